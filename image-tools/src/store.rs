//! The local image store and the import pipeline.
//!
//! ```text
//! $LITTLE_HOME (default ~/.little, the same home as `little`'s)/
//!   images/<config sha256>/rootfs.erofs   read-only base image
//!   images/<config sha256>/image.json     StoredImage: RunConfig, refs, sizes
//!   tmp/                                  work directories of running imports
//! ```
//!
//! Images are keyed by their config digest (Docker's image id): it names
//! the layers' uncompressed digests, so the same image pulled from a
//! registry, a `docker save` archive or an OCI layout converts once. An
//! import works in a temporary directory and publishes with one rename.
//!
//! Inputs ([`Source`]): an OCI layout directory, a tar of one (OCI
//! archive), a `docker save` archive, or a registry reference. Every blob is
//! checked against its digest (layers also against the config's diff ids)
//! before it is used.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::erofs::{self, ErofsError};
use crate::layer::{self, Budget, LayerError, Limits};
use crate::oci::{
    self, AnyManifest, Descriptor, Digest, DockerSaveEntry, ImageConfig, OciError, Parsed,
};
use crate::registry::{Client, ClientOptions, Reference, RegistryError};
use crate::runconfig::{self, RunConfig, RunConfigError};
use crate::tarbound;
use crate::tree::Tree;

/// Most nested indexes followed.
const MAX_INDEX_DEPTH: usize = 4;

/// Why an import, listing or removal failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A store or input file could not be read or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The input is not an image in a supported format.
    #[error("{0}")]
    Format(String),
    /// A document or blob failed verification.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// A layer could not be flattened.
    #[error("flattening the layers failed")]
    Layer(#[from] LayerError),
    /// A layer's uncompressed content does not match the config's diff id.
    #[error("layer {layer} does not match the config's diff id {expected} (got {actual})")]
    DiffId {
        /// Layer index.
        layer: usize,
        /// From the config.
        expected: Digest,
        /// Computed.
        actual: Digest,
    },
    /// Writing the base image failed.
    #[error("writing the base image failed")]
    Erofs(#[from] ErofsError),
    /// The registry could not be used.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The image config cannot run under the agent.
    #[error(transparent)]
    RunConfig(#[from] RunConfigError),
    /// No stored image matches.
    #[error("no image matches {0:?}")]
    NotFound(String),
    /// More than one stored image matches.
    #[error("{0:?} matches more than one image")]
    Ambiguous(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An OCI image layout directory; the tag picks among several images.
    Layout(PathBuf, Option<String>),
    /// A tar file: an OCI archive or a `docker save` archive.
    Archive(PathBuf),
    /// A registry reference.
    Registry(Reference),
}

impl Source {
    /// An existing directory is a layout, an existing file an archive,
    /// anything else a registry reference. `DIR:TAG` picks a layout tag.
    pub fn parse(input: &str) -> Result<Self, StoreError> {
        let path = Path::new(input);
        if path.is_dir() {
            return Ok(Self::Layout(path.to_owned(), None));
        }
        if path.is_file() {
            return Ok(Self::Archive(path.to_owned()));
        }
        if let Some((dir, tag)) = input.rsplit_once(':') {
            if Path::new(dir).is_dir() {
                return Ok(Self::Layout(dir.into(), Some(tag.to_owned())));
            }
        }
        if input.starts_with('/') || input.starts_with('.') {
            return Err(StoreError::Format(format!(
                "{input}: no such file or directory"
            )));
        }
        Ok(Self::Registry(Reference::parse(input)?))
    }
}

/// What `image.json` records about a stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    /// Config digest: the image id.
    pub id: Digest,
    /// Names it was imported under.
    pub refs: Vec<String>,
    /// How the guest runs it.
    pub run: RunConfig,
    /// Layer diff ids, base first.
    pub layers: Vec<Digest>,
    /// Size of `rootfs.erofs`.
    pub rootfs_bytes: u64,
    /// Inodes in the base image.
    pub inodes: u64,
}

/// Options of one import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Registry connection and credentials.
    pub registry: ClientOptions,
    /// Unpacking caps.
    pub limits: Limits,
    /// No progress bars.
    pub quiet: bool,
}

/// Progress bars on stderr, or none.
struct Progress {
    multi: MultiProgress,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let multi = MultiProgress::new();
        if quiet {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self { multi }
    }

    fn bytes(&self, len: u64, msg: String) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(msg);
        bar
    }

    fn step(&self, msg: String) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
        );
        bar.set_message(msg);
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    }
}

/// An image resolved to a verified config and local layer files.
struct Resolved {
    config_digest: Digest,
    config: ImageConfig,
    layers: Vec<PathBuf>,
}

/// The local image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The home every little.cloud tool shares (`little`'s state and
    /// this store): `$LITTLE_HOME`, else `~/.little`.
    pub fn default_root() -> PathBuf {
        if let Some(home) = std::env::var_os("LITTLE_HOME") {
            return home.into();
        }
        std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".little"))
            .unwrap_or_else(|| PathBuf::from(".little"))
    }

    /// A store rooted at `root` (created on first import).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory of image `id`.
    pub fn image_dir(&self, id: &Digest) -> PathBuf {
        self.root.join("images").join(id.hex())
    }

    /// The base image of image `id`.
    pub fn rootfs(&self, id: &Digest) -> PathBuf {
        self.image_dir(id).join("rootfs.erofs")
    }

    /// Every stored image.
    pub fn list(&self) -> Result<Vec<StoredImage>, StoreError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        for entry in entries {
            let path = entry
                .map_err(io_err("listing", &dir))?
                .path()
                .join("image.json");
            if let Ok(bytes) = fs::read(&path) {
                out.push(oci::parse(&bytes, "image.json")?);
            }
        }
        out.sort_by(|a: &StoredImage, b| a.refs.cmp(&b.refs));
        Ok(out)
    }

    /// The stored image named by a ref it was imported under, or by an id
    /// (`sha256:` optional) or a unique prefix of one.
    pub fn find(&self, name: &str) -> Result<StoredImage, StoreError> {
        let images = self.list()?;
        if let Some(i) = images.iter().find(|i| i.refs.iter().any(|r| r == name)) {
            return Ok(i.clone());
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        let matches: Vec<&StoredImage> = images
            .iter()
            .filter(|i| !hex.is_empty() && i.id.hex().starts_with(hex))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(StoreError::NotFound(name.to_owned())),
            _ => Err(StoreError::Ambiguous(name.to_owned())),
        }
    }

    /// Removes a stored image.
    pub fn remove(&self, name: &str) -> Result<StoredImage, StoreError> {
        let image = self.find(name)?;
        let dir = self.image_dir(&image.id);
        fs::remove_dir_all(&dir).map_err(io_err("removing", &dir))?;
        Ok(image)
    }

    /// Imports `source` (named `name` in the store's refs) unless an image
    /// with the same config digest is already stored.
    pub fn import(
        &self,
        source: &Source,
        name: &str,
        options: &ImportOptions,
    ) -> Result<StoredImage, StoreError> {
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
        fs::create_dir_all(self.root.join("images")).map_err(io_err("creating", &self.root))?;
        let work = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(&tmp)
            .map_err(io_err("creating a work directory in", &tmp))?;
        let progress = Progress::new(options.quiet);
        let existing = |id: &Digest| -> Option<StoredImage> {
            let bytes = fs::read(self.image_dir(id).join("image.json")).ok()?;
            oci::parse(&bytes, "image.json").ok()
        };
        let resolved = match source {
            Source::Layout(dir, tag) => resolve_layout(dir, tag.as_deref())?,
            Source::Archive(path) => resolve_archive(path, work.path(), &progress)?,
            Source::Registry(reference) => {
                match resolve_registry(reference, work.path(), options, &progress, &existing)? {
                    RegistryResult::Stored(image) => return self.add_ref(image, name),
                    RegistryResult::Fetched(r) => r,
                }
            }
        };
        if let Some(image) = existing(&resolved.config_digest) {
            return self.add_ref(image, name);
        }
        let image = convert(&resolved, work.path(), name, options, &progress)?;
        let dest = self.image_dir(&image.id);
        match fs::rename(work.path().join("out"), &dest) {
            Ok(()) => Ok(image),
            // Another import of the same image won the race: use it.
            Err(_) if dest.join("image.json").exists() => self.add_ref(image, name),
            Err(e) => Err(io_err("publishing", &dest)(e)),
        }
    }

    fn add_ref(&self, mut image: StoredImage, name: &str) -> Result<StoredImage, StoreError> {
        // Imports of one image may end together (a daemon deploys apps
        // side by side): one read-modify-write of its refs at a time.
        static REFS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = REFS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Ok(text) = fs::read(self.image_dir(&image.id).join("image.json")) {
            if let Ok(stored) = serde_json::from_slice::<StoredImage>(&text) {
                image.refs = stored.refs;
            }
        }
        if !image.refs.iter().any(|r| r == name) {
            image.refs.push(name.to_owned());
            image.refs.sort();
            let dir = self.image_dir(&image.id);
            write_json(&dir.join("image.json"), &image, &dir)?;
        }
        Ok(image)
    }
}

/// Writes `value` as JSON to `path` through a temporary file in `dir`.
fn write_json<T: Serialize>(path: &Path, value: &T, dir: &Path) -> Result<(), StoreError> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("writing in", dir))?;
    serde_json::to_writer_pretty(&mut tmp, value)
        .map_err(|e| io_err("writing", path)(io::Error::other(e)))?;
    tmp.persist(path)
        .map_err(|e| io_err("writing", path)(e.error))?;
    Ok(())
}

fn read_doc(path: &Path) -> Result<Vec<u8>, StoreError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    Ok(oci::read_document(file)?)
}

/// Hashes a local blob file and checks its digest and size.
fn verify_file(path: &Path, desc: &Descriptor) -> Result<(), StoreError> {
    let mut file = BufReader::new(File::open(path).map_err(io_err("opening", path))?);
    let (actual, len) = oci::copy_hashed(&mut file, &mut io::sink(), u64::MAX, |_| {})
        .map_err(io_err("reading", path))?;
    if len != desc.size {
        return Err(OciError::SizeMismatch {
            digest: desc.digest.clone(),
            expected: desc.size,
        }
        .into());
    }
    if actual != desc.digest {
        return Err(OciError::DigestMismatch {
            expected: desc.digest.clone(),
            actual,
        }
        .into());
    }
    Ok(())
}

/// Follows `index.json` of an OCI layout whose blobs are files named by
/// digest under `blobs_dir(digest)`.
fn resolve_oci(
    index: &[u8],
    tag: Option<&str>,
    blob: &dyn Fn(&Digest) -> PathBuf,
) -> Result<Resolved, StoreError> {
    let mut doc = index.to_vec();
    for _ in 0..MAX_INDEX_DEPTH {
        match AnyManifest::parse(&doc)? {
            Parsed::Index(list) => {
                let desc = oci::select(&list, tag)?;
                let path = blob(&desc.digest);
                doc = read_doc(&path)?;
                desc.digest.verify(&doc)?;
            }
            Parsed::Image { config, layers } => {
                let config_path = blob(&config.digest);
                let config_bytes = read_doc(&config_path)?;
                config.digest.verify(&config_bytes)?;
                let parsed: ImageConfig = oci::parse(&config_bytes, "image config")?;
                let mut paths = Vec::new();
                for layer in &layers {
                    let path = blob(&layer.digest);
                    verify_file(&path, layer)?;
                    paths.push(path);
                }
                return Ok(Resolved {
                    config_digest: config.digest,
                    config: parsed,
                    layers: paths,
                });
            }
        }
    }
    Err(StoreError::Format("indexes nest too deeply".into()))
}

fn resolve_layout(dir: &Path, tag: Option<&str>) -> Result<Resolved, StoreError> {
    let index = read_doc(&dir.join("index.json"))?;
    let blobs = dir.join("blobs/sha256");
    resolve_oci(&index, tag, &|d: &Digest| blobs.join(d.hex()))
}

/// Streams every regular file of the archive into `work/blobs/<sha256>`;
/// returns archive path → digest. Symlinks (old `docker save` layouts link
/// `<id>/layer.tar` to the blob) are resolved after the pass.
fn unpack_archive(
    path: &Path,
    work: &Path,
    progress: &Progress,
) -> Result<HashMap<String, Digest>, StoreError> {
    let blobs = work.join("blobs");
    fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
    let file = File::open(path).map_err(io_err("opening", path))?;
    let len = file.metadata().map_err(io_err("reading", path))?.len();
    let bar = progress.bytes(len, "reading archive".into());
    let (mut archive, meter) = tarbound::archive(BufReader::new(bar.wrap_read(file)));
    let format = |e: io::Error| {
        StoreError::Format(format!(
            "{} is not a valid tar archive: {e}",
            path.display()
        ))
    };
    let mut map = HashMap::new();
    let mut links = Vec::new();
    for entry in tarbound::entries(&mut archive, &meter).map_err(format)? {
        let mut entry = entry.map_err(format)?;
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let tmp = blobs.join("incoming");
                let mut out = BufWriter::new(File::create(&tmp).map_err(io_err("creating", &tmp))?);
                let (digest, _) =
                    oci::copy_hashed(&mut entry, &mut out, u64::MAX, |_| {}).map_err(format)?;
                out.flush().map_err(io_err("writing", &tmp))?;
                let dest = blobs.join(digest.hex());
                fs::rename(&tmp, &dest).map_err(io_err("writing", &dest))?;
                map.insert(name, digest);
            }
            tar::EntryType::Symlink => {
                if let Some(target) = entry.link_name_bytes() {
                    links.push((name, String::from_utf8_lossy(&target).into_owned()));
                }
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    for (name, target) in links {
        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
        let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
        for p in target.split('/') {
            match p {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                p => parts.push(p),
            }
        }
        if let Some(d) = map.get(&parts.join("/")).cloned() {
            map.insert(name, d);
        }
    }
    Ok(map)
}

fn resolve_archive(path: &Path, work: &Path, progress: &Progress) -> Result<Resolved, StoreError> {
    let map = unpack_archive(path, work, progress)?;
    let blobs = work.join("blobs");
    let blob_of = |name: &str| -> Result<PathBuf, StoreError> {
        map.get(name)
            .map(|d| blobs.join(d.hex()))
            .ok_or_else(|| StoreError::Format(format!("the archive has no {name}")))
    };
    if let Some(manifest) = map.get("manifest.json") {
        let bytes = read_doc(&blobs.join(manifest.hex()))?;
        let entries: Vec<DockerSaveEntry> = oci::parse(&bytes, "docker manifest.json")?;
        let [entry] = entries.as_slice() else {
            return Err(StoreError::Format(format!(
                "the docker archive holds {} images; import one at a time",
                entries.len()
            )));
        };
        let config_digest = map
            .get(entry.config.trim_start_matches("./"))
            .cloned()
            .ok_or_else(|| StoreError::Format(format!("the archive has no {}", entry.config)))?;
        let config: ImageConfig =
            oci::parse(&read_doc(&blobs.join(config_digest.hex()))?, "image config")?;
        let layers = entry
            .layers
            .iter()
            .map(|l| blob_of(l.trim_start_matches("./")))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Resolved {
            config_digest,
            config,
            layers,
        });
    }
    if map.contains_key("index.json") {
        let index = read_doc(&blob_of("index.json")?)?;
        // Every blob was stored under the digest of its bytes: a member
        // named after another digest simply is not found.
        return resolve_oci(&index, None, &|d: &Digest| blobs.join(d.hex()));
    }
    Err(StoreError::Format(format!(
        "{} is neither an OCI archive (index.json) nor a docker save archive (manifest.json)",
        path.display()
    )))
}

enum RegistryResult {
    Stored(StoredImage),
    Fetched(Resolved),
}

fn resolve_registry(
    reference: &Reference,
    work: &Path,
    options: &ImportOptions,
    progress: &Progress,
    existing: &dyn Fn(&Digest) -> Option<StoredImage>,
) -> Result<RegistryResult, StoreError> {
    let mut client = Client::new(reference, &options.registry)?;
    let (mut doc, _) = client.manifest(&reference.reference())?;
    for _ in 0..MAX_INDEX_DEPTH {
        match AnyManifest::parse(&doc)? {
            Parsed::Index(list) => {
                let desc = oci::select(&list, None)?;
                doc = client.manifest(&desc.digest.to_string())?.0;
            }
            Parsed::Image { config, layers } => {
                let config_bytes = client.document_blob(&config.digest)?;
                if let Some(image) = existing(&config.digest) {
                    return Ok(RegistryResult::Stored(image));
                }
                let parsed: ImageConfig = oci::parse(&config_bytes, "image config")?;
                let blobs = work.join("blobs");
                fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
                let mut paths = Vec::new();
                for layer in &layers {
                    let path = blobs.join(layer.digest.hex());
                    if !path.exists() {
                        let short = &layer.digest.hex()[..12];
                        let bar = progress.bytes(layer.size, format!("pulling {short}"));
                        client.blob(&layer.digest, layer.size, &path, |n| bar.inc(n))?;
                        bar.finish_and_clear();
                    }
                    paths.push(path);
                }
                return Ok(RegistryResult::Fetched(Resolved {
                    config_digest: config.digest,
                    config: parsed,
                    layers: paths,
                }));
            }
        }
    }
    Err(StoreError::Format("indexes nest too deeply".into()))
}

/// Flattens the layers and writes `work/out/{rootfs.erofs,image.json}`.
fn convert(
    resolved: &Resolved,
    work: &Path,
    name: &str,
    options: &ImportOptions,
    progress: &Progress,
) -> Result<StoredImage, StoreError> {
    let diff_ids = &resolved.config.rootfs.diff_ids;
    if diff_ids.len() != resolved.layers.len() {
        return Err(StoreError::Format(format!(
            "the config lists {} layers, the manifest {}",
            diff_ids.len(),
            resolved.layers.len()
        )));
    }
    let mut tree = Tree::new();
    let mut sources = Vec::new();
    let mut budget = Budget::default();
    for (i, blob) in resolved.layers.iter().enumerate() {
        let step = progress.step(format!(
            "flattening layer {}/{}",
            i + 1,
            resolved.layers.len()
        ));
        let spool = work.join(format!("layer-{i}.tar"));
        let source = u32::try_from(i).map_err(|_| StoreError::Format("too many layers".into()))?;
        let (spooled, diff_id) = layer::apply_layer(
            &mut tree,
            i,
            blob,
            &spool,
            source,
            &options.limits,
            &mut budget,
        )?;
        step.finish_and_clear();
        if diff_id != diff_ids[i] {
            return Err(StoreError::DiffId {
                layer: i,
                expected: diff_ids[i].clone(),
                actual: diff_id,
            });
        }
        sources.push(if spooled { spool } else { blob.clone() });
    }
    let account = |path: &str| {
        runconfig::read_image_file(&tree, &sources, path, runconfig::MAX_ACCOUNT_FILE)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let container = resolved.config.config.clone().unwrap_or_default();
    let run = RunConfig::resolve(&container, &account("/etc/passwd"), &account("/etc/group"))?;
    let out = work.join("out");
    fs::create_dir_all(&out).map_err(io_err("creating", &out))?;
    let step = progress.step("writing erofs base image".into());
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(
        &Digest::of(resolved.config_digest.hex().as_bytes())
            .hex()
            .as_bytes()[..16],
    );
    let stats = erofs::write_image(&tree, &sources, &out.join("rootfs.erofs"), uuid)?;
    step.finish_and_clear();
    let image = StoredImage {
        id: resolved.config_digest.clone(),
        refs: vec![name.to_owned()],
        run,
        layers: diff_ids.clone(),
        rootfs_bytes: stats.bytes,
        inodes: stats.inodes,
    };
    write_json(&out.join("image.json"), &image, &out)?;
    for spool in sources.iter().filter(|s| s.starts_with(work)) {
        let _ = fs::remove_file(spool);
    }
    Ok(image)
}
