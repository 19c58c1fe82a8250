//! DNS forwarding: guest UDP queries to 10.0.2.3:53 go out from a fresh,
//! connected host UDP socket to the host's resolver; the first answer goes
//! back to the guest from 10.0.2.3.

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
    /// verdict for 10.0.2.3:53; `tokens` hands out event tokens.
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
            if !allowed || self.queries.len() >= MAX_QUERIES {
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
