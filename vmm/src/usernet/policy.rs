//! Which destinations a guest may open connections (and send DNS queries)
//! to, decided on the **host-side** destination: the address the VMM
//! connects to after its mapping (`10.0.2.2:P` is `127.0.0.1:P`), never the
//! address the guest wrote.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Rule, DNS_IP};

/// What a guest asked to reach, after the stack's address mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A TCP connection to this host-side address.
    Connect(SocketAddr),
    /// A DNS query (UDP or TCP) to the forwarder `10.0.2.3:53`, which
    /// forwards it to this resolver, the host's.
    Dns {
        /// The resolver the query goes to.
        upstream: SocketAddr,
    },
}

/// Outbound policy: a default, isolation, and exceptions.
///
/// For a connection to a host-side address, in order: a matching deny rule
/// refuses; a matching allow rule admits; with `isolated`, an address off
/// the public internet ([`is_internal`]) or of the host itself refuses;
/// otherwise `allow_by_default` decides. DNS is its own destination: rules
/// naming the forwarder `10.0.2.3:53` or the upstream resolver's address
/// apply to it, isolation does not (the resolver answers queries, and its
/// address opens nothing else).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Whether destinations no rule matches are allowed.
    pub allow_by_default: bool,
    /// Public internet and DNS only: see [`is_internal`].
    pub isolated: bool,
    /// Destinations that the guest may reach even when denied by default
    /// or by isolation.
    pub allow: Vec<Rule>,
    /// Destinations denied whatever else says (checked first).
    pub deny: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_by_default: true,
            isolated: false,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

impl Policy {
    /// Whether the guest may reach `dst`; `host` holds the host's own
    /// interface addresses, refused under isolation.
    ///
    /// ```
    /// use vmm::usernet::{Destination, Policy};
    ///
    /// let isolated = Policy { isolated: true, ..Policy::default() };
    /// let connect = |a: &str| Destination::Connect(a.parse().unwrap());
    /// assert!(isolated.allows(connect("1.1.1.1:443"), &[]));
    /// // A guest connect to the gateway 10.0.2.2:5432 arrives here as this:
    /// assert!(!isolated.allows(connect("127.0.0.1:5432"), &[]));
    /// let opened = Policy { allow: vec!["127.0.0.1:5432".parse().unwrap()], ..isolated };
    /// assert!(opened.allows(connect("127.0.0.1:5432"), &[]));
    /// ```
    pub fn allows(&self, dst: Destination, host: &[IpAddr]) -> bool {
        let forwarder = SocketAddr::new(IpAddr::V4(DNS_IP), 53);
        let names = |r: &Rule| match dst {
            Destination::Connect(addr) => r.matches(addr),
            Destination::Dns { upstream } => r.matches(forwarder) || r.matches(upstream),
        };
        if self.deny.iter().any(names) {
            return false;
        }
        if self.allow.iter().any(names) {
            return true;
        }
        if let Destination::Connect(addr) = dst {
            let ip = canonical(addr.ip());
            if self.isolated && (is_internal(ip) || host.iter().any(|h| canonical(*h) == ip)) {
                return false;
            }
        }
        self.allow_by_default
    }
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:A.B.C.D`) as the IPv4
/// address it reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is off the public internet, as isolation sees it: the
/// address ranges the IANA special-purpose registries mark as not globally
/// reachable, plus multicast.
///
/// IPv4: `0.0.0.0/8` (connecting to 0.0.0.0 reaches the host itself),
/// `10/8`, `100.64/10` (CGNAT), `127/8`, `169.254/16` (link-local, cloud
/// metadata), `172.16/12`, `192.0.0/24`, `192.0.2/24`, `192.168/16`,
/// `198.18/15`, `198.51.100/24`, `203.0.113/24`, `224/4` (multicast) and
/// `240/4` (reserved, with 255.255.255.255). IPv6: `::`, `::1`, IPv4-mapped
/// and NAT64 (`64:ff9b::/96`) forms of the above, `64:ff9b:1::/48`,
/// `100::/64`, `2001:db8::/32`, `fc00::/7` (ULA), `fe80::/10`, `fec0::/10`
/// and `ff00::/8`. (The guest network is IPv4-only; IPv6 is only ever the
/// host's resolver.)
///
/// ```
/// use vmm::usernet::is_internal;
/// assert!(is_internal("169.254.169.254".parse().unwrap()));
/// assert!(is_internal("fd00::1".parse().unwrap()));
/// assert!(!is_internal("1.1.1.1".parse().unwrap()));
/// ```
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    const RANGES: [(Ipv4Addr, u8); 15] = [
        (Ipv4Addr::new(0, 0, 0, 0), 8),
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(100, 64, 0, 0), 10),
        (Ipv4Addr::new(127, 0, 0, 0), 8),
        (Ipv4Addr::new(169, 254, 0, 0), 16),
        (Ipv4Addr::new(172, 16, 0, 0), 12),
        (Ipv4Addr::new(192, 0, 0, 0), 24),
        (Ipv4Addr::new(192, 0, 2, 0), 24),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
        (Ipv4Addr::new(198, 18, 0, 0), 15),
        (Ipv4Addr::new(198, 51, 100, 0), 24),
        (Ipv4Addr::new(203, 0, 113, 0), 24),
        (Ipv4Addr::new(224, 0, 0, 0), 4),
        (Ipv4Addr::new(240, 0, 0, 0), 4),
        // 240/4 holds it already; named for the reader.
        (Ipv4Addr::BROADCAST, 32),
    ];
    RANGES.iter().any(|&(addr, prefix)| {
        Rule {
            addr,
            prefix,
            port: None,
        }
        .contains(ip)
    })
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_internal_v4(v4);
    }
    // NAT64 well-known prefix: the IPv4 address it translates to decides.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return is_internal_v4(Ipv4Addr::new(a, b, c, d));
    }
    ip.is_unspecified()
        || ip.is_loopback()
        // IPv4-compatible (deprecated) ::/96.
        || s[..6] == [0; 6]
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
        || (s[..4] == [0x100, 0, 0, 0])
        || (s[0] == 0x2001 && s[1] == 0xdb8)
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] & 0xff00) == 0xff00
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(s: &str) -> Destination {
        Destination::Connect(s.parse().expect("a socket address"))
    }

    fn isolated() -> Policy {
        Policy {
            isolated: true,
            ..Policy::default()
        }
    }

    #[test]
    fn deny_wins_over_allow_and_default() {
        let p = Policy {
            allow_by_default: false,
            allow: vec!["127.0.0.1".parse().expect("rule")],
            deny: vec!["127.0.0.1:22".parse().expect("rule")],
            ..Policy::default()
        };
        assert!(p.allows(connect("127.0.0.1:80"), &[]));
        assert!(!p.allows(connect("127.0.0.1:22"), &[]));
        assert!(!p.allows(connect("1.1.1.1:80"), &[]));
        assert!(Policy::default().allows(connect("1.1.1.1:80"), &[]));
    }

    #[test]
    fn isolation_refuses_everything_off_the_public_internet() {
        let p = isolated();
        for dst in [
            // The gateway 10.0.2.2 arrives mapped to the host loopback.
            "127.0.0.1:5432",
            "127.1.2.3:80",
            "0.0.0.0:80",
            "169.254.169.254:80",
            "10.1.2.3:80",
            "192.168.1.1:80",
            "172.16.0.1:80",
            "172.31.255.255:80",
            "100.64.0.1:80",
            "224.0.0.1:80",
            "239.255.255.250:1900",
            "255.255.255.255:80",
            "240.0.0.1:80",
            "192.0.2.1:80",
            "198.18.0.1:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::a9fe:a9fe]:80",
            "[fd00::1]:80",
            "[fe80::1]:80",
            "[ff02::1]:80",
            "[::]:80",
        ] {
            assert!(!p.allows(connect(dst), &[]), "{dst} is refused");
        }
        for dst in [
            "1.1.1.1:443",
            "8.8.8.8:53",
            "172.32.0.1:80",
            "100.128.0.1:80",
            "[2606:4700::1111]:443",
        ] {
            assert!(p.allows(connect(dst), &[]), "{dst} is public");
        }
    }

    #[test]
    fn isolation_refuses_the_hosts_own_addresses() {
        // A public address the host holds, reachable only because it is the host's.
        let host: [IpAddr; 2] = [
            "198.51.99.7".parse().expect("ip"),
            "2a01:4f8::7".parse().expect("ip"),
        ];
        let p = isolated();
        assert!(!p.allows(connect("198.51.99.7:22"), &host));
        assert!(!p.allows(connect("[2a01:4f8::7]:22"), &host));
        assert!(!p.allows(connect("[::ffff:198.51.99.7]:22"), &host));
        assert!(p.allows(connect("198.51.99.8:22"), &host));
        // Without isolation, the host is reachable as before.
        assert!(Policy::default().allows(connect("198.51.99.7:22"), &host));
    }

    #[test]
    fn the_host_addresses_are_listed_and_refused() {
        let host = super::super::sys::host_addresses().expect("getifaddrs");
        assert!(
            host.iter().any(IpAddr::is_loopback),
            "every host has a loopback interface: {host:?}"
        );
        for ip in &host {
            assert!(!isolated().allows(Destination::Connect(SocketAddr::new(*ip, 80)), &host));
        }
    }

    #[test]
    fn allow_rules_open_exactly_their_destination_under_isolation() {
        let p = Policy {
            allow: vec![
                "127.0.0.1:5432".parse().expect("rule"),
                "10.9.0.0/16".parse().expect("rule"),
            ],
            ..isolated()
        };
        assert!(p.allows(connect("127.0.0.1:5432"), &[]));
        assert!(!p.allows(connect("127.0.0.1:5433"), &[]));
        assert!(!p.allows(connect("127.0.0.2:5432"), &[]));
        assert!(p.allows(connect("10.9.200.1:80"), &[]));
        assert!(!p.allows(connect("10.10.0.1:80"), &[]));
        // An allowed host address is allowed even though it is the host's.
        let host = ["127.0.0.1".parse().expect("ip")];
        assert!(p.allows(connect("127.0.0.1:5432"), &host));
        // Deny still wins.
        let p = Policy {
            deny: vec!["127.0.0.1".parse().expect("rule")],
            ..p
        };
        assert!(!p.allows(connect("127.0.0.1:5432"), &[]));
    }

    #[test]
    fn dns_is_allowed_under_isolation_but_opens_nothing_else() {
        let upstream: SocketAddr = "127.0.0.53:53".parse().expect("addr");
        let p = isolated();
        assert!(p.allows(Destination::Dns { upstream }, &[]));
        // The resolver's own address is still closed to connections.
        assert!(!p.allows(Destination::Connect(upstream), &[]));
        assert!(!p.allows(connect("127.0.0.53:80"), &[]));
        // Denied by default: DNS needs a rule, naming the forwarder or the resolver.
        let closed = Policy {
            allow_by_default: false,
            ..isolated()
        };
        assert!(!closed.allows(Destination::Dns { upstream }, &[]));
        for rule in ["10.0.2.3:53", "127.0.0.53:53"] {
            let opened = Policy {
                allow: vec![rule.parse().expect("rule")],
                ..closed.clone()
            };
            assert!(opened.allows(Destination::Dns { upstream }, &[]), "{rule}");
        }
        // A deny rule on either name closes it.
        for rule in ["10.0.2.3", "127.0.0.0/8"] {
            let denied = Policy {
                deny: vec![rule.parse().expect("rule")],
                ..isolated()
            };
            assert!(!denied.allows(Destination::Dns { upstream }, &[]), "{rule}");
        }
    }

    #[test]
    fn the_guest_network_is_the_one_vmm_api_knows() {
        let net = vmm_api::net::GUEST_NETWORK;
        assert_eq!(net.prefix, super::super::PREFIX_LEN);
        for ip in [super::super::GATEWAY_IP, DNS_IP, super::super::GUEST_IP] {
            assert!(net.contains(ip), "{ip}");
        }
        assert_eq!(
            vmm_api::net::DNS_FORWARDER,
            std::net::SocketAddrV4::new(DNS_IP, 53)
        );
    }
}
