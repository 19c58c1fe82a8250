//! A memory cgroup for a benchmark's processes, to charge them exactly.
//!
//! MemAvailable moves with everything else the host does; a memory cgroup
//! counts precisely what its processes are charged: their anonymous pages,
//! page tables, kernel stacks and the kernel objects allocated for them
//! (KVM's per-VM and per-vCPU memory, io_uring rings, ...), and file pages
//! they were first to read. Works with cgroup v2 and with v1's memory
//! controller; the benchmark must be allowed to create a child group.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a cgroup could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This process's memory cgroup is not in /proc/self/cgroup.
    #[error("no memory cgroup found for this process")]
    NotFound,
    /// A cgroup file could not be read or written.
    #[error("cgroup file {0}")]
    Io(String, #[source] std::io::Error),
}

/// Memory charged to a cgroup, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    /// Everything charged, less page cache.
    pub total: u64,
    /// Of which kernel memory (slab, stacks, page tables, vmalloc, ...).
    pub kernel: u64,
}

impl Charge {
    /// The charge per process of `n`.
    pub fn per(self, n: u64) -> Self {
        Self {
            total: self.total / n.max(1),
            kernel: self.kernel / n.max(1),
        }
    }
}

/// A child memory cgroup, removed on drop.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// Creates `name` under this process's memory cgroup.
    pub fn create(name: &str) -> Result<Self, Error> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| Error::Io("/proc/self/cgroup".into(), e))?;
        let (base, v2) = locate(&own).ok_or(Error::NotFound)?;
        let dir = base.join(name);
        std::fs::create_dir(&dir).map_err(|e| Error::Io(dir.display().to_string(), e))?;
        Ok(Self { dir, v2 })
    }

    /// Makes `cmd`'s process join this group before it execs, so that all
    /// its memory is charged here.
    pub fn join_on_spawn(&self, cmd: &mut Command) {
        let procs = CString::new(self.dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .expect("cgroup paths have no NUL byte");
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe calls (open, write, close) on memory
        // allocated before the fork; "0" names the calling process.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if ok {
                    Ok(())
                } else {
                    Err(err)
                }
            });
        }
    }

    /// What the group is charged now.
    pub fn charge(&self) -> Result<Charge, Error> {
        let stat = self.read("memory.stat")?;
        let key = |k: &str| -> u64 {
            stat.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0)
        };
        if self.v2 {
            let current: u64 = self.read_number("memory.current")?;
            let file = key("file");
            Ok(Charge {
                total: current.saturating_sub(file),
                kernel: key("kernel"),
            })
        } else {
            let usage: u64 = self.read_number("memory.usage_in_bytes")?;
            let file = key("cache");
            Ok(Charge {
                total: usage.saturating_sub(file),
                kernel: self.read_number("memory.kmem.usage_in_bytes")?,
            })
        }
    }

    fn read(&self, file: &str) -> Result<String, Error> {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| Error::Io(path.display().to_string(), e))
    }

    fn read_number(&self, file: &str) -> Result<u64, Error> {
        let text = self.read(file)?;
        text.trim().parse().map_err(|_| {
            Error::Io(
                file.into(),
                std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_owned()),
            )
        })
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Fails while processes remain; the caller kills them first.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The memory cgroup directory of the process whose /proc/<pid>/cgroup is
/// `own`, and whether it is cgroup v2.
fn locate(own: &str) -> Option<(PathBuf, bool)> {
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some((Path::new("/sys/fs/cgroup/memory").join(path), false));
        }
    }
    let unified = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let unified = unified.trim_start_matches('/');
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(|root| Path::new(root).join(unified))
        .find(|dir| dir.join("memory.current").exists())
        .map(|dir| (dir, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v1_memory_controller_first() {
        let own = "9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n";
        assert_eq!(
            locate(own),
            Some((
                PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"),
                false
            ))
        );
        assert_eq!(locate("garbage"), None);
    }
}
