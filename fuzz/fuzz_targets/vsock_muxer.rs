//! The vsock muxer between a hostile guest and real Unix sockets: guest
//! packets (valid and rejected, any op, port, credit and payload), host
//! clients with any `CONNECT` line, host peers that write, shut down and
//! vanish, socket readiness as the event loop reports it, the deadline
//! sweep, and the packets the muxer hands the guest.
//!
//! Input: operations, each a kind byte and its arguments (see `Op`).
//!
//! What must hold: no packet to the guest carries more data than the
//! guest's advertised credit allows (virtio 1.2, 5.10.6.3) or than the RX
//! buffer holds; every packet to the guest is a well-formed host → guest
//! STREAM header; the muxer's watch, unwatch and timer requests are
//! consistent (no token watched twice, none unwatched that is not watched,
//! one sweep timer at a time); the stream count stays capped.

#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::muxer::{Interest, Muxer, LISTENER, MAX_CONNECTIONS};
use vmm::devices::virtio::vsock::packet::{
    validate, Header, Op, TxPacket, HOST_CID, MAX_PAYLOAD, TYPE_STREAM,
};

const GUEST_CID: u64 = 3;
/// The host port a `<uds>_<port>` listener serves; the others refuse.
const LISTENING_PORT: u32 = 2000;
/// Where the muxer numbers host-initiated streams from.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const HOST_PORTS: [u32; 4] = [
    LISTENING_PORT,
    LISTENING_PORT + 1,
    FIRST_LOCAL_PORT,
    FIRST_LOCAL_PORT + 1,
];
const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;
const POLLHUP: u32 = libc::POLLHUP as u32;

/// The fuzzer's bytes, consumed front to back.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.byte()?,
            self.byte()?,
            self.byte()?,
            self.byte()?,
        ]))
    }

    /// `len` bytes: a run of one byte when `fill`, else the input's next
    /// (fewer if it ends).
    fn data(&mut self, len: usize, fill: bool) -> Option<Vec<u8>> {
        if fill {
            return Some(vec![self.byte()?; len]);
        }
        let n = len.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken.to_vec())
    }
}

/// The guest's receive credit for one stream, as it advertised it, and
/// what the device has sent it since the stream began.
#[derive(Default)]
struct Credit {
    buf_alloc: u32,
    fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
}

/// The event loop's side: what is watched, the sweep timer, the host ends.
struct World {
    watched: BTreeMap<u32, u32>,
    sweep_armed: bool,
    peers: Vec<UnixStream>,
    /// Keyed (host port, guest port).
    credit: HashMap<(u32, u32), Credit>,
}

impl World {
    fn apply(&mut self, muxer: &mut Muxer) {
        for interest in muxer.take_interests() {
            match interest {
                Interest::Watch { token, events, .. } => {
                    assert!(
                        self.watched.insert(token, events).is_none(),
                        "token {token} watched twice"
                    );
                }
                Interest::Unwatch(token) => {
                    assert!(
                        self.watched.remove(&token).is_some(),
                        "token {token} unwatched but not watched"
                    );
                }
                Interest::Timer(_) => {
                    assert!(!self.sweep_armed, "a second sweep timer");
                    self.sweep_armed = true;
                }
            }
        }
        assert!(muxer.connections() <= MAX_CONNECTIONS);
    }

    /// A packet the muxer gives the guest, with room for `room` bytes.
    fn guest_receives(&mut self, hdr: &Header, payload: &[u8], room: usize) {
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.type_, hdr.len),
            (HOST_CID, GUEST_CID, TYPE_STREAM, 0),
            "{hdr:?}"
        );
        assert!(payload.len() <= room, "{} bytes into {room}", payload.len());
        let id = (hdr.src_port, hdr.dst_port);
        match hdr.op {
            op if op == Op::Request as u16 => {
                self.credit.entry(id).or_default().rx_cnt = Wrapping(0);
            }
            op if op == Op::Rw as u16 => {
                assert!(!payload.is_empty(), "an empty RW");
                let credit = self.credit.entry(id).or_default();
                let in_flight = (credit.rx_cnt - credit.fwd_cnt).0;
                let allowed = credit.buf_alloc.saturating_sub(in_flight);
                let len = u32::try_from(payload.len()).expect("capped by room");
                assert!(
                    len <= allowed,
                    "{len} bytes sent to guest port {} with credit {allowed}",
                    hdr.dst_port
                );
                credit.rx_cnt += len;
            }
            op => {
                assert!((1..=7).contains(&op), "op {op}");
                assert!(payload.is_empty(), "op {op} with a payload");
            }
        }
    }

    /// The guest sends `hdr`: valid headers carry its credit.
    fn guest_sends(&mut self, hdr: &Header, op: Op) {
        let credit = self.credit.entry((hdr.dst_port, hdr.src_port)).or_default();
        credit.buf_alloc = hdr.buf_alloc;
        credit.fwd_cnt = Wrapping(hdr.fwd_cnt);
        if op == Op::Request {
            credit.rx_cnt = Wrapping(0);
        }
    }
}

fn guest_packet(input: &mut Input<'_>, muxer: &mut Muxer, world: &mut World) -> Option<()> {
    let op = u16::from(input.byte()? % 9);
    let ports = input.byte()?;
    let mangle = input.byte()?;
    let flags = u32::from(input.byte()? % 4);
    let buf_alloc = input.u32()?;
    let fwd_cnt = input.u32()?;
    let len_byte = input.u16()?;
    let fill = len_byte & 0x8000 != 0;
    let len = usize::from(len_byte & 0x7fff) * if fill { 2 } else { 1 };
    let payload = if op == Op::Rw as u16 {
        input.data(len, fill)?
    } else {
        Vec::new()
    };
    let mut hdr = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 5000 + u32::from((ports >> 4) & 3),
        dst_port: HOST_PORTS[usize::from(ports & 3)],
        len: u32::try_from(payload.len()).expect("short"),
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    };
    if mangle & 1 != 0 {
        hdr.src_cid = u64::from(mangle);
    }
    if mangle & 2 != 0 {
        hdr.dst_cid = u64::from(mangle >> 2);
    }
    if mangle & 4 != 0 {
        hdr.type_ = 2;
    }
    if mangle & 8 != 0 {
        hdr.len = hdr.len.wrapping_add(MAX_PAYLOAD);
    }
    match validate(&hdr, GUEST_CID) {
        Ok(op) if hdr.len as usize == payload.len() => {
            world.guest_sends(&hdr, op);
            muxer.handle_tx(&TxPacket { hdr, op, payload });
        }
        _ => muxer.handle_rejected(&hdr),
    }
    Some(())
}

fn host_client(
    input: &mut Input<'_>,
    muxer: &mut Muxer,
    world: &mut World,
    path: &std::path::Path,
) -> Option<()> {
    let line = match input.byte()? % 4 {
        0 => b"CONNECT 5000\n".to_vec(),
        1 => {
            let mut line = b"CONNECT 5001\r\n".to_vec();
            let n = usize::from(input.byte()?);
            line.extend(input.data(n, false)?);
            line
        }
        2 => {
            let n = usize::from(input.byte()?);
            input.data(n, false)?
        }
        _ => Vec::new(),
    };
    let Ok(mut client) = UnixStream::connect(path) else {
        return Some(());
    };
    let _ = client.set_nonblocking(true);
    let _ = client.write_all(&line);
    world.peers.push(client);
    muxer.accept();
    Some(())
}

fn peer_io(input: &mut Input<'_>, world: &mut World, kind: u8) -> Option<()> {
    let pick = usize::from(input.byte()?);
    let arg = input.u16()?;
    if world.peers.is_empty() {
        return Some(());
    }
    let index = pick % world.peers.len();
    match kind {
        2 => {
            let data = input.data(usize::from(arg & 0x3fff), arg & 0x8000 != 0)?;
            let _ = world.peers[index].write(&data);
        }
        3 if arg & 1 == 0 => {
            let _ = world.peers[index].shutdown(Shutdown::Write);
        }
        3 => drop(world.peers.swap_remove(index)),
        _ => {
            let mut sink = vec![0u8; usize::from(arg)];
            let _ = world.peers[index].read(&mut sink);
        }
    }
    Some(())
}

fn ready(input: &mut Input<'_>, muxer: &mut Muxer, world: &World) -> Option<()> {
    let pick = usize::from(input.byte()?);
    let hup = input.byte()? & 1 != 0;
    let n = world.watched.len();
    if n == 0 {
        return Some(());
    }
    let (&token, &events) = world.watched.iter().nth(pick % n).expect("in range");
    if token == LISTENER {
        // The handler accepts when the listening socket is readable.
        muxer.accept();
    } else {
        let revents = (events & (POLLIN | POLLOUT)) | if hup { POLLHUP } else { 0 };
        muxer.ready(token, revents);
    }
    Some(())
}

fn drain(input: &mut Input<'_>, muxer: &mut Muxer, world: &mut World) -> Option<()> {
    let room = usize::from(input.u16()?).min(MAX_PAYLOAD as usize);
    let count = 1 + input.byte()? % 16;
    for _ in 0..count {
        let Some((hdr, payload)) = muxer.next_rx(room) else {
            assert!(!muxer.has_rx() || room == 0, "has_rx but nothing to send");
            break;
        };
        world.guest_receives(&hdr, &payload, room);
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("v.sock");
    let Ok(listener) = UnixListener::bind(&path) else {
        return;
    };
    let Ok(host) = UnixListener::bind(dir.path().join(format!("v.sock_{LISTENING_PORT}"))) else {
        return;
    };
    let _ = host.set_nonblocking(true);
    let mut muxer = Muxer::new(GUEST_CID, path.clone(), listener);
    muxer.start();
    let mut world = World {
        watched: BTreeMap::new(),
        sweep_armed: false,
        peers: Vec::new(),
        credit: HashMap::new(),
    };
    world.apply(&mut muxer);

    let mut input = Input(data);
    while let Some(kind) = input.byte() {
        let done = match kind % 8 {
            0 => guest_packet(&mut input, &mut muxer, &mut world),
            1 => host_client(&mut input, &mut muxer, &mut world, &path),
            k @ 2..=4 => peer_io(&mut input, &mut world, k),
            5 => ready(&mut input, &mut muxer, &world),
            6 => {
                if std::mem::take(&mut world.sweep_armed) {
                    muxer.sweep();
                }
                Some(())
            }
            _ => drain(&mut input, &mut muxer, &mut world),
        };
        // Streams the guest opened reach the listener as host peers.
        while let Ok((peer, _)) = host.accept() {
            let _ = peer.set_nonblocking(true);
            world.peers.push(peer);
        }
        world.apply(&mut muxer);
        if done.is_none() {
            break;
        }
    }
});
