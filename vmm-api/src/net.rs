//! Outbound network rules (`vmm --net-allow`/`--net-deny`, `little deploy
//! --allow-host`), parsed and printed in one place.
//!
//! A rule names a **host-side** destination: the address the VMM connects
//! to on the guest's behalf, after its address mapping. A guest connect to
//! the gateway `10.0.2.2:P` is a connect to the host's `127.0.0.1:P`, so
//! `127.0.0.1:5432` is the rule that opens the host's loopback port 5432 to
//! the guest (which still connects to `10.0.2.2:5432`). DNS queries to the
//! forwarder `10.0.2.3:53` are matched as `10.0.2.3:53` and as the host
//! resolver's address. No connection ever goes to the guest network
//! `10.0.2.0/24` on the host, so a rule that can only name addresses there
//! (say `10.0.2.2:5432`) is refused rather than silently never matching.
//!
//! ```
//! use vmm_api::net::Rule;
//!
//! let rule: Rule = "127.0.0.1:5432".parse().expect("a valid rule");
//! assert!(rule.matches("127.0.0.1:5432".parse().unwrap()));
//! assert!(!rule.matches("127.0.0.1:22".parse().unwrap()));
//! assert_eq!(rule.to_string(), "127.0.0.1:5432");
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;

/// The guest network of every `vmm --net`: the guest `10.0.2.15`, the
/// gateway `10.0.2.2` (the host's loopback as a destination) and the DNS
/// forwarder [`DNS_FORWARDER`].
pub const GUEST_NETWORK: Rule = Rule {
    addr: Ipv4Addr::new(10, 0, 2, 0),
    prefix: 24,
    port: None,
};

/// The guest's DNS forwarder, the one guest-network address rules may name.
pub const DNS_FORWARDER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53);

/// A rule that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseRuleError {
    /// Not `A.B.C.D[/N][:PORT]`.
    #[error("invalid network rule {0:?}: expected A.B.C.D[/N][:PORT]")]
    Syntax(String),
    /// Only guest-network addresses fall under it, which no connection
    /// goes to on the host.
    #[error("network rule {0:?} names the guest network: rules match host-side destinations (write 127.0.0.1 for the gateway 10.0.2.2; DNS is 10.0.2.3:53)")]
    GuestNetwork(String),
}

/// A destination match: an IPv4 network and optionally one port
/// (`A.B.C.D[/N][:PORT]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0-32.
    pub prefix: u8,
    /// Port, or any port.
    pub port: Option<u16>,
}

impl Rule {
    /// Whether `dst` falls under this rule. IPv4 rules match IPv6
    /// destinations only in their IPv4-mapped form (`::ffff:A.B.C.D`).
    ///
    /// ```
    /// use vmm_api::net::Rule;
    /// let r: Rule = "10.0.0.0/8:443".parse().unwrap();
    /// assert!(r.matches("10.1.2.3:443".parse().unwrap()));
    /// assert!(!r.matches("10.1.2.3:80".parse().unwrap()));
    /// assert!(!r.matches("11.0.0.1:443".parse().unwrap()));
    /// assert!(r.matches("[::ffff:10.1.2.3]:443".parse().unwrap()));
    /// ```
    pub fn matches(&self, dst: SocketAddr) -> bool {
        let ip = match dst.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(ip) => ip,
                None => return false,
            },
        };
        self.contains(ip) && self.port.is_none_or(|p| p == dst.port())
    }

    /// Whether `ip` lies in this rule's network (whatever the port).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        (u32::from(ip) & mask) == (u32::from(self.addr) & mask)
    }
}

impl FromStr for Rule {
    type Err = ParseRuleError;

    /// `A.B.C.D[/N][:PORT]`, refusing a rule within [`GUEST_NETWORK`]
    /// that does not cover [`DNS_FORWARDER`].
    ///
    /// ```
    /// use vmm_api::net::{ParseRuleError, Rule};
    /// assert!("10.0.2.3:53".parse::<Rule>().is_ok());
    /// assert!("10.0.0.0/8".parse::<Rule>().is_ok());
    /// assert!(matches!(
    ///     "10.0.2.2:5432".parse::<Rule>(),
    ///     Err(ParseRuleError::GuestNetwork(_))
    /// ));
    /// ```
    fn from_str(s: &str) -> Result<Self, ParseRuleError> {
        let bad = || ParseRuleError::Syntax(s.to_owned());
        let (net, port) = match s.split_once(':') {
            Some((net, port)) => (net, Some(port.parse::<u16>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((addr, prefix)) => (addr, prefix.parse::<u8>().map_err(|_| bad())?),
            None => (net, 32),
        };
        if prefix > 32 {
            return Err(bad());
        }
        let rule = Self {
            addr: addr.parse().map_err(|_| bad())?,
            prefix,
            port,
        };
        let guest_only = rule.prefix >= GUEST_NETWORK.prefix && GUEST_NETWORK.contains(rule.addr);
        if guest_only && !rule.matches(SocketAddr::V4(DNS_FORWARDER)) {
            return Err(ParseRuleError::GuestNetwork(s.to_owned()));
        }
        Ok(rule)
    }
}

impl fmt::Display for Rule {
    /// The form [`FromStr`] reads: `/N` only below 32, `:PORT` only for one port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.prefix < 32 {
            write!(f, "/{}", self.prefix)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_reject_garbage() {
        let any: Rule = "0.0.0.0/0".parse().unwrap();
        assert!(any.matches("8.8.8.8:1".parse().unwrap()));
        assert!(!any.matches("[2001:db8::1]:1".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1:x",
            "host:80",
            "10.0.0.0/8:99999",
            "::1",
            "[::1]:80",
            "10.0.0.1/",
            "10.0.0.1:",
        ] {
            assert!(
                matches!(bad.parse::<Rule>(), Err(ParseRuleError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn rules_that_can_only_name_the_guest_network_are_refused() {
        for bad in [
            "10.0.2.2",
            "10.0.2.2:5432",
            "10.0.2.15",
            "10.0.2.3:80",
            "10.0.2.0/25:80",
        ] {
            let err = bad.parse::<Rule>().expect_err(bad);
            assert_eq!(err, ParseRuleError::GuestNetwork(bad.into()));
            assert!(err.to_string().contains("127.0.0.1"), "{err}");
        }
        for good in [
            "10.0.2.3",
            "10.0.2.3:53",
            "10.0.2.0/24",
            "10.0.0.0/8",
            "0.0.0.0/0",
        ] {
            assert!(good.parse::<Rule>().is_ok(), "{good}");
        }
    }

    #[test]
    fn rules_print_as_they_parse() {
        for text in [
            "127.0.0.1:5432",
            "10.0.0.0/8",
            "0.0.0.0/0:443",
            "1.2.3.4",
            "10.0.2.3:53",
        ] {
            let rule: Rule = text.parse().unwrap();
            assert_eq!(rule.to_string(), text);
            assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule);
        }
        let rule: Rule = "1.2.3.4/32:80".parse().unwrap();
        assert_eq!(rule.to_string(), "1.2.3.4:80");
    }
}
