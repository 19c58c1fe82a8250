//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A device reachable through a range of port or memory addresses.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A range of zero length.
    #[error("a bus range at {0:#x} has zero length")]
    ZeroLength(u64),
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A map from address ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

/// Locks a device; a poisoned lock (a panic elsewhere, impossible with
/// `panic = "abort"`) still yields the device.
pub fn lock(device: &SharedDevice) -> MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::ZeroLength(base));
        }
        let end = base.checked_add(len).ok_or(Error::Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&b, e)) = before {
            if b + e.len > base {
                return Err(Error::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a read; returns false if no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).expect("free range");
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(
            dev.lock().expect("unpoisoned").last_write,
            Some((0, vec![7]))
        );
        assert!(!bus.read(0x400, &mut b), "past the end");
        assert!(!bus.read(0x3f7, &mut b), "before the start");
    }

    #[test]
    fn access_straddling_the_end_is_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 4)
            .expect("free");
        let mut b = [0u8; 4];
        assert!(bus.read(0x1000, &mut b));
        assert!(!bus.read(0x1002, &mut b));
        assert!(!bus.write(u64::MAX, &[1, 2]), "no overflow at the top");
    }

    #[test]
    fn overlaps_and_empty_ranges_are_rejected() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d(), 0x100, 0x10).expect("free");
        assert_eq!(
            bus.insert(d(), 0x10f, 1),
            Err(Error::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(d(), 0xf8, 0x10),
            Err(Error::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert_eq!(bus.insert(d(), 0x200, 0), Err(Error::ZeroLength(0x200)));
        bus.insert(d(), 0x110, 1).expect("adjacent is fine");
        bus.insert(d(), 0xf0, 0x10).expect("adjacent below is fine");
    }
}
