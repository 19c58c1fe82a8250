//! The snapshot file: a fixed header, the serialized VM state, then the
//! guest memory image at a page-aligned offset (sparse: zero pages are holes),
//! so that a restore can map the memory straight from the file.
//!
//! ```text
//! 0        header (64 bytes, little endian, CRC-protected)
//! 64       state  (bincode, `state_len` bytes, CRC in the header)
//! mem_off  guest memory, regions back to back (page aligned)
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// File magic.
pub const MAGIC: [u8; 8] = *b"LTLSNAP\0";
/// Current format version. Bump on any incompatible change of the state.
pub const VERSION: u32 = 3;
/// Size of the fixed header, in bytes.
const HEADER_BYTES: usize = 64;
/// Size of the fixed header.
pub const HEADER_LEN: u64 = HEADER_BYTES as u64;
/// Largest serialized state accepted on read.
pub const MAX_STATE_LEN: u64 = 16 << 20;
/// Alignment of the memory image inside the file.
pub const PAGE_SIZE: u64 = 4096;

/// Errors reading or writing snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on the file.
    #[error("snapshot file I/O failed")]
    Io(#[from] std::io::Error),
    /// The file is shorter than its header or its declared sections.
    #[error("snapshot file is truncated ({0})")]
    Truncated(&'static str),
    /// Not a little.cloud snapshot.
    #[error("not a little.cloud snapshot (bad magic)")]
    BadMagic,
    /// Made by an incompatible version.
    #[error("snapshot format version {found} is not supported by this vmm (it reads version {VERSION}); re-create the snapshot")]
    Version {
        /// Version in the file.
        found: u32,
    },
    /// A checksum does not match.
    #[error("snapshot {0} checksum mismatch: the file is corrupt")]
    Checksum(&'static str),
    /// A section is larger than allowed or overlaps another.
    #[error("snapshot {0} has an invalid size or offset")]
    Layout(&'static str),
    /// The state could not be encoded or decoded.
    #[error("snapshot state could not be decoded")]
    Decode(#[source] bincode::Error),
}

/// Where things are in a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the serialized state (at offset [`HEADER_LEN`]).
    pub state_len: u64,
    /// CRC32 of the state bytes.
    pub state_crc: u32,
    /// Offset of the memory image (page aligned).
    pub mem_offset: u64,
    /// Length of the memory image.
    pub mem_len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.state_crc.to_le_bytes());
        b[32..40].copy_from_slice(&self.mem_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.mem_len.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_BYTES]) -> Result<Self, Error> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if b[0..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::Version { found: version });
        }
        if crc32fast::hash(&b[..60]) != u32_at(60) {
            return Err(Error::Checksum("header"));
        }
        let h = Header {
            state_len: u64_at(16),
            state_crc: u32_at(24),
            mem_offset: u64_at(32),
            mem_len: u64_at(40),
        };
        if h.state_len > MAX_STATE_LEN {
            return Err(Error::Layout("state"));
        }
        if !h.mem_offset.is_multiple_of(PAGE_SIZE)
            || h.mem_offset < HEADER_LEN + h.state_len
            || h.mem_offset.checked_add(h.mem_len).is_none()
        {
            return Err(Error::Layout("memory image"));
        }
        Ok(h)
    }
}

/// Offset of the memory image for a state of `state_len` bytes.
pub fn mem_offset_for(state_len: u64) -> u64 {
    (HEADER_LEN + state_len).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Writes header and state to `file` (truncating it to the memory image's
/// end) and returns the header; the memory image is written by the caller.
pub fn write_state<S: Serialize>(
    file: &mut File,
    state: &S,
    mem_len: u64,
) -> Result<Header, Error> {
    let bytes = bincode::serialize(state).map_err(Error::Decode)?;
    let state_len = bytes.len() as u64;
    if state_len > MAX_STATE_LEN {
        return Err(Error::Layout("state"));
    }
    let header = Header {
        state_len,
        state_crc: crc32fast::hash(&bytes),
        mem_offset: mem_offset_for(state_len),
        mem_len,
    };
    file.set_len(0)?;
    file.set_len(header.mem_offset + mem_len)?;
    file.write_all_at(&header.encode(), 0)?;
    file.write_all_at(&bytes, HEADER_LEN)?;
    Ok(header)
}

/// Reads and checks the header and state of a snapshot file.
pub fn read_state<S: DeserializeOwned>(file: &mut File) -> Result<(Header, S), Error> {
    let file_len = file.metadata()?.len();
    let mut hb = [0u8; HEADER_BYTES];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut hb).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Truncated("header"),
        _ => Error::Io(e),
    })?;
    let header = Header::decode(&hb)?;
    if HEADER_LEN + header.state_len > file_len {
        return Err(Error::Truncated("state"));
    }
    if header.mem_offset + header.mem_len > file_len {
        return Err(Error::Truncated("memory image"));
    }
    let len = usize::try_from(header.state_len).map_err(|_| Error::Layout("state"))?;
    let mut bytes = vec![0u8; len];
    file.read_exact(&mut bytes)?;
    if crc32fast::hash(&bytes) != header.state_crc {
        return Err(Error::Checksum("state"));
    }
    use bincode::Options;
    let state = bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(MAX_STATE_LEN)
        .deserialize(&bytes)
        .map_err(Error::Decode)?;
    Ok((header, state))
}

/// Flushes a finished snapshot file to disk.
pub fn sync(file: &mut File) -> Result<(), Error> {
    file.flush()?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Demo {
        name: String,
        regs: Vec<u64>,
    }

    fn demo() -> Demo {
        Demo {
            name: "vm".into(),
            regs: vec![1, 2, 3],
        }
    }

    fn written() -> File {
        let mut f = tempfile::tempfile().expect("tempfile");
        let h = write_state(&mut f, &demo(), 3 * PAGE_SIZE).expect("write");
        assert_eq!(h.mem_offset % PAGE_SIZE, 0);
        assert_eq!(
            f.metadata().expect("meta").len(),
            h.mem_offset + 3 * PAGE_SIZE
        );
        f
    }

    #[test]
    fn round_trip() {
        let mut f = written();
        let (h, s): (Header, Demo) = read_state(&mut f).expect("read");
        assert_eq!(s, demo());
        assert_eq!(h.mem_len, 3 * PAGE_SIZE);
    }

    #[test]
    fn corruption_is_detected() {
        let flip = |offset: u64, expect: &str| {
            let mut f = written();
            let mut b = [0u8];
            f.read_exact_at(&mut b, offset).expect("read");
            f.write_all_at(&[b[0] ^ 0xff], offset).expect("write");
            let err = read_state::<Demo>(&mut f).expect_err("corrupt");
            assert!(err.to_string().contains(expect), "{offset}: {err}");
        };
        flip(0, "bad magic");
        flip(8, "version");
        flip(20, "header checksum");
        flip(HEADER_LEN + 2, "state checksum");
    }

    #[test]
    fn truncation_is_detected() {
        for cut in [0, 10, HEADER_LEN + 1, mem_offset_for(30) + 5] {
            let mut f = written();
            f.set_len(cut).expect("truncate");
            let err = read_state::<Demo>(&mut f).expect_err("truncated");
            assert!(matches!(err, Error::Truncated(_)), "{cut}: {err}");
        }
    }

    #[test]
    fn oversized_state_is_refused_before_reading() {
        let mut f = written();
        let mut h = [0u8; HEADER_BYTES];
        f.read_exact_at(&mut h, 0).expect("read");
        let mut header = Header::decode(&h).expect("valid");
        header.state_len = MAX_STATE_LEN + 1;
        f.write_all_at(&header.encode(), 0).expect("write");
        assert!(matches!(
            read_state::<Demo>(&mut f),
            Err(Error::Layout("state"))
        ));
    }

    #[test]
    fn garbage_state_is_a_decode_error() {
        let mut f = tempfile::tempfile().expect("tempfile");
        // A valid header around 8 bytes claiming a 2^60-element vector.
        let bytes = [0xffu8; 8];
        let header = Header {
            state_len: 8,
            state_crc: crc32fast::hash(&bytes),
            mem_offset: PAGE_SIZE,
            mem_len: 0,
        };
        f.set_len(PAGE_SIZE).expect("len");
        f.write_all_at(&header.encode(), 0).expect("hdr");
        f.write_all_at(&bytes, HEADER_LEN).expect("state");
        assert!(matches!(read_state::<Demo>(&mut f), Err(Error::Decode(_))));
    }
}
