//! Snapshots: save a paused microVM to one file and restore any number of
//! copy-on-write clones from it.
//!
//! Saving pauses every vCPU (after KVM completes the last port/MMIO access),
//! reads all vCPU and VM state from KVM and the devices, and writes one file:
//! header, state, then the guest memory image with zero pages left as holes
//! ([`format`], [`memory`]). Restoring maps that image `MAP_PRIVATE`, so all
//! clones share the file's pages through the page cache, and re-creates the
//! VM, vCPUs and devices from the state ([`crate::builder::build_from_snapshot`]).

pub mod format;
pub mod memory;
pub mod working_set;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::devices::legacy::LegacyState;
use crate::host::HostKind;
use crate::vstate::persist::{VcpuState, VmState};
use memory::RegionState;

/// Errors while writing or reading snapshots.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be created, written or renamed.
    #[error("cannot write snapshot {0}")]
    Create(String, #[source] std::io::Error),
    /// The file could not be opened.
    #[error("cannot open snapshot {0}")]
    Open(String, #[source] std::io::Error),
    /// The file format is wrong or the file is damaged.
    #[error("snapshot {0} is unusable")]
    Format(String, #[source] format::Error),
    /// The memory image could not be written or mapped.
    #[error("snapshot {0}: guest memory")]
    Memory(String, #[source] memory::Error),
    /// The devices given for the restore do not match the snapshot's.
    #[error("snapshot {0} has {1} virtio device(s), {2} were given: restore with the same --net/--drive/--vsock flags")]
    Devices(String, usize, usize),
    /// A device could not be put back.
    #[error("snapshot {0}: virtio device")]
    Device(
        String,
        #[source] crate::devices::virtio::transport::mmio::RestoreError,
    ),
    /// The working-set file could not be used.
    #[error("working set {0}")]
    WorkingSet(String, #[source] working_set::Error),
    /// A diff snapshot's base is missing or was replaced.
    #[error("diff snapshot {0}: its base snapshot {1} is missing or has changed")]
    Base(String, String),
    /// The state is internally inconsistent.
    #[error("snapshot {0} is inconsistent: {1}")]
    Invalid(String, &'static str),
}

/// Everything needed to bring a paused microVM back.
#[derive(Serialize, Deserialize)]
pub struct MicrovmState {
    /// Host kind the snapshot was taken on (informational).
    pub host: String,
    /// Guest memory layout; the image holds the regions back to back.
    pub regions: Vec<RegionState>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Serial console and i8042.
    pub legacy: LegacyState,
    /// Virtio transports and device runtimes, in slot order.
    pub virtio: Vec<crate::devices::virtio::persist::TransportState>,
    /// For a diff snapshot: the full snapshot whose memory it builds on.
    pub base: Option<BaseImage>,
    /// For a diff snapshot: the image pages it holds, `(first, count)` runs.
    pub dirty: Vec<(u64, u64)>,
}

/// The full snapshot a diff snapshot's memory is relative to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    /// Path of the full snapshot file.
    pub path: String,
    /// Its state checksum, to detect a replaced base.
    pub state_crc: u32,
    /// Its memory image length.
    pub mem_len: u64,
}

impl MicrovmState {
    /// Gathers a state from its parts.
    pub fn new(
        mem: &GuestMemoryMmap,
        vm: VmState,
        vcpus: Vec<VcpuState>,
        legacy: LegacyState,
        virtio: Vec<crate::devices::virtio::persist::TransportState>,
    ) -> Self {
        Self {
            host: HostKind::detect().name().to_owned(),
            regions: memory::regions(mem),
            vm,
            vcpus,
            legacy,
            virtio,
            base: None,
            dirty: Vec::new(),
        }
    }
}

/// Writes a full snapshot: `state` and every non-zero page of `mem`, to
/// `path` through a temporary file renamed into place. Returns (state bytes,
/// memory bytes written, memory image size).
pub fn write(
    path: &Path,
    state: &MicrovmState,
    mem: &GuestMemoryMmap,
) -> Result<(u64, u64, u64), Error> {
    write_with(path, state, |file, offset| {
        memory::write_sparse(mem, file, offset)
    })
}

/// Writes a diff snapshot: `state` (with `base` and `dirty` set) and only
/// the dirty pages of `mem`.
pub fn write_diff(
    path: &Path,
    state: &MicrovmState,
    mem: &GuestMemoryMmap,
) -> Result<(u64, u64, u64), Error> {
    write_with(path, state, |file, offset| {
        memory::write_runs(mem, &state.dirty, file, offset)
    })
}

/// Header and state, then `write_memory(file, image offset)`, in a
/// temporary file that replaces `path` only once complete.
fn write_with(
    path: &Path,
    state: &MicrovmState,
    write_memory: impl FnOnce(&std::fs::File, u64) -> Result<u64, memory::Error>,
) -> Result<(u64, u64, u64), Error> {
    let name = path.display().to_string();
    let tmp = path.with_extension("snap-partial");
    let mut file = create_file(&tmp).map_err(|e| Error::Create(name.clone(), e))?;
    let mem_len: u64 = state.regions.iter().map(|r| r.len).sum();
    let result = (|| {
        let header = format::write_state(&mut file, state, mem_len)
            .map_err(|e| Error::Format(name.clone(), e))?;
        let written =
            write_memory(&file, header.mem_offset).map_err(|e| Error::Memory(name.clone(), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::Create(name.clone(), e))?;
        Ok((header.state_len, written, mem_len))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Opens a snapshot target for writing, owner-only: it holds the guest's
/// memory, secrets included.
fn create_file(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A snapshot holds guest memory (the app's secrets): owner-only,
    /// whatever the umask.
    #[test]
    fn snapshot_files_are_owner_only() {
        // SAFETY: umask(2) only sets this process's file mode mask; 022 is
        // the usual default, so other tests running now are unaffected.
        unsafe { libc::umask(0o022) };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.snap");
        create_file(&path).expect("create");
        let mode = std::fs::metadata(&path)
            .expect("created")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
