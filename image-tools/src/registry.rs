//! A small client for the registry distribution API (`/v2/`): image
//! references, manifest and blob downloads over HTTP or HTTPS, anonymous,
//! basic and bearer-token authentication. Blobs stream to disk while they
//! are hashed; nothing larger than a manifest is held in memory.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;

use crate::oci::{self, Digest, OciError, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

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
    /// The registry asked for an authentication scheme we do not speak.
    #[error("registry wants unsupported authentication {0:?}")]
    Auth(String),
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
        if !valid_repo || !valid_tag {
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

    /// Whether the registry is on this machine (plain HTTP by default, as
    /// Docker treats loopback registries as insecure).
    pub fn is_loopback(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(&*self.registry, |(h, _)| h);
        matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.starts_with("127.")
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

/// How to reach and authenticate to a registry.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Use `http://` (default for loopback registries).
    pub plain_http: bool,
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
    /// A client for `reference`'s registry and repository.
    pub fn new(reference: &Reference, options: &ClientOptions) -> Self {
        let host = if reference.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &reference.registry
        };
        let scheme = if options.plain_http || reference.is_loopback() {
            "http"
        } else {
            "https"
        };
        Self {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(30))
                .timeout_read(Duration::from_secs(120))
                .build(),
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            repository: reference.repository.clone(),
            credentials: options.credentials.clone(),
            authorization: None,
        }
    }

    /// GETs `url` with `accept`, authenticating once if the registry says 401.
    fn get(&mut self, url: &str, accept: &str) -> Result<ureq::Response, RegistryError> {
        for attempt in 0..2 {
            let mut req = self.agent.get(url).set("Accept", accept);
            if let Some(auth) = &self.authorization {
                req = req.set("Authorization", auth);
            }
            match req.call() {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if attempt == 0 => {
                    let challenge = resp.header("www-authenticate").unwrap_or("").to_owned();
                    self.authorization = Some(self.authorize(&challenge)?);
                }
                Err(e) => {
                    return Err(RegistryError::Http {
                        url: url.to_owned(),
                        source: Box::new(e),
                    })
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Answers a `WWW-Authenticate` challenge: basic credentials, or a
    /// bearer token fetched from the realm (with the credentials if any).
    fn authorize(&self, challenge: &str) -> Result<String, RegistryError> {
        let basic = self.credentials.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic
                .ok_or_else(|| RegistryError::Auth("basic, but no credentials given".into()));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(RegistryError::Auth(challenge.to_owned()));
        }
        let param = |key: &str| -> Option<String> {
            params.split(',').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == key).then(|| v.trim_matches('"').to_owned())
            })
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
            req = req.set("Authorization", b);
        }
        let resp = req.call().map_err(|e| RegistryError::Http {
            url: realm.clone(),
            source: Box::new(e),
        })?;
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

#[cfg(test)]
mod tests {
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
        for bad in ["", "UPPER", "a//b", "a:b:c/d e", "x@sha256:12"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
