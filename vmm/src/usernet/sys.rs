//! The socket calls std does not offer: a non-blocking connect, closing
//! with a RST, and listing the host's interface addresses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Starts a non-blocking TCP connect to `addr`; the stream becomes writable
/// (or reports an error through `take_error`) when the connect finishes.
pub fn connect_nonblocking(addr: SocketAddr) -> io::Result<TcpStream> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) takes no pointers; a negative result is checked below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` is a sockaddr_storage initialised for `addr`'s
    // family and `len` is the size of that family's sockaddr, within it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&storage).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
    }
    Ok(TcpStream::from(fd))
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data for which all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: family(libc::AF_INET),
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin);
            }
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: family(libc::AF_INET6),
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6);
            }
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, socklen(len))
}

fn socklen(size: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(size).expect("socket structures are a few dozen bytes")
}

fn family(af: libc::c_int) -> libc::sa_family_t {
    libc::sa_family_t::try_from(af).expect("address family constants fit sa_family_t")
}

/// Makes the next close of `stream` send a RST instead of a FIN (SO_LINGER 0).
pub fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value points to a live `linger` of the length given;
    // the fd belongs to `stream`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            socklen(std::mem::size_of::<libc::linger>()),
        )
    };
    if rc < 0 {
        tracing::debug!("SO_LINGER failed: {}", io::Error::last_os_error());
    }
}

/// The IPv4 and IPv6 addresses of the host's network interfaces, loopback
/// included (getifaddrs(3)).
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes one pointer through the pointer given,
    // which points to a live local; a non-zero result is checked below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut node = head;
    while !node.is_null() {
        // SAFETY: `node` is a node of the list getifaddrs returned, which
        // stays allocated until the freeifaddrs below.
        let ifa = unsafe { &*node };
        // SAFETY: a non-null ifa_addr points to a sockaddr of the kind its
        // family names, owned by the same list.
        if let Some(ip) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
        node = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once;
    // nothing borrowed from the list outlives this call.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}

/// The address in `sa`, if it is IPv4 or IPv6.
///
/// # Safety
///
/// `sa` is null or points to a readable sockaddr at least as large as its
/// `sa_family` says.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees a readable sockaddr; every sockaddr
    // starts with its family. Unaligned reads ask nothing of the allocation.
    let family = unsafe { std::ptr::read_unaligned(std::ptr::addr_of!((*sa).sa_family)) };
    match libc::c_int::from(family) {
        libc::AF_INET => {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in (caller's guarantee).
            let sin = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
            Some(IpAddr::V4(Ipv4Addr::from(
                sin.sin_addr.s_addr.to_ne_bytes(),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6 (caller's guarantee).
            let sin6 = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}
