//! virtio-net on the userspace network, end to end. One guest boots for the
//! whole file (~10-15 s on a nested, emulated host) with
//! `--publish 127.0.0.1:<free>:8080` and a second published port to a
//! closed guest port. Its entrypoint fetches a page from a server on the
//! host's loopback through the gateway 10.0.2.2, then serves HTTP on 8080
//! with busybox httpd. Guest forks are kept to two (wget, httpd's per-request child).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use little_tests::{agent_initramfs, ceiling, free_port, http_get, kernel, VmmProcess};

/// How long the guest gets to boot and start serving.
const BOOT_DEADLINE: Duration = little_tests::ceiling::BOOT;
/// Number of tests in this file: the last one to finish stops the guest.
const TESTS: usize = 4;
const HOST_BODY: &str = "from-the-host-loopback";
const GUEST_BODY: &str = "served-by-the-guest";

struct Guest {
    vmm: Mutex<Option<VmmProcess>>,
    http_port: u16,
    closed_port: u16,
    host_requests: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

static DONE: AtomicUsize = AtomicUsize::new(0);

/// Counts a finished test (also when it panics) and stops the guest after the last.
struct Finished;

impl Drop for Finished {
    fn drop(&mut self) {
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 == TESTS {
            if let Some(g) = GUEST.get() {
                g.vmm.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
        }
    }
}

static GUEST: OnceLock<Guest> = OnceLock::new();

/// A one-line HTTP/1.0 responder on the host's loopback, recording request lines.
fn host_server(requests: Arc<Mutex<Vec<String>>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind host server");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.trim().to_owned());
            // Drain the headers, then answer and close.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let reply = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{HOST_BODY}",
                HOST_BODY.len()
            );
            let _ = (&stream).write_all(reply.as_bytes());
        }
    });
    port
}

fn guest() -> &'static Guest {
    GUEST.get_or_init(|| {
        let host_requests = Arc::new(Mutex::new(Vec::new()));
        let host_port = host_server(host_requests.clone());
        let conf = format!(
            "arg=/bin/sh\narg=-c\narg=echo {GUEST_BODY} > /tmp/index.html; \
             read ns < /etc/resolv.conf; echo \"resolv=$ns\"; \
             /bin/busybox wget -q -O - http://10.0.2.2:{host_port}/hello; echo; \
             exec /bin/busybox httpd -f -p 8080 -h /tmp\nenv=PATH=/bin\n"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = agent_initramfs(dir.path(), &conf);
        let (http_port, closed_port) = (free_port(), free_port());
        let k = kernel();
        let publish_http = format!("127.0.0.1:{http_port}:8080");
        let publish_closed = format!("127.0.0.1:{closed_port}:9");
        let vmm = VmmProcess::spawn(&[
            "--kernel",
            k.to_str().expect("utf-8 path"),
            "--initrd",
            initrd.to_str().expect("utf-8 path"),
            "--mem",
            "128",
            "--publish",
            &publish_http,
            "--publish",
            &publish_closed,
        ]);
        Guest {
            vmm: Mutex::new(Some(vmm)),
            http_port,
            closed_port,
            host_requests,
            _dir: dir,
        }
    })
}

fn console(g: &Guest) -> String {
    g.vmm
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|v| format!("console:\n{}\nstderr:\n{}", v.stdout(), v.stderr()))
        .unwrap_or_default()
}

/// Retries until the guest's httpd answers through the published port.
fn wait_for_http(g: &Guest) -> String {
    little_tests::wait_for_http(g.http_port, "/index.html", BOOT_DEADLINE, || console(g))
}

#[test]
fn published_port_reaches_the_guest_http_server() {
    let _done = Finished;
    let g = guest();
    let reply = wait_for_http(g);
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.contains(GUEST_BODY), "{reply}");
    // A second connection works too, after the first one closed.
    let again = http_get(g.http_port, "/index.html")
        .unwrap_or_else(|e| panic!("second request: {e}\n{}", console(g)));
    assert!(again.contains(GUEST_BODY), "{again}");
}

#[test]
fn guest_reaches_the_host_loopback_through_the_gateway() {
    let _done = Finished;
    let g = guest();
    // httpd starts after wget, so a served page means wget is done.
    wait_for_http(g);
    let requests = g
        .host_requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert!(
        requests
            .iter()
            .any(|r| r == "GET /hello HTTP/1.1" || r == "GET /hello HTTP/1.0"),
        "host server saw {requests:?}; {}",
        console(g)
    );
    let start = Instant::now();
    while !console(g).contains(HOST_BODY) && start.elapsed() < ceiling::GUEST {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(console(g).contains(HOST_BODY), "{}", console(g));
}

#[test]
fn connection_to_a_closed_guest_port_is_reset() {
    let _done = Finished;
    let g = guest();
    wait_for_http(g);
    let mut s = TcpStream::connect(("127.0.0.1", g.closed_port)).expect("the VMM listens");
    s.set_read_timeout(Some(ceiling::GUEST)).expect("timeout");
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
}

#[test]
fn agent_writes_the_dns_forwarder_to_resolv_conf() {
    let _done = Finished;
    let g = guest();
    wait_for_http(g);
    assert!(
        console(g).contains("resolv=nameserver 10.0.2.3"),
        "{}",
        console(g)
    );
}
