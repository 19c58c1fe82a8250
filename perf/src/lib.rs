//! little.cloud benchmarks: shared helpers for the `boot-time` tool and the
//! criterion benches.

pub mod cgroup;
pub mod memory;

use std::path::PathBuf;
use std::time::Duration;

/// The repository's target directory (`CARGO_TARGET_DIR` or `<repo>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The guest kernel: `LITTLE_VMLINUX` or the one `guest-kernel/build.sh` linked.
pub fn default_kernel() -> PathBuf {
    std::env::var_os("LITTLE_VMLINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest-kernel/vmlinux"))
}

/// Minimum, median and maximum of `samples` (which must not be empty).
pub fn summary(samples: &[Duration]) -> Option<(Duration, Duration, Duration)> {
    let mut s = samples.to_vec();
    s.sort();
    Some((*s.first()?, s[s.len() / 2], *s.last()?))
}

/// A percentile (0..=100) by nearest rank.
pub fn percentile(samples: &[Duration], p: u32) -> Option<Duration> {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return None;
    }
    let rank = (usize::try_from(p).ok()? * s.len()).div_ceil(100).max(1);
    s.get(rank - 1).copied()
}

/// The `little` binary next to the running bench (`target/release`).
pub fn little() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("little")))
        .unwrap_or_else(|| PathBuf::from("little"))
}

/// A free TCP port on 127.0.0.1 (`fallback` if none could be found).
pub fn free_port(fallback: u16) -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(fallback)
}

/// A `little serve` the bench started, killed when dropped.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_percentiles() {
        let ms = |v: u64| Duration::from_millis(v);
        let s = [ms(5), ms(1), ms(3)];
        assert_eq!(summary(&s), Some((ms(1), ms(3), ms(5))));
        assert_eq!(summary(&[]), None);
        let hundred: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&hundred, 50), Some(ms(50)));
        assert_eq!(percentile(&hundred, 99), Some(ms(99)));
        assert_eq!(percentile(&hundred, 100), Some(ms(100)));
        assert_eq!(percentile(&[], 50), None);
    }
}
