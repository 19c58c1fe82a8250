//! VMM mechanics on real KVM with a hand-assembled 64-bit guest: the boot
//! GDT, page tables and long-mode entry, port I/O and MMIO exits, a clean
//! stop through the i8042 reset port, and a guest flooding its serial
//! console past the log's cap. No kernel needed; runs in milliseconds
//! of host time (the guest's few instructions are emulated on nested hosts).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::boot::memory_ranges;
use vmm::devices::bus::{Bus, BusDevice};
use vmm::devices::legacy::console_log::{rotated_path, ConsoleLog};
use vmm::devices::legacy::i8042::I8042;
use vmm::devices::legacy::serial::SerialConsole;
use vmm::host::HostKind;
use vmm::vstate::vcpu::{StopReason, Vcpu};
use vmm::vstate::vm::{open_kvm, Vm};

const CODE_ADDR: u64 = 0x10_0000;
/// Inside the boot identity map (first GiB) but outside guest RAM.
const MMIO_ADDR: u64 = 0x3000_0000;

/// `out 0x3f8, 'O'; out 0x3f8, 'K'; rax = \[MMIO\]; rax += 1; \[MMIO+8\] = rax;
/// out 0x64, 0xfe; hlt`
#[rustfmt::skip]
const GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
    0xb0, b'O', 0xee,                   // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee,                   // mov al, 'K'; out dx, al
    0x48, 0xa1, 0x00, 0x00, 0x00, 0x30, 0, 0, 0, 0, // movabs rax, [0x30000000]
    0x48, 0x83, 0xc0, 0x01,             // add rax, 1
    0x48, 0xa3, 0x08, 0x00, 0x00, 0x30, 0, 0, 0, 0, // movabs [0x30000008], rax
    0xb0, 0xfe, 0xe6, 0x64,             // mov al, 0xfe; out 0x64, al
    0xf4,                               // hlt
];

#[derive(Default)]
struct PortLog(Vec<u8>);

impl BusDevice for PortLog {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0.extend_from_slice(data);
    }
}

#[derive(Default)]
struct MmioRecorder {
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for MmioRecorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = 0x1122_3344_5566_7788u64.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v[..n]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

#[test]
fn long_mode_guest_does_pio_mmio_and_resets() {
    let kvm = match open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => panic!("this test needs /dev/kvm: {e}"),
    };
    let mem = GuestMemoryMmap::from_ranges(&memory_ranges(32 << 20)).expect("guest memory");
    mem.write_slice(GUEST, GuestAddress(CODE_ADDR))
        .expect("code fits");
    let vm = Vm::new(kvm, mem).expect("VM");
    let mut vcpu = Vcpu::new(&vm, 0, 1, CODE_ADDR, HostKind::detect()).expect("vCPU");

    let serial = Arc::new(Mutex::new(PortLog::default()));
    let recorder = Arc::new(Mutex::new(MmioRecorder::default()));
    let reset = Arc::new(AtomicBool::new(false));
    let flag = reset.clone();
    let mut pio = Bus::new();
    pio.insert(serial.clone(), 0x3f8, 8).expect("serial range");
    pio.insert(
        Arc::new(Mutex::new(I8042::new(Box::new(move || {
            flag.store(true, Ordering::SeqCst)
        })))),
        0x60,
        5,
    )
    .expect("i8042 range");
    let mut mmio = Bus::new();
    mmio.insert(recorder.clone(), MMIO_ADDR, 0x1000)
        .expect("mmio range");

    let stop = vcpu.run(&pio, &mmio, &reset).expect("guest runs cleanly");
    assert_eq!(stop, StopReason::Reset);
    assert!(
        reset.load(Ordering::SeqCst),
        "stopped by the i8042, not a fault"
    );
    assert_eq!(serial.lock().expect("unpoisoned").0, b"OK");
    let writes = &recorder.lock().expect("unpoisoned").writes;
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].0, 8, "offset inside the MMIO window");
    assert_eq!(writes[0].1, 0x1122_3344_5566_7789u64.to_le_bytes().to_vec());
}

#[test]
fn guest_fault_is_a_typed_error_not_a_panic() {
    let kvm = open_kvm().expect("this test needs /dev/kvm");
    let mem = GuestMemoryMmap::from_ranges(&memory_ranges(32 << 20)).expect("guest memory");
    // ud2 with no IDT: #UD -> #DF -> triple fault, which KVM reports as shutdown.
    mem.write_slice(&[0x0f, 0x0b], GuestAddress(CODE_ADDR))
        .expect("code fits");
    let vm = Vm::new(kvm, mem).expect("VM");
    let mut vcpu = Vcpu::new(&vm, 0, 1, CODE_ADDR, HostKind::detect()).expect("vCPU");
    let reset = AtomicBool::new(false);
    let r = vcpu.run(&Bus::new(), &Bus::new(), &reset);
    assert!(
        matches!(r, Ok(StopReason::Reset) | Err(_)),
        "a triple-faulting guest ends the VM: {r:?}"
    );
}

/// `out 0x3f8, 'x'` `COUNT` times (patched into the `mov ecx`), then the
/// i8042 reset.
#[rustfmt::skip]
const FLOOD: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
    0xb9, 0, 0, 0, 0,                   // mov ecx, COUNT
    0xb0, b'x',                         // loop: mov al, 'x'
    0xee,                               // out dx, al
    0xff, 0xc9,                         // dec ecx
    0x75, 0xf9,                         // jnz loop
    0xb0, 0xfe, 0xe6, 0x64,             // mov al, 0xfe; out 0x64, al
    0xf4,                               // hlt
];

#[test]
fn a_guest_flooding_its_console_leaves_logs_under_the_cap() {
    const COUNT: u32 = 256 * 1024;
    const CAP: u64 = COUNT as u64 / 16;
    let kvm = open_kvm().expect("this test needs /dev/kvm");
    let mem = GuestMemoryMmap::from_ranges(&memory_ranges(32 << 20)).expect("guest memory");
    let mut code = FLOOD.to_vec();
    code[5..9].copy_from_slice(&COUNT.to_le_bytes());
    mem.write_slice(&code, GuestAddress(CODE_ADDR))
        .expect("code fits");
    let vm = Vm::new(kvm, mem).expect("VM");
    let mut vcpu = Vcpu::new(&vm, 0, 1, CODE_ADDR, HostKind::detect()).expect("vCPU");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("console.log");
    let log = ConsoleLog::create(&path, CAP).expect("console log");
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let serial = SerialConsole::new(irq, Box::new(log));
    let reset = Arc::new(AtomicBool::new(false));
    let flag = reset.clone();
    let mut pio = Bus::new();
    pio.insert(Arc::new(Mutex::new(serial)), 0x3f8, 8)
        .expect("serial range");
    pio.insert(
        Arc::new(Mutex::new(I8042::new(Box::new(move || {
            flag.store(true, Ordering::SeqCst)
        })))),
        0x60,
        5,
    )
    .expect("i8042 range");

    let stop = vcpu
        .run(&pio, &Bus::new(), &reset)
        .expect("guest runs cleanly");
    assert_eq!(stop, StopReason::Reset, "the guest wrote all {COUNT} bytes");
    let size = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .len()
    };
    let (current, rotated) = (size(&path), size(&rotated_path(&path)));
    assert!(
        current <= CAP && rotated == CAP,
        "{COUNT} bytes written under a {CAP}-byte cap left {current} + {rotated} bytes"
    );
    assert_eq!(
        u64::from(COUNT) % CAP,
        current % CAP,
        "the current file holds the tail of the flood"
    );
}
