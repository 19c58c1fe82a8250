//! Reading layer tarballs (uncompressed, gzip or zstd) and applying them,
//! in order, to a [`Tree`] with OCI whiteout semantics.
//!
//! A layer is read once, as a stream. A compressed layer's decompressed
//! bytes are teed into a spool file so that file contents can be referenced
//! by offset; an uncompressed layer is referenced in place. Every archive is
//! hostile: the unpacked bytes and the entry count are capped over the whole
//! image ([`Limits`]), paths go through [`split_path`], links are resolved
//! inside the tree only, and truncated archives are an error.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::oci::Digest;
use crate::tarbound;
use crate::tree::{split_path, DataRef, Kind, Meta, Node, PathError, Tree};

/// Caps over one image import.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most decompressed layer bytes, all layers together.
    pub max_unpacked_bytes: u64,
    /// Most tar entries, all layers together.
    pub max_entries: u64,
    /// Most extended-attribute bytes (names and values) on one entry.
    pub max_xattr_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_unpacked_bytes: 64 << 30,
            max_entries: 4_000_000,
            max_xattr_bytes: 64 << 10,
        }
    }
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading the blob or writing the spool failed.
    #[error("layer I/O failed")]
    Io(#[from] io::Error),
    /// The layer is not a valid tar archive (or is truncated).
    #[error("layer {layer} is not a valid tar archive")]
    Tar {
        /// Layer index.
        layer: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An entry's path is refused.
    #[error("layer {layer} has a bad path")]
    Path {
        /// Layer index.
        layer: usize,
        /// Cause.
        #[source]
        source: PathError,
    },
    /// The decompressed size went over [`Limits::max_unpacked_bytes`].
    #[error("the image unpacks to more than {0} bytes")]
    TooLarge(u64),
    /// The entry count went over [`Limits::max_entries`].
    #[error("the image has more than {0} entries")]
    TooManyEntries(u64),
    /// An entry type that images do not carry (sparse files, sockets...).
    #[error("layer {layer}: entry {path:?} has an unsupported type {kind:?}")]
    Unsupported {
        /// Layer index.
        layer: usize,
        /// Entry path.
        path: String,
        /// The tar type byte.
        kind: u8,
    },
    /// A hard link names a missing entry or a directory.
    #[error(
        "layer {layer}: hard link {path:?} points to {target:?}, which is not a file in the image"
    )]
    BadHardLink {
        /// Layer index.
        layer: usize,
        /// Entry path.
        path: String,
        /// Link target.
        target: String,
    },
    /// A whiteout names `.`, `..` or nothing.
    #[error("layer {layer}: invalid whiteout {path:?}")]
    BadWhiteout {
        /// Layer index.
        layer: usize,
        /// Entry path.
        path: String,
    },
    /// A numeric field (uid, gid, device) does not fit.
    #[error("layer {layer}: entry {path:?} has an out-of-range {field}")]
    BadField {
        /// Layer index.
        layer: usize,
        /// Entry path.
        path: String,
        /// Which field.
        field: &'static str,
    },
    /// Too many extended-attribute bytes on one entry.
    #[error("layer {layer}: entry {path:?} has too many xattr bytes")]
    XattrsTooLarge {
        /// Layer index.
        layer: usize,
        /// Entry path.
        path: String,
    },
}

/// Running totals checked against [`Limits`] across layers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Budget {
    /// Decompressed bytes read so far.
    pub unpacked: u64,
    /// Entries read so far.
    pub entries: u64,
}

/// How a layer blob is compressed, sniffed from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Recognises gzip and zstd magic numbers; anything else is a plain tar.
    pub fn sniff(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Self::Zstd,
            _ => Self::None,
        }
    }
}

/// Counts the decompressed bytes, stops at the cap, and optionally tees
/// them into a spool file so file data keeps its stream offset.
struct Tee<R> {
    inner: R,
    hasher: Sha256,
    spool: Option<BufWriter<File>>,
    read: u64,
    cap: u64,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.cap {
            return Err(io::Error::other(CapExceeded));
        }
        self.hasher.update(&buf[..n]);
        if let Some(spool) = self.spool.as_mut() {
            spool.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct CapExceeded;

impl std::fmt::Display for CapExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("decompressed size cap exceeded")
    }
}

impl std::error::Error for CapExceeded {}

/// What one tar entry adds to the tree.
#[derive(Debug)]
enum Op {
    Add { path: Vec<u8>, node: Node },
    HardLink { path: Vec<u8>, target: Vec<u8> },
    Whiteout { path: Vec<u8> },
    Opaque { dir: Vec<u8> },
}

/// Splits `path` (trailing slashes ignored) into parent and last name.
fn split_base(path: &[u8]) -> (&[u8], &[u8]) {
    let mut end = path.len();
    while end > 0 && path[end - 1] == b'/' {
        end -= 1;
    }
    let trimmed = &path[..end];
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (&[], trimmed),
    }
}

fn as_refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(Vec::as_slice).collect()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads layer number `layer` from `blob` and applies it to `tree`.
/// `source` is the index file data will be referenced by: the blob itself
/// when it is a plain tar, else `spool`, which receives the decompressed
/// tar. Returns whether the spool was used and the digest of the
/// uncompressed tar (the layer's diff id).
pub fn apply_layer(
    tree: &mut Tree,
    layer: usize,
    blob: &Path,
    spool: &Path,
    source: u32,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<(bool, Digest), LayerError> {
    let mut file = BufReader::with_capacity(1 << 20, File::open(blob)?);
    let head = {
        use std::io::BufRead;
        file.fill_buf()?.to_vec()
    };
    let compression = Compression::sniff(&head);
    let decoder: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    };
    let spooled = compression != Compression::None;
    let spool_writer = if spooled {
        Some(BufWriter::with_capacity(1 << 20, File::create(spool)?))
    } else {
        None
    };
    let cap = limits.max_unpacked_bytes.saturating_sub(budget.unpacked);
    let tee = Tee {
        inner: decoder,
        hasher: Sha256::new(),
        spool: spool_writer,
        read: 0,
        cap,
    };
    let (ops, tee) = read_ops(tee, layer, source, limits, budget)?;
    budget.unpacked += tee.read;
    if let Some(mut spool) = tee.spool {
        spool.flush()?;
    }
    apply_ops(tree, layer, ops)?;
    Ok((spooled, Digest::from_hasher(tee.hasher)))
}

/// Parses a tar stream into tree operations; file data stays in the stream.
fn read_ops<R: Read>(
    reader: Tee<R>,
    layer: usize,
    source: u32,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<(Vec<Op>, Tee<R>), LayerError> {
    let tar_err = |source: io::Error| {
        if source
            .get_ref()
            .is_some_and(|e| e.downcast_ref::<CapExceeded>().is_some())
        {
            LayerError::TooLarge(limits.max_unpacked_bytes)
        } else {
            LayerError::Tar { layer, source }
        }
    };
    let (mut archive, meter) = tarbound::archive(reader);
    let mut ops = Vec::new();
    let mut files: Vec<(u64, u64)> = Vec::new();
    for entry in tarbound::entries(&mut archive, &meter).map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        budget.entries += 1;
        if budget.entries > limits.max_entries {
            return Err(LayerError::TooManyEntries(limits.max_entries));
        }
        let path = entry.path_bytes().into_owned();
        let header = entry.header();
        let kind_byte = header.entry_type().as_byte();
        let bad = |field| LayerError::BadField {
            layer,
            path: lossy(&path),
            field,
        };
        let mut meta = Meta {
            mode: header.mode().map_err(|_| bad("mode"))? & 0o7777,
            uid: u32::try_from(header.uid().map_err(|_| bad("uid"))?).map_err(|_| bad("uid"))?,
            gid: u32::try_from(header.gid().map_err(|_| bad("gid"))?).map_err(|_| bad("gid"))?,
            mtime: header.mtime().map_err(|_| bad("mtime"))?,
            xattrs: Vec::new(),
        };
        let device = |header: &tar::Header| -> Result<(u32, u32), LayerError> {
            let major = header.device_major().map_err(|_| bad("device"))?;
            let minor = header.device_minor().map_err(|_| bad("device"))?;
            Ok((major.unwrap_or(0), minor.unwrap_or(0)))
        };
        let entry_type = header.entry_type();
        let dev = if entry_type.is_character_special() || entry_type.is_block_special() {
            device(header)?
        } else {
            (0, 0)
        };
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        if let Some(pax) = entry.pax_extensions().map_err(tar_err)? {
            let mut xattr_bytes = 0usize;
            for ext in pax {
                let ext = ext.map_err(tar_err)?;
                let (key, value) = (ext.key_bytes(), ext.value_bytes());
                let parse = |v: &[u8]| -> Option<u64> {
                    let int = v.split(|&b| b == b'.').next()?;
                    std::str::from_utf8(int).ok()?.parse().ok()
                };
                match key {
                    b"uid" => {
                        meta.uid = parse(value)
                            .and_then(|v| u32::try_from(v).ok())
                            .ok_or_else(|| bad("uid"))?
                    }
                    b"gid" => {
                        meta.gid = parse(value)
                            .and_then(|v| u32::try_from(v).ok())
                            .ok_or_else(|| bad("gid"))?
                    }
                    // Negative or malformed times become 0 (the epoch).
                    b"mtime" => meta.mtime = parse(value).unwrap_or(0),
                    _ => {
                        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                            xattr_bytes += name.len() + value.len();
                            if xattr_bytes > limits.max_xattr_bytes {
                                return Err(LayerError::XattrsTooLarge {
                                    layer,
                                    path: lossy(&path),
                                });
                            }
                            meta.xattrs.push((name.to_vec(), value.to_vec()));
                        }
                    }
                }
            }
            meta.xattrs.sort();
            meta.xattrs.dedup_by(|a, b| a.0 == b.0);
        }
        let (parent, base) = split_base(&path);
        if base == b".wh..wh..opq" {
            ops.push(Op::Opaque {
                dir: parent.to_vec(),
            });
            continue;
        }
        if base.starts_with(b".wh..wh.") {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content.
            continue;
        }
        if let Some(name) = base.strip_prefix(b".wh.") {
            if name.is_empty() || name == b"." || name == b".." {
                return Err(LayerError::BadWhiteout {
                    layer,
                    path: lossy(&path),
                });
            }
            let mut target = parent.to_vec();
            target.push(b'/');
            target.extend_from_slice(name);
            ops.push(Op::Whiteout { path: target });
            continue;
        }
        let kind = match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let len = entry.size();
                let offset = entry.raw_file_position();
                files.push((offset, len));
                Kind::File((len > 0).then_some(DataRef {
                    source,
                    offset,
                    len,
                }))
            }
            tar::EntryType::Directory => Kind::Dir(Default::default()),
            tar::EntryType::Symlink => Kind::Symlink(link.unwrap_or_default()),
            tar::EntryType::Link => {
                ops.push(Op::HardLink {
                    path,
                    target: link.unwrap_or_default(),
                });
                continue;
            }
            tar::EntryType::Char => Kind::CharDev {
                major: dev.0,
                minor: dev.1,
            },
            tar::EntryType::Block => Kind::BlockDev {
                major: dev.0,
                minor: dev.1,
            },
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::XGlobalHeader => continue,
            _ => {
                return Err(LayerError::Unsupported {
                    layer,
                    path: lossy(&path),
                    kind: kind_byte,
                })
            }
        };
        // Drain the data now so a truncated archive fails here, with the
        // entry, rather than being silently cut.
        io::copy(&mut entry, &mut io::sink()).map_err(tar_err)?;
        ops.push(Op::Add {
            path,
            node: Node { meta, kind },
        });
    }
    let mut reader = archive.into_inner().into_inner();
    // The end-of-archive blocks and any padding count toward the diff id.
    io::copy(&mut reader, &mut io::sink()).map_err(tar_err)?;
    // A data range past what the stream held means the archive was cut.
    if let Some(&(offset, len)) = files
        .iter()
        .find(|(offset, len)| offset.saturating_add(*len) > reader.read)
    {
        return Err(LayerError::Tar {
            layer,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file data at {offset}+{len} is past the end of the archive"),
            ),
        });
    }
    Ok((ops, reader))
}

/// Applies one layer: its whiteouts and opaque markers first (they only
/// hide lower layers, wherever they sit in the archive), then its entries
/// in archive order.
fn apply_ops(tree: &mut Tree, layer: usize, ops: Vec<Op>) -> Result<(), LayerError> {
    let split = |p: &[u8]| -> Result<Vec<Vec<u8>>, LayerError> {
        split_path(p)
            .map(|v| v.into_iter().map(<[u8]>::to_vec).collect())
            .map_err(|source| LayerError::Path { layer, source })
    };
    for op in &ops {
        match op {
            Op::Whiteout { path } => {
                let parts = split(path)?;
                let Some((name, parent)) = parts.split_last() else {
                    continue;
                };
                if let Some(dir) = tree.lookup(&as_refs(parent)) {
                    tree.whiteout(dir, name, layer);
                }
            }
            Op::Opaque { dir } => {
                let parts = split(dir)?;
                if let Some(dir) = tree.lookup(&as_refs(&parts)) {
                    tree.make_opaque(dir, layer);
                }
            }
            _ => {}
        }
    }
    for op in ops {
        match op {
            Op::Add { path, node } => {
                let parts = split(&path)?;
                let Some((name, parent)) = parts.split_last() else {
                    // The root itself: keep its entries, take its metadata.
                    if matches!(node.kind, Kind::Dir(_)) {
                        tree.nodes[crate::tree::ROOT].meta = node.meta;
                    }
                    continue;
                };
                let dir = tree.make_dirs(&as_refs(parent), layer);
                let existing = tree
                    .entries(dir)
                    .and_then(|e| e.get(name.as_slice()))
                    .map(|c| c.node);
                match existing {
                    // A directory over a directory merges: new metadata,
                    // same entries.
                    Some(old)
                        if matches!(node.kind, Kind::Dir(_))
                            && matches!(tree.nodes[old].kind, Kind::Dir(_)) =>
                    {
                        tree.nodes[old].meta = node.meta;
                    }
                    _ => {
                        let id = tree.add(node);
                        tree.link(dir, name, id, layer);
                    }
                }
            }
            Op::HardLink { path, target } => {
                let parts = split(&path)?;
                let target_parts = split(&target)?;
                let bad = || LayerError::BadHardLink {
                    layer,
                    path: lossy(&path),
                    target: lossy(&target),
                };
                let node = tree.lookup(&as_refs(&target_parts)).ok_or_else(bad)?;
                if matches!(tree.nodes[node].kind, Kind::Dir(_)) {
                    return Err(bad());
                }
                let Some((name, parent)) = parts.split_last() else {
                    return Err(bad());
                };
                let dir = tree.make_dirs(&as_refs(parent), layer);
                tree.link(dir, name, node, layer);
            }
            Op::Whiteout { .. } | Op::Opaque { .. } => {}
        }
    }
    Ok(())
}

/// Parses one tar stream held in memory into a fresh tree (for fuzzing and
/// tests): the same code path as [`apply_layer`] on a plain tar.
pub fn apply_tar_bytes(
    tree: &mut Tree,
    layer: usize,
    tar: &[u8],
    limits: &Limits,
    budget: &mut Budget,
) -> Result<(), LayerError> {
    let cap = limits.max_unpacked_bytes.saturating_sub(budget.unpacked);
    let tee = Tee {
        inner: tar,
        hasher: Sha256::new(),
        spool: None,
        read: 0,
        cap,
    };
    let (ops, tee) = read_ops(tee, layer, 0, limits, budget)?;
    budget.unpacked += tee.read;
    apply_ops(tree, layer, ops)
}
