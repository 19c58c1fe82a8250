//! A real registry for the pull tests of `import.rs`: Debian's
//! `docker-registry` on a free loopback port (plain, TLS, htpasswd or token
//! auth), images pushed into it with `skopeo`, a throw-away PKI made with
//! the `openssl` CLI, and a small token server that signs ES256 JWTs the
//! way the registry's token authentication expects them.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// Runs `cmd` to success; a missing program names its Debian package.
pub fn run_tool(cmd: &mut Command, package: &str) {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{:?} is not installed: apt-get install {package} (scripts/common.sh lists it)",
            cmd.get_program()
        ),
        Err(e) => panic!("{cmd:?}: {e}"),
    };
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// Runs `openssl` in `dir` with the space-separated `args`.
fn openssl(dir: &Path, args: &str) {
    run_tool(
        Command::new("openssl")
            .current_dir(dir)
            .args(args.split_whitespace()),
        "openssl",
    );
}

/// `openssl req` flags for a new unencrypted P-256 key.
const NEW_EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// A CA and a server certificate for 127.0.0.1 (IP SAN) signed by it.
pub struct ServerPki {
    /// The CA certificate (PEM), alone in its directory as skopeo's
    /// `--dest-cert-dir` wants.
    pub ca: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server key (PEM).
    pub key: PathBuf,
}

impl ServerPki {
    /// Makes the PKI under `dir/ca` and `dir/server`.
    pub fn new(dir: &Path) -> Self {
        let (ca_dir, server) = (dir.join("ca"), dir.join("server"));
        std::fs::create_dir_all(&ca_dir).unwrap();
        std::fs::create_dir_all(&server).unwrap();
        openssl(
            &server,
            &format!(
                "req -x509 -days 2 -subj /CN=little-test-CA {NEW_EC_KEY} -keyout ca.key -out ../ca/ca.crt"
            ),
        );
        openssl(
            &server,
            &format!("req -subj /CN=127.0.0.1 {NEW_EC_KEY} -keyout server.key -out server.csr"),
        );
        std::fs::write(
            server.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            &server,
            "x509 -req -in server.csr -CA ../ca/ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile ext.cnf -out server.crt",
        );
        Self {
            ca: ca_dir.join("ca.crt"),
            cert: server.join("server.crt"),
            key: server.join("server.key"),
        }
    }

    /// The directory holding only the CA certificate.
    pub fn ca_dir(&self) -> &Path {
        self.ca.parent().unwrap()
    }
}

/// A running `docker-registry`, killed when dropped.
pub struct Registry {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    /// Starts the registry with its storage, config and log under `dir`,
    /// serving TLS with `tls`'s server certificate if given, and with
    /// `auth` (YAML of the config's `auth:` section, indented two spaces)
    /// if not empty. Returns once the port accepts connections.
    pub fn start(dir: &Path, tls: Option<&ServerPki>, auth: &str) -> Self {
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        if let Some(pki) = tls {
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.cert.display(),
                pki.key.display()
            );
        }
        if !auth.is_empty() {
            config += &format!("auth:\n{auth}");
        }
        let path = dir.join("registry.yml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&path)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("docker-registry (Debian package docker-registry): {e}"));
        let mut registry = Self { child, port, log };
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !up {
            let status = registry.child.try_wait();
            panic!(
                "docker-registry did not start ({status:?}): {}",
                registry.log()
            );
        }
        registry
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pushes the OCI layout `layout` (tag `latest`) as `name_tag` with
    /// `skopeo copy` and the extra destination flags `dest`; returns the
    /// image's reference on this registry.
    pub fn push(&self, layout: &Path, name_tag: &str, dest: &[&str]) -> String {
        let reference = format!("{}/{name_tag}", self.host());
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet"])
            .args(dest)
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap_or_else(|e| panic!("skopeo (Debian package skopeo): {e}"));
        assert!(
            out.status.success(),
            "skopeo push: {}\nregistry log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// Writes a bcrypt htpasswd file (the only hash the registry accepts)
/// with one user.
pub fn htpasswd(path: &Path, user: &str, password: &str) {
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .unwrap_or_else(|e| panic!("htpasswd (Debian package apache2-utils): {e}"));
    assert!(out.status.success(), "htpasswd: {out:?}");
    std::fs::write(path, out.stdout).unwrap();
}

/// A token server for the registry's `auth: token:` scheme: it checks
/// HTTP basic credentials and answers with an ES256 JWT granting the
/// requested scopes, its certificate in the `x5c` header.
pub struct TokenServer {
    port: u16,
    /// The self-signed certificate of the signing key: the registry's
    /// `rootcertbundle`.
    pub cert: PathBuf,
    scopes: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The service name the registry and the token server agree on.
pub const SERVICE: &str = "little-test";
/// The issuer name the registry trusts.
pub const ISSUER: &str = "little-test-issuer";

impl TokenServer {
    /// Makes a signing key under `dir` and serves tokens to `user:password`.
    pub fn start(dir: &Path, user: &str, password: &str) -> Self {
        let keys = dir.join("token");
        std::fs::create_dir_all(&keys).unwrap();
        openssl(
            &keys,
            &format!(
                "req -x509 -days 2 -subj /CN={ISSUER} {NEW_EC_KEY} -keyout key.pem -out cert.pem"
            ),
        );
        openssl(
            &keys,
            "pkcs8 -topk8 -nocrypt -in key.pem -outform DER -out key.pk8",
        );
        openssl(&keys, "x509 -in cert.pem -outform DER -out cert.der");
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &std::fs::read(keys.join("key.pk8")).unwrap(),
            &rng,
        )
        .unwrap();
        let x5c = STANDARD.encode(std::fs::read(keys.join("cert.der")).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let scopes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let expected = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        let issuer = Issuer {
            key,
            rng,
            x5c,
            user: user.to_owned(),
        };
        let thread = {
            let (scopes, stop) = (scopes.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        serve_token(stream, &expected, &issuer, &scopes);
                    }
                }
            })
        };
        Self {
            port,
            cert: keys.join("cert.pem"),
            scopes,
            stop,
            thread: Some(thread),
        }
    }

    /// The token endpoint, for the registry's `realm`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The registry's `auth:` section for this server.
    pub fn auth_config(&self) -> String {
        format!(
            "  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.cert.display()
        )
    }

    /// The scopes asked for since the last call, one entry per token request.
    pub fn take_scopes(&self) -> Vec<String> {
        std::mem::take(&mut *self.scopes.lock().unwrap())
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What signs tokens.
struct Issuer {
    key: EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    x5c: String,
    user: String,
}

impl Issuer {
    /// A JWT for `scopes` (`type:name:action[,action]`), all granted.
    fn token(&self, scopes: &[String]) -> String {
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let (kind, rest) = s.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(serde_json::json!({
                    "type": kind,
                    "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": self.user,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{now}-{}", scopes.len()),
            "access": access,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.key.sign(&self.rng, signed.as_bytes()).unwrap();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

/// Answers one `GET /token?service=..&scope=..` request.
fn serve_token(stream: TcpStream, expected_auth: &str, issuer: &Issuer, seen: &Mutex<Vec<String>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line.trim().is_empty() => break,
            Ok(_) => {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        authorization = Some(v.trim().to_owned());
                    }
                }
            }
        }
    }
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let scopes: Vec<String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "scope")
        .flat_map(|(_, v)| {
            // One parameter may carry several space-separated scopes.
            percent_decode(v)
                .split(' ')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    seen.lock().unwrap().push(scopes.join(" "));
    let (status, body) = if authorization.as_deref() == Some(expected_auth) {
        let token = issuer.token(&scopes);
        ("200 OK", serde_json::json!({"token": token}).to_string())
    } else {
        (
            "401 Unauthorized",
            r#"{"details":"bad credentials"}"#.to_owned(),
        )
    };
    let mut stream = &stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Decodes `%XX` escapes and `+` (form encoding) of a query value.
fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
            }
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
