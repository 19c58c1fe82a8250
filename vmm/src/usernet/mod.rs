//! The userspace network behind the virtio-net device
//! ([`crate::devices::virtio::net`]): a smoltcp stack that plays the
//! gateway of the guest's private, slirp-style /24, so a guest needs no TAP
//! device, bridge, network namespace or root on the host.
//!
//! | guest destination | host-side destination (what [`Policy`] decides on) |
//! |---|---|
//! | `10.0.2.15/24` | the guest itself (set by the kernel's `ip=` argument) |
//! | `10.0.2.2:P` (the gateway, this stack) | the host's `127.0.0.1:P` |
//! | `10.0.2.3:53`, UDP or TCP | DNS: the host's resolver ([`Destination::Dns`]) |
//! | any other `10.0.2.0/24` address, broadcast, multicast, `0.0.0.0` | none: refused |
//! | any other IPv4 `A:P` | `A:P` itself |
//!
//! Inbound, each accepted host TCP connection ([`Stack::accept_inbound`], or
//! a `--publish` listener) becomes a TCP connection from the gateway to a
//! guest port. Outbound, each guest SYN is mapped to its host-side
//! destination (table above), checked against [`Policy`] there, and
//! re-originated from a non-blocking host socket; the SYN is only answered
//! once the host connect succeeds, so a refused or denied connection
//! reaches the guest as a RST. Outbound UDP other than DNS is not
//! forwarded (smoltcp answers ICMP port unreachable); a denied DNS query is
//! answered REFUSED. Data is copied between host sockets and smoltcp
//! sockets with backpressure both ways.
//!
//! Under [`Policy::isolated`] (`vmm --net-isolated`, what every platform
//! instance runs with) a guest reaches the public internet and DNS and
//! nothing else: not the host's loopback (so not `10.0.2.2`), not any
//! address of the host's interfaces (listed with getifaddrs when the stack
//! starts), not link-local (`169.254.169.254`, cloud metadata), private,
//! CGNAT, multicast or reserved ranges ([`is_internal`]). Allow rules
//! (`--net-allow 127.0.0.1:5432`) open exactly what they name. The guest
//! network is IPv4-only: outbound connections are IPv4, and only the
//! host's resolver may be IPv6.
//!
//! The stack never blocks and owns no thread: the virtio-net device's
//! event-loop handler feeds it guest frames, host readiness and timer
//! expiries, and carries out the [`WatchRequest`]s it queues.
//!
//! | file | what |
//! |---|---|
//! | `stack.rs` | the smoltcp interface, frame queues and connection table |
//! | `conn.rs` | one proxied TCP connection |
//! | `dns.rs` | the DNS forwarder |
//! | `policy.rs` | outbound policy: isolation, allow/deny rules, on host-side destinations |
//! | `watch.rs` | watch requests and tokens, shared by the stack and the forwarder |
//! | `sys.rs` | socket calls std has no API for, and the host's interface addresses |

mod conn;
mod dns;
mod policy;
mod stack;
mod sys;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
mod watch;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

pub use policy::{is_internal, Destination, Policy};
pub use stack::{Stack, MAX_FRAME_LEN};
pub use sys::host_addresses;
pub use vmm_api::net::{ParseRuleError, Rule};
pub use watch::{WatchRequest, FIRST_TOKEN};

/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway: this stack. As a destination it stands for the host's loopback.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS forwarder's address.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Prefix length of the guest network.
pub const PREFIX_LEN: u8 = 24;
/// The guest's default MAC address (locally administered, as QEMU's).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The gateway's MAC address (as slirp's).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// The kernel argument that configures the guest's eth0 statically
/// (`ip=<client>:<server>:<gw>:<netmask>:<host>:<dev>:<autoconf>:<dns0>`),
/// plus the agent's knob for writing `/etc/resolv.conf`.
pub const GUEST_CMDLINE: &str =
    "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3 little.dns=10.0.2.3";

/// Errors of the network backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--publish` value is malformed.
    #[error("invalid publish spec {0:?}: expected [HOSTADDR:]HOSTPORT:GUESTPORT")]
    PublishSpec(String),
    /// The host's interface addresses, which isolation refuses, could not be listed.
    #[error("cannot list the host's interface addresses")]
    HostAddresses(#[source] std::io::Error),
    /// A published host port could not be bound.
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// An accepted host connection could not be taken over.
    #[error("cannot take over an inbound connection")]
    Inbound(#[source] std::io::Error),
    /// Too many connections are open.
    #[error("too many open connections (at most {0})")]
    TooManyConnections(usize),
}

/// A host port published to a guest port (`[HOSTADDR:]HOSTPORT:GUESTPORT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish {
    /// Where the VMM listens on the host (default address 127.0.0.1).
    pub host: SocketAddr,
    /// The guest port connections are forwarded to.
    pub guest_port: u16,
}

impl FromStr for Publish {
    type Err = Error;

    /// ```
    /// use vmm::usernet::Publish;
    /// let p: Publish = "0.0.0.0:8000:80".parse().unwrap();
    /// assert_eq!((p.host.to_string().as_str(), p.guest_port), ("0.0.0.0:8000", 80));
    /// let p: Publish = "8000:80".parse().unwrap();
    /// assert_eq!(p.host.to_string(), "127.0.0.1:8000");
    /// ```
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::PublishSpec(s.to_owned());
        let (host, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        let guest_port: u16 = guest.parse().map_err(|_| bad())?;
        let host = match host.rsplit_once(':') {
            Some((addr, port)) => {
                let addr = addr.trim_start_matches('[').trim_end_matches(']');
                SocketAddr::new(
                    addr.parse::<IpAddr>().map_err(|_| bad())?,
                    port.parse().map_err(|_| bad())?,
                )
            }
            None => SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                host.parse().map_err(|_| bad())?,
            ),
        };
        if guest_port == 0 {
            return Err(bad());
        }
        Ok(Self { host, guest_port })
    }
}

/// What the guest's network looks like from the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Host ports published to guest ports.
    pub publish: Vec<Publish>,
    /// Which outbound connections the guest may make.
    pub policy: Policy,
    /// The resolver guest DNS queries go to (default: the first
    /// `nameserver` of the host's `/etc/resolv.conf`).
    pub dns_upstream: Option<SocketAddr>,
    /// The host's own interface addresses an isolated guest may not reach
    /// (default: listed when the network starts; a jailed VMM lists them
    /// before it enters its jail).
    pub host_addrs: Option<Vec<std::net::IpAddr>>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            mac: GUEST_MAC,
            publish: Vec::new(),
            policy: Policy::default(),
            dns_upstream: None,
            host_addrs: None,
        }
    }
}

/// The first `nameserver` in a resolv.conf text, on port 53.
///
/// ```
/// let text = "# x\nsearch lan\nnameserver 192.0.2.1\nnameserver 192.0.2.2\n";
/// assert_eq!(vmm::usernet::resolver_from(text), Some("192.0.2.1:53".parse().unwrap()));
/// ```
pub fn resolver_from(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// The host's resolver, from `/etc/resolv.conf` (127.0.0.1:53 if none).
pub fn host_resolver() -> SocketAddr {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|text| resolver_from(&text))
        .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53))
}

#[cfg(test)]
mod tests;
