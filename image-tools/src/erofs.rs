//! An uncompressed erofs image writer, straight from a [`Tree`]: no root,
//! no extraction to the host filesystem, owners, modes, device numbers,
//! xattrs and mtimes taken from the index as they are.
//!
//! Why erofs and why our own writer: the guest mounts the base image
//! read-only under an overlay, which is what erofs is for (compact
//! metadata, small files inlined next to their inode, no journal or free
//! space maps, so the image is little more than the data), and the kernel
//! reads it without a block allocator in the way. Debian 12's erofs-utils
//! 1.5 can only build from a directory (its `--tar` mode came in 1.6), which
//! would mean extracting hostile layers to disk with their owners (root or
//! fakeroot); writing the format ourselves skips that copy and the
//! privilege. `fsck.erofs` checks the output in the tests.
//!
//! Layout (4 KiB blocks, as the kernel requires `blkszbits == PAGE_SHIFT`):
//! block 0 holds the superblock at byte 1024, then the inodes (64-byte
//! extended form, so 32-bit uid/gid and per-inode mtime), each followed by
//! its xattrs and, when it fits in the same block, the tail of its data
//! (`FLAT_INLINE`). Full data blocks follow the metadata, one contiguous
//! run per inode (`FLAT_PLAIN` or the head of `FLAT_INLINE`). Directory
//! blocks hold sorted 12-byte dirents then their names, as the kernel's
//! binary-search lookup expects.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::tree::{Kind, NodeId, Tree, ROOT};

/// Block size: the guest's page size.
pub const BLOCK: u64 = 4096;
const BLOCK_USIZE: usize = 4096;
const MAGIC: u32 = 0xE0F5_E1E2;
const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_SIZE: u64 = 128;
const INODE_SIZE: u64 = 64;
const XATTR_HEADER: usize = 12;
const DIRENT_SIZE: usize = 12;
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// Reading a data source or writing the image failed.
    #[error("erofs image I/O failed")]
    Io(#[from] io::Error),
    /// A data source is shorter than a file that points into it.
    #[error("data source {0} is shorter than the files that point into it")]
    ShortSource(PathBuf),
    /// The image would pass erofs' 32-bit block addresses (16 TiB).
    #[error("the image is too large for erofs")]
    TooLarge,
    /// An xattr value is longer than erofs' 16-bit size field.
    #[error("an xattr value is longer than 65535 bytes")]
    XattrTooLarge,
}

/// What the writer produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Inodes written.
    pub inodes: u64,
    /// Image size in bytes.
    pub bytes: u64,
}

struct Inode {
    node: NodeId,
    nlink: u32,
    size: u64,
    xattrs: Vec<u8>,
    layout: u16,
    /// Byte offset of the inode (its nid is this / 32).
    pos: u64,
    blkaddr: u32,
    /// Directory entries: name, target node, file type.
    dirents: Vec<(Vec<u8>, NodeId, u8)>,
}

impl Inode {
    fn nid(&self) -> u64 {
        self.pos / 32
    }

    fn tail(&self) -> u64 {
        if self.layout == LAYOUT_FLAT_INLINE {
            self.size % BLOCK
        } else {
            0
        }
    }

    fn full_blocks(&self) -> u64 {
        if self.layout == LAYOUT_FLAT_INLINE {
            self.size / BLOCK
        } else {
            self.size.div_ceil(BLOCK)
        }
    }
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File(_) => 1,
        Kind::Dir(_) => 2,
        Kind::CharDev { .. } => 3,
        Kind::BlockDev { .. } => 4,
        Kind::Fifo => 5,
        Kind::Symlink(_) => 7,
    }
}

fn type_bits(kind: &Kind) -> u16 {
    match kind {
        Kind::File(_) => 0o100000,
        Kind::Dir(_) => 0o040000,
        Kind::CharDev { .. } => 0o020000,
        Kind::BlockDev { .. } => 0o060000,
        Kind::Fifo => 0o010000,
        Kind::Symlink(_) => 0o120000,
    }
}

/// Linux's `new_encode_dev`, which erofs stores for device inodes.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The inode's xattr body: a 12-byte header then 4-byte aligned entries.
/// Names with a prefix erofs has no index for are dropped.
fn xattr_body(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>, ErofsError> {
    const PREFIXES: [(&[u8], u8); 6] = [
        (b"system.posix_acl_access", 2),
        (b"system.posix_acl_default", 3),
        (b"user.", 1),
        (b"trusted.", 4),
        (b"lustre.", 5),
        (b"security.", 6),
    ];
    let mut body = Vec::new();
    for (name, value) in xattrs {
        let Some((suffix, index)) = PREFIXES
            .iter()
            .find_map(|(p, i)| name.strip_prefix(*p).map(|s| (s, *i)))
        else {
            continue;
        };
        let Ok(name_len) = u8::try_from(suffix.len()) else {
            continue;
        };
        let value_len = u16::try_from(value.len()).map_err(|_| ErofsError::XattrTooLarge)?;
        body.push(name_len);
        body.push(index);
        body.extend_from_slice(&value_len.to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    if body.is_empty() {
        return Ok(body);
    }
    let mut out = vec![0u8; XATTR_HEADER];
    out.extend_from_slice(&body);
    Ok(out)
}

/// Packs sorted dirents into blocks; returns the blocks' byte size (the
/// last one trimmed to what it uses).
fn dir_size(dirents: &[(Vec<u8>, NodeId, u8)]) -> u64 {
    let mut size = 0u64;
    let mut used = 0usize;
    for (name, _, _) in dirents {
        let need = DIRENT_SIZE + name.len();
        if used + need > BLOCK_USIZE {
            size += BLOCK;
            used = 0;
        }
        used += need;
    }
    size + used as u64
}

/// The directory's bytes (same packing as [`dir_size`]), names NUL-padded
/// to the block end so the kernel's name scan stops.
fn dir_bytes(dirents: &[(Vec<u8>, NodeId, u8)], nids: &HashMap<NodeId, u64>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < dirents.len() {
        let mut end = start;
        let mut used = 0;
        while end < dirents.len() && used + DIRENT_SIZE + dirents[end].0.len() <= BLOCK_USIZE {
            used += DIRENT_SIZE + dirents[end].0.len();
            end += 1;
        }
        let block = &dirents[start..end];
        let base = out.len();
        let mut nameoff = DIRENT_SIZE * block.len();
        for (name, node, ftype) in block {
            out.extend_from_slice(&nids.get(node).copied().unwrap_or(0).to_le_bytes());
            let nameoff16 = u16::try_from(nameoff).expect("names of one block end before 4096");
            out.extend_from_slice(&nameoff16.to_le_bytes());
            out.push(*ftype);
            out.push(0);
            nameoff += name.len();
        }
        for (name, _, _) in block {
            out.extend_from_slice(name);
        }
        if end < dirents.len() {
            out.resize(base + BLOCK_USIZE, 0);
        }
        start = end;
    }
    out
}

/// Writes `tree` as an erofs image at `out`. `sources[i]` is the file that
/// [`crate::tree::DataRef::source`] `i` refers to; `uuid` names the volume.
pub fn write_image(
    tree: &Tree,
    sources: &[PathBuf],
    out: &Path,
    uuid: [u8; 16],
) -> Result<Stats, ErofsError> {
    // Inodes in breadth-first order from the root (nid fits 16 bits in the
    // superblock only for the root, which comes first); hard links share.
    let mut inodes: Vec<Inode> = Vec::new();
    let mut index: HashMap<NodeId, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([(ROOT, ROOT)]);
    index.insert(ROOT, 0);
    inodes.push(Inode {
        node: ROOT,
        nlink: 0,
        size: 0,
        xattrs: Vec::new(),
        layout: LAYOUT_FLAT_PLAIN,
        pos: 0,
        blkaddr: 0,
        dirents: Vec::new(),
    });
    while let Some((dir, parent)) = queue.pop_front() {
        let Some(entries) = tree.entries(dir) else {
            continue;
        };
        let mut dirents = vec![(b".".to_vec(), dir, 2u8), (b"..".to_vec(), parent, 2u8)];
        for (name, child) in entries {
            let node = &tree.nodes[child.node];
            dirents.push((name.clone(), child.node, file_type(&node.kind)));
            match index.get(&child.node) {
                Some(&i) => inodes[i].nlink += 1,
                None => {
                    index.insert(child.node, inodes.len());
                    inodes.push(Inode {
                        node: child.node,
                        nlink: 1,
                        size: 0,
                        xattrs: Vec::new(),
                        layout: LAYOUT_FLAT_PLAIN,
                        pos: 0,
                        blkaddr: 0,
                        dirents: Vec::new(),
                    });
                    if matches!(node.kind, Kind::Dir(_)) {
                        queue.push_back((child.node, dir));
                    }
                }
            }
        }
        dirents.sort_by(|a, b| a.0.cmp(&b.0));
        let subdirs = dirents.iter().filter(|d| d.2 == 2).count() - 2;
        let i = index[&dir];
        inodes[i].nlink = 2 + u32::try_from(subdirs).unwrap_or(u32::MAX - 2);
        inodes[i].dirents = dirents;
    }

    // Sizes, xattrs, then the metadata layout.
    let mut pos = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE;
    for inode in &mut inodes {
        let node = &tree.nodes[inode.node];
        inode.size = match &node.kind {
            Kind::File(data) => data.map_or(0, |d| d.len),
            Kind::Symlink(target) => target.len() as u64,
            Kind::Dir(_) => dir_size(&inode.dirents),
            _ => 0,
        };
        inode.xattrs = xattr_body(&node.meta.xattrs)?;
        let ibody = INODE_SIZE + inode.xattrs.len() as u64;
        let tail = inode.size % BLOCK;
        // Directories keep one zero byte after an inline tail.
        let tail_room = tail + u64::from(matches!(node.kind, Kind::Dir(_)));
        let inline = tail > 0 && ibody + tail_room <= BLOCK;
        if inline {
            if pos % BLOCK + ibody + tail_room > BLOCK {
                pos = pos.next_multiple_of(BLOCK);
            }
            inode.layout = LAYOUT_FLAT_INLINE;
            inode.pos = pos;
            pos += ibody + tail_room;
        } else {
            if pos % BLOCK + ibody > BLOCK && ibody <= BLOCK {
                pos = pos.next_multiple_of(BLOCK);
            }
            inode.pos = pos;
            pos += ibody;
        }
        pos = pos.next_multiple_of(32);
    }
    let mut block = pos.div_ceil(BLOCK);
    for inode in &mut inodes {
        let n = inode.full_blocks();
        if n > 0 {
            inode.blkaddr = u32::try_from(block).map_err(|_| ErofsError::TooLarge)?;
            block += n;
        }
    }
    let total_blocks = u32::try_from(block).map_err(|_| ErofsError::TooLarge)?;
    let nids: HashMap<NodeId, u64> = inodes.iter().map(|i| (i.node, i.nid())).collect();

    let files: Vec<File> = sources.iter().map(File::open).collect::<Result<_, _>>()?;
    let read_range = |source: u32, offset: u64, buf: &mut [u8]| -> Result<(), ErofsError> {
        let i = source as usize;
        let file = files
            .get(i)
            .ok_or_else(|| ErofsError::ShortSource(PathBuf::from(format!("#{source}"))))?;
        file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ErofsError::ShortSource(sources[i].clone())
            } else {
                ErofsError::Io(e)
            }
        })
    };
    // The bytes of the inode's data from `from` to its end (small: tails
    // and directories, symlinks).
    let small_data = |inode: &Inode, from: u64| -> Result<Vec<u8>, ErofsError> {
        let node = &tree.nodes[inode.node];
        let len = usize::try_from(inode.size - from).map_err(|_| ErofsError::TooLarge)?;
        let from_u = usize::try_from(from).map_err(|_| ErofsError::TooLarge)?;
        Ok(match &node.kind {
            Kind::File(Some(d)) => {
                let mut buf = vec![0u8; len];
                read_range(d.source, d.offset + from, &mut buf)?;
                buf
            }
            Kind::Symlink(target) => target[from_u..].to_vec(),
            Kind::Dir(_) => dir_bytes(&inode.dirents, &nids)[from_u..].to_vec(),
            _ => Vec::new(),
        })
    };

    let mut w = BufWriter::with_capacity(1 << 20, File::create(out)?);
    let mut sb = vec![0u8; 1024];
    sb.extend_from_slice(&MAGIC.to_le_bytes());
    sb.extend_from_slice(&0u32.to_le_bytes()); // checksum (feature off)
    sb.extend_from_slice(&0u32.to_le_bytes()); // feature_compat
    sb.push(12); // blkszbits
    sb.push(0); // sb_extslots
    let root_nid = u16::try_from(inodes[0].nid()).map_err(|_| ErofsError::TooLarge)?;
    sb.extend_from_slice(&root_nid.to_le_bytes());
    sb.extend_from_slice(&(inodes.len() as u64).to_le_bytes());
    sb.extend_from_slice(&0u64.to_le_bytes()); // build_time: reproducible
    sb.extend_from_slice(&0u32.to_le_bytes()); // build_time_nsec
    sb.extend_from_slice(&total_blocks.to_le_bytes());
    sb.extend_from_slice(&0u32.to_le_bytes()); // meta_blkaddr
    sb.extend_from_slice(&0u32.to_le_bytes()); // xattr_blkaddr
    sb.extend_from_slice(&uuid);
    sb.extend_from_slice(&[0u8; 16]); // volume_name
    sb.extend_from_slice(&0u32.to_le_bytes()); // feature_incompat
    sb.resize(1024 + 128, 0);
    w.write_all(&sb)?;
    let mut at = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE;
    let pad_to = |w: &mut BufWriter<File>, at: &mut u64, to: u64| -> io::Result<()> {
        io::copy(&mut io::repeat(0).take(to - *at), w)?;
        *at = to;
        Ok(())
    };
    for (i, inode) in inodes.iter().enumerate() {
        let node = &tree.nodes[inode.node];
        pad_to(&mut w, &mut at, inode.pos)?;
        let mut raw = [0u8; 64];
        let format: u16 = 1 | (inode.layout << 1);
        raw[0..2].copy_from_slice(&format.to_le_bytes());
        let icount: u16 = if inode.xattrs.is_empty() {
            0
        } else {
            u16::try_from(1 + (inode.xattrs.len() - XATTR_HEADER) / 4)
                .map_err(|_| ErofsError::XattrTooLarge)?
        };
        raw[2..4].copy_from_slice(&icount.to_le_bytes());
        let mode =
            type_bits(&node.kind) | u16::try_from(node.meta.mode & 0o7777).expect("12 bits fit");
        raw[4..6].copy_from_slice(&mode.to_le_bytes());
        raw[8..16].copy_from_slice(&inode.size.to_le_bytes());
        let u = match node.kind {
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                encode_dev(major, minor)
            }
            _ => inode.blkaddr,
        };
        raw[16..20].copy_from_slice(&u.to_le_bytes());
        raw[20..24].copy_from_slice(
            &u32::try_from(i + 1)
                .map_err(|_| ErofsError::TooLarge)?
                .to_le_bytes(),
        );
        raw[24..28].copy_from_slice(&node.meta.uid.to_le_bytes());
        raw[28..32].copy_from_slice(&node.meta.gid.to_le_bytes());
        raw[32..40].copy_from_slice(&node.meta.mtime.to_le_bytes());
        raw[44..48].copy_from_slice(&inode.nlink.to_le_bytes());
        w.write_all(&raw)?;
        w.write_all(&inode.xattrs)?;
        at += INODE_SIZE + inode.xattrs.len() as u64;
        let tail = inode.tail();
        if tail > 0 {
            let bytes = small_data(inode, inode.size - tail)?;
            w.write_all(&bytes)?;
            at += bytes.len() as u64;
        }
    }
    pad_to(&mut w, &mut at, pos.div_ceil(BLOCK) * BLOCK)?;

    let mut buf = vec![0u8; 1 << 20];
    for inode in &inodes {
        let n = inode.full_blocks();
        if n == 0 {
            continue;
        }
        debug_assert_eq!(at, u64::from(inode.blkaddr) * BLOCK);
        let len = inode.size - inode.tail();
        match &tree.nodes[inode.node].kind {
            Kind::File(Some(d)) => {
                let mut done = 0;
                while done < len {
                    let chunk = usize::try_from(len - done).map_or(buf.len(), |l| l.min(buf.len()));
                    read_range(d.source, d.offset + done, &mut buf[..chunk])?;
                    w.write_all(&buf[..chunk])?;
                    done += chunk as u64;
                }
            }
            _ => {
                let bytes = small_data(inode, 0)?;
                w.write_all(
                    &bytes[..bytes.len() - usize::try_from(inode.tail()).expect("tail < block")],
                )?;
            }
        }
        at += len;
        pad_to(&mut w, &mut at, (u64::from(inode.blkaddr) + n) * BLOCK)?;
    }
    let mut file = w.into_inner().map_err(|e| e.into_error())?;
    file.flush()?;
    let bytes = file.stream_position()?;
    Ok(Stats {
        inodes: inodes.len() as u64,
        bytes,
    })
}
