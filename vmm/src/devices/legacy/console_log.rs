//! The serial console's log file, capped: when it reaches its cap it is
//! renamed to `PATH.1` (replacing an older one) and a new file starts, so a
//! guest that writes without end leaves at most twice the cap on disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The cap `vmm --console-max-bytes` defaults to: 8 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;

/// Where a full console file at `path` goes: `PATH.1`.
///
/// ```
/// use vmm::devices::legacy::console_log::rotated_path;
/// assert_eq!(rotated_path("/a/7.log".as_ref()), std::path::Path::new("/a/7.log.1"));
/// ```
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Creates or truncates `path`, readable by its owner only: guest output
/// may show the app's environment.
fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// A console log file with a size cap and one rotated predecessor.
pub struct ConsoleLog {
    path: PathBuf,
    rotated: PathBuf,
    /// `None` after a failed rotation: the next write creates the file.
    file: Option<File>,
    /// Bytes in the current file.
    written: u64,
    /// The cap; 0 for none.
    max_bytes: u64,
}

impl ConsoleLog {
    /// Starts a fresh log at `path` (created or truncated, mode 0600) and
    /// removes an older `PATH.1`, which belongs to a console before this
    /// one (if it cannot be removed, the VM still starts: the first
    /// rotation replaces it). `max_bytes` 0 means no cap.
    pub fn create(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = create_private(path)?;
        let rotated = rotated_path(path);
        match std::fs::remove_file(&rotated) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(
                    "cannot remove the old console log {}: {e}",
                    rotated.display()
                );
            }
            _ => {}
        }
        Ok(Self {
            path: path.to_owned(),
            rotated,
            file: Some(file),
            written: 0,
            max_bytes,
        })
    }

    /// Moves the current file to `PATH.1` and starts a new one. When the
    /// rename fails the current file starts over instead, so the cap holds
    /// either way.
    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            if std::fs::rename(&self.path, &self.rotated).is_err() {
                file.set_len(0)?;
                file.seek(SeekFrom::Start(0))?;
                self.file = Some(file);
                self.written = 0;
                return Ok(());
            }
        }
        self.file = Some(create_private(&self.path)?);
        self.written = 0;
        Ok(())
    }
}

impl Write for ConsoleLog {
    /// Writes what fits under the cap (rotating first when the file is
    /// full): a write may be short, never over the cap.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let full = self.max_bytes > 0 && self.written >= self.max_bytes;
        if full || self.file.is_none() {
            self.rotate()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("the console log has no file"));
        };
        let room = if self.max_bytes == 0 {
            buf.len()
        } else {
            usize::try_from(self.max_bytes - self.written)
                .unwrap_or(usize::MAX)
                .min(buf.len())
        };
        let n = file.write(&buf[..room])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    }

    /// A guest writing 100 times the cap leaves the cap's worth in `PATH.1`
    /// and at most that in `PATH`: together the newest output, in order,
    /// owner-only whatever the umask.
    #[test]
    fn a_guest_writing_past_the_cap_leaves_at_most_two_capped_files() {
        // SAFETY: umask(2) only sets this process's file mode mask; 022 is
        // the usual default, so other tests running now are unaffected.
        unsafe { libc::umask(0o022) };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("7.log");
        let rotated = rotated_path(&path);
        std::fs::write(&rotated, "an older console").expect("write");
        let cap = 1000;
        let mut log = io::LineWriter::new(ConsoleLog::create(&path, cap).expect("create"));
        assert!(!rotated.exists(), "a fresh console starts a fresh log");
        let mut all = Vec::new();
        let mut i = 0;
        while all.len() < 100 * 1000 {
            let line = format!("line {i}\n");
            log.write_all(line.as_bytes()).expect("write");
            all.extend_from_slice(line.as_bytes());
            i += 1;
        }
        log.flush().expect("flush");
        let old = std::fs::read(&rotated).expect("PATH.1");
        let current = std::fs::read(&path).expect("PATH");
        assert_eq!(old.len() as u64, cap);
        assert!(current.len() as u64 <= cap);
        assert!(all.ends_with(&[old, current].concat()));
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&rotated), 0o600);
    }

    /// When `PATH.1` cannot be replaced (here a non-empty folder sits
    /// there), the file starts over instead: the cap still holds and the
    /// newest output is kept.
    #[test]
    fn a_failed_rotation_starts_the_file_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("1.log");
        let rotated = rotated_path(&path);
        std::fs::create_dir(&rotated).expect("mkdir");
        std::fs::write(rotated.join("x"), "").expect("write");
        let mut log = ConsoleLog::create(&path, 10).expect("a stale PATH.1 does not stop the VM");
        log.write_all(b"0123456789abcdefghij-tail").expect("write");
        assert_eq!(std::fs::read(&path).expect("PATH"), b"-tail");
        assert!(rotated.join("x").exists());
    }

    #[test]
    fn no_cap_keeps_everything_in_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("boot.log");
        let mut log = ConsoleLog::create(&path, 0).expect("create");
        let text = vec![b'x'; 100_000];
        log.write_all(&text).expect("write");
        assert_eq!(std::fs::read(&path).expect("PATH"), text);
        assert!(!rotated_path(&path).exists());
    }
}
