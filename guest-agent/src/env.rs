//! The entrypoint's environment and the `execvp`-style program lookup.

use alloc::vec::Vec;

/// `PATH` used for the lookup, and added to the environment, when the
/// configuration sets none (the value Docker and runc use).
pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Added on nested hosts (`little.nested=1`) when the configuration has no
/// `GLIBC_TUNABLES`. Such a host saves only the FXSAVE state of guest
/// tasks while user-mode CPUID still advertises AVX, so glibc must not use
/// AVX (its string functions would) nor XSAVE/XSAVEC (the lazy-binding
/// trampoline would): with both XSAVE and XSAVEC off, glibc >= 2.34 also
/// turns off AVX, AVX2, AVX-512, FMA and friends and saves registers with
/// FXSAVE. The `*_Usable` names do the same for glibc 2.26 to 2.32, and
/// glibc ignores names it does not know.
pub const NESTED_GLIBC_TUNABLES: &[u8] = b"GLIBC_TUNABLES=glibc.cpu.hwcaps=\
-XSAVEC,-XSAVE,-AVX,-AVX2,-AVX512F,-AVX_Usable,-AVX2_Usable,-AVX512F_Usable,\
-AVX_Fast_Unaligned_Load";

/// Longest path `execve` accepts (PATH_MAX, including the NUL).
pub const PATH_MAX: usize = 4096;

/// The `KEY` of a `KEY=VALUE` entry (the whole entry when it has no `=`).
pub fn key_of(entry: &[u8]) -> &[u8] {
    match entry.iter().position(|&b| b == b'=') {
        Some(i) => &entry[..i],
        None => entry,
    }
}

/// The value of `key` in `env`, if set.
pub fn lookup<'a>(env: &'a [Vec<u8>], key: &[u8]) -> Option<&'a [u8]> {
    env.iter()
        .rev()
        .find(|entry| key_of(entry) == key)
        .map(|entry| entry.get(key.len() + 1..).unwrap_or_default())
}

/// Builds the entrypoint's environment from the configuration's entries:
/// a repeated key keeps its last value (at the place of its first
/// occurrence), `PATH` defaults to [`DEFAULT_PATH`], and on nested hosts
/// [`NESTED_GLIBC_TUNABLES`] is added unless the configuration sets
/// `GLIBC_TUNABLES` itself.
///
/// ```
/// use guest_agent::env::build_env;
/// let env = build_env(&[b"A=1".to_vec(), b"PATH=/bin".to_vec(), b"A=2".to_vec()], false);
/// assert_eq!(env, [b"A=2".to_vec(), b"PATH=/bin".to_vec()]);
/// ```
pub fn build_env(config_env: &[Vec<u8>], nested: bool) -> Vec<Vec<u8>> {
    let mut env: Vec<Vec<u8>> = Vec::with_capacity(config_env.len() + 2);
    for entry in config_env {
        let key = key_of(entry);
        match env.iter_mut().find(|e| key_of(e) == key) {
            Some(existing) => existing.clone_from(entry),
            None => env.push(entry.clone()),
        }
    }
    if lookup(&env, b"PATH").is_none() {
        env.push([b"PATH=".as_slice(), DEFAULT_PATH].concat());
    }
    if nested && lookup(&env, b"GLIBC_TUNABLES").is_none() {
        env.push(NESTED_GLIBC_TUNABLES.to_vec());
    }
    env
}

/// The paths `execve` should try, in order, to run `program` the way
/// `execvp` does: `program` itself when it contains a slash, otherwise
/// each `PATH` directory joined with it (an empty directory means the
/// working directory). Candidates too long for the kernel are skipped.
///
/// ```
/// use guest_agent::env::exec_candidates;
/// assert_eq!(exec_candidates(b"sh", b"/bin:/usr/bin"), [b"/bin/sh".to_vec(), b"/usr/bin/sh".to_vec()]);
/// assert_eq!(exec_candidates(b"./x", b"/bin"), [b"./x".to_vec()]);
/// ```
pub fn exec_candidates(program: &[u8], path: &[u8]) -> Vec<Vec<u8>> {
    if program.contains(&b'/') {
        return alloc::vec![program.to_vec()];
    }
    path.split(|&b| b == b':')
        .map(|dir| {
            if dir.is_empty() {
                program.to_vec()
            } else if dir.ends_with(b"/") {
                [dir, program].concat()
            } else {
                [dir, b"/", program].concat()
            }
        })
        .filter(|candidate| candidate.len() < PATH_MAX)
        .collect()
}

/// Tracks `execve` failures across [`exec_candidates`] with `execvp`'s
/// rules: a missing file moves on to the next directory, a permission error
/// is remembered but also moves on, anything else stops the search.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExecSearch {
    saw_eacces: bool,
    last: i32,
}

/// Errno values the search cares about (x86-64 Linux).
pub mod errno {
    /// No such file or directory.
    pub const ENOENT: i32 = 2;
    /// Permission denied.
    pub const EACCES: i32 = 13;
    /// A path component is not a directory.
    pub const ENOTDIR: i32 = 20;
    /// Too many levels of symbolic links.
    pub const ELOOP: i32 = 40;
    /// File name too long.
    pub const ENAMETOOLONG: i32 = 36;
}

impl ExecSearch {
    /// Records a failed `execve`; returns whether to try the next
    /// candidate.
    pub fn failed(&mut self, err: i32) -> bool {
        self.last = err;
        if err == errno::EACCES {
            self.saw_eacces = true;
        }
        moves_on(err)
    }

    /// The errno to report once the search is over: the error that stopped
    /// it, else EACCES if a candidate existed but could not be run, else the
    /// last error (ENOENT when there was no candidate at all).
    pub fn errno(&self) -> i32 {
        if self.last == 0 {
            errno::ENOENT
        } else if moves_on(self.last) && self.saw_eacces {
            errno::EACCES
        } else {
            self.last
        }
    }
}

fn moves_on(err: i32) -> bool {
    matches!(
        err,
        errno::ENOENT | errno::ENOTDIR | errno::ELOOP | errno::ENAMETOOLONG | errno::EACCES
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&[u8]]) -> Vec<Vec<u8>> {
        items.iter().map(|i| i.to_vec()).collect()
    }

    #[test]
    fn env_keeps_order_last_value_wins_and_adds_path() {
        let env = build_env(&v(&[b"B=1", b"A=x", b"B=2", b"EMPTY="]), false);
        assert_eq!(
            env,
            v(&[
                b"B=2",
                b"A=x",
                b"EMPTY=",
                b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ])
        );
    }

    #[test]
    fn nested_adds_tunables_unless_configured() {
        let env = build_env(&v(&[b"PATH=/bin"]), true);
        assert_eq!(env, v(&[b"PATH=/bin", NESTED_GLIBC_TUNABLES]));
        let own = build_env(
            &v(&[b"PATH=/bin", b"GLIBC_TUNABLES=glibc.malloc.check=3"]),
            true,
        );
        assert_eq!(
            own,
            v(&[b"PATH=/bin", b"GLIBC_TUNABLES=glibc.malloc.check=3"])
        );
        assert_eq!(lookup(&build_env(&[], false), b"GLIBC_TUNABLES"), None);
    }

    #[test]
    fn nested_tunables_use_names_glibc_knows() {
        let value = NESTED_GLIBC_TUNABLES
            .strip_prefix(b"GLIBC_TUNABLES=glibc.cpu.hwcaps=")
            .unwrap();
        // glibc's parser wants "-NAME" items separated by single commas.
        for item in value.split(|&b| b == b',') {
            assert!(item.len() > 1 && item[0] == b'-', "{item:?}");
            assert!(item[1..]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_'));
        }
        for needed in [&b"-XSAVEC"[..], b"-XSAVE", b"-AVX", b"-AVX2", b"-AVX512F"] {
            assert!(
                value.split(|&b| b == b',').any(|i| i == needed),
                "{needed:?}"
            );
        }
    }

    #[test]
    fn lookup_finds_values_and_empty_values() {
        let env = v(&[b"A=1", b"E=", b"AB=2"]);
        assert_eq!(lookup(&env, b"A"), Some(&b"1"[..]));
        assert_eq!(lookup(&env, b"E"), Some(&b""[..]));
        assert_eq!(lookup(&env, b"AB"), Some(&b"2"[..]));
        assert_eq!(lookup(&env, b"B"), None);
    }

    #[test]
    fn candidates_follow_execvp() {
        assert_eq!(
            exec_candidates(b"redis-server", b"/usr/local/bin/::/bin"),
            v(&[
                b"/usr/local/bin/redis-server",
                b"redis-server",
                b"/bin/redis-server"
            ])
        );
        assert_eq!(exec_candidates(b"/abs/prog", b"/bin"), v(&[b"/abs/prog"]));
        assert_eq!(exec_candidates(b"rel/prog", b"/bin"), v(&[b"rel/prog"]));
        assert_eq!(exec_candidates(b"x", b""), v(&[b"x"]));
        let long_dir = [b'/'; PATH_MAX];
        let mut path = long_dir.to_vec();
        path.extend_from_slice(b":/ok");
        assert_eq!(exec_candidates(b"x", &path), v(&[b"/ok/x"]));
    }

    #[test]
    fn exec_search_reports_like_execvp() {
        let mut s = ExecSearch::default();
        assert!(s.failed(errno::ENOENT));
        assert!(s.failed(errno::ENOTDIR));
        assert_eq!(s.errno(), errno::ENOTDIR);

        let mut s = ExecSearch::default();
        assert!(s.failed(errno::EACCES));
        assert!(s.failed(errno::ENOENT));
        assert_eq!(s.errno(), errno::EACCES);

        let mut s = ExecSearch::default();
        assert!(!s.failed(8)); // ENOEXEC stops the search
        assert_eq!(s.errno(), 8);

        assert_eq!(ExecSearch::default().errno(), errno::ENOENT);
    }
}
