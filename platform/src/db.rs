//! The daemon's state in an embedded database (redb, one file,
//! `<home>/state.redb`): one record per deployed app, so a restarted daemon
//! serves the same apps from the same snapshots.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::api::AppSpec;

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// redb failed.
    #[error("state database error")]
    Redb(#[source] Box<redb::Error>),
    /// The database file could not be created owner-only.
    #[error("cannot make {0} owner-only")]
    Mode(String, #[source] std::io::Error),
    /// A record could not be encoded or decoded.
    #[error("state record {0:?} is malformed")]
    Record(String, #[source] serde_json::Error),
}

fn redb_err(e: impl Into<redb::Error>) -> DbError {
    DbError::Redb(Box::new(e.into()))
}

/// A deployed app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// What the user asked for.
    pub spec: AppSpec,
    /// The bound listen address (the spec's, with the port filled in).
    pub listen: String,
    /// The app's folder (initramfs, snapshot, logs, instances).
    pub dir: PathBuf,
    /// The snapshot instances are restored from.
    pub snapshot: PathBuf,
    /// The read-only erofs base image (`/dev/vda`).
    pub rootfs: PathBuf,
    /// When it was deployed (seconds since the epoch).
    pub deployed_unix: u64,
    /// The uid and gid its VMMs run as when the daemon runs as root
    /// (0: none given yet).
    #[serde(default)]
    pub uid: u32,
    /// The image files of `spec.volumes`, in order (absent in records from
    /// before volumes existed).
    #[serde(default)]
    pub volume_files: Vec<PathBuf>,
}

/// The open database.
pub struct Db {
    db: Database,
}

impl Db {
    /// Opens (or creates) the database file, owner-only: records carry
    /// the apps' environment.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        crate::home::private_file(path)
            .map_err(|e| DbError::Mode(path.display().to_string(), e))?;
        let db = Database::create(path).map_err(redb_err)?;
        let tx = db.begin_write().map_err(redb_err)?;
        tx.open_table(APPS).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        Ok(Self { db })
    }

    /// Stores (or replaces) an app's record.
    pub fn put(&self, record: &AppRecord) -> Result<(), DbError> {
        let bytes =
            serde_json::to_vec(record).map_err(|e| DbError::Record(record.spec.name.clone(), e))?;
        let tx = self.db.begin_write().map_err(redb_err)?;
        {
            let mut table = tx.open_table(APPS).map_err(redb_err)?;
            table
                .insert(record.spec.name.as_str(), bytes.as_slice())
                .map_err(redb_err)?;
        }
        tx.commit().map_err(redb_err)
    }

    /// Forgets an app; false if there was none of that name.
    pub fn remove(&self, name: &str) -> Result<bool, DbError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        let removed = {
            let mut table = tx.open_table(APPS).map_err(redb_err)?;
            let old = table.remove(name).map_err(redb_err)?;
            old.is_some()
        };
        tx.commit().map_err(redb_err)?;
        Ok(removed)
    }

    /// Whether an app of that name is stored.
    pub fn contains(&self, name: &str) -> Result<bool, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(APPS).map_err(redb_err)?;
        Ok(table.get(name).map_err(redb_err)?.is_some())
    }

    /// Every app, by name.
    pub fn list(&self) -> Result<Vec<AppRecord>, DbError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let table = tx.open_table(APPS).map_err(redb_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(redb_err)? {
            let (key, value) = entry.map_err(redb_err)?;
            let record = serde_json::from_slice(value.value())
                .map_err(|e| DbError::Record(key.value().to_owned(), e))?;
            out.push(record);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> AppRecord {
        AppRecord {
            spec: AppSpec {
                name: name.into(),
                image: "img.tar".into(),
                port: 8080,
                listen: "127.0.0.1:0".into(),
                memory_mib: 64,
                concurrency: 4,
                min: 0,
                max: 3,
                idle_timeout_ms: 1000,
                env: vec!["A=1".into()],
                allow_host: vec!["127.0.0.1:5432".parse().unwrap()],
                volumes: vec!["data:/data".parse().unwrap()],
                ready_timeout_ms: 600_000,
                ready_cmd: None,
            },
            listen: "127.0.0.1:4000".into(),
            dir: "/x".into(),
            snapshot: "/x/app.snap".into(),
            rootfs: "/x/rootfs.erofs".into(),
            deployed_unix: 1,
            uid: 0,
            volume_files: vec!["/home/volumes/data.ext4".into()],
        }
    }

    #[test]
    fn records_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Db::open(&path).unwrap();
            db.put(&record("a")).unwrap();
            db.put(&record("b")).unwrap();
            assert!(db.contains("a").unwrap());
            assert!(db.remove("a").unwrap());
            assert!(!db.remove("a").unwrap());
            assert!(!db.contains("a").unwrap());
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.list().unwrap(), vec![record("b")]);
    }

    #[test]
    fn records_from_before_host_rules_decode_with_none() {
        let mut json = serde_json::to_value(record("old")).unwrap();
        json["spec"].as_object_mut().unwrap().remove("allow_host");
        let old: AppRecord = serde_json::from_value(json).unwrap();
        assert!(old.spec.allow_host.is_empty());
        assert_eq!(old.spec.name, "old");
    }

    #[test]
    fn the_database_file_is_owner_only_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: umask(2) only sets this process's file mode mask; 022 is
        // the usual default, so other tests running now are unaffected.
        unsafe { libc::umask(0o022) };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        Db::open(&path).unwrap().put(&record("a")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
