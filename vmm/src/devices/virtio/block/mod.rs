//! virtio-blk (virtio 1.2, section 5.2): raw disk images served from the
//! VMM's io_uring event loop.
//!
//! [`BlockConfig`] says which file backs a disk and how; [`Disk`] is the
//! opened image; [`device::Block`] is the [`VirtioDevice`](super::VirtioDevice)
//! the MMIO transport drives; [`request`] turns one descriptor chain into
//! a checked [`request::Request`]; `handler.rs` runs the queue on the event
//! loop; [`persist`] is what a snapshot keeps of it.
//!
//! ```
//! use vmm::devices::virtio::block::BlockConfig;
//!
//! let c = BlockConfig::parse("path=/images/root.erofs,ro,serial=root").unwrap();
//! assert!(c.read_only);
//! assert_eq!(c.serial.as_deref(), Some("root"));
//! ```

pub mod device;
mod handler;
pub mod persist;
pub mod request;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

pub use device::Block;

/// Bytes in a virtio-blk sector (the unit of `sector` and `capacity`,
/// whatever the disk's logical block size).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the GET_ID answer (a serial, NUL-padded, not NUL-terminated
/// when it uses all 20 bytes).
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Errors while configuring or opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--drive` value could not be parsed.
    #[error("invalid drive {spec:?}: {reason}")]
    Syntax {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The image could not be opened.
    #[error("cannot open disk image {0}")]
    Open(String, #[source] std::io::Error),
    /// The image's size could not be read.
    #[error("cannot read the size of disk image {0}")]
    Metadata(String, #[source] std::io::Error),
    /// The image is not a regular file or block device with whole sectors.
    #[error("disk image {0} is not a file or block device of at least one 512-byte sector")]
    Empty(String),
}

/// One disk: its image file and how the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw image file (or block device).
    pub path: PathBuf,
    /// Offer the disk read-only (VIRTIO_BLK_F_RO) and open the file O_RDONLY.
    pub read_only: bool,
    /// GET_ID serial (1..=20 printable ASCII bytes); default derived from
    /// the file's device and inode numbers.
    pub serial: Option<String>,
}

impl BlockConfig {
    /// A read-write disk backed by `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            serial: None,
        }
    }

    /// Parses `path=PATH[,ro][,serial=ID]` (the `--drive` syntax). Keys may
    /// come in any order; a path containing a comma is not expressible.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let bad = |reason| Error::Syntax {
            spec: spec.to_owned(),
            reason,
        };
        let (mut path, mut read_only, mut serial) = (None, false, None);
        for part in spec.split(',') {
            match part {
                "ro" => read_only = true,
                "rw" => read_only = false,
                _ => match part.split_once('=') {
                    Some(("path", "")) => return Err(bad("empty path")),
                    Some(("path", p)) => {
                        if path.replace(PathBuf::from(p)).is_some() {
                            return Err(bad("path given twice"));
                        }
                    }
                    Some(("serial", s)) => {
                        let ok = !s.is_empty()
                            && s.len() <= ID_BYTES
                            && s.bytes().all(|b| b.is_ascii_graphic());
                        if !ok {
                            return Err(bad("serial must be 1 to 20 printable ASCII characters"));
                        }
                        if serial.replace(s.to_owned()).is_some() {
                            return Err(bad("serial given twice"));
                        }
                    }
                    _ => return Err(bad("expected path=PATH, ro, rw or serial=ID")),
                },
            }
        }
        let path = path.ok_or_else(|| bad("missing path=PATH"))?;
        Ok(Self {
            path,
            read_only,
            serial,
        })
    }
}

/// An opened disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens the image `config` names: O_RDONLY for a read-only disk.
    /// Capacity is the file size in whole sectors; a trailing partial
    /// sector is not visible to the guest.
    pub fn open(config: &BlockConfig) -> Result<Self, Error> {
        let name = config.path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|e| Error::Open(name.clone(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::Metadata(name.clone(), e))?;
        let bytes = if meta.file_type().is_file() {
            meta.len()
        } else if !meta.file_type().is_block_device() {
            return Err(Error::Empty(name));
        } else {
            // A block device reports 0 in st_size: ask the file itself.
            use std::io::{Seek, SeekFrom};
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::Metadata(name.clone(), e))?
        };
        let capacity = bytes / SECTOR_SIZE;
        if capacity == 0 {
            return Err(Error::Empty(name));
        }
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "disk image {name}: the last {} bytes are not a whole sector and are hidden",
                bytes % SECTOR_SIZE
            );
        }
        let mut id = [0u8; ID_BYTES];
        let serial = config
            .serial
            .clone()
            .unwrap_or_else(|| format!("{:x}-{:x}", meta.dev(), meta.ino()));
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only: config.read_only,
            capacity,
            id,
        })
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The GET_ID answer.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Deallocates (`punch`) or zeroes `len` bytes at `offset`; the image
    /// keeps its size and the range reads back as zeros either way.
    pub fn fallocate(&self, punch: bool, offset: u64, len: u64) -> std::io::Result<()> {
        let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
        let mode = libc::FALLOC_FL_KEEP_SIZE
            | if punch {
                libc::FALLOC_FL_PUNCH_HOLE
            } else {
                libc::FALLOC_FL_ZERO_RANGE
            };
        // SAFETY: fallocate(2) takes no pointers; the fd belongs to
        // self.file, which is open for the whole call.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;
