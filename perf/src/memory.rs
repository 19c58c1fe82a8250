//! Per-process memory from /proc: proportional (PSS) and private (USS)
//! bytes, split between the guest memory mapping and the rest of the VMM.

use std::path::Path;

/// Memory of one VMM process, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// PSS of the guest memory mapping (the snapshot file).
    pub guest_pss: u64,
    /// Private (dirty or clean) bytes of the guest memory mapping.
    pub guest_private: u64,
    /// PSS of everything else (VMM heap, stacks, binary, libraries).
    pub vmm_pss: u64,
    /// Private bytes of everything else.
    pub vmm_private: u64,
}

/// Sums /proc/<pid>/smaps, attributing mappings of `guest_file` to the guest.
pub fn process_memory(pid: u32, guest_file: &Path) -> std::io::Result<ProcessMemory> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    parse_smaps(&smaps, &guest_file.to_string_lossy())
}

fn kib(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Parses smaps text; mappings whose path is `guest_file` count as guest.
pub fn parse_smaps(smaps: &str, guest_file: &str) -> std::io::Result<ProcessMemory> {
    let mut m = ProcessMemory::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_guest = line.split_whitespace().nth(5) == Some(guest_file);
            continue;
        }
        let (pss, private) = match first {
            "Pss:" => (kib(line), 0),
            "Private_Clean:" | "Private_Dirty:" => (0, kib(line)),
            _ => continue,
        };
        if in_guest {
            m.guest_pss += pss;
            m.guest_private += private;
        } else {
            m.vmm_pss += pss;
            m.vmm_private += private;
        }
    }
    Ok(m)
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    Ok(meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .map(kib)
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_guest_mapping_from_the_rest() {
        let smaps = "\
7f0000000000-7f0004000000 rw-p 00001000 fe:00 123 /tmp/app.snap
Rss:                1000 kB
Pss:                 250 kB
Private_Clean:         0 kB
Private_Dirty:        40 kB
55d000000000-55d000100000 r-xp 00000000 fe:00 456 /usr/bin/vmm
Pss:                 100 kB
Private_Clean:        20 kB
Private_Dirty:        30 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Pss:                   8 kB
Private_Dirty:         8 kB
";
        let m = parse_smaps(smaps, "/tmp/app.snap").expect("parses");
        assert_eq!(m.guest_pss, 250 * 1024);
        assert_eq!(m.guest_private, 40 * 1024);
        assert_eq!(m.vmm_pss, 108 * 1024);
        assert_eq!(m.vmm_private, 58 * 1024);
    }
}
