//! An app's console logs, streamed: every VM of the app writes its
//! console to `<app dir>/logs/<name>/console.log` (`boot` for the first
//! boot, the instance number for instances; the folder is the one its jail
//! shows it as `/log`), which its `vmm` renames to `console.log.1` at the
//! cap and starts again. [`Logs`] reads them in
//! chunks, never a whole file at once: each log's `.1` then its current
//! file, the first boot before the instances in the order they started,
//! each under a `==> name <==` header; then, when following, what is
//! added, across rotations (like `tail -F`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How much is read (and written) at once.
pub const CHUNK: usize = 64 * 1024;

/// A file's identity: (device, inode).
type Identity = (u64, u64);

fn identity(meta: &std::fs::Metadata) -> Identity {
    (meta.dev(), meta.ino())
}

/// The order logs are shown in: the first boot, then instances by number.
fn order(name: &str) -> (bool, u64, String) {
    (
        name != "boot",
        name.parse().unwrap_or(u64::MAX),
        name.to_owned(),
    )
}

/// The current file of one VM's log, as far as it was read.
struct Followed {
    file: File,
    id: Identity,
    offset: u64,
}

/// An app's logs folder being read.
pub struct Logs {
    dir: PathBuf,
    /// Every log seen, by its order; `None` while its current file is
    /// missing.
    seen: BTreeMap<(bool, u64, String), Option<Followed>>,
    /// The log whose bytes were written last.
    last: Option<String>,
    /// Whether the last byte written was a newline (or nothing was).
    at_line_start: bool,
    buf: Vec<u8>,
}

impl Logs {
    /// A reader of the logs in `dir` that has shown nothing yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            seen: BTreeMap::new(),
            last: None,
            at_line_start: true,
            buf: vec![0; CHUNK],
        }
    }

    /// Writes to `out` what was not shown yet: a log seen for the first
    /// time from its beginning (`.1` first), the others from where the
    /// last call stopped, picking up a rotated or replaced file. Fails only
    /// when `out` does: a log that cannot be read is skipped.
    pub fn poll(&mut self, out: &mut impl Write) -> io::Result<()> {
        for name in self.names() {
            let key = order(&name);
            let current = current(&self.dir, &name);
            let rotated = rotated(&self.dir, &name);
            match self.seen.remove(&key) {
                None => {
                    self.copy_whole(&name, &rotated, None, out)?;
                    let followed = self.open_and_copy(&name, &current, out)?;
                    self.seen.insert(key, followed);
                }
                Some(Some(mut followed)) => {
                    self.copy_from(&name, &mut followed, out)?;
                    let now = std::fs::metadata(&current).ok();
                    let replaced = now.as_ref().is_some_and(|m| identity(m) != followed.id);
                    if replaced {
                        // Rotated more than once since the last call: the
                        // file in between is `.1` now.
                        self.copy_whole(&name, &rotated, Some(followed.id), out)?;
                        let next = self.open_and_copy(&name, &current, out)?;
                        self.seen.insert(key, next);
                    } else {
                        if now.is_some_and(|m| m.len() < followed.offset) {
                            // Truncated in place: start it over.
                            followed.offset = 0;
                            self.copy_from(&name, &mut followed, out)?;
                        }
                        self.seen.insert(key, Some(followed));
                    }
                }
                Some(None) => {
                    let followed = self.open_and_copy(&name, &current, out)?;
                    self.seen.insert(key, followed);
                }
            }
        }
        Ok(())
    }

    /// The logs in the folder, in order.
    fn names(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort_by_key(|n| order(n));
        names.dedup();
        names
    }

    /// Opens `path` and copies it from the start; `None` when it is
    /// missing.
    fn open_and_copy(
        &mut self,
        name: &str,
        path: &Path,
        out: &mut impl Write,
    ) -> io::Result<Option<Followed>> {
        let Some((file, id)) = open(path) else {
            return Ok(None);
        };
        let mut followed = Followed {
            file,
            id,
            offset: 0,
        };
        self.copy_from(name, &mut followed, out)?;
        Ok(Some(followed))
    }

    /// Copies all of `path` unless it is the file `except`.
    fn copy_whole(
        &mut self,
        name: &str,
        path: &Path,
        except: Option<Identity>,
        out: &mut impl Write,
    ) -> io::Result<()> {
        match open(path) {
            Some((file, id)) if Some(id) != except => {
                let mut whole = Followed {
                    file,
                    id,
                    offset: 0,
                };
                self.copy_from(name, &mut whole, out)
            }
            _ => Ok(()),
        }
    }

    /// Copies `followed` from its offset to its end, chunk by chunk.
    fn copy_from(
        &mut self,
        name: &str,
        followed: &mut Followed,
        out: &mut impl Write,
    ) -> io::Result<()> {
        if followed
            .file
            .seek(SeekFrom::Start(followed.offset))
            .is_err()
        {
            return Ok(());
        }
        loop {
            let n = match followed.file.read(&mut self.buf) {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            followed.offset += n as u64;
            if self.last.as_deref() != Some(name) {
                let sep = if self.at_line_start { "" } else { "\n" };
                writeln!(out, "{sep}==> {name} <==")?;
                self.last = Some(name.to_owned());
            }
            out.write_all(&self.buf[..n])?;
            self.at_line_start = self.buf[n - 1] == b'\n';
        }
    }

    /// Ends the output on a line of its own (for a reader that stops).
    pub fn finish(&mut self, out: &mut impl Write) -> io::Result<()> {
        if !self.at_line_start {
            out.write_all(b"\n")?;
            self.at_line_start = true;
        }
        out.flush()
    }
}

/// The current console file of the VM `name` in the logs folder `dir`.
pub fn current(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join(crate::jail::CONSOLE)
}

/// The rotated console file of the VM `name` in the logs folder `dir`.
pub fn rotated(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join(format!("{}.1", crate::jail::CONSOLE))
}

/// Removes the console logs (`<id>/`, with its current and rotated file) of instances
/// other than the newest `keep` and those in `live`, so an app that wakes
/// again and again keeps a bounded number of logs (each capped by its
/// `vmm`); the first boot's log stays.
pub fn prune(dir: &Path, keep: usize, live: &[u64]) {
    let mut ids = instance_ids(dir);
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids.dedup();
    for id in ids.into_iter().skip(keep).filter(|id| !live.contains(id)) {
        let _ = std::fs::remove_dir_all(dir.join(id.to_string()));
    }
}

/// The instance ids that have a log folder in `dir`.
fn instance_ids(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok()?.parse().ok())
        .collect()
}

/// The highest instance id with a log in `dir` (0: none), so that a
/// restarted daemon numbers its instances after it and never writes over
/// an old instance's log.
pub fn highest_id(dir: &Path) -> u64 {
    instance_ids(dir).into_iter().max().unwrap_or(0)
}

fn open(path: &Path) -> Option<(File, Identity)> {
    let file = File::open(path).ok()?;
    let id = identity(&file.metadata().ok()?);
    Some((file, id))
}

/// The last `max` bytes of the file at `path` (lossy UTF-8), reading only
/// those; empty when it cannot be read.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(max).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Where the log tests call `<name>.log` (or `<name>.log.1`) lives in the
/// logs folder `dir`: `<name>/console.log` (`.1`), its folder made.
#[cfg(test)]
pub(crate) fn test_path(dir: &Path, file: &str) -> PathBuf {
    let (name, is_rotated) = match file.strip_suffix(".log.1") {
        Some(name) => (name, true),
        None => (file.strip_suffix(".log").expect("a .log name"), false),
    };
    std::fs::create_dir_all(dir.join(name)).expect("the VM's log folder");
    if is_rotated {
        rotated(dir, name)
    } else {
        current(dir, name)
    }
}

#[cfg(test)]
#[path = "logs_tests.rs"]
mod tests;
