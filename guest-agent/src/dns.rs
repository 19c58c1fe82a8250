//! `little.dns=<address>` on the kernel command line: the resolver the
//! agent writes to `/etc/resolv.conf` (the VMM's userspace network puts its
//! DNS forwarder there; the kernel's `ip=` keeps DNS to /proc/net/pnp).

use alloc::vec::Vec;

/// Longest accepted address (an IPv6 address in text).
const MAX_ADDR_LEN: usize = 45;

/// The `/etc/resolv.conf` text for the last `little.dns=` on `cmdline`,
/// if it holds an IPv4 or IPv6 address's characters.
///
/// ```
/// let text = guest_agent::dns::resolv_conf(b"quiet little.dns=10.0.2.3 ip=x\n");
/// assert_eq!(text.as_deref(), Some(&b"nameserver 10.0.2.3\n"[..]));
/// assert_eq!(guest_agent::dns::resolv_conf(b"little.dns=a;b"), None);
/// ```
pub fn resolv_conf(cmdline: &[u8]) -> Option<Vec<u8>> {
    let addr = cmdline
        .split(|b| b.is_ascii_whitespace() || *b == 0)
        .filter_map(|word| word.strip_prefix(b"little.dns="))
        .next_back()?;
    let valid = !addr.is_empty()
        && addr.len() <= MAX_ADDR_LEN
        && addr
            .iter()
            .all(|b| b.is_ascii_hexdigit() || *b == b'.' || *b == b':');
    if !valid {
        return None;
    }
    let mut text = Vec::with_capacity(addr.len() + 12);
    text.extend_from_slice(b"nameserver ");
    text.extend_from_slice(addr);
    text.push(b'\n');
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_valid_knob_wins_and_garbage_is_ignored() {
        assert_eq!(
            resolv_conf(b"little.dns=1.1.1.1 little.dns=fd00::3").as_deref(),
            Some(&b"nameserver fd00::3\n"[..])
        );
        assert_eq!(resolv_conf(b"console=ttyS0"), None);
        assert_eq!(resolv_conf(b"little.dns="), None);
        assert_eq!(resolv_conf(b"little.dns=1.2.3.4/../x"), None);
        assert_eq!(resolv_conf(b"xlittle.dns=1.2.3.4"), None);
    }
}
