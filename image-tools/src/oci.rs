//! OCI and Docker image documents: digests, descriptors, indexes,
//! manifests, image configs and `docker save`'s `manifest.json`, as the
//! small serde subset an importer needs.
//!
//! Why not the `oci-spec` crate: it would pull a builder and regex stack
//! for fields we never read, and its strict types refuse Docker's media
//! types in places registries still serve them. These types accept both
//! families (they share the JSON shapes) and every document is read under
//! a size cap ([`MAX_DOCUMENT`]) before parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Largest index, manifest or config accepted, in bytes.
pub const MAX_DOCUMENT: u64 = 4 << 20;

/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A digest is not `sha256:` and 64 lowercase hex digits.
    #[error("unsupported or malformed digest {0:?} (only sha256 is supported)")]
    BadDigest(String),
    /// Content does not hash to its digest.
    #[error("content does not match its digest {expected} (got {actual})")]
    DigestMismatch {
        /// The digest that was asked for.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// Content is not the size its descriptor says.
    #[error("content of {digest} is not {expected} bytes long")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The size its descriptor gives.
        expected: u64,
    },
    /// A document is larger than [`MAX_DOCUMENT`].
    #[error("document is larger than {MAX_DOCUMENT} bytes")]
    TooLarge,
    /// A document is not valid JSON of the expected shape.
    #[error("malformed {what}")]
    Json {
        /// Which document.
        what: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// Reading a document failed.
    #[error("reading a document failed")]
    Io(#[from] io::Error),
    /// No manifest matches the platform (or tag).
    #[error("no manifest for {0}")]
    NoMatch(String),
    /// A document type this importer does not handle.
    #[error("unsupported document: {0}")]
    Unsupported(String),
}

/// A `sha256:<hex>` content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Parses and validates a digest string.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| OciError::BadDigest(s.to_owned()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(OciError::BadDigest(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The digest a finished hasher holds.
    pub fn from_hasher(hasher: Sha256) -> Self {
        let sum = hasher.finalize();
        let mut s = String::from("sha256:");
        for b in sum {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// The 64 hex digits (safe as a file name).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// Checks that `bytes` hash to this digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), OciError> {
        let actual = Self::of(bytes);
        if &actual != self {
            return Err(OciError::DigestMismatch {
                expected: self.clone(),
                actual,
            });
        }
        Ok(())
    }
}

impl TryFrom<String> for Digest {
    type Error = OciError;
    fn try_from(s: String) -> Result<Self, OciError> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Copies `from` into `to` while hashing; returns the digest and length.
/// Stops with an error once more than `cap` bytes arrived.
pub fn copy_hashed(
    from: &mut impl Read,
    to: &mut impl Write,
    cap: u64,
    mut progress: impl FnMut(u64),
) -> Result<(Digest, u64), io::Error> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if total > cap {
            return Err(io::Error::other(format!(
                "content is longer than {cap} bytes"
            )));
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        progress(n as u64);
    }
    Ok((Digest::from_hasher(hasher), total))
}

/// Reads a whole document, refusing more than [`MAX_DOCUMENT`] bytes.
pub fn read_document(from: impl Read) -> Result<Vec<u8>, OciError> {
    let mut buf = Vec::new();
    from.take(MAX_DOCUMENT + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_DOCUMENT {
        return Err(OciError::TooLarge);
    }
    Ok(buf)
}

/// Parses a JSON document of type `T`.
pub fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T, OciError> {
    if bytes.len() as u64 > MAX_DOCUMENT {
        return Err(OciError::TooLarge);
    }
    serde_json::from_slice(bytes).map_err(|source| OciError::Json { what, source })
}

/// A platform a manifest is built for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture variant (`v8`).
    #[serde(default)]
    pub variant: Option<String>,
}

/// A reference to content: media type, digest, size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// Content digest.
    pub digest: Digest,
    /// Content size in bytes.
    pub size: u64,
    /// Platform, in indexes.
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Annotations (`org.opencontainers.image.ref.name` names tags in a layout).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An index (manifest list) or an image manifest: they share one JSON
/// shape family, told apart by which fields are present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnyManifest {
    /// 2 for every supported document (1 is Docker's legacy format).
    pub schema_version: u32,
    /// Media type when the document carries it.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Index entries.
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    /// Image config, for a manifest.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Layers, base first, for a manifest.
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

/// What a manifest document turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An index: pick one of its manifests.
    Index(Vec<Descriptor>),
    /// An image manifest: its config and layers.
    Image {
        /// Config blob.
        config: Descriptor,
        /// Layer blobs, base first.
        layers: Vec<Descriptor>,
    },
}

impl AnyManifest {
    /// Parses and classifies a manifest or index.
    pub fn parse(bytes: &[u8]) -> Result<Parsed, OciError> {
        let m: AnyManifest = parse(bytes, "manifest")?;
        if m.schema_version != 2 {
            return Err(OciError::Unsupported(format!(
                "manifest schema version {} (only 2)",
                m.schema_version
            )));
        }
        match (m.manifests, m.config, m.layers) {
            (Some(list), None, _) => Ok(Parsed::Index(list)),
            (None, Some(config), layers) => Ok(Parsed::Image {
                config,
                layers: layers.unwrap_or_default(),
            }),
            _ => Err(OciError::Unsupported(
                "a manifest that is neither an index nor an image manifest".into(),
            )),
        }
    }
}

/// Picks `linux/amd64` from an index; an index of a single entry without
/// platform (as OCI layouts written by umoci or skopeo have) is taken as is.
/// `tag`, when given, must match the entry's ref-name annotation if any
/// entry has one.
pub fn select(list: &[Descriptor], tag: Option<&str>) -> Result<Descriptor, OciError> {
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    let mut candidates: Vec<&Descriptor> = list.iter().collect();
    if let Some(tag) = tag {
        if candidates
            .iter()
            .any(|d| d.annotations.contains_key(REF_NAME))
        {
            candidates.retain(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(tag));
        }
    }
    let for_amd64 = candidates.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(d) = for_amd64 {
        return Ok((*d).clone());
    }
    let unplatformed: Vec<&&Descriptor> =
        candidates.iter().filter(|d| d.platform.is_none()).collect();
    if unplatformed.len() == 1 {
        return Ok((**unplatformed[0]).clone());
    }
    Err(OciError::NoMatch(match tag {
        Some(t) => format!("linux/amd64 with tag {t:?}"),
        None => "linux/amd64".into(),
    }))
}

/// The part of an image config a runtime uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// Program and fixed arguments.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (after the entrypoint).
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// `KEY=VALUE` environment.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// `user[:group]`, names or ids.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    /// `port/proto` keys.
    #[serde(rename = "ExposedPorts", default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// Signal that stops the container (`SIGTERM`).
    #[serde(rename = "StopSignal", default)]
    pub stop_signal: Option<String>,
    /// Paths that hold data (Docker's `VOLUME`), as keys.
    #[serde(rename = "Volumes", default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    /// How to tell the container is healthy (Docker's `HEALTHCHECK`).
    #[serde(rename = "Healthcheck", default)]
    pub healthcheck: Option<Healthcheck>,
}

/// An image's `HEALTHCHECK`; only its test is used (as the ready command).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Healthcheck {
    /// `[]`: inherit; `["NONE"]`: none; `["CMD", program, args...]`;
    /// `["CMD-SHELL", command]`: run by `/bin/sh -c`.
    #[serde(rename = "Test", default)]
    pub test: Option<Vec<String>>,
}

impl Healthcheck {
    /// The test as an argv; empty when there is none.
    ///
    /// ```
    /// use image_tools::oci::Healthcheck;
    /// let h = |t: &[&str]| Healthcheck { test: Some(t.iter().map(|s| s.to_string()).collect()) };
    /// assert_eq!(h(&["CMD", "pg_isready", "-q"]).argv(), ["pg_isready", "-q"]);
    /// assert_eq!(h(&["CMD-SHELL", "curl -f localhost"]).argv(), ["/bin/sh", "-c", "curl -f localhost"]);
    /// assert!(h(&["NONE"]).argv().is_empty());
    /// assert!(h(&["CMD-SHELL"]).argv().is_empty());
    /// ```
    pub fn argv(&self) -> Vec<String> {
        match self.test.as_deref() {
            Some([kind, args @ ..]) if kind == "CMD" => args.to_vec(),
            Some([kind, command]) if kind == "CMD-SHELL" => {
                vec!["/bin/sh".into(), "-c".into(), command.clone()]
            }
            _ => Vec::new(),
        }
    }
}

/// The layers' uncompressed digests.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Digest of each uncompressed layer tar, base first.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// An image config blob.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// Runtime defaults.
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    /// Layer diff ids.
    #[serde(default)]
    pub rootfs: RootFs,
}

/// One image in a `docker save` archive's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DockerSaveEntry {
    /// Path of the config file inside the archive.
    #[serde(rename = "Config")]
    pub config: String,
    /// Tags, `name:tag`.
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars inside the archive, base first.
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e5f63cf1cc7ee496e30cba0d3db1db58e9c04a0c560effed3871163ce600190a";

    fn desc(platform: Option<(&str, &str)>, tag: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::parse(&format!("sha256:{HEX}")).unwrap(),
            size: 1,
            platform: platform.map(|(os, arch)| Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: None,
            }),
            annotations: tag
                .map(|t| [("org.opencontainers.image.ref.name".into(), t.into())].into())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn digests_are_validated_and_verified() {
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha512:{HEX}")).is_err());
        assert!(Digest::parse(&format!("sha256:{}", HEX.to_uppercase())).is_err());
        let d = Digest::of(b"hello");
        assert_eq!(
            d.hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(d.verify(b"hello").is_ok());
        assert!(matches!(
            d.verify(b"hellO"),
            Err(OciError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn select_prefers_linux_amd64_and_honours_tags() {
        let list = [
            desc(Some(("linux", "arm64")), None),
            desc(Some(("linux", "amd64")), None),
        ];
        assert_eq!(select(&list, None).unwrap(), list[1]);
        assert!(select(&list[..1], None).is_err());
        let layout = [desc(None, Some("a")), desc(None, Some("b"))];
        assert_eq!(select(&layout, Some("b")).unwrap(), layout[1]);
        assert!(select(&layout, None).is_err());
        assert!(select(&layout, Some("c")).is_err());
    }

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{HEX}","size":3}}]}}"#
        );
        assert!(matches!(
            AnyManifest::parse(index.as_bytes()).unwrap(),
            Parsed::Index(l) if l.len() == 1
        ));
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha256:{HEX}","size":3}},"layers":[]}}"#
        );
        assert!(matches!(
            AnyManifest::parse(image.as_bytes()).unwrap(),
            Parsed::Image { .. }
        ));
        assert!(AnyManifest::parse(br#"{"schemaVersion":1}"#).is_err());
        assert!(AnyManifest::parse(b"{").is_err());
        let huge = vec![b' '; (MAX_DOCUMENT + 1) as usize];
        assert!(matches!(AnyManifest::parse(&huge), Err(OciError::TooLarge)));
    }
}
