//! A TCP test client that says why a request got no reply: refused, reset,
//! timed out or closed early, after how long and with how many bytes, so
//! a failing test tells a lost request from a slow one.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::ceiling;

/// Why a request got no complete reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nothing listens on the port.
    #[error("connection to 127.0.0.1:{port} refused")]
    Refused {
        /// The port.
        port: u16,
    },
    /// The connection could not be opened for another reason.
    #[error("cannot connect to 127.0.0.1:{port}")]
    Connect {
        /// The port.
        port: u16,
        /// What connect(2) said.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be sent.
    #[error("sending the request failed after {after:.1?}")]
    Send {
        /// Time since the connection opened.
        after: Duration,
        /// What write(2) said.
        #[source]
        source: std::io::Error,
    },
    /// The peer reset the connection.
    #[error("reset after {after:.1?} with {bytes} bytes received")]
    Reset {
        /// Time since the connection opened.
        after: Duration,
        /// Bytes received before the reset.
        bytes: usize,
    },
    /// No complete reply within the ceiling.
    #[error("timed out after {after:.1?} with {bytes} bytes received")]
    TimedOut {
        /// Time since the connection opened.
        after: Duration,
        /// Bytes received by then.
        bytes: usize,
    },
    /// The peer closed the connection before a complete reply.
    #[error(
        "closed after {after:.1?} with {} bytes that are not a complete reply: {:?}",
        received.len(),
        String::from_utf8_lossy(received)
    )]
    Closed {
        /// Time since the connection opened.
        after: Duration,
        /// What came back.
        received: Vec<u8>,
    },
    /// Reading failed for another reason.
    #[error("reading failed after {after:.1?} with {bytes} bytes received")]
    Read {
        /// Time since the connection opened.
        after: Duration,
        /// Bytes received before the error.
        bytes: usize,
        /// What read(2) said.
        #[source]
        source: std::io::Error,
    },
}

impl RequestError {
    /// Whether nothing serves the port yet: refused, or reset or closed
    /// before a single byte came back (a published port whose guest side
    /// is not listening). A wait for a server to start retries on these,
    /// and on nothing else.
    pub fn not_serving(&self) -> bool {
        match self {
            Self::Refused { .. } => true,
            Self::Reset { bytes, .. } => *bytes == 0,
            Self::Closed { received, .. } => received.is_empty(),
            _ => false,
        }
    }
}

/// When a reply is complete.
#[derive(Debug, Clone, Copy)]
pub enum Until<'a> {
    /// The peer closes the connection after a reply that starts with this.
    Close(&'a [u8]),
    /// The reply holds these bytes (the connection may stay open).
    Contains(&'a [u8]),
}

impl Until<'_> {
    fn complete(self, reply: &[u8], closed: bool) -> bool {
        match self {
            Self::Close(prefix) => closed && reply.starts_with(prefix),
            Self::Contains(needle) => reply.windows(needle.len()).any(|w| w == needle),
        }
    }
}

/// Sends `request` to `127.0.0.1:port` and reads until the reply is
/// complete, for at most `ceiling` in all.
pub fn exchange(
    port: u16,
    request: &[u8],
    until: Until<'_>,
    ceiling: Duration,
) -> Result<Vec<u8>, RequestError> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| match e.kind() {
        ErrorKind::ConnectionRefused => RequestError::Refused { port },
        _ => RequestError::Connect { port, source: e },
    })?;
    let start = Instant::now();
    s.write_all(request).map_err(|e| match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => RequestError::Reset {
            after: start.elapsed(),
            bytes: 0,
        },
        _ => RequestError::Send {
            after: start.elapsed(),
            source: e,
        },
    })?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let left = ceiling.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(RequestError::TimedOut {
                after: start.elapsed(),
                bytes: reply.len(),
            });
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| RequestError::Read {
                after: start.elapsed(),
                bytes: reply.len(),
                source: e,
            })?;
        match s.read(&mut chunk) {
            Ok(0) if until.complete(&reply, true) => return Ok(reply),
            Ok(0) => {
                return Err(RequestError::Closed {
                    after: start.elapsed(),
                    received: reply,
                })
            }
            Ok(n) => {
                reply.extend_from_slice(&chunk[..n]);
                if until.complete(&reply, false) {
                    return Ok(reply);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(RequestError::TimedOut {
                    after: start.elapsed(),
                    bytes: reply.len(),
                })
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Err(RequestError::Reset {
                    after: start.elapsed(),
                    bytes: reply.len(),
                })
            }
            Err(e) => {
                return Err(RequestError::Read {
                    after: start.elapsed(),
                    bytes: reply.len(),
                    source: e,
                })
            }
        }
    }
}

/// One HTTP/1.0 GET to `127.0.0.1:port`: the whole reply (the server
/// closes after it), within [`ceiling::GUEST`].
pub fn http_get(port: u16, path: &str) -> Result<String, RequestError> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n");
    exchange(
        port,
        request.as_bytes(),
        Until::Close(b"HTTP/1."),
        ceiling::GUEST,
    )
    .map(|r| String::from_utf8_lossy(&r).into_owned())
}

/// Repeats `request` until something serves `port` (see
/// [`RequestError::not_serving`]), then returns the first complete reply.
/// Any other failure, or nothing serving within `ceiling`, panics with the
/// reason and `context()` (the guest's console, say).
pub fn wait_until_serving(
    port: u16,
    request: &[u8],
    until: Until<'_>,
    ceiling: Duration,
    context: impl Fn() -> String,
) -> Vec<u8> {
    let start = Instant::now();
    loop {
        match exchange(port, request, until, ceiling) {
            Ok(reply) => return reply,
            Err(e) if e.not_serving() && start.elapsed() < ceiling => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if e.not_serving() => panic!(
                "nothing served port {port} within {:.0?} (last try: {e})\n{}",
                start.elapsed(),
                context()
            ),
            Err(e) => panic!(
                "port {port} began to serve, then the request failed: {e}\n{}",
                context()
            ),
        }
    }
}

/// [`wait_until_serving`] for an HTTP/1.0 GET: the reply as text.
pub fn wait_for_http(
    port: u16,
    path: &str,
    ceiling: Duration,
    context: impl Fn() -> String,
) -> String {
    let request = format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n");
    let reply = wait_until_serving(
        port,
        request.as_bytes(),
        Until::Close(b"HTTP/1."),
        ceiling,
        context,
    );
    String::from_utf8_lossy(&reply).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn server(reply: &'static [u8], close: bool) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            s.write_all(reply).expect("reply");
            if !close {
                std::thread::sleep(Duration::from_secs(5));
            }
        });
        port
    }

    #[test]
    fn a_closed_port_is_refused_and_not_serving() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let e = http_get(port, "/").expect_err("nothing listens");
        assert!(matches!(e, RequestError::Refused { .. }), "{e}");
        assert!(e.not_serving());
    }

    #[test]
    fn a_reply_that_stops_midway_times_out_with_its_byte_count() {
        let port = server(b"HTTP/1.0 200 OK\r\n", false);
        let e = exchange(
            port,
            b"GET / HTTP/1.0\r\n\r\n",
            Until::Close(b"HTTP/1."),
            Duration::from_millis(300),
        )
        .expect_err("never closes");
        assert!(matches!(e, RequestError::TimedOut { bytes: 17, .. }), "{e}");
        assert!(!e.not_serving());
        assert!(e.to_string().contains("17 bytes"), "{e}");
    }

    #[test]
    fn a_close_without_a_reply_is_reported_with_what_came() {
        let port = server(b"garbage", true);
        let e = http_get(port, "/").expect_err("not HTTP");
        assert!(matches!(e, RequestError::Closed { .. }), "{e}");
        assert!(e.to_string().contains("garbage"), "{e}");
    }

    #[test]
    fn contains_returns_without_waiting_for_close() {
        let port = server(b"+PONG\r\n", false);
        let reply = exchange(
            port,
            b"PING\r\n",
            Until::Contains(b"+PONG"),
            Duration::from_secs(30),
        )
        .expect("a reply");
        assert_eq!(reply, b"+PONG\r\n");
    }
}
