//! A cgroup per instance: memory, pids and CPU limits, and the handle the
//! daemon finds its instances by (never by their command lines).
//!
//! The daemon's groups live under `little-<tag>` (the tag names the home)
//! inside the daemon's own cgroup, in the unified (v2) hierarchy when the
//! host has one with these controllers, else in the v1 `memory`, `pids` and
//! `cpu` hierarchies. Each instance's `vmm` joins its group before it forks
//! the jailed VMM (`vmm --jail-cgroup`), so every thread it starts is in it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of the cgroup tree.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable hierarchy was found.
    #[error("no cgroup hierarchy with the memory, pids and cpu controllers is mounted and writable ({0})")]
    Unavailable(String),
    /// A cgroup file or folder could not be written.
    #[error("cannot write {0}")]
    Write(String, #[source] std::io::Error),
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|e| CgroupError::Write(path.display().to_string(), e))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Write(path.display().to_string(), e)),
    }
}

/// What an instance may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory (guest memory, the VMM's own, page cache), bytes.
    pub memory_bytes: u64,
    /// Tasks (threads count).
    pub pids: u64,
    /// CPU weight, 1-10000, 100 is the default share (cgroup v2's scale;
    /// v1 `cpu.shares` gets weight × 1024 / 100).
    pub cpu_weight: u64,
}

/// Which hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Layout {
    /// One unified folder.
    V2(PathBuf),
    /// The memory, pids and cpu hierarchies' folders.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

/// The daemon's cgroup tree.
#[derive(Clone, Debug)]
pub struct Cgroups {
    layout: Layout,
}

/// One instance's group; dropping it removes it (killing what is left).
#[derive(Debug)]
pub struct InstanceCgroup {
    layout: Layout,
}

/// A stable 64-bit FNV-1a hash (the tag must not change between builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The tree's folder name for the daemon serving `home`.
pub fn tree_name(home: &Path) -> String {
    let home = home.canonicalize().unwrap_or_else(|_| home.to_owned());
    format!("little-{:016x}", fnv1a(home.as_os_str().as_encoded_bytes()))
}

/// This process's cgroup path in a hierarchy, from `/proc/self/cgroup`
/// text: the v2 line (`0::/path`) for `None`, else the v1 line listing
/// `controller`.
fn own_path(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        let found = match controller {
            None => id == "0" && list.is_empty(),
            Some(c) => list.split(',').any(|l| l == c),
        };
        found.then(|| path.to_owned())
    })
}

/// Where the hierarchy holding `controller` (v1: fstype `cgroup` with that
/// super option; v2 for `None`: fstype `cgroup2`) is mounted, with the
/// mount's root within the hierarchy, from `/proc/self/mountinfo` text.
fn mount_of(mountinfo: &str, controller: Option<&str>) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (root, point) = (left.get(3)?, left.get(4)?);
        let (fstype, options) = (right.first()?, right.get(2).unwrap_or(&""));
        let found = match controller {
            None => *fstype == "cgroup2",
            Some(c) => *fstype == "cgroup" && options.split(',').any(|o| o == c),
        };
        found.then(|| (PathBuf::from(point), (*root).to_owned()))
    })
}

/// The folder of this process's cgroup in a hierarchy.
fn own_dir(proc_cgroup: &str, mountinfo: &str, controller: Option<&str>) -> Option<PathBuf> {
    let path = own_path(proc_cgroup, controller)?;
    let (point, root) = mount_of(mountinfo, controller)?;
    let rel = path.strip_prefix(root.as_str()).unwrap_or(&path);
    Some(point.join(rel.trim_start_matches('/')))
}

impl Cgroups {
    /// Creates (or reopens) the tree named `name` under the daemon's own
    /// cgroup: v2 where its controllers include memory, pids and cpu,
    /// else v1.
    pub fn open(name: &str) -> Result<Self, CgroupError> {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let (cgroup, mountinfo) = (read("/proc/self/cgroup"), read("/proc/self/mountinfo"));
        if let Some(dir) = own_dir(&cgroup, &mountinfo, None) {
            let controllers =
                std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            let has = |c| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") && has("cpu") {
                return Self::open_v2(&dir, name);
            }
        }
        let dir = |c| {
            own_dir(&cgroup, &mountinfo, Some(c))
                .ok_or_else(|| CgroupError::Unavailable(format!("no v1 {c} hierarchy")))
        };
        let layout = Layout::V1 {
            memory: dir("memory")?.join(name),
            pids: dir("pids")?.join(name),
            cpu: dir("cpu")?.join(name),
        };
        let tree = Self { layout };
        for d in tree.dirs() {
            mkdir(&d)?;
        }
        Ok(tree)
    }

    /// The tree named `name` under this process's cgroup, if it exists
    /// (nothing is created or moved).
    pub fn find(name: &str) -> Option<Self> {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let (cgroup, mountinfo) = (read("/proc/self/cgroup"), read("/proc/self/mountinfo"));
        let v2 = own_dir(&cgroup, &mountinfo, None).map(|d| d.join(name));
        if let Some(dir) = v2.filter(|d| d.is_dir()) {
            return Some(Self {
                layout: Layout::V2(dir),
            });
        }
        let dir = |c| own_dir(&cgroup, &mountinfo, Some(c)).map(|d| d.join(name));
        let layout = Layout::V1 {
            memory: dir("memory")?,
            pids: dir("pids")?,
            cpu: dir("cpu")?,
        };
        let tree = Self { layout };
        tree.dirs().iter().any(|d| d.is_dir()).then_some(tree)
    }

    /// v2: a non-root group with processes cannot hand controllers to
    /// children, so the daemon first moves itself to a leaf of its own.
    fn open_v2(own: &Path, name: &str) -> Result<Self, CgroupError> {
        const ENABLE: &str = "+memory +pids +cpu";
        let control = own.join("cgroup.subtree_control");
        if write(&control, ENABLE).is_err() {
            let leaf = own.join("little-daemon");
            mkdir(&leaf)?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
            write(&control, ENABLE)?;
        }
        let tree = own.join(name);
        mkdir(&tree)?;
        write(&tree.join("cgroup.subtree_control"), ENABLE)?;
        Ok(Self {
            layout: Layout::V2(tree),
        })
    }

    fn dirs(&self) -> Vec<PathBuf> {
        layout_dirs(&self.layout)
    }

    /// Creates the group `name` with `limits`.
    pub fn create(&self, name: &str, limits: Limits) -> Result<InstanceCgroup, CgroupError> {
        let layout = match &self.layout {
            Layout::V2(dir) => Layout::V2(dir.join(name)),
            Layout::V1 { memory, pids, cpu } => Layout::V1 {
                memory: memory.join(name),
                pids: pids.join(name),
                cpu: cpu.join(name),
            },
        };
        let group = InstanceCgroup { layout };
        // A group left by an earlier instance of the same name holds no
        // process the daemon still runs.
        group.remove();
        for d in group.dirs() {
            mkdir(&d)?;
        }
        group.limit(limits)?;
        Ok(group)
    }

    /// Kills every process in every group of the tree (instances a killed
    /// daemon left behind) and removes the groups; returns how many
    /// processes were signalled.
    pub fn kill_all(&self) -> usize {
        let mut names = std::collections::BTreeSet::new();
        for dir in self.dirs() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        names.insert(entry.file_name());
                    }
                }
            }
        }
        let mut killed = 0;
        for name in names {
            let Some(name) = name.to_str() else { continue };
            let group = InstanceCgroup {
                layout: match &self.layout {
                    Layout::V2(dir) => Layout::V2(dir.join(name)),
                    Layout::V1 { memory, pids, cpu } => Layout::V1 {
                        memory: memory.join(name),
                        pids: pids.join(name),
                        cpu: cpu.join(name),
                    },
                },
            };
            killed += group.kill();
            // Dropping it removes it.
        }
        killed
    }
}

impl Cgroups {
    /// Sets the CPU weight of the whole tree (1-10000, v2's scale): all
    /// instances together compete with the host's other processes as one
    /// group of this weight.
    pub fn set_cpu_weight(&self, weight: u64) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2(dir) => write(
                &dir.join("cpu.weight"),
                &weight.clamp(1, 10_000).to_string(),
            ),
            Layout::V1 { cpu, .. } => {
                let shares = (weight * 1024 / 100).clamp(2, 262_144);
                write(&cpu.join("cpu.shares"), &shares.to_string())
            }
        }
    }

    /// Kills what is left in the tree and removes it (a daemon that stops;
    /// a v2 tree's `little-daemon` leaf, holding the daemon, stays).
    pub fn remove(&self) {
        self.kill_all();
        for dir in self.dirs() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn layout_dirs(layout: &Layout) -> Vec<PathBuf> {
    match layout {
        Layout::V2(dir) => vec![dir.clone()],
        Layout::V1 { memory, pids, cpu } => vec![memory.clone(), pids.clone(), cpu.clone()],
    }
}

/// The `oom_kill` count from a `memory.events` (v2) or
/// `memory.oom_control` (v1) text.
fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

impl InstanceCgroup {
    /// Its folders: what `vmm --jail-cgroup` joins.
    pub fn dirs(&self) -> Vec<PathBuf> {
        layout_dirs(&self.layout)
    }

    fn limit(&self, limits: Limits) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2(dir) => {
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
            }
            Layout::V1 { memory, pids, cpu } => {
                write(
                    &memory.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_bytes.to_string())?;
                }
                write(&pids.join("pids.max"), &limits.pids.to_string())?;
                let shares = (limits.cpu_weight * 1024 / 100).max(2);
                write(&cpu.join("cpu.shares"), &shares.to_string())?;
            }
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer killed a process of the
    /// group for hitting its memory limit.
    pub fn oom_kills(&self) -> u64 {
        let file = match &self.layout {
            Layout::V2(dir) => dir.join("memory.events"),
            Layout::V1 { memory, .. } => memory.join("memory.oom_control"),
        };
        std::fs::read_to_string(file)
            .map(|t| oom_kill_count(&t))
            .unwrap_or(0)
    }

    /// The memory limit, bytes, as the kernel holds it.
    pub fn memory_limit(&self) -> Option<u64> {
        let file = match &self.layout {
            Layout::V2(dir) => dir.join("memory.max"),
            Layout::V1 { memory, .. } => memory.join("memory.limit_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// SIGKILLs every process in the group; returns how many.
    fn kill(&self) -> usize {
        let dir = &self.dirs()[0];
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let mut killed = 0;
        for pid in procs
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill(2) with a pid from the group's member list and
            // a valid signal number touches no memory.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        killed
    }

    /// Removes the group's folders once its processes are gone (kills
    /// any that are left, waiting up to a second for them to exit).
    pub fn remove(&self) {
        let start = Instant::now();
        for dir in self.dirs() {
            if !dir.exists() {
                continue;
            }
            while std::fs::remove_dir(&dir).is_err() && dir.exists() {
                if start.elapsed() > Duration::from_secs(1) {
                    break;
                }
                self.kill();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Drop for InstanceCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
35 30 0:31 /process_api/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
38 30 0:34 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP: &str = "\
8:pids:/
4:memory:/process_api/abc/svc
1:cpu,cpuacct:/daemon
0::/daemon
";

    #[test]
    fn own_folders_are_found_in_each_hierarchy() {
        assert_eq!(
            own_dir(CGROUP, MOUNTINFO, Some("memory")),
            Some(PathBuf::from("/sys/fs/cgroup/memory/svc"))
        );
        assert_eq!(
            own_dir(CGROUP, MOUNTINFO, Some("pids")),
            Some(PathBuf::from("/sys/fs/cgroup/pids/"))
        );
        assert_eq!(
            own_dir(CGROUP, MOUNTINFO, Some("cpu")),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/daemon"))
        );
        assert_eq!(
            own_dir(CGROUP, MOUNTINFO, None),
            Some(PathBuf::from("/sys/fs/cgroup/unified/daemon"))
        );
        assert_eq!(own_dir(CGROUP, MOUNTINFO, Some("hugetlb")), None);
    }

    #[test]
    fn oom_kills_are_read_from_either_format() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        let v2 = "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kill_count(v1), 2);
        assert_eq!(oom_kill_count(v2), 1);
        assert_eq!(oom_kill_count(""), 0);
    }

    #[test]
    fn the_tree_name_is_stable_and_names_the_home() {
        let a = tree_name(Path::new("/nonexistent/home-a"));
        assert_eq!(a, tree_name(Path::new("/nonexistent/home-a")));
        assert_ne!(a, tree_name(Path::new("/nonexistent/home-b")));
        assert!(a.starts_with("little-") && a.len() == 23, "{a}");
    }
}
