//! Synthetic layers and OCI layouts for tests, benches and fuzz targets
//! (feature `test-utils`): tar entries of every type, hostile ones
//! included (raw names the `tar` crate's own checks would refuse), and a
//! small OCI layout writer.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::oci::{ContainerConfig, Digest};

/// How a synthetic layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Builds one layer tar in memory.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

/// Writes `path` into the header's name field as is (no `..` check).
fn raw_name(h: &mut tar::Header, path: &[u8]) {
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    let n = path.len().min(name.len());
    name[..n].copy_from_slice(&path[..n]);
}

fn raw_link(h: &mut tar::Header, target: &[u8]) {
    let link = &mut h.as_old_mut().linkname;
    link.fill(0);
    let n = target.len().min(link.len());
    link[..n].copy_from_slice(&target[..n]);
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn append(&mut self, mut h: tar::Header, path: &[u8], data: &[u8]) -> &mut Self {
        raw_name(&mut h, path);
        h.set_cksum();
        self.tar
            .append(&h, data)
            .expect("appending to a Vec cannot fail");
        self
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let h = header(tar::EntryType::Directory, mode, uid, gid, 0);
        self.append(h, path.as_bytes(), &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        self.raw_file(path.as_bytes(), mode, uid, gid, data)
    }

    /// A regular file with any name bytes (hostile names included).
    pub fn raw_file(
        &mut self,
        path: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> &mut Self {
        let h = header(tar::EntryType::Regular, mode, uid, gid, data.len() as u64);
        self.append(h, path, data)
    }

    /// A regular file with extended attributes (PAX `SCHILY.xattr.*`).
    pub fn file_with_xattrs(
        &mut self,
        path: &str,
        data: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let keys: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.tar
            .append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
            .expect("appending to a Vec cannot fail");
        self.file(path, 0o644, 0, 0, data)
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        raw_link(&mut h, target.as_bytes());
        self.append(h, path.as_bytes(), &[])
    }

    /// A hard link to `target` (any bytes).
    pub fn hardlink(&mut self, path: &str, target: &[u8]) -> &mut Self {
        let mut h = header(tar::EntryType::Link, 0o644, 0, 0, 0);
        raw_link(&mut h, target);
        self.append(h, path.as_bytes(), &[])
    }

    /// A character device.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = header(tar::EntryType::Char, 0o666, 0, 0, 0);
        h.set_device_major(major).expect("gnu header");
        h.set_device_minor(minor).expect("gnu header");
        self.append(h, path.as_bytes(), &[])
    }

    /// A whiteout for `path` (`dir/.wh.name`).
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, 0o644, 0, 0, &[])
    }

    /// Marks directory `dir` opaque.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, 0, 0, &[])
    }

    /// A header that claims `size` bytes, followed by fewer (truncated).
    pub fn truncated_file(&mut self, path: &str, size: u64) -> Vec<u8> {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 0, size);
        raw_name(&mut h, path.as_bytes());
        h.set_cksum();
        let mut out = self.finish_unterminated();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&[7u8; 512]);
        out
    }

    fn finish_unterminated(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.tar, tar::Builder::new(Vec::new()))
            .into_inner()
            .map(|mut v| {
                // into_inner wrote the two end blocks: drop them.
                v.truncate(v.len().saturating_sub(1024));
                v
            })
            .expect("Vec writer")
    }

    /// The finished tar.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.tar, tar::Builder::new(Vec::new()))
            .into_inner()
            .expect("Vec writer")
    }
}

/// Compresses a layer.
pub fn compress(tar: &[u8], how: Compress) -> Vec<u8> {
    match how {
        Compress::None => tar.to_vec(),
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("Vec writer");
            e.finish().expect("Vec writer")
        }
        Compress::Zstd => zstd::stream::encode_all(tar, 1).expect("in-memory zstd"),
    }
}

fn put_blob(dir: &Path, bytes: &[u8]) -> (Digest, u64) {
    let digest = Digest::of(bytes);
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("blob dir");
    fs::write(blobs.join(digest.hex()), bytes).expect("blob");
    (digest, bytes.len() as u64)
}

/// Writes an OCI layout of one linux/amd64 image with `layers` (tar bytes,
/// base first) at `dir`; returns the config digest (the image id).
pub fn write_layout(
    dir: &Path,
    layers: &[(Vec<u8>, Compress)],
    config: &ContainerConfig,
) -> Digest {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, how) in layers {
        diff_ids.push(Digest::of(tar).to_string());
        let blob = compress(tar, *how);
        let (digest, size) = put_blob(dir, &blob);
        let media = match how {
            Compress::None => "application/vnd.oci.image.layer.v1.tar",
            Compress::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compress::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        descs.push(serde_json::json!({"mediaType": media, "digest": digest, "size": size}));
    }
    let config_json = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) =
        put_blob(dir, &serde_json::to_vec(&config_json).expect("json"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": descs,
    });
    let (m_digest, m_size) = put_blob(dir, &serde_json::to_vec(&manifest).expect("json"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": m_digest, "size": m_size,
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index");
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    config_digest
}

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn blob_of(layout: &Path, digest: &serde_json::Value) -> std::path::PathBuf {
    let digest = digest
        .as_str()
        .and_then(|d| Digest::parse(d).ok())
        .unwrap_or_else(|| panic!("{digest} is not a sha256 digest"));
    layout.join("blobs/sha256").join(digest.hex())
}

/// Copies the one-image OCI layout at `base` to `dir` with `layer` (a tar,
/// stored uncompressed) on top and its container config changed by
/// `edit`: a variant of a real test image, made without a container
/// engine. Everything else the base's index, manifest and config hold (tags,
/// history, labels) is kept. Returns the new config digest (the image id).
pub fn extend_layout(
    base: &Path,
    dir: &Path,
    layer: &[u8],
    edit: impl FnOnce(&mut ContainerConfig),
) -> Digest {
    let mut index = read_json(&base.join("index.json"));
    let Some([entry]) = index["manifests"].as_array_mut().map(Vec::as_mut_slice) else {
        panic!("{} does not hold exactly one image", base.display());
    };
    let mut manifest = read_json(&blob_of(base, &entry["digest"]));
    let mut config = read_json(&blob_of(base, &manifest["config"]["digest"]));

    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).expect("blob dir");
    for blob in fs::read_dir(base.join("blobs/sha256")).expect("the base's blobs") {
        let blob = blob.expect("a blob entry");
        fs::copy(blob.path(), blobs.join(blob.file_name())).expect("blob copied");
    }

    let (layer_digest, layer_size) = put_blob(dir, layer);
    manifest["layers"]
        .as_array_mut()
        .expect("a manifest lists its layers")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest, "size": layer_size,
        }));
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("a config lists its diff ids")
        .push(serde_json::json!(layer_digest));
    if let Some(history) = config["history"].as_array_mut() {
        history.push(serde_json::json!({"created_by": "image_tools::test_utils::extend_layout"}));
    }
    // Edited through the JSON object, so fields ContainerConfig does not
    // model (Labels, Volumes) stay.
    let mut fields = match config["config"].take() {
        serde_json::Value::Object(fields) => fields,
        _ => serde_json::Map::new(),
    };
    let mut run: ContainerConfig =
        serde_json::from_value(serde_json::Value::Object(fields.clone())).unwrap_or_default();
    edit(&mut run);
    if let serde_json::Value::Object(edited) = serde_json::to_value(&run).expect("json") {
        for (key, value) in edited {
            if value.is_null() {
                fields.remove(&key);
            } else {
                fields.insert(key, value);
            }
        }
    }
    config["config"] = serde_json::Value::Object(fields);

    let (config_digest, config_size) = put_blob(dir, &serde_json::to_vec(&config).expect("json"));
    manifest["config"]["digest"] = serde_json::json!(config_digest);
    manifest["config"]["size"] = serde_json::json!(config_size);
    let (manifest_digest, manifest_size) =
        put_blob(dir, &serde_json::to_vec(&manifest).expect("json"));
    entry["digest"] = serde_json::json!(manifest_digest);
    entry["size"] = serde_json::json!(manifest_size);
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index");
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    config_digest
}
