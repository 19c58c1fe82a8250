//! Boots a [`VmConfig`]: memory, kernel, boot structures, devices, vCPUs.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, InitrdPlacement};
use crate::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, COM1_IRQ, COM1_PORT, HIMEM_START, I8042_DATA_PORT,
};
use crate::arch::x86_64::mptable;
use crate::config::{self, ConsoleOutput, RestoreConfig, VmConfig, MAX_MEM_MIB};
use crate::devices::legacy::console_log::ConsoleLog;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialConsole;
use crate::devices::legacy::{LegacyDevices, LegacyState};
use crate::devices::manager::{self, DeviceManager};
use crate::event_loop::EventLoop;
use crate::host::HostKind;
use crate::snapshot::working_set::WorkingSet;
use crate::snapshot::{format, memory, BaseImage, Error as SnapshotError, MicrovmState};
use crate::vmm::{BuiltVm, GuestExit, RunOptions};
use crate::vstate::persist;
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::vm::{self, Vm};

/// Submission-queue size of the device event loop. The rings live in
/// kernel memory for as long as the VMM does (64 entries: 8 KiB, against
/// 28 KiB for 256); a full queue is submitted and refilled, and the kernel
/// keeps completions that overflow the ring, so a burst is slower, never lost.
pub(crate) const EVENT_LOOP_ENTRIES: u32 = 64;

/// Kernel arguments every guest gets: serial console, reboot through the
/// i8042 (the VMM's clean exit), no PCI/ACPI probing, no modules, quiet.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp quiet";

/// Extra kernel arguments on a nested, emulated KVM host (see
/// `guest-kernel/README.md`): keep XSAVE off and the features the emulator
/// cannot run cleared (the kernel reads some CPUID bits in ways the vCPU's
/// CPUID table does not cover on such hosts, so the mask is repeated here),
/// skip the slow read-only remapping, turn user SYSCALL into #UD that the
/// nested kernel profile emulates, and tell the agent.
pub const NESTED_CMDLINE: &str = "noxsave clearcpuid=smap,popcnt,cx16,xsave,erms,fsrm \
rodata=off syscall_via_ud little.nested=1";

/// Errors while booting a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// A vCPU could not be created or failed while running.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Guest memory could not be mapped.
    #[error("failed to allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// The kernel file could not be opened.
    #[error("cannot open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The kernel file is not a loadable ELF vmlinux.
    #[error(
        "kernel {0} is not a loadable uncompressed ELF vmlinux (or does not fit in guest memory)"
    )]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    /// The initrd file could not be opened or read.
    #[error("cannot read initrd {0}")]
    Initrd(String, #[source] std::io::Error),
    /// The initrd does not fit in guest memory above the kernel.
    #[error("initrd {0} ({1} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge(String, u64),
    /// The initrd could not be copied into guest memory.
    #[error("failed to copy initrd {0} into guest memory")]
    InitrdCopy(String, #[source] vm_memory::GuestMemoryError),
    /// The kernel command line could not be built.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written to guest memory.
    #[error("failed to write the kernel command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The boot parameters could not be written.
    #[error(transparent)]
    BootParams(#[from] boot::Error),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// The console file could not be created.
    #[error("cannot create console file {0}")]
    Console(String, #[source] std::io::Error),
    /// A device could not be set up.
    #[error("failed to set up {0}")]
    Device(&'static str, #[source] std::io::Error),
    /// The built VM failed while running.
    #[error(transparent)]
    Run(#[from] crate::vmm::Error),
    /// KVM state could not be read or restored.
    #[error(transparent)]
    Persist(#[from] crate::vstate::persist::Error),
    /// A snapshot could not be read or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    /// The device event loop failed.
    #[error("device event loop failed")]
    EventLoop(#[source] crate::event_loop::Error),
    /// A device could not be attached.
    #[error(transparent)]
    Devices(#[from] manager::Error),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::Error),
    /// The network device could not be set up.
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::Error),
    /// A disk image could not be opened.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::Error),
}

/// Builds the full kernel command line for `config` on `host`.
pub fn build_cmdline(config: &VmConfig, host: HostKind) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    if !config.cmdline_replace {
        cmdline
            .insert_str(DEFAULT_CMDLINE)
            .map_err(Error::Cmdline)?;
        if host == HostKind::NestedEmulated {
            cmdline.insert_str(NESTED_CMDLINE).map_err(Error::Cmdline)?;
        }
        if config.net.is_some() {
            cmdline
                .insert_str(crate::usernet::GUEST_CMDLINE)
                .map_err(Error::Cmdline)?;
        }
    }
    if !config.cmdline_extra.trim().is_empty() {
        cmdline
            .insert_str(config.cmdline_extra.trim())
            .map_err(Error::Cmdline)?;
    }
    Ok(cmdline)
}

fn console_writer(console: ConsoleOutput) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match console {
        ConsoleOutput::Stdout => Box::new(LineWriter::new(std::io::stdout())),
        ConsoleOutput::Null => Box::new(std::io::sink()),
        ConsoleOutput::File { path, max_bytes } => Box::new(LineWriter::new(
            ConsoleLog::create(&path, max_bytes)
                .map_err(|e| Error::Console(path.display().to_string(), e))?,
        )),
        ConsoleOutput::Writer(w) => w,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &str,
    kernel_end: u64,
) -> Result<InitrdPlacement, Error> {
    let mut file = File::open(path).map_err(|e| Error::Initrd(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::Initrd(path.into(), e))?
        .len();
    let addr = boot::initrd_address(mem, size, kernel_end)
        .ok_or_else(|| Error::InitrdTooLarge(path.into(), size))?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooLarge(path.into(), size))?;
    let slice = mem
        .get_slice(addr, len)
        .map_err(|e| Error::InitrdCopy(path.into(), e))?;
    let mut done = 0;
    while done < len {
        let mut rest = slice
            .subslice(done, len - done)
            .map_err(|e| Error::InitrdCopy(path.into(), e.into()))?;
        let n = file
            .read_volatile(&mut rest)
            .map_err(|e| Error::Initrd(path.into(), std::io::Error::other(e.to_string())))?;
        if n == 0 {
            return Err(Error::Initrd(
                path.into(),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        done += n;
    }
    Ok(InitrdPlacement { addr, size })
}

/// Prepares `config` up to the first KVM_RUN.
pub fn build(mut config: VmConfig) -> Result<BuiltVm, Error> {
    config.validate()?;
    let host = HostKind::detect();
    let kvm = vm::open_kvm()?;
    let mem_bytes = config.mem_mib << 20;
    let mem = GuestMemoryMmap::from_ranges(&boot::memory_ranges(mem_bytes))
        .map_err(|e| Error::Memory(config.mem_mib, e))?;

    let kernel_name = config.kernel.display().to_string();
    let mut kernel =
        File::open(&config.kernel).map_err(|e| Error::OpenKernel(kernel_name.clone(), e))?;
    let loaded = Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| Error::LoadKernel(kernel_name.clone(), e))?;
    let entry = loaded.kernel_load.0;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(
            &mem,
            &path.display().to_string(),
            loaded.kernel_end,
        )?),
        None => None,
    };

    let vm = Vm::new(kvm, mem)?;
    let event_loop = EventLoop::new(EVENT_LOOP_ENTRIES).map_err(Error::EventLoop)?;
    let console = std::mem::replace(&mut config.console, ConsoleOutput::Null);
    // Virtio devices: each gets an MMIO window, an IRQ and a cmdline entry
    // (attached before the command line is written).
    let Attached {
        reset,
        devices,
        legacy,
        inbound,
    } = attach_devices(
        &vm,
        &event_loop,
        console,
        None,
        config.net.as_ref(),
        &config.drives,
        config.vsock.as_ref(),
    )?;

    let mut cmdline = build_cmdline(&config, host)?;
    devices.announce(&mut cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes_with_nul()
        .len();
    load_cmdline(&vm.mem, GuestAddress(CMDLINE_START), &cmdline).map_err(Error::WriteCmdline)?;
    boot::write_boot_params(&vm.mem, cmdline_len, initrd)?;
    mptable::setup_mptable(&vm.mem, config.vcpus)?;
    tracing::debug!(
        "kernel entry {entry:#x}, end {:#x}, {} MiB, cmdline {:?}",
        loaded.kernel_end,
        vm.mem.last_addr().0 >> 20,
        cmdline
    );

    let vcpus = (0..config.vcpus)
        .map(|index| Vcpu::new(&vm, index, config.vcpus, entry, host))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BuiltVm {
        vm,
        vcpus,
        devices,
        event_loop,
        reset,
        legacy,
        carried_pit: None,
        base: None,
        mapped_diff: Vec::new(),
        inbound,
    })
}

/// The devices of a VM, as [`attach_devices`] leaves them.
struct Attached {
    reset: Arc<AtomicBool>,
    devices: DeviceManager,
    legacy: LegacyDevices,
    inbound: Option<crate::devices::virtio::net::InboundHandle>,
}

/// Attaches the legacy devices (with their saved state on a restore) and
/// the virtio devices, in the one order a boot and every restore share.
fn attach_devices(
    vm: &Vm,
    event_loop: &EventLoop,
    console: ConsoleOutput,
    legacy_state: Option<&LegacyState>,
    net: Option<&crate::usernet::NetConfig>,
    drives: &[crate::devices::virtio::block::BlockConfig],
    vsock: Option<&crate::devices::virtio::vsock::VsockConfig>,
) -> Result<Attached, Error> {
    let reset = Arc::new(AtomicBool::new(false));
    let mut devices = DeviceManager::new(event_loop.handle());
    let legacy = attach_legacy_devices(vm, &mut devices, console, reset.clone(), legacy_state)?;
    let inbound = attach_virtio_devices(vm, &mut devices, net, drives, vsock)?;
    Ok(Attached {
        reset,
        devices,
        legacy,
        inbound,
    })
}

/// Attaches the virtio devices, always in the same order (net, disks in
/// order, vsock), so that a restore with the same flags finds each device in
/// the slot its snapshot state belongs to. Returns the network device's
/// inbound handle.
fn attach_virtio_devices(
    vm: &Vm,
    devices: &mut DeviceManager,
    net: Option<&crate::usernet::NetConfig>,
    drives: &[crate::devices::virtio::block::BlockConfig],
    vsock: Option<&crate::devices::virtio::vsock::VsockConfig>,
) -> Result<Option<crate::devices::virtio::net::InboundHandle>, Error> {
    let mut inbound = None;
    if let Some(net) = net {
        let device = crate::devices::virtio::net::Net::new(net)?;
        inbound = Some(device.inbound());
        devices.attach_virtio(&vm.fd, &vm.mem, Box::new(device))?;
    }
    for drive in drives {
        let disk = crate::devices::virtio::block::Disk::open(drive)?;
        let block = crate::devices::virtio::block::Block::new(disk);
        devices.attach_virtio(&vm.fd, &vm.mem, Box::new(block))?;
    }
    if let Some(vsock) = vsock {
        let device = crate::devices::virtio::vsock::Vsock::new(vsock)?;
        devices.attach_virtio(&vm.fd, &vm.mem, Box::new(device))?;
    }
    Ok(inbound)
}

/// Serial console on COM1 (interrupt through an irqfd) and the i8042 whose
/// reset command ends the VM; restored from `state` when given.
fn attach_legacy_devices(
    vm: &Vm,
    devices: &mut DeviceManager,
    console: ConsoleOutput,
    reset: Arc<AtomicBool>,
    state: Option<&LegacyState>,
) -> Result<LegacyDevices, Error> {
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device("the serial irqfd", e))?;
    vm.fd.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| {
        Error::Device(
            "the serial irqfd",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    let out = console_writer(console)?;
    let on_reset = Box::new(move || reset.store(true, Ordering::Release));
    let (serial, i8042) = match state {
        Some(s) => (
            SerialConsole::restore(&s.serial, serial_irq, out)
                .map_err(|e| Error::Device("the serial console", std::io::Error::other(e)))?,
            I8042::restore(&s.i8042, on_reset),
        ),
        None => (SerialConsole::new(serial_irq, out), I8042::new(on_reset)),
    };
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(i8042));
    devices.attach_pio(serial.clone(), COM1_PORT, 8)?;
    devices.attach_pio(i8042.clone(), I8042_DATA_PORT, 5)?;
    Ok(LegacyDevices { serial, i8042 })
}

/// Boots `config` and runs the guest until it resets, powers off or fails.
pub fn run(config: VmConfig) -> Result<GuestExit, Error> {
    Ok(build(config)?.run(RunOptions::default())?)
}

/// Most vCPUs a snapshot may hold (the MP table's limit).
const MAX_VCPUS: usize = crate::arch::x86_64::mptable::MAX_CPUS as usize;

/// Reads and validates the snapshot, maps its memory copy-on-write and
/// re-creates the VM, vCPUs and devices, ready to run: the same devices
/// as the snapshot's, attached by the same code as a boot's.
pub fn build_from_snapshot(config: RestoreConfig) -> Result<BuiltVm, Error> {
    let name = config.snapshot.display().to_string();
    let mut file =
        File::open(&config.snapshot).map_err(|e| SnapshotError::Open(name.clone(), e))?;
    let (header, state): (format::Header, MicrovmState) =
        format::read_state(&mut file).map_err(|e| SnapshotError::Format(name.clone(), e))?;
    memory::validate(&state.regions, header.mem_len, MAX_MEM_MIB << 20)
        .map_err(|e| SnapshotError::Memory(name.clone(), e))?;
    if state.vcpus.is_empty() || state.vcpus.len() > MAX_VCPUS {
        return Err(SnapshotError::Invalid(name, "vCPU count").into());
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
                .map_err(|e| SnapshotError::Memory(name.clone(), e))?;
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
            let bad_base = || SnapshotError::Base(name.clone(), base.path.clone());
            let mut base_file = File::open(&base.path).map_err(|_| bad_base())?;
            let (base_header, _): (format::Header, MicrovmState) =
                format::read_state(&mut base_file).map_err(|_| bad_base())?;
            if base_header.state_crc != base.state_crc || base_header.mem_len != base.mem_len {
                return Err(bad_base().into());
            }
            let mem =
                memory::map_private(Arc::new(base_file), base_header.mem_offset, &state.regions)
                    .map_err(|e| SnapshotError::Memory(name.clone(), e))?;
            memory::map_runs(&mem, &state.dirty, &file, header.mem_offset)
                .map_err(|e| SnapshotError::Memory(name.clone(), e))?;
            (mem, base.clone())
        }
    };

    if let Some(path) = &config.working_set {
        let ws = WorkingSet::load(path)
            .map_err(|e| SnapshotError::WorkingSet(path.display().to_string(), e))?;
        // Populate in the background while the VM is created; a guest that
        // reaches a page first simply faults it in itself.
        let mem = mem.clone();
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                let pages = ws.prefetch(&mem);
                tracing::debug!("prefetched {pages} working-set pages");
            })
            .map_err(|e| SnapshotError::Open(name.clone(), e))?;
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
    let event_loop = EventLoop::new(EVENT_LOOP_ENTRIES).map_err(Error::EventLoop)?;
    let Attached {
        reset,
        devices,
        legacy,
        inbound,
    } = attach_devices(
        &vm,
        &event_loop,
        config.console,
        Some(&state.legacy),
        config.net.as_ref(),
        &config.drives,
        config.vsock.as_ref(),
    )?;
    if devices.transports().len() != state.virtio.len() {
        return Err(
            SnapshotError::Devices(name, state.virtio.len(), devices.transports().len()).into(),
        );
    }
    for (transport, saved) in devices.transports().iter().zip(&state.virtio) {
        transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(saved)
            .map_err(|e| SnapshotError::Device(name.clone(), e))?;
    }
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, vcpu_state) in state.vcpus.iter().enumerate() {
        let index =
            u8::try_from(index).map_err(|_| SnapshotError::Invalid(name.clone(), "vCPU count"))?;
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| Error::Vcpu(crate::vstate::vcpu::Error::Kvm("create a vCPU", e)))?;
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
        mapped_diff: state.dirty,
        inbound,
    })
}
