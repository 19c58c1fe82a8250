//! Restoring a microVM from a snapshot file.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::builder::{attach_legacy_devices, attach_virtio_devices, BuiltVm, Error as BuildError};
use crate::config::{ConsoleOutput, MAX_MEM_MIB};
use crate::devices::manager::DeviceManager;
use crate::event_loop::EventLoop;
use crate::host::HostKind;
use crate::snapshot::working_set::WorkingSet;
use crate::snapshot::{format, memory, BaseImage, Error, MicrovmState};
use crate::vstate::persist;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{self, Vm};

/// What to restore and how to wire it.
pub struct RestoreConfig {
    /// The snapshot file.
    pub snapshot: PathBuf,
    /// Where the guest's serial console goes.
    pub console: ConsoleOutput,
    /// The network, as when the snapshot was taken (same device list).
    pub net: Option<crate::usernet::NetConfig>,
    /// Disks, in the order they had when the snapshot was taken.
    pub drives: Vec<crate::devices::virtio::block::BlockConfig>,
    /// The vsock device (its socket path may differ per restore).
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
    /// Pages to map ahead of use, recorded with the `working-set` command.
    pub working_set: Option<PathBuf>,
}

impl RestoreConfig {
    /// Restores `snapshot` with no virtio devices, console on stdout.
    pub fn new(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            console: ConsoleOutput::Stdout,
            net: None,
            drives: Vec::new(),
            vsock: None,
            working_set: None,
        }
    }
}

/// Most vCPUs a snapshot may hold (the MP table's limit).
const MAX_VCPUS: usize = crate::arch::x86_64::mptable::MAX_CPUS as usize;

/// Reads and validates the snapshot, maps its memory copy-on-write and
/// re-creates the VM, vCPUs and devices, ready to run.
pub fn restore(config: RestoreConfig) -> Result<BuiltVm, BuildError> {
    let name = config.snapshot.display().to_string();
    let mut file = File::open(&config.snapshot).map_err(|e| Error::Open(name.clone(), e))?;
    let (header, state): (format::Header, MicrovmState) =
        format::read_state(&mut file).map_err(|e| Error::Format(name.clone(), e))?;
    memory::validate(&state.regions, header.mem_len, MAX_MEM_MIB << 20)
        .map_err(|e| Error::Memory(name.clone(), e))?;
    if state.vcpus.is_empty() || state.vcpus.len() > MAX_VCPUS {
        return Err(Error::Invalid(name, "vCPU count").into());
    }
    let host = HostKind::detect().name();
    if state.host != host {
        tracing::warn!(
            "snapshot taken on a {} host, restoring on a {host} host",
            state.host
        );
    }
    let (mem, base) = match &state.base {
        None => {
            let mem = memory::map_private(Arc::new(file), header.mem_offset, &state.regions)
                .map_err(|e| Error::Memory(name.clone(), e))?;
            let base = BaseImage {
                path: std::fs::canonicalize(&config.snapshot)
                    .unwrap_or_else(|_| config.snapshot.clone())
                    .display()
                    .to_string(),
                state_crc: header.state_crc,
                mem_len: header.mem_len,
            };
            (mem, base)
        }
        Some(base) => {
            // Memory comes from the base, with the diff's pages on top.
            let bad_base = || Error::Base(name.clone(), base.path.clone());
            let mut base_file = File::open(&base.path).map_err(|_| bad_base())?;
            let (base_header, _): (format::Header, MicrovmState) =
                format::read_state(&mut base_file).map_err(|_| bad_base())?;
            if base_header.state_crc != base.state_crc || base_header.mem_len != base.mem_len {
                return Err(bad_base().into());
            }
            let mem =
                memory::map_private(Arc::new(base_file), base_header.mem_offset, &state.regions)
                    .map_err(|e| Error::Memory(name.clone(), e))?;
            memory::read_runs(&mem, &state.dirty, &file, header.mem_offset)
                .map_err(|e| Error::Memory(name.clone(), e))?;
            (mem, base.clone())
        }
    };

    if let Some(path) = &config.working_set {
        let ws =
            WorkingSet::load(path).map_err(|e| Error::WorkingSet(path.display().to_string(), e))?;
        // Populate in the background while the VM is created; a guest that
        // reaches a page first simply faults it in itself.
        let mem = mem.clone();
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                let pages = ws.prefetch(&mem);
                tracing::debug!("prefetched {pages} working-set pages");
            })
            .map_err(|e| Error::Open(name.clone(), e))?;
    }
    let kvm = vm::open_kvm()?;
    let vm = if persist::pit_active(&state.vm.pit) {
        Vm::new(kvm, mem)?
    } else {
        Vm::without_pit(kvm, mem)?
    };
    persist::restore_vm(&vm.fd, &state.vm, vm.has_pit)?;
    let vm_has_pit = vm.has_pit;
    tracing::debug!("restoring with in-kernel PIT: {vm_has_pit}");
    let event_loop =
        EventLoop::new(crate::builder::EVENT_LOOP_ENTRIES).map_err(BuildError::EventLoop)?;
    let reset = Arc::new(AtomicBool::new(false));
    let mut devices = DeviceManager::new(event_loop.handle());
    let legacy = attach_legacy_devices(
        &vm,
        &mut devices,
        config.console,
        reset.clone(),
        Some(&state.legacy),
    )?;
    let inbound = attach_virtio_devices(
        &vm,
        &mut devices,
        config.net.as_ref(),
        &config.drives,
        config.vsock.as_ref(),
    )?;
    if devices.transports().len() != state.virtio.len() {
        return Err(Error::Devices(name, state.virtio.len(), devices.transports().len()).into());
    }
    for (transport, saved) in devices.transports().iter().zip(&state.virtio) {
        transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(saved)
            .map_err(|e| Error::Device(name.clone(), e))?;
    }
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, vcpu_state) in state.vcpus.iter().enumerate() {
        let index = u8::try_from(index).map_err(|_| Error::Invalid(name.clone(), "vCPU count"))?;
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| BuildError::Vcpu(crate::vstate::vcpu::Error::Kvm("create a vCPU", e)))?;
        persist::restore_vcpu(&fd, vcpu_state)?;
        vcpus.push(Vcpu::from_fd(fd, index));
    }
    Ok(BuiltVm {
        vm,
        vcpus,
        devices,
        event_loop,
        reset,
        legacy,
        carried_pit: (!vm_has_pit).then_some(state.vm.pit),
        base: Some(base),
        inbound,
    })
}
