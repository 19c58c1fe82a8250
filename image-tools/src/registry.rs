//! A small client for the registry distribution API (`/v2/`): image
//! references, manifest and blob downloads over HTTP or HTTPS, anonymous,
//! basic and bearer-token authentication. Blobs stream to disk while they
//! are hashed; nothing larger than a manifest is held in memory.
//!
//! Why not `oci-client`: it is async (tokio and reqwest), and the importer is
//! a synchronous, single-purpose tool. A pull needs a handful of GETs: the
//! manifest or index, the config, the layers. Doing those with `ureq` (and
//! its rustls) keeps the CLI free of an async runtime and lets each blob be
//! hashed and written to disk in one streaming pass.
//!
//! # Scheme
//!
//! [`ClientOptions::plain_http`] forces `http://` for any registry. Otherwise
//! a registry on another machine is always spoken to over HTTPS. A loopback
//! registry (`localhost`, `127.*`, `[::1]`) counts as insecure, as in Docker,
//! and gets plain HTTP, unless HTTPS is asked for explicitly: with
//! [`ClientOptions::tls`], or by giving a CA ([`ClientOptions::ca_certs`], or
//! a `*.crt` file in Docker's `/etc/docker/certs.d/<host[:port]>/`). There is
//! no silent fallback from HTTPS to HTTP.
//!
//! # Trust
//!
//! HTTPS trusts the Mozilla roots compiled in (`webpki-roots`), every
//! certificate in the PEM files of [`ClientOptions::ca_certs`], and, for
//! registry `host[:port]` only, the certificates of the `*.crt` files in
//! `<certs.d>/host[:port]/` (Docker's convention; client certificates, the
//! `*.cert`/`*.key` pairs there, are not used).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use crate::oci::{self, Digest, OciError, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

/// Docker's directory of per-registry CA certificates.
pub const DOCKER_CERTS_DIR: &str = "/etc/docker/certs.d";

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference cannot be parsed.
    #[error("invalid image reference {0:?}")]
    BadReference(String),
    /// The HTTP exchange failed (connection, TLS, status).
    #[error("request to {url} failed")]
    Http {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The TLS handshake failed, most often over a certificate signed by a
    /// CA that is not trusted.
    #[error("TLS connection for {url} failed")]
    Tls {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// A token realm would get the credentials over plain HTTP from
    /// another host than the registry's (a registry can name any realm).
    #[error("the token realm {realm} is plain HTTP on another host than the registry's: credentials are not sent there")]
    InsecureRealm {
        /// The realm URL.
        realm: String,
    },
    /// The registry asked for an authentication scheme we do not speak.
    #[error("registry wants unsupported authentication {0:?}")]
    Auth(String),
    /// The registry (or its token server) wants credentials and none were
    /// given.
    #[error("{url} needs credentials, and none were given")]
    NoCredentials {
        /// The URL that answered 401 (or 403).
        url: String,
    },
    /// The registry (or its token server) turned the credentials down.
    #[error("{url} refused the credentials given")]
    Refused {
        /// The URL that answered 401 (or 403).
        url: String,
    },
    /// A CA file cannot be read or is not valid PEM.
    #[error("cannot read CA certificates from {path}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A CA file holds no PEM `CERTIFICATE` section.
    #[error("{0} holds no PEM certificate")]
    NoCaCert(PathBuf),
    /// A certificate of a CA file cannot serve as a trust anchor.
    #[error("{path} holds a certificate that cannot be a trust anchor")]
    BadCaCert {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// Docker's per-registry certificate directory cannot be listed.
    #[error("cannot list {path}")]
    CertsDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a blob or reading a response failed.
    #[error("registry I/O failed")]
    Io(#[from] std::io::Error),
    /// A document or blob failed verification.
    #[error(transparent)]
    Oci(#[from] OciError),
}

/// `[registry/]repository[:tag][@digest]`, normalised like Docker does:
/// no registry means Docker Hub, and one-word Hub names get `library/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host and optional port.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Tag, when no digest was given (`latest` by default).
    pub tag: Option<String>,
    /// Digest, when pinned.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses a reference.
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let bad = || RegistryError::BadReference(s.to_owned());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|_| bad())?)),
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path)
            }
            _ => ("docker.io".to_owned(), rest),
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (path, None),
        };
        // The host names a directory under certs.d: no path tricks.
        let valid_registry = !registry.starts_with(['.', '-', ':'])
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        let valid_repo = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        let valid_tag = tag.as_deref().is_none_or(|t| {
            !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
        if !valid_registry || !valid_repo || !valid_tag {
            return Err(bad());
        }
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_owned()
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The tag or digest to ask the registry for.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The registry host without its port (`[::1]` keeps its brackets).
    pub fn host(&self) -> &str {
        let r = &*self.registry;
        match r.find(']') {
            Some(end) if r.starts_with('[') => &r[..=end],
            _ => r.split_once(':').map_or(r, |(h, _)| h),
        }
    }

    /// Whether the registry is on this machine (plain HTTP by default, as
    /// Docker treats loopback registries as insecure).
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        matches!(host, "localhost" | "[::1]") || host.starts_with("127.")
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// How to reach and authenticate to a registry. See the module
/// documentation for how the scheme is chosen.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Use `http://`, whatever the registry.
    pub plain_http: bool,
    /// Use `https://` even for a loopback registry.
    pub tls: bool,
    /// PEM files of CA certificates to trust besides the built-in roots.
    pub ca_certs: Vec<PathBuf>,
    /// Docker-style per-registry CA directories (`<dir>/<host[:port]>/*.crt`);
    /// `None` means [`DOCKER_CERTS_DIR`].
    pub certs_dir: Option<PathBuf>,
    /// `user:password` for basic auth or for the token endpoint.
    pub credentials: Option<String>,
}

/// One registry session: a repository, a connection agent, and the
/// authorization header once the registry asked for one.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    repository: String,
    credentials: Option<String>,
    authorization: Option<String>,
}

impl Client {
    /// A client for `reference`'s registry and repository. Fails when a CA
    /// file cannot be used.
    pub fn new(reference: &Reference, options: &ClientOptions) -> Result<Self, RegistryError> {
        let host = if reference.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &reference.registry
        };
        let certs_dir = options
            .certs_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DOCKER_CERTS_DIR));
        let mut cas = options.ca_certs.clone();
        cas.extend(docker_cas(&certs_dir.join(&reference.registry))?);
        let https =
            !options.plain_http && (options.tls || !cas.is_empty() || !reference.is_loopback());
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120));
        if https {
            agent = agent.tls_config(tls_config(&cas)?);
        }
        let scheme = if https { "https" } else { "http" };
        Ok(Self {
            agent: agent.build(),
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            repository: reference.repository.clone(),
            credentials: options.credentials.clone(),
            authorization: None,
        })
    }

    /// The base URL of the repository (`scheme://host/v2/name`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// GETs `url` with `accept`, authenticating once if the registry says 401.
    fn get(&mut self, url: &str, accept: &str) -> Result<ureq::Response, RegistryError> {
        let challenge = match self.send(url, accept, self.authorization.as_deref()) {
            Ok(resp) => return Ok(resp),
            Err(e) => match *e {
                ureq::Error::Status(401, resp) => {
                    resp.header("www-authenticate").unwrap_or("").to_owned()
                }
                e => return Err(http_error(url, e)),
            },
        };
        let authorization = self.authorize(&challenge, url)?;
        let retry = self.send(url, accept, Some(&authorization));
        self.authorization = Some(authorization);
        retry.map_err(|e| match *e {
            ureq::Error::Status(401, _) => self.denied(url),
            e => http_error(url, e),
        })
    }

    /// One GET of `url` with `authorization`, if any.
    fn send(
        &self,
        url: &str,
        accept: &str,
        authorization: Option<&str>,
    ) -> Result<ureq::Response, Box<ureq::Error>> {
        let mut req = self.agent.get(url).set("Accept", accept);
        if let Some(auth) = authorization {
            req = req.set("Authorization", auth);
        }
        req.call().map_err(Box::new)
    }

    /// The error for a 401 from `url` despite having answered the challenge.
    fn denied(&self, url: &str) -> RegistryError {
        let url = url.to_owned();
        match self.credentials {
            Some(_) => RegistryError::Refused { url },
            None => RegistryError::NoCredentials { url },
        }
    }

    /// Answers the `WWW-Authenticate` challenge `url` gave: basic
    /// credentials, or a bearer token fetched from the realm (with the
    /// credentials if any).
    fn authorize(&self, challenge: &str, url: &str) -> Result<String, RegistryError> {
        let basic = self.credentials.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic.ok_or_else(|| RegistryError::NoCredentials {
                url: url.to_owned(),
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(RegistryError::Auth(challenge.to_owned()));
        }
        let params = challenge_params(params);
        let param = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        };
        let realm = param("realm").ok_or_else(|| RegistryError::Auth(challenge.to_owned()))?;
        let mut req = self.agent.get(&realm);
        if let Some(service) = param("service") {
            req = req.query("service", &service);
        }
        let scope =
            param("scope").unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        req = req.query("scope", &scope);
        if let Some(b) = &basic {
            if !realm_may_get_credentials(&realm, &self.base) {
                return Err(RegistryError::InsecureRealm { realm });
            }
            req = req.set("Authorization", b);
        }
        let resp = match req.call() {
            Ok(resp) => resp,
            Err(ureq::Error::Status(401 | 403, _)) => return Err(self.denied(&realm)),
            Err(e) => return Err(http_error(&realm, e)),
        };
        let body = oci::read_document(resp.into_reader())?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = oci::parse(&body, "token response")?;
        let token = t
            .token
            .or(t.access_token)
            .ok_or_else(|| RegistryError::Auth("token endpoint gave no token".into()))?;
        Ok(format!("Bearer {token}"))
    }

    /// Fetches a manifest or index by tag or digest; verifies it when asked
    /// by digest. Returns the bytes and their digest.
    pub fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, Digest), RegistryError> {
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let url = format!("{}/manifests/{reference}", self.base);
        let body = oci::read_document(self.get(&url, &accept)?.into_reader())?;
        let digest = Digest::of(&body);
        if let Ok(expected) = Digest::parse(reference) {
            expected.verify(&body)?;
        }
        Ok((body, digest))
    }

    /// Downloads blob `digest` of `size` bytes to `to`, hashing as it goes.
    pub fn blob(
        &mut self,
        digest: &Digest,
        size: u64,
        to: &Path,
        progress: impl FnMut(u64),
    ) -> Result<(), RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.get(&url, "*/*")?;
        let mut out = BufWriter::new(File::create(to)?);
        let (actual, len) = oci::copy_hashed(
            &mut resp.into_reader().take(size + 1),
            &mut out,
            size,
            progress,
        )?;
        out.flush()?;
        if len != size {
            return Err(OciError::SizeMismatch {
                digest: digest.clone(),
                expected: size,
            }
            .into());
        }
        if &actual != digest {
            return Err(OciError::DigestMismatch {
                expected: digest.clone(),
                actual,
            }
            .into());
        }
        Ok(())
    }

    /// Downloads a small document blob (a config) into memory, verified.
    pub fn document_blob(&mut self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let body = oci::read_document(self.get(&url, "*/*")?.into_reader())?;
        digest.verify(&body)?;
        Ok(body)
    }
}

/// The error for a failed request to `url`: [`RegistryError::Tls`] when
/// rustls gave up on the connection, else [`RegistryError::Http`].
fn http_error(url: &str, e: ureq::Error) -> RegistryError {
    // ureq hands rustls's error over inside an io::Error, whose source()
    // skips the error it wraps: look inside with get_ref.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        let tls = c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return RegistryError::Tls {
                url: url.to_owned(),
                source: tls.clone(),
            };
        }
        cause = c.source();
    }
    RegistryError::Http {
        url: url.to_owned(),
        source: Box::new(e),
    }
}

/// The scheme and host (without its port, an IPv6 address in brackets) of
/// `url` as ureq connects to it, or `None` if ureq would not. Read with the
/// parser ureq uses (the `url` crate's WHATWG rules), not by hand: there a
/// `\` ends the host of an `http` URL too, so a hand split of
/// `http://evil.example\@registry/` found the registry's host where ureq
/// connects to `evil.example`.
fn origin(url: &str) -> Option<(String, String)> {
    let parsed = url::Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    Some((parsed.scheme().to_owned(), host.to_owned()))
}

/// Whether a token realm may be sent the registry's credentials: over
/// HTTPS anywhere (Docker Hub's realm is another host), over plain HTTP
/// only on the registry's own host (a local registry and its token
/// server, on any port).
fn realm_may_get_credentials(realm: &str, registry_base: &str) -> bool {
    match (origin(realm), origin(registry_base)) {
        (Some((scheme, _)), _) if scheme == "https" => true,
        (Some((scheme, host)), Some((_, registry))) => scheme == "http" && host == registry,
        _ => false,
    }
}

/// The `key=value` or `key="quoted, value"` pairs of a challenge, in order.
fn challenge_params(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = params.trim_start();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_owned();
        let after = after.trim_start();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end..])
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_owned(), &after[end..])
            }
        };
        out.push((key, value));
        rest = tail.trim_start().trim_start_matches(',');
    }
    out
}

/// The `*.crt` files of Docker's per-registry directory `dir`, sorted;
/// none when it does not exist.
fn docker_cas(dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RegistryError::CertsDir {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut cas = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| RegistryError::CertsDir {
                path: dir.to_owned(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "crt") {
            cas.push(path);
        }
    }
    cas.sort();
    Ok(cas)
}

/// A rustls configuration trusting the built-in roots and every
/// certificate in the PEM files `cas`.
fn tls_config(cas: &[PathBuf]) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for path in cas {
        let bad_file = |source| RegistryError::CaFile {
            path: path.clone(),
            source,
        };
        let mut found = false;
        for cert in CertificateDer::pem_file_iter(path).map_err(bad_file)? {
            roots
                .add(cert.map_err(bad_file)?)
                .map_err(|source| RegistryError::BadCaCert {
                    path: path.clone(),
                    source,
                })?;
            found = true;
        }
        if !found {
            return Err(RegistryError::NoCaCert(path.clone()));
        }
    }
    // The provider ureq itself uses, named so that no process-wide default
    // provider is needed.
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
    .expect("ring's default provider supports TLS 1.2 and 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The parsers behind a registry's authentication challenge, for fuzz
/// targets and tests.
#[cfg(any(test, feature = "test-utils"))]
pub mod challenge {
    /// The `key=value` or `key="quoted, value"` pairs of a
    /// `WWW-Authenticate` challenge's parameters, in order.
    pub fn params(params: &str) -> Vec<(String, String)> {
        super::challenge_params(params)
    }

    /// Whether the registry at `registry_base` sends its credentials to
    /// the token `realm`.
    pub fn realm_may_get_credentials(realm: &str, registry_base: &str) -> bool {
        super::realm_may_get_credentials(realm, registry_base)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_go_to_https_realms_and_to_the_registry_itself_only() {
        use super::realm_may_get_credentials as may;
        let hub = "https://registry-1.docker.io/v2/library/redis";
        assert!(may("https://auth.docker.io/token", hub));
        assert!(!may("http://auth.docker.io/token", hub));
        let local = "http://127.0.0.1:5000/v2/app";
        assert!(may("http://127.0.0.1:5000/token", local));
        assert!(may("http://127.0.0.1:5001/token", local));
        assert!(!may("http://evil.example/token", local));
        assert!(!may("http://127.0.0.1@evil.example:5000/t", local));
        // Found by the registry_auth fuzz target: ureq reads `\` as the
        // end of the host, so this realm is evil.example.
        assert!(!may("http://evil.example\\@127.0.0.1:5000/t", local));
        assert!(may("HTTP://127.0.0.1:5001/token", local));
        assert!(may("http://[::1]:9/t", "http://[::1]:5000/v2/app"));
        assert!(!may("http://[::2]:9/t", "http://[::1]:5000/v2/app"));
        assert!(!may("ftp://127.0.0.1:5000/token", local));
        assert!(!may("no-scheme", local));
    }

    use super::*;

    #[test]
    fn references_normalise_like_docker() {
        let r = Reference::parse("redis").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/redis", Some("latest"))
        );
        let r = Reference::parse("127.0.0.1:5000/little/httpd:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "little/httpd");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.is_loopback());
        let hex = "a".repeat(64);
        let r = Reference::parse(&format!("ghcr.io/a/b@sha256:{hex}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), format!("sha256:{hex}"));
        assert!(!r.is_loopback());
        for bad in [
            "",
            "UPPER",
            "a//b",
            "a:b:c/d e",
            "x@sha256:12",
            "../a/b",
            "..:5000/a",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        let r = Reference::parse("[::1]:5000/a").unwrap();
        assert_eq!(r.host(), "[::1]");
        assert!(r.is_loopback());
        assert_eq!(Reference::parse("localhost/a").unwrap().host(), "localhost");
    }

    #[test]
    fn challenge_parameters_keep_commas_inside_quotes() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service=reg, scope="repository:a/b:pull,push",x="q\"uote""#,
        );
        let pairs: Vec<(&str, &str)> = p.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(
            pairs,
            [
                ("realm", "https://auth.example/token"),
                ("service", "reg"),
                ("scope", "repository:a/b:pull,push"),
                ("x", "q\"uote"),
            ]
        );
        assert!(challenge_params("").is_empty());
    }

    fn options(certs_dir: &Path) -> ClientOptions {
        ClientOptions {
            certs_dir: Some(certs_dir.to_owned()),
            ..ClientOptions::default()
        }
    }

    #[test]
    fn loopback_is_plain_http_unless_tls_or_a_ca_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let local = Reference::parse("127.0.0.1:5000/a/b").unwrap();
        let remote = Reference::parse("ghcr.io/a/b").unwrap();
        let base = |r: &Reference, o: &ClientOptions| {
            Client::new(r, o)
                .unwrap()
                .base_url()
                .split(':')
                .next()
                .map(str::to_owned)
        };
        let o = options(dir.path());
        assert_eq!(base(&local, &o).as_deref(), Some("http"));
        assert_eq!(base(&remote, &o).as_deref(), Some("https"));
        let plain = ClientOptions {
            plain_http: true,
            ..options(dir.path())
        };
        assert_eq!(base(&remote, &plain).as_deref(), Some("http"));
        let tls = ClientOptions {
            tls: true,
            ..options(dir.path())
        };
        assert_eq!(base(&local, &tls).as_deref(), Some("https"));

        // A CA in Docker's per-registry directory means HTTPS for that
        // registry only; other files there are not CAs.
        let host_dir = dir.path().join("127.0.0.1:5000");
        std::fs::create_dir(&host_dir).unwrap();
        std::fs::write(host_dir.join("ca.crt"), TEST_CA).unwrap();
        std::fs::write(host_dir.join("client.cert"), "not a CA").unwrap();
        assert_eq!(base(&local, &o).as_deref(), Some("https"));
        let other = Reference::parse("127.0.0.1:5001/a/b").unwrap();
        assert_eq!(base(&other, &o).as_deref(), Some("http"));
        let with_ca = ClientOptions {
            ca_certs: vec![host_dir.join("ca.crt")],
            ..options(&dir.path().join("none"))
        };
        assert_eq!(base(&other, &with_ca).as_deref(), Some("https"));
    }

    /// A self-signed P-256 certificate, valid as a trust anchor
    /// (`openssl req -x509 -newkey ec`).
    const TEST_CA: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBkzCCATmgAwIBAgIUL5x7ch6DYhwTmEpGuoUv9zte5/gwCgYIKoZIzj0EAwIw\n\
HjEcMBoGA1UEAwwTbGl0dGxlLXVuaXQtdGVzdC1jYTAgFw0yNjExMjgwOTIzMTBa\n\
GA8yMTI2MTEwNDA5MjMxMFowHjEcMBoGA1UEAwwTbGl0dGxlLXVuaXQtdGVzdC1j\n\
YTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABJXldvBb5NAl5MjJVKqABkNInI1B\n\
ytQRwTohEzgUVy7eugrF9epiMEuGzWisjoZ9lo1FtbWxpRDW4c4MVpEExOijUzBR\n\
MB0GA1UdDgQWBBT1Ue1wyAbX0h6yMTsZ4a+Ciqc7HjAfBgNVHSMEGDAWgBT1Ue1w\n\
yAbX0h6yMTsZ4a+Ciqc7HjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gA\n\
MEUCIAaQTWj6VtdV9L1y6dvrgMtKeC6hPiWqs5KaDdxWLP8wAiEAr779/B1Ha+HA\n\
mNWC+3xhloGvForlkbBE50tvIFf8Ebg=\n\
-----END CERTIFICATE-----\n";

    #[test]
    fn unusable_ca_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let local = Reference::parse("127.0.0.1:5000/a/b").unwrap();
        let try_ca = |name: &str, contents: Option<&str>| {
            let path = dir.path().join(name);
            if let Some(c) = contents {
                std::fs::write(&path, c).unwrap();
            }
            let o = ClientOptions {
                ca_certs: vec![path],
                ..options(dir.path())
            };
            Client::new(&local, &o).err()
        };
        assert!(matches!(
            try_ca("missing.pem", None),
            Some(RegistryError::CaFile { .. })
        ));
        assert!(matches!(
            try_ca("text.pem", Some("just text\n")),
            Some(RegistryError::NoCaCert(_))
        ));
        assert!(matches!(
            try_ca(
                "base64.pem",
                Some("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
            ),
            Some(RegistryError::CaFile { .. })
        ));
        assert!(matches!(
            try_ca(
                "der.pem",
                Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            ),
            Some(RegistryError::BadCaCert { .. })
        ));
        let good = try_ca("good.pem", Some(TEST_CA));
        assert!(good.is_none(), "{good:?}");
    }
}
