//! Which destinations a guest may open connections (and send DNS queries) to.

use std::net::Ipv4Addr;
use std::str::FromStr;

use super::Error;

/// A destination match: an IPv4 network and optionally one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0-32.
    pub prefix: u8,
    /// Port, or any port.
    pub port: Option<u16>,
}

impl Rule {
    /// Whether `addr:port` falls under this rule.
    pub fn matches(&self, addr: Ipv4Addr, port: u16) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        (u32::from(addr) & mask) == (u32::from(self.addr) & mask)
            && self.port.is_none_or(|p| p == port)
    }
}

impl FromStr for Rule {
    type Err = Error;

    /// `A.B.C.D[/N][:PORT]`.
    ///
    /// ```
    /// use vmm::usernet::Rule;
    /// let r: Rule = "10.0.0.0/8:443".parse().unwrap();
    /// assert!(r.matches("10.1.2.3".parse().unwrap(), 443));
    /// assert!(!r.matches("10.1.2.3".parse().unwrap(), 80));
    /// assert!(!r.matches("11.0.0.1".parse().unwrap(), 443));
    /// ```
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Rule(s.to_owned());
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
        Ok(Self {
            addr: addr.parse().map_err(|_| bad())?,
            prefix,
            port,
        })
    }
}

/// Outbound policy: a default, with exceptions. The first matching
/// exception wins: with `allow_by_default`, the exceptions deny; without
/// it, they allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Whether destinations no rule matches are allowed.
    pub allow_by_default: bool,
    /// Destinations that the guest may reach even when denied by default.
    pub allow: Vec<Rule>,
    /// Destinations denied even when allowed by default (checked first).
    pub deny: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_by_default: true,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

impl Policy {
    /// Whether the guest may connect to `addr:port` (addresses as the guest
    /// sees them: `10.0.2.2` is the host's loopback, `10.0.2.3:53` its resolver).
    pub fn allows(&self, addr: Ipv4Addr, port: u16) -> bool {
        if self.deny.iter().any(|r| r.matches(addr, port)) {
            return false;
        }
        self.allow_by_default || self.allow.iter().any(|r| r.matches(addr, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_over_allow_and_default() {
        let p = Policy {
            allow_by_default: false,
            allow: vec!["10.0.2.2".parse().expect("rule")],
            deny: vec!["10.0.2.2:22".parse().expect("rule")],
        };
        assert!(p.allows(Ipv4Addr::new(10, 0, 2, 2), 80));
        assert!(!p.allows(Ipv4Addr::new(10, 0, 2, 2), 22));
        assert!(!p.allows(Ipv4Addr::new(1, 1, 1, 1), 80));
        assert!(Policy::default().allows(Ipv4Addr::new(1, 1, 1, 1), 80));
    }

    #[test]
    fn rules_parse_and_reject_garbage() {
        let any: Rule = "0.0.0.0/0".parse().expect("rule");
        assert!(any.matches(Ipv4Addr::new(8, 8, 8, 8), 1));
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1:x",
            "host:80",
            "10.0.0.0/8:99999",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }
}
