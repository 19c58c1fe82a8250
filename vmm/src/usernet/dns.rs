//! DNS forwarding: guest UDP queries to 10.0.2.3:53 go out from a fresh,
//! connected host UDP socket to the host's resolver; the first answer goes
//! back to the guest from 10.0.2.3. When the policy denies DNS, each query
//! is answered REFUSED at once, so the guest's resolver fails rather than
//! waits.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::udp::{self, PacketBuffer, PacketMetadata, UdpMetadata};
use smoltcp::wire::{IpAddress, IpEndpoint};

use super::watch::{Tokens, WatchRequest};
use super::DNS_IP;
use crate::event_loop::Token;

/// Most queries in flight; more are dropped (the guest's resolver retries).
pub(super) const MAX_QUERIES: usize = 64;
/// How long an unanswered query keeps its host socket.
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest DNS message over UDP handled (EDNS0 sizes included).
const MAX_MESSAGE: usize = 4096;

struct Query {
    sock: UdpSocket,
    guest: IpEndpoint,
    expires: Instant,
}

/// The forwarder's state.
pub(super) struct Dns {
    handle: SocketHandle,
    upstream: SocketAddr,
    queries: HashMap<Token, Query>,
}

impl Dns {
    /// A forwarder to `upstream`, with its guest-facing socket in `sockets`.
    pub(super) fn new(sockets: &mut SocketSet<'static>, upstream: SocketAddr) -> Self {
        let buffer =
            || PacketBuffer::new(vec![PacketMetadata::EMPTY; 16], vec![0u8; 16 * MAX_MESSAGE]);
        let mut socket = udp::Socket::new(buffer(), buffer());
        // Binding a fresh socket to a non-zero port cannot fail.
        let _ = socket.bind((IpAddress::Ipv4(DNS_IP), 53));
        let handle = sockets.add(socket);
        Self {
            handle,
            upstream,
            queries: HashMap::new(),
        }
    }

    /// The host fds to watch (after a restart of the handler).
    pub(super) fn watches(&self, requests: &mut Vec<WatchRequest>) {
        for (&token, q) in &self.queries {
            requests.push(WatchRequest::Watch {
                fd: q.sock.as_raw_fd(),
                token,
                events: libc::POLLIN as u32,
            });
        }
    }

    pub(super) fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub(super) fn owns(&self, token: Token) -> bool {
        self.queries.contains_key(&token)
    }

    /// Sends the guest's queued queries upstream. `allowed` is the policy's
    /// verdict on DNS (denied queries are answered REFUSED); `tokens` hands
    /// out event tokens.
    pub(super) fn forward_queries(
        &mut self,
        sockets: &mut SocketSet<'static>,
        allowed: bool,
        tokens: &mut Tokens,
        requests: &mut Vec<WatchRequest>,
    ) -> bool {
        let socket = sockets.get_mut::<udp::Socket>(self.handle);
        let mut buf = [0u8; MAX_MESSAGE];
        let mut progress = false;
        while let Ok((n, meta)) = socket.recv_slice(&mut buf) {
            progress = true;
            if !allowed {
                if let Some(answer) = refused(&buf[..n]) {
                    let meta = UdpMetadata {
                        endpoint: meta.endpoint,
                        local_address: Some(IpAddress::Ipv4(DNS_IP)),
                        meta: Default::default(),
                    };
                    if let Err(e) = socket.send_slice(&answer, meta) {
                        tracing::debug!("dns: refusal dropped: {e}");
                    }
                }
                continue;
            }
            if self.queries.len() >= MAX_QUERIES {
                continue;
            }
            let local = match self.upstream {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let sent = UdpSocket::bind(SocketAddr::new(local, 0)).and_then(|sock| {
                sock.set_nonblocking(true)?;
                sock.connect(self.upstream)?;
                sock.send(&buf[..n])?;
                Ok(sock)
            });
            match sent {
                Ok(sock) => {
                    let t = tokens.next();
                    requests.push(WatchRequest::Watch {
                        fd: sock.as_raw_fd(),
                        token: t,
                        events: libc::POLLIN as u32,
                    });
                    self.queries.insert(
                        t,
                        Query {
                            sock,
                            guest: meta.endpoint,
                            expires: Instant::now() + QUERY_TIMEOUT,
                        },
                    );
                }
                Err(e) => tracing::debug!("dns: forwarding to {} failed: {e}", self.upstream),
            }
        }
        progress
    }

    /// A host socket of query `token` is readable: relay the answer.
    pub(super) fn answer(
        &mut self,
        token: Token,
        sockets: &mut SocketSet<'static>,
        requests: &mut Vec<WatchRequest>,
    ) {
        let Some(query) = self.queries.get(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_MESSAGE];
        match query.sock.recv(&mut buf) {
            Ok(n) => {
                let socket = sockets.get_mut::<udp::Socket>(self.handle);
                let meta = UdpMetadata {
                    endpoint: query.guest,
                    local_address: Some(IpAddress::Ipv4(DNS_IP)),
                    meta: Default::default(),
                };
                if let Err(e) = socket.send_slice(&buf[..n], meta) {
                    tracing::debug!("dns: answer dropped: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => tracing::debug!("dns: upstream error: {e}"),
        }
        self.queries.remove(&token);
        requests.push(WatchRequest::Unwatch { token });
    }

    /// Drops queries nobody answered in time.
    pub(super) fn expire(&mut self, now: Instant, requests: &mut Vec<WatchRequest>) {
        self.queries.retain(|&token, q| {
            let keep = q.expires > now;
            if !keep {
                requests.push(WatchRequest::Unwatch { token });
            }
            keep
        });
    }

    /// When the oldest query expires.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.queries.values().map(|q| q.expires).min()
    }
}

/// Size of a DNS message header.
const HEADER: usize = 12;
/// The REFUSED response code.
const RCODE_REFUSED: u8 = 5;

/// A REFUSED answer to the guest's `query`: its ID, opcode, RD bit and
/// question, no records. `None` for a message that is not a query or whose
/// question does not parse (nothing is answered then).
pub(super) fn refused(query: &[u8]) -> Option<Vec<u8>> {
    let header = query.get(..HEADER)?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let questions = u16::from_be_bytes([header[4], header[5]]);
    let mut end = HEADER;
    if questions == 1 {
        // QNAME: length-prefixed labels of at most 63 bytes up to the root
        // label; a query's question has no compression pointers.
        loop {
            let len = usize::from(*query.get(end)?);
            end += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None;
            }
            end += len;
        }
        // QTYPE and QCLASS.
        end += 4;
        if end > query.len() {
            return None;
        }
    }
    let mut answer = query.get(..end)?.to_vec();
    // QR, the query's opcode and RD; not authoritative, not truncated.
    answer[2] = 0x80 | (header[2] & 0x79);
    // No recursion available, REFUSED.
    answer[3] = RCODE_REFUSED;
    let qdcount = if questions == 1 { 1u16 } else { 0 };
    answer[4..6].copy_from_slice(&qdcount.to_be_bytes());
    answer[6..12].fill(0);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `example.com` A, ID 0xbeef, RD set.
    fn query() -> Vec<u8> {
        let mut q = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
        q
    }

    #[test]
    fn a_refusal_echoes_the_id_and_question() {
        let q = query();
        let a = refused(&q).expect("a query is answered");
        assert_eq!(a.len(), q.len());
        assert_eq!(&a[..2], &[0xbe, 0xef]);
        assert_eq!(a[2], 0x81, "QR and RD");
        assert_eq!(a[3] & 0x0f, RCODE_REFUSED);
        assert_eq!(&a[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&a[12..], &q[12..]);
        // Records after the question (EDNS0 OPT) are not echoed.
        let mut with_opt = q.clone();
        with_opt[11] = 1;
        with_opt.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(refused(&with_opt).expect("answered"), a);
    }

    #[test]
    fn what_is_no_query_gets_no_answer() {
        let q = query();
        let mut response = q.clone();
        response[2] |= 0x80;
        let mut pointer = q.clone();
        pointer[12] = 0xc0;
        let mut long_label = q.clone();
        long_label[12] = 64;
        for bad in [
            &[][..],
            &q[..11],
            &q[..q.len() - 1],
            &q[..20],
            &response,
            &pointer,
            &long_label,
        ] {
            assert_eq!(refused(bad), None, "{bad:?}");
        }
    }
}
