//! Socket, poll and clock calls for the host channel: vsock streams, the
//! TCP readiness probe, multi-fd `ppoll`, and what `RESTORED` needs
//! (`clock_settime`, `RNDADDENTROPY`).

use super::raw::{syscall2, syscall3, syscall5};
use super::{check, check_i32, close, Result, EINVAL, O_CLOEXEC};
use core::ptr;

mod nr {
    pub const IOCTL: usize = 16;
    pub const SOCKET: usize = 41;
    pub const CONNECT: usize = 42;
    pub const ACCEPT: usize = 43;
    pub const SHUTDOWN: usize = 48;
    pub const BIND: usize = 49;
    pub const LISTEN: usize = 50;
    pub const CLOCK_SETTIME: usize = 227;
    pub const PPOLL: usize = 271;
}

const AF_INET: u16 = 2;
const AF_VSOCK: u16 = 40;
const SOCK_STREAM: usize = 1;
/// Any vsock context id (for `bind`).
const VMADDR_CID_ANY: u32 = u32::MAX;

/// Readable.
pub const POLLIN: i16 = 0x1;

/// `struct pollfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PollFd {
    /// The fd (negative: ignored).
    pub fd: i32,
    /// Requested events.
    pub events: i16,
    /// Returned events.
    pub revents: i16,
}

/// `ppoll(2)` on `fds`, waiting at most `timeout_ms` (`None`: forever);
/// returns how many fds have events. EINTR counts as none.
pub fn poll(fds: &mut [PollFd], timeout_ms: Option<u64>) -> Result<usize> {
    let ts = timeout_ms.map(|ms| [ms / 1000, (ms % 1000) * 1_000_000]);
    let ts_ptr = ts.as_ref().map_or(ptr::null(), |t| t.as_ptr());
    // SAFETY: fds is a live, exclusively borrowed array of `struct pollfd`
    // (repr(C), 8 bytes each) of the length given; ts is NULL or a
    // `struct timespec` (two 64-bit fields) on the stack; no signal mask.
    let ret = unsafe {
        syscall5(
            nr::PPOLL,
            fds.as_mut_ptr() as usize,
            fds.len(),
            ts_ptr as usize,
            0,
            8,
        )
    };
    match check(ret) {
        Err(super::EINTR) => Ok(0),
        other => other,
    }
}

fn sockaddr_vm(cid: u32, port: u32) -> [u8; 16] {
    // struct sockaddr_vm { u16 family; u16 reserved; u32 port; u32 cid;
    // u8 flags; u8 zero[3]; }
    let mut addr = [0u8; 16];
    addr[..2].copy_from_slice(&AF_VSOCK.to_ne_bytes());
    addr[4..8].copy_from_slice(&port.to_ne_bytes());
    addr[8..12].copy_from_slice(&cid.to_ne_bytes());
    addr
}

fn socket(family: u16) -> Result<i32> {
    // SAFETY: socket() takes no pointers.
    check_i32(unsafe { syscall3(nr::SOCKET, usize::from(family), SOCK_STREAM | O_CLOEXEC, 0) })
}

fn connect_addr(fd: i32, addr: &[u8; 16]) -> Result<()> {
    // SAFETY: addr is a 16-byte socket address living for the call; the
    // kernel only reads it.
    check(unsafe { syscall3(nr::CONNECT, fd as usize, addr.as_ptr() as usize, addr.len()) })
        .map(drop)
}

/// A blocking vsock stream connected to `cid:port`.
pub fn vsock_connect(cid: u32, port: u32) -> Result<i32> {
    let fd = socket(AF_VSOCK)?;
    match connect_addr(fd, &sockaddr_vm(cid, port)) {
        Ok(()) => Ok(fd),
        Err(e) => {
            close(fd);
            Err(e)
        }
    }
}

/// A vsock stream socket listening on `port`.
pub fn vsock_listen(port: u32) -> Result<i32> {
    let fd = socket(AF_VSOCK)?;
    let addr = sockaddr_vm(VMADDR_CID_ANY, port);
    // SAFETY: addr is a 16-byte sockaddr_vm living for the call.
    let bound = check(unsafe { syscall3(nr::BIND, fd as usize, addr.as_ptr() as usize, 16) })
        // SAFETY: listen() takes no pointers.
        .and_then(|_| check(unsafe { syscall2(nr::LISTEN, fd as usize, 4) }));
    match bound {
        Ok(_) => Ok(fd),
        Err(e) => {
            close(fd);
            Err(e)
        }
    }
}

/// A TCP socket listening on 127.0.0.1:`port`.
pub fn tcp_listen_loopback(port: u16) -> Result<i32> {
    let fd = socket(AF_INET)?;
    let addr = sockaddr_in_loopback(port);
    // SAFETY: addr is a 16-byte sockaddr_in living for the call.
    let bound = check(unsafe { syscall3(nr::BIND, fd as usize, addr.as_ptr() as usize, 16) })
        // SAFETY: listen() takes no pointers.
        .and_then(|_| check(unsafe { syscall2(nr::LISTEN, fd as usize, 16) }));
    match bound {
        Ok(_) => Ok(fd),
        Err(e) => {
            close(fd);
            Err(e)
        }
    }
}

/// `accept(2)` without the peer address.
pub fn accept(fd: i32) -> Result<i32> {
    // SAFETY: NULL address and length pointers ask for no peer address.
    check_i32(unsafe { syscall3(nr::ACCEPT, fd as usize, 0, 0) })
}

/// `shutdown(fd, SHUT_WR)`: the peer reads end-of-file.
pub fn shutdown_write(fd: i32) {
    // SAFETY: shutdown takes no pointers.
    let _ = unsafe { syscall2(nr::SHUTDOWN, fd as usize, 1) };
}

fn sockaddr_in_loopback(port: u16) -> [u8; 16] {
    // struct sockaddr_in { u16 family; be16 port; be32 addr; u8 zero[8]; }
    let mut addr = [0u8; 16];
    addr[..2].copy_from_slice(&AF_INET.to_ne_bytes());
    addr[2..4].copy_from_slice(&port.to_be_bytes());
    addr[4..8].copy_from_slice(&[127, 0, 0, 1]);
    addr
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` (one
/// connect, then close: three system calls).
pub fn tcp_accepts(port: u16) -> bool {
    let Ok(fd) = socket(AF_INET) else {
        return false;
    };
    let ok = connect_addr(fd, &sockaddr_in_loopback(port)).is_ok();
    close(fd);
    ok
}

/// Sets the wall clock (`clock_settime(CLOCK_REALTIME)`).
pub fn set_realtime(unix_ns: u64) -> Result<()> {
    let ts: [u64; 2] = [unix_ns / 1_000_000_000, unix_ns % 1_000_000_000];
    // SAFETY: ts is a `struct timespec` on the stack, read by the kernel.
    check(unsafe { syscall2(nr::CLOCK_SETTIME, 0, ts.as_ptr() as usize) }).map(drop)
}

/// Mixes `bytes` into the kernel RNG and credits them as entropy
/// (`RNDADDENTROPY` on an open `/dev/urandom` or `/dev/random` fd).
pub fn add_entropy(fd: i32, bytes: &[u8]) -> Result<()> {
    const RNDADDENTROPY: usize = 0x4008_5203;
    const MAX: usize = 64;
    if bytes.len() > MAX {
        return Err(EINVAL);
    }
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = [0u8; 8 + MAX];
    let len = i32::try_from(bytes.len()).map_err(|_| EINVAL)?;
    info[..4].copy_from_slice(&(len * 8).to_ne_bytes());
    info[4..8].copy_from_slice(&len.to_ne_bytes());
    info[8..8 + bytes.len()].copy_from_slice(bytes);
    // SAFETY: info holds a rand_pool_info whose buf_size matches the bytes
    // that follow it in the same live buffer; the kernel only reads it.
    check(unsafe {
        syscall3(
            nr::IOCTL,
            fd as usize,
            RNDADDENTROPY,
            info.as_ptr() as usize,
        )
    })
    .map(drop)
}

/// `RNDRESEEDCRNG`: the kernel's CRNG takes a new key from its input pool
/// now (which [`add_entropy`] just fed) instead of at its next scheduled
/// reseed, so a restored clone stops producing its snapshot's stream.
pub fn reseed_crng(fd: i32) -> Result<()> {
    const RNDRESEEDCRNG: usize = 0x5207;
    // SAFETY: an argument-less ioctl on the descriptor the caller opened;
    // the kernel reads and writes no memory of this process.
    check(unsafe { syscall3(nr::IOCTL, fd as usize, RNDRESEEDCRNG, 0) }).map(drop)
}
