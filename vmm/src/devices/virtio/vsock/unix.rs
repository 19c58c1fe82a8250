//! The one Unix-socket call std lacks: a connect that never blocks.
//!
//! `UnixStream::connect` blocks while the listener's backlog is full, which
//! would stall the device event loop; a non-blocking connect fails with
//! EAGAIN instead, and the guest gets RST as if nobody listened.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to the stream socket at `path` without blocking; the stream
/// comes back non-blocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // AF_UNIX is 1: it fits sa_family_t.
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket this function just created and owns alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // sockaddr_un is 110 bytes: it fits socklen_t.
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(110);
    // SAFETY: addr is a valid, initialised sockaddr_un living for the call,
    // and len is its size; the kernel only reads it.
    let ret = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_or_fails_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        assert!(connect_nonblocking(&path).is_err(), "nobody listens yet");
        let listener = UnixListener::bind(&path).expect("bind");
        let mut client = connect_nonblocking(&path).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        server.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        std::thread::sleep(std::time::Duration::from_millis(10));
        client.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
        let long = dir.path().join("x".repeat(200));
        assert!(connect_nonblocking(&long).is_err());
    }
}
