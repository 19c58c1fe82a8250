//! A bound on what the `tar` crate holds in memory between two entries.
//!
//! Before it yields an entry, `tar::Entries` reads that entry's GNU long
//! name and long link members and its PAX extended header into `Vec`s as
//! large as their headers claim (up to 8 GiB each). [`Entries`] wraps the
//! crate's iterator and meters the stream under it: while the crate looks for
//! the next entry it may read the unread rest of the previous entry, its
//! padding and at most [`MAX_METADATA`] bytes of headers and extension
//! members; past that the read fails with [`MetadataTooLarge`], before the
//! bytes are buffered. Entry data read by the caller is not metered.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// Most bytes of headers, long names and PAX records before one entry:
/// far above `PATH_MAX` twice plus any xattrs an image carries.
pub const MAX_METADATA: u64 = 1024 * 1024;
/// A tar block: headers are one, data is padded to a whole number of them.
const BLOCK: u64 = 512;

/// The error a metered read fails with (inside an `io::Error`).
#[derive(Debug, thiserror::Error)]
#[error("tar headers before one entry exceed {MAX_METADATA} bytes")]
pub struct MetadataTooLarge;

/// Whether `e` is [`MetadataTooLarge`].
pub fn is_metadata_too_large(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<MetadataTooLarge>().is_some())
}

#[derive(Default)]
struct Meter {
    /// Between entries: how many more bytes the crate may read.
    allowance: Cell<Option<u64>>,
    /// Data bytes of the current entry not read yet.
    data_left: Cell<u64>,
}

/// The reader under the archive: counts what the crate reads.
pub struct Metered<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R> Metered<R> {
    /// `inner`, metered.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            meter: Rc::default(),
        }
    }

    /// The reader back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let meter = &self.meter;
        let buf = match meter.allowance.get() {
            Some(0) if !buf.is_empty() => return Err(io::Error::other(MetadataTooLarge)),
            Some(left) => {
                let cut = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                &mut buf[..cut]
            }
            None => buf,
        };
        let n = self.inner.read(buf)?;
        let n64 = n as u64;
        match meter.allowance.get() {
            Some(left) => meter.allowance.set(Some(left - n64)),
            None => meter
                .data_left
                .set(meter.data_left.get().saturating_sub(n64)),
        }
        Ok(n)
    }
}

/// An archive over `reader` whose [`entries`] are metered.
pub fn archive<R: Read>(reader: R) -> (tar::Archive<Metered<R>>, MeterHandle) {
    let metered = Metered::new(reader);
    let handle = MeterHandle(Rc::clone(&metered.meter));
    (tar::Archive::new(metered), handle)
}

/// What [`entries`] needs of an [`archive`]'s reader, which the archive
/// owns and does not lend out while it is read.
pub struct MeterHandle(Rc<Meter>);

/// `tar::Entries` with its metadata metered (see the [module docs](self)).
pub struct Entries<'a, R: Read> {
    inner: tar::Entries<'a, Metered<R>>,
    meter: Rc<Meter>,
}

/// The entries of an `archive` made by [`archive`], with `handle`.
pub fn entries<'a, R: Read>(
    archive: &'a mut tar::Archive<Metered<R>>,
    handle: &MeterHandle,
) -> io::Result<Entries<'a, R>> {
    Ok(Entries {
        inner: archive.entries()?,
        meter: Rc::clone(&handle.0),
    })
}

impl<'a, R: Read> Iterator for Entries<'a, R> {
    type Item = io::Result<tar::Entry<'a, Metered<R>>>;

    fn next(&mut self) -> Option<Self::Item> {
        // The crate first skips what is left of the previous entry.
        let skip = self.meter.data_left.get().div_ceil(BLOCK) * BLOCK;
        self.meter
            .allowance
            .set(Some(skip.saturating_add(MAX_METADATA)));
        let next = self.inner.next();
        self.meter.allowance.set(None);
        self.meter.data_left.set(match &next {
            Some(Ok(entry)) => entry.size(),
            _ => 0,
        });
        next
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A GNU long-name member of `len` bytes, then a regular file `f`.
    fn long_name_tar(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().expect("gnu").name[..13].copy_from_slice(b"././@LongLink");
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(len as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + len.div_ceil(512) * 512, b'a');
        let mut builder = tar::Builder::new(out);
        let mut file = tar::Header::new_gnu();
        file.set_path("f").expect("short path");
        file.set_size(3);
        file.set_mode(0o644);
        file.set_cksum();
        builder.append(&file, &b"abc"[..]).expect("in memory");
        builder.into_inner().expect("in memory")
    }

    /// Each entry's path and data.
    type Listing = Vec<(Vec<u8>, Vec<u8>)>;

    /// Reads every entry's path and data; the bytes the reader gave.
    fn read_all(bytes: &[u8]) -> (io::Result<Listing>, usize) {
        let counted = Cell::new(0usize);
        struct Count<'c>(&'c [u8], &'c Cell<usize>);
        impl Read for Count<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.set(self.1.get() + n);
                Ok(n)
            }
        }
        let (mut archive, handle) = archive(Count(bytes, &counted));
        let result = (|| {
            let mut out = Vec::new();
            for entry in entries(&mut archive, &handle)? {
                let mut entry = entry?;
                let path = entry.path_bytes().into_owned();
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                out.push((path, data));
            }
            Ok(out)
        })();
        (result, counted.get())
    }

    #[test]
    fn long_names_up_to_the_bound_are_read() {
        let (entries, _) = read_all(&long_name_tar(4096));
        let entries = entries.expect("a 4 KiB long name is fine");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0.len(), 4096);
        assert_eq!(entries[0].1, b"abc");
    }

    #[test]
    fn a_long_name_past_the_bound_fails_before_it_is_buffered() {
        let len = 64 * 1024 * 1024;
        let (entries, read) = read_all(&long_name_tar(len));
        let e = entries.expect_err("a 64 MiB long name is refused");
        assert!(is_metadata_too_large(&e), "{e}");
        assert!(
            (read as u64) < MAX_METADATA + 64 * 1024,
            "read {read} bytes of a {len}-byte long name"
        );
    }

    #[test]
    fn unread_entry_data_is_skipped_without_counting() {
        // A 3 MiB file nobody reads, then another entry.
        let mut builder = tar::Builder::new(Vec::new());
        for (name, len) in [("big", 3 * 1024 * 1024), ("small", 1)] {
            let mut h = tar::Header::new_gnu();
            h.set_path(name).expect("short path");
            h.set_size(len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append(&h, &vec![7u8; len][..]).expect("in memory");
        }
        let bytes = builder.into_inner().expect("in memory");
        let (mut archive, handle) = archive(&bytes[..]);
        let names: Vec<Vec<u8>> = entries(&mut archive, &handle)
            .expect("entries")
            .map(|e| e.map(|e| e.path_bytes().into_owned()))
            .collect::<io::Result<_>>()
            .expect("skipping data is not metadata");
        assert_eq!(names, [b"big".to_vec(), b"small".to_vec()]);
    }
}
