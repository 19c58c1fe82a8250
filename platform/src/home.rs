//! The daemon's home folder: one daemon per home, and owner-only modes
//! for everything the daemon creates in it, whatever umask it started
//! with.
//!
//! The home holds what must not leak: the state database (the apps'
//! `--env` values), snapshots (guest memory, the same values in the
//! clear), agent initramfs files (the agent config, again the values) and
//! console logs. So the home is `0700`, every file the daemon creates is
//! `0600`, and the daemon's umask is `077`, which its children (`vmm`,
//! image conversion) inherit for the files they create. Ownership is left
//! alone: whoever runs a `vmm` under another uid gives it its files.
//!
//! [`HomeLock::claim`] takes an exclusive `flock` on `<home>/lock` before
//! the daemon touches anything else, and holds it for the daemon's life: a
//! second daemon on the same home stops with the first one's pid, before
//! it could kill the first one's VMMs or replace its socket.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every folder the daemon creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the daemon creates.
pub const FILE_MODE: u32 = 0o600;
/// The lock file's name in the home.
pub const LOCK_FILE: &str = "lock";

/// Errors claiming a home.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// Another daemon holds the home's lock.
    #[error("another daemon serves {home} (pid {pid})")]
    Taken {
        /// The home.
        home: String,
        /// The holder's pid as it wrote it, or `unknown`.
        pid: String,
    },
    /// A folder, the lock file or a mode could not be set up.
    #[error("cannot set up {0}")]
    Io(String, #[source] io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HomeError + '_ {
    move |e| HomeError::Io(path.display().to_string(), e)
}

/// Makes this process's umask `077`: files it and its children create
/// without an explicit mode are owner-only.
pub fn private_umask() {
    // SAFETY: umask(2) only replaces the process's file mode creation
    // mask; it takes no pointer and cannot fail.
    unsafe { libc::umask(0o077) };
}

/// Creates `dir` and its missing parents with mode [`DIR_MODE`]; `dir`
/// itself ends up with exactly that mode, whatever the umask.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Creates (or truncates) the file at `path` with mode [`FILE_MODE`],
/// whatever the umask; an existing file is brought to that mode too.
pub fn create_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Brings the existing file at `path` to mode [`FILE_MODE`], creating it
/// empty (with that mode) if it is missing; its contents are kept.
pub fn private_file(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))
}

/// The exclusive claim on a home, held as long as this value lives.
///
/// The lock file is opened close-on-exec (as Rust opens every file), so
/// the `vmm` processes the daemon starts do not inherit the lock: a
/// daemon that was killed frees its home even while its VMMs live on
/// (the next daemon stops them).
#[derive(Debug)]
pub struct HomeLock {
    /// Holds the `flock`; closing it releases the lock.
    _file: File,
    home: PathBuf,
}

impl HomeLock {
    /// Claims `home` for this process: creates it (mode [`DIR_MODE`]) if
    /// missing, takes the lock without waiting, and only then sets the
    /// home's mode and writes this process's pid into the lock file. When
    /// another daemon holds the lock it fails with that daemon's pid and
    /// has changed nothing.
    pub fn claim(home: &Path) -> Result<Self, HomeError> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(home)
            .map_err(io_err(home))?;
        let path = home.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(io_err(&path))?;
        if !try_lock(&file).map_err(io_err(&path))? {
            let mut text = String::new();
            let _ = (&file).take(32).read_to_string(&mut text);
            let pid = match text.trim() {
                "" => "unknown".to_owned(),
                pid => pid.to_owned(),
            };
            return Err(HomeError::Taken {
                home: home.display().to_string(),
                pid,
            });
        }
        std::fs::set_permissions(home, Permissions::from_mode(DIR_MODE)).map_err(io_err(home))?;
        file.set_permissions(Permissions::from_mode(FILE_MODE))
            .and_then(|()| file.set_len(0))
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io_err(&path))?;
        Ok(Self {
            _file: file,
            home: home.to_owned(),
        })
    }

    /// The claimed home.
    pub fn home(&self) -> &Path {
        &self.home
    }
}

/// Takes an exclusive `flock` on `file` without waiting: false when
/// another open file description holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock(2) on a descriptor `file` keeps open for the
        // duration of the call; it touches no memory of this process.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(false),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Under the usual umask 022 (which would give 0755 and 0644), the
    /// home, the lock file and everything made with the helpers are
    /// owner-only.
    #[test]
    fn a_claimed_home_and_its_files_are_owner_only_under_umask_022() {
        // SAFETY: umask(2) only sets this process's file mode mask; 022 is
        // the usual default, so other tests running now are unaffected.
        unsafe { libc::umask(0o022) };
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, Permissions::from_mode(0o755)).unwrap();
        let lock = HomeLock::claim(&home).unwrap();
        assert_eq!(lock.home(), home);
        assert_eq!(mode(&home), 0o700, "an existing home is tightened");
        assert_eq!(mode(&home.join(LOCK_FILE)), 0o600);

        let logs = home.join("apps/web/logs");
        create_dir_all(&logs).unwrap();
        for d in ["apps", "apps/web", "apps/web/logs"] {
            assert_eq!(mode(&home.join(d)), 0o700, "{d}");
        }
        let cpio = home.join("apps/web/agent.cpio");
        std::fs::write(&cpio, "old").unwrap();
        std::fs::set_permissions(&cpio, Permissions::from_mode(0o644)).unwrap();
        create_file(&cpio).unwrap().write_all(b"env=A=1").unwrap();
        assert_eq!(mode(&cpio), 0o600, "a file made earlier is tightened");
        let db = home.join("state.redb");
        std::fs::write(&db, "kept").unwrap();
        std::fs::set_permissions(&db, Permissions::from_mode(0o644)).unwrap();
        private_file(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        assert_eq!(std::fs::read_to_string(&db).unwrap(), "kept");
    }

    /// A second claim while the first is held fails with the holder's pid
    /// and leaves the lock file and the home's mode as they were; once
    /// the first is dropped the home can be claimed again.
    #[test]
    fn a_second_claim_names_the_holder_and_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let first = HomeLock::claim(&home).unwrap();
        let pid = std::process::id().to_string();
        let lock_file = home.join(LOCK_FILE);
        assert_eq!(std::fs::read_to_string(&lock_file).unwrap().trim(), pid);
        // Someone loosened the home: a refused claim must not change it.
        std::fs::set_permissions(&home, Permissions::from_mode(0o750)).unwrap();

        let err = HomeLock::claim(&home).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("another daemon serves {} (pid {pid})", home.display())
        );
        assert_eq!(mode(&home), 0o750);
        assert_eq!(std::fs::read_to_string(&lock_file).unwrap().trim(), pid);

        drop(first);
        let again = HomeLock::claim(&home).unwrap();
        assert_eq!(mode(&home), 0o700);
        drop(again);
    }
}
