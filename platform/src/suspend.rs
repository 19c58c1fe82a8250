//! Which snapshot an app with volumes may start from, and the files that
//! say so in its folder.
//!
//! A snapshot holds the guest's view of its volumes (the page cache,
//! ext4's state), so it is restored only with the volumes exactly as they
//! were when it was taken:
//!
//! - `app.snap`, the full snapshot of the deploy's (or a cold boot's) boot,
//!   until an instance has run;
//! - then only [`SUSPEND`], the diff snapshot (over `app.snap`) its last
//!   suspend wrote;
//! - neither while the [`MOVED`] marker exists (made durable before a
//!   guest may write, removed once a suspend has settled), nor when a
//!   volume's file is not the one recorded in [`RECORD`] with the pair
//!   (it was replaced, imported or written to since), nor when the file
//!   cannot be restored: the app then boots cold from its image with the
//!   volumes as they are (ext4 replays its journal).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// In an app's folder: its volumes may have changed since its last
/// snapshot (an instance ran with them and did not suspend yet).
pub const MOVED: &str = "volumes.moved";
/// In an app's folder: the diff snapshot of its last suspend.
pub const SUSPEND: &str = "suspend.snap";
/// In an app's folder: the volume files as they were when the snapshot
/// that may be restored (the deploy's, a cold boot's or a suspend's) was
/// settled.
pub const RECORD: &str = "volumes.state";
/// A suspend's snapshot until it is settled (in the instance's folder as
/// the VMM writes it, then in the app's).
pub const PENDING: &str = "suspend.new";

/// Errors settling a snapshot with its volumes.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    /// A file could not be written, synced, renamed or removed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SuspendError + '_ {
    move |e| SuspendError::Io(path.display().to_string(), e)
}

/// What an app with volumes starts from.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// `app.snap`: the volumes are as its boot left them.
    Snapshot,
    /// [`SUSPEND`]: the volumes are as its last suspend left them.
    Suspended(PathBuf),
    /// A cold boot, and why.
    Cold(String),
}

/// One volume file as recorded with a settled snapshot: any write, resize
/// or replacement changes one of these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// The pairing files of one app's folder.
pub struct Pairing<'a> {
    dir: &'a Path,
    volumes: &'a [PathBuf],
}

impl<'a> Pairing<'a> {
    /// The app in `dir`, whose volume files are `volumes`.
    pub fn new(dir: &'a Path, volumes: &'a [PathBuf]) -> Self {
        Self { dir, volumes }
    }

    /// The marker's path.
    pub fn marker(&self) -> PathBuf {
        self.dir.join(MOVED)
    }

    /// The suspend file's path.
    pub fn suspended(&self) -> PathBuf {
        self.dir.join(SUSPEND)
    }

    /// What the next instance may start from.
    pub fn start(&self) -> Start {
        if self.marker().exists() {
            return Start::Cold(
                "its volumes moved on since its last snapshot (an instance stopped without suspending)"
                    .into(),
            );
        }
        if let Err(why) = self.volumes_unchanged() {
            return Start::Cold(why);
        }
        let suspended = self.suspended();
        if suspended.exists() {
            Start::Suspended(suspended)
        } else {
            Start::Snapshot
        }
    }

    /// Whether every volume file is the one recorded with the snapshot.
    fn volumes_unchanged(&self) -> Result<(), String> {
        let path = self.dir.join(RECORD);
        let recorded: Vec<FileId> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| format!("{} is missing or unreadable", path.display()))?;
        if recorded.len() != self.volumes.len() {
            return Err("its volumes are not the ones of its snapshot".into());
        }
        for (was, path) in recorded.iter().zip(self.volumes) {
            match FileId::of(path) {
                Ok(now) if now == *was => {}
                Ok(_) => {
                    return Err(format!(
                    "volume {} was changed since its snapshot (written to, replaced or imported)",
                    path.display()
                ))
                }
                Err(e) => return Err(format!("volume {}: {e}", path.display())),
            }
        }
        Ok(())
    }

    /// Before a guest may write to the volumes: the marker, durable.
    pub fn mark_moved(&self) -> Result<(), SuspendError> {
        let marker = self.marker();
        crate::home::create_file(&marker)
            .and_then(|f| f.sync_all())
            .map_err(io(&marker))?;
        sync_dir(self.dir)
    }

    /// After a boot wrote `app.snap` and its VMM is gone: the volumes and
    /// the snapshot durable, any suspend file (over the old `app.snap`)
    /// removed, the volumes recorded, the marker removed.
    pub fn settle_boot(&self, snapshot: &Path) -> Result<(), SuspendError> {
        remove_if_there(&self.suspended())?;
        sync_file(snapshot)?;
        self.settle()
    }

    /// After a suspend's VMM is gone, `pending` its diff snapshot (in the
    /// app's folder): the volumes and the snapshot durable, the snapshot
    /// renamed to [`SUSPEND`], the volumes recorded, the marker removed.
    /// A crash on the way leaves the marker: the next start is cold.
    pub fn settle_suspend(&self, pending: &Path) -> Result<(), SuspendError> {
        sync_file(pending)?;
        let suspended = self.suspended();
        std::fs::rename(pending, &suspended).map_err(io(&suspended))?;
        self.settle()
    }

    fn settle(&self) -> Result<(), SuspendError> {
        for volume in self.volumes {
            sync_file(volume)?;
        }
        let ids = self
            .volumes
            .iter()
            .map(|v| FileId::of(v).map_err(io(v)))
            .collect::<Result<Vec<_>, _>>()?;
        let record = self.dir.join(RECORD);
        let pending = self.dir.join(format!("{RECORD}.new"));
        let text = serde_json::to_vec(&ids).unwrap_or_default();
        crate::home::create_file(&pending)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &text)?;
                f.sync_all()
            })
            .map_err(io(&pending))?;
        std::fs::rename(&pending, &record).map_err(io(&record))?;
        sync_dir(self.dir)?;
        remove_if_there(&self.marker())?;
        sync_dir(self.dir)
    }
}

/// Removes `path`; one that is not there is fine.
fn remove_if_there(path: &Path) -> Result<(), SuspendError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// `fsync` of a file's data and size.
fn sync_file(path: &Path) -> Result<(), SuspendError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// `fsync` of a folder: its entries (a rename, a new or removed file).
fn sync_dir(dir: &Path) -> Result<(), SuspendError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct App {
        dir: tempfile::TempDir,
        volumes: Vec<PathBuf>,
    }

    fn app() -> App {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("data.ext4");
        std::fs::write(&volume, b"ext4").unwrap();
        std::fs::write(dir.path().join("app.snap"), b"snap").unwrap();
        App {
            volumes: vec![volume],
            dir,
        }
    }

    #[test]
    fn without_a_record_an_app_boots_cold() {
        let a = app();
        let p = Pairing::new(a.dir.path(), &a.volumes);
        assert!(matches!(p.start(), Start::Cold(why) if why.contains("missing")));
    }

    #[test]
    fn a_settled_boot_restores_its_snapshot_until_an_instance_runs() {
        let a = app();
        let p = Pairing::new(a.dir.path(), &a.volumes);
        std::fs::write(p.suspended(), b"stale diff").unwrap();
        p.settle_boot(&a.dir.path().join("app.snap")).unwrap();
        assert!(!p.suspended().exists(), "a diff over the old snapshot goes");
        assert_eq!(p.start(), Start::Snapshot);
        p.mark_moved().unwrap();
        assert!(matches!(p.start(), Start::Cold(why) if why.contains("moved on")));
    }

    #[test]
    fn a_settled_suspend_is_resumed_and_clears_the_marker() {
        let a = app();
        let p = Pairing::new(a.dir.path(), &a.volumes);
        p.settle_boot(&a.dir.path().join("app.snap")).unwrap();
        p.mark_moved().unwrap();
        std::fs::write(&a.volumes[0], b"ext4 with a write").unwrap();
        let pending = a.dir.path().join(PENDING);
        std::fs::write(&pending, b"diff").unwrap();
        p.settle_suspend(&pending).unwrap();
        assert!(!pending.exists() && !p.marker().exists());
        assert_eq!(p.start(), Start::Suspended(p.suspended()));
    }

    #[test]
    fn a_volume_changed_behind_the_snapshot_means_a_cold_boot() {
        let a = app();
        let p = Pairing::new(a.dir.path(), &a.volumes);
        p.settle_boot(&a.dir.path().join("app.snap")).unwrap();
        // Replaced, as an import does (a new file, same size).
        let other = a.dir.path().join("other");
        std::fs::write(&other, b"ext4").unwrap();
        std::fs::rename(&other, &a.volumes[0]).unwrap();
        assert!(matches!(p.start(), Start::Cold(why) if why.contains("was changed")));
        // Missing.
        std::fs::remove_file(&a.volumes[0]).unwrap();
        assert!(matches!(p.start(), Start::Cold(why) if why.contains("data.ext4")));
    }

    #[test]
    fn a_damaged_record_means_a_cold_boot() {
        let a = app();
        let p = Pairing::new(a.dir.path(), &a.volumes);
        p.settle_boot(&a.dir.path().join("app.snap")).unwrap();
        std::fs::write(a.dir.path().join(RECORD), b"{not json").unwrap();
        assert!(matches!(p.start(), Start::Cold(_)));
    }
}
