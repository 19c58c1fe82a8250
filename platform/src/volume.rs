//! Persistent volumes: sparse ext4 images under `<home>/volumes`, made
//! without root by `mkfs.ext4` (Debian's e2fsprogs), each attached to its
//! app's VMs as one more virtio-blk disk.
//!
//! A volume is the file `<home>/volumes/<name>.ext4`; the folder is the
//! list. Which app uses a volume is in the app's record
//! ([`crate::api::AppSpec::volumes`]): the daemon refuses to remove a
//! volume an app uses and to give one volume to two apps.
//!
//! In a VM, the `i`-th volume of an app is the disk whose serial is
//! [`serial`]`(i)`; the agent config line `volume=vol<i>:<path>` tells the
//! guest agent where to mount it (filling a new, empty volume with what the
//! image has at that path first, as Docker does).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Size of a volume made without `--size`.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The smallest volume `mkfs.ext4` is asked for: room for its journal.
pub const MIN_SIZE: u64 = 8 << 20;
/// The largest volume: 16 TiB, ext4's limit with 4 KiB blocks.
pub const MAX_SIZE: u64 = 16 << 40;
/// Most volumes one app mounts.
pub const MAX_PER_APP: usize = 16;
/// ext4's superblock magic, at byte 1080 of the image.
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];
const MAGIC_AT: usize = 1024 + 0x38;

/// Errors of the volume store.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The name is not a volume name.
    #[error("invalid volume name {0:?}: use 1-32 letters, digits, '-' or '_'")]
    Name(String),
    /// A size that is not `N[K|M|G|T]` within the limits.
    #[error("invalid volume size {0:?}: use a number with K, M, G or T, from 8M to 16T")]
    Size(String),
    /// `create` of a name that exists.
    #[error("volume {0:?} already exists")]
    Exists(String),
    /// A name that does not exist.
    #[error("no volume named {0:?} (little volume create {0})")]
    NotFound(String),
    /// The file is not an ext4 image.
    #[error("volume {0:?} is not an ext4 filesystem ({1})")]
    NotExt4(String, String),
    /// `rm` of a volume an app mounts.
    #[error("volume {name:?} is used by app {app:?}: remove the app first (little rm {app})")]
    InUse {
        /// The volume.
        name: String,
        /// The app that mounts it.
        app: String,
    },
    /// A tool (`mkfs.ext4`, `debugfs`, `tar`, `e2fsck`) failed or is
    /// missing.
    #[error("volume {0:?}: {1}")]
    Tool(String, String),
    /// An archive to import is not one `volume export` makes.
    #[error("cannot import {0}: {1}")]
    Archive(String, String),
    /// A file operation failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// One volume as `little volume ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// Its size (the filesystem's capacity).
    pub size: u64,
    /// Bytes it takes on the host's disk (the image is sparse).
    pub allocated: u64,
    /// The app that mounts it, if any.
    #[serde(default)]
    pub app: Option<String>,
}

/// Where an app mounts a volume: `NAME:/guest/path` on the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume.
    pub name: String,
    /// The absolute path in the guest.
    pub path: String,
}

impl std::str::FromStr for VolumeMount {
    type Err = String;

    /// Parses `NAME:/guest/path`.
    ///
    /// ```
    /// use platform::volume::VolumeMount;
    /// let m: VolumeMount = "pgdata:/var/lib/postgresql/data".parse().unwrap();
    /// assert_eq!((m.name.as_str(), m.path.as_str()), ("pgdata", "/var/lib/postgresql/data"));
    /// assert!("pgdata".parse::<VolumeMount>().is_err());
    /// assert!("pgdata:data".parse::<VolumeMount>().is_err());
    /// ```
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, path) = text
            .split_once(':')
            .ok_or_else(|| format!("invalid volume {text:?}: expected NAME:/guest/path"))?;
        let mount = Self {
            name: name.to_owned(),
            path: path.to_owned(),
        };
        mount.validate()?;
        Ok(mount)
    }
}

impl std::fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.path)
    }
}

impl VolumeMount {
    /// Checks the name and the guest path (absolute, no `.` or `..`
    /// parts, no `:` or newline, not `/`).
    pub fn validate(&self) -> Result<(), String> {
        check_name(&self.name).map_err(|e| e.to_string())?;
        let path = &self.path;
        let parts_ok = path
            .split('/')
            .skip(1)
            .all(|p| !p.is_empty() && p != "." && p != "..");
        if !path.starts_with('/')
            || path == "/"
            || !parts_ok
            || path.len() > 1024
            || path.contains(['\n', '\0', ':'])
        {
            return Err(format!(
                "invalid volume path {path:?} for {:?}: an absolute guest path other than /",
                self.name
            ));
        }
        Ok(())
    }
}

/// The volume name for the image-declared `path` of app `app`: the app's
/// name (at most 23 bytes of it) and a hash of the path, so a redeploy
/// finds the same volume.
///
/// ```
/// let name = platform::volume::private_name("pg", "/var/lib/postgresql/data");
/// assert!(name.starts_with("pg-") && name.len() == 11);
/// assert_eq!(name, platform::volume::private_name("pg", "/var/lib/postgresql/data"));
/// assert_ne!(name, platform::volume::private_name("pg", "/data"));
/// ```
pub fn private_name(app: &str, path: &str) -> String {
    // FNV-1a: stable across builds and platforms.
    let hash = path.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let app = app.get(..app.len().min(23)).unwrap_or(app);
    format!("{app}-{hash:08x}")
}

/// The app-private mounts for the paths an image declares as volumes
/// (its config `Volumes`) that `spec` mounts nothing at; an error names a
/// declared path that cannot be a mount point.
pub fn private_mounts(
    spec: &crate::api::AppSpec,
    declared: &[String],
) -> Result<Vec<VolumeMount>, String> {
    let mut mounts: Vec<VolumeMount> = Vec::new();
    for raw in declared {
        let path = raw.trim_end_matches('/');
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        let taken = spec.volumes.iter().chain(&mounts).any(|m| m.path == path);
        if taken {
            continue;
        }
        let mount = VolumeMount {
            name: private_name(&spec.name, &path),
            path,
        };
        mount.validate().map_err(|e| {
            format!("the image declares volume {raw:?}, which cannot be mounted: {e}")
        })?;
        mounts.push(mount);
    }
    Ok(mounts)
}

/// The disk serial of an app's `index`-th volume (what the agent looks
/// for in `/sys/block/vd*/serial`).
pub fn serial(index: usize) -> String {
    format!("vol{index}")
}

/// The agent config lines for `mounts`, in order.
///
/// ```
/// let m = vec!["data:/data".parse().unwrap()];
/// assert_eq!(platform::volume::agent_lines(&m), "volume=vol0:/data\n");
/// ```
pub fn agent_lines(mounts: &[VolumeMount]) -> String {
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| format!("volume={}:{}\n", serial(i), m.path))
        .collect()
}

/// Checks a volume name: what an app name allows.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::Name(name.to_owned()))
    }
}

/// Parses a size: bytes, or a number with `K`, `M`, `G` or `T` (powers of
/// 1024, an optional `i` and `B` after them), within [`MIN_SIZE`] and
/// [`MAX_SIZE`].
///
/// ```
/// use platform::volume::parse_size;
/// assert_eq!(parse_size("1G").unwrap(), 1 << 30);
/// assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
/// assert!(parse_size("1K").is_err());
/// assert!(parse_size("lots").is_err());
/// ```
pub fn parse_size(text: &str) -> Result<u64, VolumeError> {
    let bad = || VolumeError::Size(text.to_owned());
    let t = text.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let t = t.strip_suffix('i').unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let size = n.checked_mul(1 << shift).ok_or_else(bad)?;
    if (MIN_SIZE..=MAX_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(bad())
    }
}

/// The volumes of one home.
pub struct Volumes {
    dir: PathBuf,
}

impl Volumes {
    /// The volumes under `<home>/volumes`.
    pub fn new(home: &Path) -> Self {
        Self {
            dir: home.join("volumes"),
        }
    }

    /// The image file of volume `name` (which may not exist).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.ext4"))
    }

    /// Makes volume `name`: a sparse file of `size` bytes, owner-only,
    /// formatted ext4 by `mkfs.ext4`. Nothing is left behind on failure.
    pub fn create(&self, name: &str, size: u64) -> Result<VolumeInfo, VolumeError> {
        check_name(name)?;
        if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
            return Err(VolumeError::Size(size.to_string()));
        }
        crate::home::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.path(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => VolumeError::Exists(name.to_owned()),
                _ => VolumeError::Io(format!("cannot create {}", path.display()), e),
            })?;
        let made = (|| {
            crate::home::private_file(&path).map_err(io_err(&path))?;
            file.set_len(size).map_err(io_err(&path))?;
            drop(file);
            mkfs(name, &path, None)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.info(name, None)
    }

    /// Volume `name`'s file, once checked to hold ext4.
    pub fn open(&self, name: &str) -> Result<PathBuf, VolumeError> {
        check_name(name)?;
        let path = self.path(name);
        check_magic(name, &path)?;
        Ok(path)
    }

    /// One volume's size and use, `app` being who mounts it.
    pub fn info(&self, name: &str, app: Option<String>) -> Result<VolumeInfo, VolumeError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path(name);
        let meta = std::fs::metadata(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VolumeError::NotFound(name.to_owned()),
            _ => VolumeError::Io(format!("cannot read {}", path.display()), e),
        })?;
        Ok(VolumeInfo {
            name: name.to_owned(),
            size: meta.len(),
            allocated: meta.blocks() * 512,
            app,
        })
    }

    /// Every volume, by name; `user` says which app mounts one.
    pub fn list(
        &self,
        user: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<VolumeInfo>, VolumeError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let name = name.strip_suffix(".ext4")?.to_owned();
                check_name(&name).is_ok().then_some(name)
            })
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let app = user(&name);
                self.info(&name, app)
            })
            .collect()
    }

    /// Removes volume `name`; `user` is the app that mounts it, if any
    /// (then nothing is removed).
    pub fn remove(&self, name: &str, user: Option<String>) -> Result<(), VolumeError> {
        check_name(name)?;
        if let Some(app) = user {
            return Err(VolumeError::InUse {
                name: name.to_owned(),
                app,
            });
        }
        let path = self.path(name);
        std::fs::remove_file(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VolumeError::NotFound(name.to_owned()),
            _ => VolumeError::Io(format!("cannot remove {}", path.display()), e),
        })
    }
}

/// `volume export`/`import`: the archive is a tar (GNU format, sparse:
/// holes take no space) with one member, the volume's ext4 image
/// `NAME.ext4`, made and read by GNU tar.
impl Volumes {
    /// Writes volume `name` to the new file `archive`. Its app must not
    /// run meanwhile (the daemon holds it).
    pub fn export(&self, name: &str, archive: &Path) -> Result<(), VolumeError> {
        check_name(name)?;
        let file = format!("{name}.ext4");
        if !self.dir.join(&file).exists() {
            return Err(VolumeError::NotFound(name.to_owned()));
        }
        let mut tar = Command::new("tar");
        tar.args([
            "--create",
            "--sparse",
            "--format=gnu",
            "--numeric-owner",
            "--file",
        ])
        .arg(archive)
        .arg("--directory")
        .arg(&self.dir)
        .arg(&file);
        run_tool(name, "tar", &mut tar).map(drop)
    }

    /// Makes volume `name` from `archive` (an [`export`](Self::export)),
    /// replacing it if it exists (its app must not run meanwhile: the
    /// daemon holds it), once the archive is checked to hold exactly one
    /// file, a clean ext4 image of an allowed size (`e2fsck -n`). The
    /// image is unpacked under `scratch` and renamed into place, so a bad
    /// archive leaves the volume as it was.
    pub fn import(
        &self,
        name: &str,
        archive: &Path,
        scratch: &Path,
    ) -> Result<VolumeInfo, VolumeError> {
        check_name(name)?;
        let bad = |why: String| VolumeError::Archive(archive.display().to_string(), why);
        let mut list = Command::new("tar");
        list.args(["--list", "--file"]).arg(archive);
        let members = run_tool(name, "tar", &mut list).map_err(|e| bad(e.to_string()))?;
        let members: Vec<&str> = members.lines().collect();
        let [member] = members.as_slice() else {
            return Err(bad(format!(
                "it holds {} members, not one ext4 image",
                members.len()
            )));
        };
        if member.contains('/') || member.is_empty() || *member == "." || *member == ".." {
            return Err(bad(format!(
                "its member {member:?} is not a plain file name"
            )));
        }
        crate::home::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        crate::home::create_dir_all(scratch).map_err(io_err(scratch))?;
        let work = scratch.join(format!("import-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        crate::home::create_dir_all(&work).map_err(io_err(&work))?;
        let result = (|| {
            let mut tar = Command::new("tar");
            tar.args(["--extract", "--sparse", "--no-same-owner", "--file"])
                .arg(archive)
                .arg("--directory")
                .arg(&work)
                .arg(member);
            run_tool(name, "tar", &mut tar).map_err(|e| bad(e.to_string()))?;
            let image = work.join(member);
            let meta = std::fs::symlink_metadata(&image).map_err(io_err(&image))?;
            if !meta.is_file() {
                return Err(bad(format!("its member {member:?} is not a regular file")));
            }
            if !(MIN_SIZE..=MAX_SIZE).contains(&meta.len()) {
                return Err(bad(format!(
                    "its image is {} bytes, outside 8 MiB to 16 TiB",
                    meta.len()
                )));
            }
            check_magic(name, &image)?;
            let mut fsck = Command::new("e2fsck");
            fsck.args(["-f", "-n"]).arg(&image);
            run_tool(name, "e2fsck", &mut fsck)
                .map_err(|e| bad(format!("its image is not a clean ext4 filesystem: {e}")))?;
            crate::home::private_file(&image).map_err(io_err(&image))?;
            std::fs::File::open(&image)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&image))?;
            let path = self.path(name);
            std::fs::rename(&image, &path).map_err(io_err(&path))?;
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir))
        })();
        let _ = std::fs::remove_dir_all(&work);
        result?;
        self.info(name, None)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |e| VolumeError::Io(format!("cannot write {}", path.display()), e)
}

/// Whether `path`, volume `name`'s image, starts with an ext4 superblock.
fn check_magic(name: &str, path: &Path) -> Result<(), VolumeError> {
    let mut head = [0u8; MAGIC_AT + 2];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    match read {
        Ok(()) if head[MAGIC_AT..] == EXT_MAGIC => Ok(()),
        Ok(()) => Err(VolumeError::NotExt4(
            name.to_owned(),
            "no ext2/3/4 superblock".into(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(VolumeError::NotFound(name.to_owned()))
        }
        Err(e) => Err(VolumeError::NotExt4(name.to_owned(), e.to_string())),
    }
}

/// `mkfs.ext4 -E`: a root directory owned by root, and inode tables and
/// journal written now (sparse-friendly) rather than by the guest's
/// kernel in the background after its first mount.
const MKFS_EXTENDED: &str = "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0";
/// The same but the root folder's owner.
const MKFS_EXTENDED_LAZY: &str = "lazy_itable_init=0,lazy_journal_init=0";

/// Formats `path` as ext4, labelled `name`, with the journal (what makes
/// a VM killed mid-write recover) and nothing initialised lazily that a
/// guest would have to finish; with `tree`, filled with its files (their
/// owners, modes and times; the root folder takes the tree's).
pub(crate) fn mkfs(name: &str, path: &Path, tree: Option<&Path>) -> Result<(), VolumeError> {
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", name]);
    let mut root_mode = None;
    match tree {
        Some(tree) => {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(tree).map_err(io_err(tree))?;
            root_mode = Some(meta.mode());
            let extended = format!(
                "root_owner={}:{},{MKFS_EXTENDED_LAZY}",
                meta.uid(),
                meta.gid()
            );
            mkfs.arg("-E").arg(extended).arg("-d").arg(tree)
        }
        None => mkfs.args(["-E", MKFS_EXTENDED]),
    };
    run_tool(name, "mkfs.ext4", mkfs.arg(path))?;
    // mkfs gives the root folder its owner but not its mode.
    if let Some(mode) = root_mode {
        let set = format!("set_inode_field <2> mode 0{mode:o}");
        let mut debugfs = Command::new("debugfs");
        debugfs.args(["-w", "-R", &set]).arg(path);
        run_tool(name, "debugfs", &mut debugfs)?;
    }
    Ok(())
}

/// Runs `program` (as `command`) for volume `name`; its stdout.
pub(crate) fn run_tool(
    name: &str,
    program: &str,
    command: &mut Command,
) -> Result<String, VolumeError> {
    let out = command
        .env("PATH", mkfs_path())
        .output()
        .map_err(|e| VolumeError::Tool(name.to_owned(), format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let said = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        Err(VolumeError::Tool(
            name.to_owned(),
            format!("{program}: {}: {}", out.status, said.trim()),
        ))
    }
}

/// `PATH` with the sbin folders Debian keeps mkfs in (a user's PATH often
/// lacks them).
fn mkfs_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/sbin:/sbin")
}

#[cfg(test)]
#[path = "volume_tests.rs"]
mod tests;
