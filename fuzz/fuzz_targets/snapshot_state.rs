//! Snapshot files as a restore reads them: the header (magic, version,
//! CRCs, layout), the bincode state under its size cap, then what a
//! restore does with the state before it needs KVM: the memory layout
//! checks, the serial console and i8042 put back, and a virtio-net
//! transport (with its device handler, when saved active) restored from
//! each saved virtio-net slot.
//!
//! Input: a flags byte, then the file. Flag 1 rewrites the magic, the
//! version and both CRCs (so that the fuzzer reaches the state decoder
//! rather than the checksums); flag 2 extends the file (sparse) to the end
//! of the memory image the header declares, when that is under 1 GiB.
//!
//! What must hold: an accepted header describes a layout inside the file;
//! a decoded state saves to a file that reads back and saves again to the
//! same bytes; a restored transport shows the saved status and runs its
//! handler exactly when one was saved.

#![no_main]

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use little_fuzz::deny_all_net;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::bus::BusDevice;
use vmm::devices::legacy::i8042::{COMMAND_OFFSET, DATA_OFFSET, I8042};
use vmm::devices::legacy::SerialConsole;
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::persist::{DeviceState, TransportState};
use vmm::devices::virtio::transport::mmio::MmioTransport;
use vmm::devices::virtio::Interrupt;
use vmm::event_loop::EventLoop;
use vmm::snapshot::format::{self, HEADER_LEN, MAGIC, MAX_STATE_LEN, PAGE_SIZE, VERSION};
use vmm::snapshot::memory;
use vmm::snapshot::MicrovmState;
use vmm_sys_util::eventfd::EventFd;

/// The memory cap a restore checks regions against (`MAX_MEM_MIB`).
const MAX_MEM: u64 = 64 << 30;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Makes the header's magic, version and CRCs right for what follows.
fn fix_up(file: &mut [u8]) {
    if file.len() < HEADER_LEN as usize {
        return;
    }
    file[0..8].copy_from_slice(&MAGIC);
    file[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let body = file.len() - HEADER_LEN as usize;
    let state_len = usize::try_from(u64_at(file, 16)).map_or(body, |n| n.min(body));
    file[16..24].copy_from_slice(&(state_len as u64).to_le_bytes());
    let start = HEADER_LEN as usize;
    let crc = crc32fast::hash(&file[start..start + state_len]);
    file[24..28].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32fast::hash(&file[..60]);
    file[60..64].copy_from_slice(&crc.to_le_bytes());
}

/// The snapshot file `write_state` makes of `state`: header and state.
fn save(state: &MicrovmState, mem_len: u64) -> Vec<u8> {
    let mut file = tempfile::tempfile().expect("a temporary file");
    let header = format::write_state(&mut file, state, mem_len).expect("a decoded state encodes");
    assert!(header.state_len <= MAX_STATE_LEN);
    let mut bytes = vec![0u8; usize::try_from(HEADER_LEN + header.state_len).expect("capped")];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut bytes))
        .expect("just written");
    bytes
}

/// A file holding `bytes`, as long as the memory image they declare.
fn tempfile_with(bytes: &[u8]) -> std::fs::File {
    let mut file = tempfile::tempfile().expect("a temporary file");
    file.write_all(bytes).expect("written");
    let end = u64_at(bytes, 32) + u64_at(bytes, 40);
    file.set_len(end.max(bytes.len() as u64)).expect("sparse");
    file
}

/// Puts a virtio-net transport back as `saved` says, as a restore does.
fn restore_net(saved: &TransportState) {
    let Ok(event_loop) = EventLoop::new(8) else {
        return;
    };
    let (Ok(mem), Ok(net), Ok(irq)) = (
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]),
        Net::new(&deny_all_net()),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return;
    };
    let interrupt = Arc::new(Interrupt::new(irq));
    let Ok(mut t) = MmioTransport::new(Box::new(net), mem, interrupt, event_loop.handle()) else {
        return;
    };
    if t.restore(saved).is_err() {
        return;
    }
    assert_eq!(t.status(), saved.status);
    assert_eq!(t.activated(), saved.runtime.is_some());
    // The guest goes on from there: it reads and resets the device.
    for offset in (0..0x100).step_by(4) {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
    }
    t.write(0x70, &0u32.to_le_bytes());
    assert!(!t.activated());
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let mut image = image.to_vec();
    if flags & 1 != 0 {
        fix_up(&mut image);
    }
    let Ok(mut file) = tempfile::tempfile() else {
        return;
    };
    if file.write_all(&image).is_err() {
        return;
    }
    if flags & 2 != 0 && image.len() >= HEADER_LEN as usize {
        let end = u64_at(&image, 32).checked_add(u64_at(&image, 40));
        if let Some(end) = end.filter(|&e| e > image.len() as u64 && e < 1 << 30) {
            let _ = file.set_len(end);
        }
    }
    let Ok(file_len) = file.metadata().map(|m| m.len()) else {
        return;
    };

    let Ok((header, state)) = format::read_state::<MicrovmState>(&mut file) else {
        return;
    };
    assert!(header.state_len <= MAX_STATE_LEN);
    assert!(header.mem_offset.is_multiple_of(PAGE_SIZE));
    assert!(header.mem_offset >= HEADER_LEN + header.state_len);
    assert!(header.mem_offset + header.mem_len <= file_len);

    // What a snapshot of the restored VM would write reads back, and
    // encodes again to the same bytes. (Not always the bytes it came from:
    // kvm-bindings pads or cuts a KVM struct saved with another size.)
    let first = save(&state, header.mem_len);
    let (second_header, second): (_, MicrovmState) =
        format::read_state(&mut tempfile_with(&first)).expect("a written snapshot reads back");
    assert_eq!(second_header.mem_len, header.mem_len);
    assert_eq!(
        save(&second, header.mem_len),
        first,
        "a second save differs"
    );

    // What a restore checks and builds before it needs KVM.
    let _ = memory::validate(&state.regions, header.mem_len, MAX_MEM);
    let mut i8042 = I8042::restore(&state.legacy.i8042, Box::new(|| {}));
    for offset in [DATA_OFFSET, COMMAND_OFFSET] {
        i8042.read(offset, &mut [0u8]);
    }
    if let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) {
        let serial = SerialConsole::restore(&state.legacy.serial, irq, Box::new(std::io::sink()));
        if let Ok(mut serial) = serial {
            let mut b = [0u8];
            for offset in 0..8 {
                serial.read(offset, &mut b);
            }
        }
    }
    for saved in &state.virtio {
        for (i, q) in saved.queues.iter().enumerate() {
            let _ = q.to_queue(i);
        }
        if let Some(runtime) = &saved.runtime {
            let _ = match &runtime.device {
                DeviceState::Block(s) => s.check(),
                DeviceState::Net(s) => s.check(),
                DeviceState::Vsock(s) => s.check(),
            };
        }
        if saved.device_type == VIRTIO_ID_NET {
            restore_net(saved);
        }
    }
});
