//! Who is on the other end of the API socket, from the kernel
//! (`SO_PEERCRED`): the daemon answers its own uid and root, no one else,
//! even if the socket's mode or the home's were loosened.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The credentials the kernel recorded when the peer connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's process.
    pub pid: i32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

/// The credentials of `stream`'s peer.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| io::Error::other("struct ucred does not fit a socklen_t"))?;
    // SAFETY: `cred` and `len` are valid, exclusively borrowed for the
    // call, and `len` is the size of `cred`, so the kernel writes at most
    // that many bytes; the descriptor is open while `stream` lives.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// This process's effective uid.
pub fn my_uid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a peer with `uid` may use a daemon running as `daemon_uid`:
/// the same user, or root.
///
/// ```
/// use platform::peer::may_use;
/// assert!(may_use(1000, 1000));
/// assert!(may_use(0, 1000));
/// assert!(!may_use(1001, 1000));
/// assert!(!may_use(1000, 0));
/// ```
pub fn may_use(uid: u32, daemon_uid: u32) -> bool {
    uid == daemon_uid || uid == 0
}

/// Whether the peer of `stream` has closed its end (checked without
/// blocking and without consuming anything it sent).
pub fn hung_up(stream: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv(2) writes at most 1 byte into `byte`, which lives for
    // the call; MSG_DONTWAIT keeps it from blocking, MSG_PEEK leaves the
    // data queued; the descriptor is open while `stream` lives.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            io::Error::last_os_error().kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_of_a_local_socket_is_this_process() {
        let (a, b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.uid, my_uid());
        assert_eq!(cred.pid, i32::try_from(std::process::id()).unwrap());
        assert!(may_use(cred.uid, my_uid()));
        drop(b);
        assert!(hung_up(&a));
    }

    #[test]
    fn a_connected_peer_has_not_hung_up_even_after_sending() {
        use std::io::{Read, Write};
        let (mut a, mut b) = UnixStream::pair().unwrap();
        assert!(!hung_up(&a));
        b.write_all(b"x").unwrap();
        assert!(!hung_up(&a));
        let mut byte = [0u8];
        a.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x", "the check consumed nothing");
    }
}
