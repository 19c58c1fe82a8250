//! Newc cpio archives for the kernel's initramfs.
//!
//! Entries are described in memory (ownership and modes are explicit, so no
//! root is needed to build a root-owned tree) and written in one pass.
//!
//! ```
//! use image_tools::initramfs::Initramfs;
//!
//! let mut fs = Initramfs::new();
//! fs.dir("/bin", 0o755).unwrap();
//! fs.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n".to_vec()).unwrap();
//! fs.symlink("/bin/hi", "hello").unwrap();
//! let mut out = Vec::new();
//! fs.write(&mut out).unwrap();
//! assert!(out.starts_with(b"070701"));
//! ```

use std::collections::BTreeMap;
use std::io::{self, Cursor, Write};
use std::path::Path;

use cpio::newc::{trailer, Builder, ModeFileType};

/// Largest file accepted into an initramfs (the archive's size field is 32-bit).
pub const MAX_FILE_SIZE: u64 = u32::MAX as u64;

/// Errors while describing or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path is not absolute, has `.`/`..` components or empty segments.
    #[error("initramfs path {0:?} must be absolute and normalized (no '.', '..' or '//')")]
    BadPath(String),
    /// Two entries for one path.
    #[error("initramfs path {0:?} is added twice")]
    Duplicate(String),
    /// An entry whose parent directory was not added first.
    #[error("initramfs path {0:?} has no parent directory entry")]
    NoParent(String),
    /// A host file could not be read.
    #[error("cannot read {0}")]
    ReadHost(String, #[source] io::Error),
    /// A file too large for the newc format.
    #[error("{0} is larger than the 4 GiB a newc archive holds")]
    TooLarge(String),
    /// Writing the archive failed.
    #[error("failed to write the initramfs")]
    Write(#[source] io::Error),
}

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// An initramfs being assembled: a set of entries keyed by absolute path.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

fn check_path(path: &str) -> Result<String, Error> {
    let bad = || Error::BadPath(path.to_owned());
    let rel = path.strip_prefix('/').ok_or_else(bad)?;
    if rel.is_empty()
        || rel
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || rel.contains('\0')
    {
        return Err(bad());
    }
    Ok(rel.to_owned())
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, path: &str, kind: Kind, mode: u32) -> Result<&mut Self, Error> {
        let rel = check_path(path)?;
        if let Some((parent, _)) = rel.rsplit_once('/') {
            match self.entries.get(parent) {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => {}
                _ => return Err(Error::NoParent(path.to_owned())),
            }
        }
        if self.entries.contains_key(&rel) {
            return Err(Error::Duplicate(path.to_owned()));
        }
        self.entries.insert(
            rel,
            Entry {
                kind,
                mode: mode & 0o7777,
                uid: 0,
                gid: 0,
            },
        );
        Ok(self)
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, Error> {
        self.add(path, Kind::Dir, mode)
    }

    /// Adds every missing directory along `path` (mode 0755), like `mkdir -p`.
    pub fn dirs(&mut self, path: &str) -> Result<&mut Self, Error> {
        let rel = check_path(path)?;
        let mut prefix = String::new();
        for seg in rel.split('/') {
            prefix.push('/');
            prefix.push_str(seg);
            if !self.entries.contains_key(&prefix[1..]) {
                self.dir(&prefix, 0o755)?;
            }
        }
        Ok(self)
    }

    /// Adds a regular file with `contents`.
    pub fn file(&mut self, path: &str, mode: u32, contents: Vec<u8>) -> Result<&mut Self, Error> {
        if contents.len() as u64 > MAX_FILE_SIZE {
            return Err(Error::TooLarge(path.to_owned()));
        }
        self.add(path, Kind::File(contents), mode)
    }

    /// Adds a regular file copied from `host` (mode taken from `mode`).
    pub fn host_file(&mut self, path: &str, mode: u32, host: &Path) -> Result<&mut Self, Error> {
        let name = host.display().to_string();
        let meta = std::fs::metadata(host).map_err(|e| Error::ReadHost(name.clone(), e))?;
        if meta.len() > MAX_FILE_SIZE {
            return Err(Error::TooLarge(name));
        }
        let contents = std::fs::read(host).map_err(|e| Error::ReadHost(name, e))?;
        self.file(path, mode, contents)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, Error> {
        self.add(path, Kind::Symlink(target.to_owned()), 0o777)
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, Error> {
        self.add(path, Kind::CharDev { major, minor }, mode)
    }

    /// Sets the owner of an existing entry.
    pub fn chown(&mut self, path: &str, uid: u32, gid: u32) -> Result<&mut Self, Error> {
        let rel = check_path(path)?;
        let entry = self
            .entries
            .get_mut(&rel)
            .ok_or_else(|| Error::NoParent(path.to_owned()))?;
        entry.uid = uid;
        entry.gid = gid;
        Ok(self)
    }

    /// Writes the archive (entries in path order, parents first) to `out`.
    pub fn write<W: Write>(&self, out: W) -> Result<W, Error> {
        let mut out = out;
        for (ino, (name, entry)) in self.entries.iter().enumerate() {
            let (file_type, data): (ModeFileType, &[u8]) = match &entry.kind {
                Kind::Dir => (ModeFileType::Directory, &[]),
                Kind::File(data) => (ModeFileType::Regular, data),
                Kind::Symlink(target) => (ModeFileType::Symlink, target.as_bytes()),
                Kind::CharDev { .. } => (ModeFileType::Char, &[]),
            };
            let mut b = Builder::new(name)
                .ino(
                    u32::try_from(ino + 1)
                        .map_err(|_| Error::Write(io::Error::other("too many entries")))?,
                )
                .mode(entry.mode)
                .uid(entry.uid)
                .gid(entry.gid)
                .nlink(if matches!(entry.kind, Kind::Dir) {
                    2
                } else {
                    1
                })
                .set_mode_file_type(file_type);
            if let Kind::CharDev { major, minor } = entry.kind {
                b = b.rdev_major(major).rdev_minor(minor);
            }
            // Sizes were capped at MAX_FILE_SIZE when the entry was added.
            let size = u32::try_from(data.len()).map_err(|_| Error::TooLarge(name.clone()))?;
            let mut w = b.write(out, size);
            io::copy(&mut Cursor::new(data), &mut w).map_err(Error::Write)?;
            out = w.finish().map_err(Error::Write)?;
        }
        trailer(out).map_err(Error::Write)
    }

    /// Writes the archive to the file at `path` (created or truncated).
    pub fn write_file(&self, path: &Path) -> Result<(), Error> {
        let file = std::fs::File::create(path).map_err(Error::Write)?;
        let mut w = self.write(io::BufWriter::new(file))?;
        w.flush().map_err(Error::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::NewcReader;

    fn read_all(bytes: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut cur = Cursor::new(bytes);
        loop {
            let mut r = NewcReader::new(cur).expect("valid entry");
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            let (name, mode, uid) = (e.name().to_owned(), e.mode(), e.uid());
            let mut data = Vec::new();
            io::copy(&mut r, &mut data).expect("entry data");
            out.push((name, mode, uid, data));
            cur = r.finish().expect("next entry");
        }
        out
    }

    #[test]
    fn round_trips_through_a_newc_reader() {
        let mut fs = Initramfs::new();
        fs.dirs("/little").expect("dirs");
        fs.dir("/dev", 0o755).expect("dev");
        fs.char_dev("/dev/console", 0o600, 5, 1).expect("console");
        fs.file("/little/agent.conf", 0o644, b"arg=/bin/sh\n".to_vec())
            .expect("file");
        fs.symlink("/init", "/little/agent").expect("link");
        fs.chown("/little/agent.conf", 1000, 1000).expect("chown");
        let mut bytes = Vec::new();
        fs.write(&mut bytes).expect("write");
        let entries = read_all(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "init", "little", "little/agent.conf"]
        );
        let conf = &entries[4];
        assert_eq!(conf.1, 0o100644);
        assert_eq!(conf.2, 1000);
        assert_eq!(conf.3, b"arg=/bin/sh\n");
        assert_eq!(entries[2].1 & 0o170000, 0o120000, "symlink");
        assert_eq!(entries[2].3, b"/little/agent");
        assert_eq!(entries[1].1 & 0o170000, 0o020000, "char device");
    }

    #[test]
    fn hostile_paths_are_refused() {
        let mut fs = Initramfs::new();
        for p in ["relative", "/", "/a/../b", "/./a", "//a", "/a/", "/nul\0"] {
            assert!(matches!(fs.dir(p, 0o755), Err(Error::BadPath(_))), "{p:?}");
        }
    }

    #[test]
    fn parents_must_exist_and_paths_are_unique() {
        let mut fs = Initramfs::new();
        assert!(matches!(
            fs.file("/a/b", 0o644, vec![]),
            Err(Error::NoParent(_))
        ));
        fs.dir("/a", 0o755).expect("dir");
        fs.file("/a/b", 0o644, vec![]).expect("file");
        assert!(matches!(
            fs.file("/a/b", 0o644, vec![]),
            Err(Error::Duplicate(_))
        ));
        assert!(
            matches!(fs.file("/a/b/c", 0o644, vec![]), Err(Error::NoParent(_))),
            "parent is a file"
        );
    }

    #[test]
    fn missing_host_file_is_a_clear_error() {
        let mut fs = Initramfs::new();
        let e = fs
            .host_file("/x", 0o755, Path::new("/nonexistent/file"))
            .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/file"));
    }
}
