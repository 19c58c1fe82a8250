//! Boot knobs read from the kernel command line (`/proc/cmdline`).
//!
//! The kernel keeps dotted parameters such as `little.config=` for itself
//! (it takes them for module parameters) instead of handing them to init,
//! so the agent reads `/proc/cmdline` after mounting `/proc`.
//!
//! | parameter | meaning |
//! |---|---|
//! | `little.config=<path>` | configuration file (default `/little/agent.conf`) |
//! | `little.nested=1` | the guest runs on a nested host that saves only FXSAVE state: keep glibc off AVX |
//! | `little.verbose=1` | print progress, as the config's `verbose=1` does, but from the start |
//!
//! The last occurrence of a parameter wins. Words are split on spaces,
//! tabs and newlines; a double-quoted stretch keeps its spaces, as the
//! kernel's own parser does.

/// Default configuration path.
pub const DEFAULT_CONFIG_PATH: &[u8] = b"/little/agent.conf";
/// Longest accepted `little.config=` value (the kernel's PATH_MAX is 4096,
/// but the whole command line is 2048 bytes on x86).
pub const MAX_CONFIG_PATH_LEN: usize = 255;

/// Knobs from the kernel command line, borrowing from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootOptions<'a> {
    /// Path of the configuration file.
    pub config_path: &'a [u8],
    /// `little.nested=1`: disable glibc's AVX code paths.
    pub nested: bool,
    /// `little.verbose=1`: verbose from the start.
    pub verbose: bool,
}

impl Default for BootOptions<'_> {
    fn default() -> Self {
        Self {
            config_path: DEFAULT_CONFIG_PATH,
            nested: false,
            verbose: false,
        }
    }
}

impl<'a> BootOptions<'a> {
    /// Parses the command line; unknown words and malformed values are
    /// ignored (the kernel command line also carries the kernel's own
    /// parameters), leaving the default in place.
    ///
    /// ```
    /// use guest_agent::cmdline::BootOptions;
    /// let o = BootOptions::parse(b"console=ttyS0 reboot=k little.nested=1 little.config=/c\n");
    /// assert_eq!(o.config_path, b"/c");
    /// assert!(o.nested);
    /// ```
    pub fn parse(cmdline: &'a [u8]) -> Self {
        let mut options = Self::default();
        for word in Words(cmdline) {
            let (key, value) = match word.iter().position(|&b| b == b'=') {
                Some(i) => (&word[..i], Some(strip_quotes(&word[i + 1..]))),
                None => (word, None),
            };
            match key {
                b"little.config" => {
                    if let Some(path) = value.filter(|p| is_config_path(p)) {
                        options.config_path = path;
                    }
                }
                b"little.nested" => options.nested = flag(value, options.nested),
                b"little.verbose" => options.verbose = flag(value, options.verbose),
                _ => {}
            }
        }
        options
    }
}

fn is_config_path(path: &[u8]) -> bool {
    path.first() == Some(&b'/') && path.len() <= MAX_CONFIG_PATH_LEN && !path.contains(&0)
}

/// `x`, `x=1` set the flag, `x=0` clears it, anything else keeps `current`.
fn flag(value: Option<&[u8]>, current: bool) -> bool {
    match value {
        None | Some(b"1") => true,
        Some(b"0") => false,
        Some(_) => current,
    }
}

/// Whitespace-separated words; double quotes group, and are dropped when
/// they wrap the whole word.
pub(crate) struct Words<'a>(pub(crate) &'a [u8]);

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0);
        let start = self.0.iter().position(|b| !is_space(b))?;
        let rest = &self.0[start..];
        let mut in_quotes = false;
        let mut end = rest.len();
        for (i, b) in rest.iter().enumerate() {
            if *b == b'"' {
                in_quotes = !in_quotes;
            } else if !in_quotes && is_space(b) {
                end = i;
                break;
            }
        }
        let word = &rest[..end];
        self.0 = &rest[end..];
        Some(strip_quotes(word))
    }
}

/// Drops one pair of surrounding double quotes, as the kernel does for
/// `"word"` and for the value of `key="value"`.
pub(crate) fn strip_quotes(word: &[u8]) -> &[u8] {
    match word {
        [b'"', inner @ .., b'"'] => inner,
        _ => word,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_knobs() {
        let o = BootOptions::parse(b"console=ttyS0 reboot=k panic=-1 quiet\n");
        assert_eq!(o, BootOptions::default());
        assert_eq!(o.config_path, b"/little/agent.conf");
    }

    #[test]
    fn knobs_are_read_anywhere_and_last_wins() {
        let o = BootOptions::parse(
            b"little.config=/a little.nested=1 root=/dev/vda -- little.config=/b\tlittle.verbose",
        );
        assert_eq!(o.config_path, b"/b");
        assert!(o.nested);
        assert!(o.verbose);
        let o = BootOptions::parse(b"little.nested=1 little.nested=0");
        assert!(!o.nested);
    }

    #[test]
    fn malformed_values_keep_defaults() {
        let o = BootOptions::parse(b"little.config= little.config=relative little.nested=yes");
        assert_eq!(o.config_path, DEFAULT_CONFIG_PATH);
        assert!(!o.nested);
        let long = [b"little.config=/".as_slice(), &[b'a'; MAX_CONFIG_PATH_LEN]].concat();
        assert_eq!(BootOptions::parse(&long).config_path, DEFAULT_CONFIG_PATH);
    }

    #[test]
    fn similar_names_do_not_match() {
        let o = BootOptions::parse(b"xlittle.nested=1 little.nestedx=1 little.nested.x=1");
        assert!(!o.nested);
    }

    #[test]
    fn quoted_words_keep_spaces() {
        let words: Vec<&[u8]> = Words(b"  a \"b c\" d=\"e f\"  g ").collect();
        assert_eq!(words, [&b"a"[..], b"b c", b"d=\"e f\"", b"g"]);
        let o = BootOptions::parse(b"little.config=\"/my dir/c\"");
        assert_eq!(o.config_path, b"/my dir/c");
    }

    #[test]
    fn empty_and_blank_lines() {
        assert_eq!(Words(b"").count(), 0);
        assert_eq!(Words(b" \n\t ").count(), 0);
        assert_eq!(BootOptions::parse(b""), BootOptions::default());
    }
}
