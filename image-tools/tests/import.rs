//! `little-image import` on synthetic multi-layer images (whiteouts, opaque
//! directories, links, devices, owners, three compressions), hostile
//! layers, and the offline test images built by `test-images/build.sh`,
//! checked against `umoci unpack` as the oracle. The base images are read
//! back with `fsck.erofs --extract` (erofs-utils), which also checks them.
//! Registry pulls run against a real `docker-registry`: plain HTTP, HTTPS
//! with a private CA, htpasswd basic auth and bearer tokens
//! (`local_registry`).

// CONTRIBUTING.md: tests may unwrap.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use image_tools::layer::{apply_tar_bytes, Budget, LayerError, Limits};
use image_tools::oci::{ContainerConfig, Digest};
use image_tools::registry::{ClientOptions, RegistryError};
use image_tools::store::{ImportOptions, Source, Store, StoreError, StoredImage};
use image_tools::test_utils::{extend_layout, write_layout, Compress, LayerBuilder};
use image_tools::tree::{Kind, Tree};
use local_registry::{htpasswd, run_tool, Registry, ServerPki, TokenServer};

mod local_registry;

fn quiet() -> ImportOptions {
    ImportOptions {
        quiet: true,
        ..ImportOptions::default()
    }
}

/// Extracts a base image with fsck.erofs, which checks it on the way.
fn extract(image: &Path, to: &Path) {
    run_tool(
        Command::new("fsck.erofs")
            .arg(format!("--extract={}", to.display()))
            .arg(image),
        "erofs-utils",
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The raw `i_mode` of `path` in an erofs image (type and all 12 bits).
fn raw_mode(image: &Path, path: &str) -> u16 {
    let out = Command::new("dump.erofs")
        .arg(format!("--path={path}"))
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let nid: u64 = text
        .split("NID: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("dump.erofs {path}: {text}"));
    let file = std::fs::File::open(image).unwrap();
    let mut raw = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, nid * 32 + 4).unwrap();
    u16::from_le_bytes(raw)
}

/// path → (type, mode, uid, gid, link target, rdev); the contents of
/// regular files are compared by `differing_contents`.
type Listing = BTreeMap<String, (char, u32, u32, u32, Vec<u8>, u64)>;

fn listing(root: &Path) -> Listing {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let (kind, target) = if ft.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
            ('d', Vec::new())
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&path).unwrap();
            ('l', t.into_os_string().into_encoded_bytes())
        } else if ft.is_file() {
            ('f', Vec::new())
        } else if ft.is_char_device() {
            ('c', Vec::new())
        } else if ft.is_block_device() {
            ('b', Vec::new())
        } else {
            ('p', Vec::new())
        };
        // fsck.erofs 1.5 chowns after chmod, which drops setuid/setgid:
        // those bits are checked on the raw inode instead (raw_mode).
        let mode = if ft.is_symlink() {
            0
        } else {
            meta.mode() & 0o1777
        };
        out.insert(
            format!("/{}", rel.display()),
            (kind, mode, meta.uid(), meta.gid(), target, meta.rdev()),
        );
    }
    out
}

/// Regular files of `list` whose bytes differ between trees `a` and `b`:
/// compared byte for byte, as hashing hundreds of MB is slow unoptimized.
fn differing_contents(list: &Listing, a: &Path, b: &Path) -> Vec<String> {
    list.iter()
        .filter(|(_, v)| v.0 == 'f')
        .map(|(p, _)| p)
        .filter(|p| {
            let rel = p.trim_start_matches('/');
            std::fs::read(a.join(rel)).unwrap() != std::fs::read(b.join(rel)).unwrap()
        })
        .take(10)
        .cloned()
        .collect()
}

/// Three layers, one per compression, exercising every entry type and
/// both whiteout forms.
fn synthetic_layers() -> Vec<(Vec<u8>, Compress)> {
    let base = LayerBuilder::new()
        .dir("etc", 0o755, 0, 0)
        .file("etc/keep", 0o644, 0, 0, b"old")
        .file("etc/gone", 0o644, 0, 0, b"x")
        .dir("opq", 0o700, 0, 0)
        .file("opq/old", 0o644, 0, 0, b"old")
        .dir("data", 0o755, 1000, 2000)
        .file("data/big", 0o4755, 1000, 2000, &vec![b'z'; 10_000])
        .symlink("lib", "usr/lib")
        .dir("usr/lib", 0o755, 0, 0)
        .char_dev("dev/null", 1, 3)
        .file_with_xattrs("bin/ping", b"elf", &[("security.capability", b"\x01\x02")])
        .finish();
    let middle = LayerBuilder::new()
        .whiteout("etc/gone")
        .opaque("opq")
        .file("opq/new", 0o600, 7, 8, b"new")
        .hardlink("data/link", b"data/big")
        .finish();
    let top = LayerBuilder::new()
        .file("etc/keep", 0o640, 0, 42, b"newer")
        .finish();
    vec![
        (base, Compress::None),
        (middle, Compress::Gzip),
        (top, Compress::Zstd),
    ]
}

#[test]
fn layers_flatten_with_whiteouts_links_and_owners() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let config = ContainerConfig {
        entrypoint: Some(vec!["/bin/ping".into()]),
        user: Some("1000:2000".into()),
        ..ContainerConfig::default()
    };
    let id = write_layout(&layout, &synthetic_layers(), &config);
    let store = Store::new(dir.path().join("store"));
    let image = store
        .import(&Source::Layout(layout.clone(), None), "synthetic", &quiet())
        .unwrap();
    assert_eq!(image.id, id);
    assert_eq!((image.run.uid, image.run.gid), (1000, 2000));

    let out = dir.path().join("x");
    extract(&store.rootfs(&id), &out);
    let list = listing(&out);
    assert!(!list.contains_key("/etc/gone"), "whiteout: {list:?}");
    assert!(!list.contains_key("/opq/old"), "opaque dir: {list:?}");
    assert_eq!(std::fs::read(out.join("opq/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(out.join("etc/keep")).unwrap(), b"newer");
    assert_eq!(
        std::fs::read(out.join("data/link")).unwrap(),
        vec![b'z'; 10_000]
    );
    assert_eq!(
        std::fs::read_link(out.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    assert_eq!(list["/dev/null"].0, 'c');
    assert_eq!(list["/dev/null"].5, libc::makedev(1, 3));
    assert_eq!(raw_mode(&store.rootfs(&id), "/data/big"), 0o104755);
    assert_eq!(list["/data/big"].1, 0o755);
    assert_eq!(list["/etc/keep"].1, 0o640);
    assert_eq!(list["/opq"].1, 0o700);
    if is_root() {
        // fsck.erofs restores owners only when it runs as root.
        assert_eq!((list["/data/big"].2, list["/data/big"].3), (1000, 2000));
        assert_eq!((list["/opq/new"].2, list["/opq/new"].3), (7, 8));
        assert_eq!(list["/etc/keep"].3, 42);
    }

    // The same image again converts nothing and records the second name.
    let again = store
        .import(&Source::Layout(layout, None), "again", &quiet())
        .unwrap();
    assert_eq!(again.refs, ["again", "synthetic"]);
    assert_eq!(store.list().unwrap().len(), 1);
    store.remove("again").unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn an_extended_layout_adds_a_layer_and_keeps_the_rest_of_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let config = ContainerConfig {
        entrypoint: Some(vec!["/bin/ping".into()]),
        user: Some("1000:2000".into()),
        env: Some(vec!["A=1".into()]),
        ..ContainerConfig::default()
    };
    let base_id = write_layout(&base, &synthetic_layers(), &config);
    let top = LayerBuilder::new()
        .dir("probe", 0o755, 0, 0)
        .file("probe/run.sh", 0o755, 0, 0, b"#!/bin/sh\n")
        .file("etc/keep", 0o644, 0, 0, b"replaced")
        .finish();
    let variant = dir.path().join("variant");
    let id = extend_layout(&base, &variant, &top, |c| {
        c.entrypoint = Some(vec!["/probe/run.sh".into()]);
    });
    assert_ne!(id, base_id);

    let store = Store::new(dir.path().join("store"));
    let image = store
        .import(&Source::Layout(variant, None), "variant", &quiet())
        .unwrap();
    assert_eq!(image.id, id);
    assert_eq!(image.layers.len(), 4, "three base layers and the new one");
    assert_eq!(image.run.entrypoint, ["/probe/run.sh"]);
    assert_eq!((image.run.uid, image.run.gid), (1000, 2000), "User kept");
    assert!(
        image.run.env.contains(&"A=1".to_owned()),
        "{:?}",
        image.run.env
    );
    let out = dir.path().join("x");
    extract(&store.rootfs(&id), &out);
    assert_eq!(
        std::fs::read(out.join("probe/run.sh")).unwrap(),
        b"#!/bin/sh\n"
    );
    assert_eq!(std::fs::read(out.join("etc/keep")).unwrap(), b"replaced");
    assert_eq!(std::fs::read(out.join("opq/new")).unwrap(), b"new");
}

#[test]
fn the_index_keeps_hard_links_and_xattrs() {
    let mut tree = Tree::new();
    let mut budget = Budget::default();
    for (i, (tar, _)) in synthetic_layers().iter().enumerate() {
        apply_tar_bytes(&mut tree, i, tar, &Limits::default(), &mut budget).unwrap();
    }
    let big = tree.lookup(&[b"data", b"big"]).unwrap();
    assert_eq!(tree.lookup(&[b"data", b"link"]), Some(big));
    assert_eq!(tree.nodes[big].meta.mode, 0o4755);
    let ping = tree.lookup(&[b"bin", b"ping"]).unwrap();
    assert_eq!(
        tree.nodes[ping].meta.xattrs,
        [(b"security.capability".to_vec(), b"\x01\x02".to_vec())]
    );
}

fn apply(tar: &[u8], limits: &Limits) -> Result<Tree, LayerError> {
    let mut tree = Tree::new();
    apply_tar_bytes(&mut tree, 0, tar, limits, &mut Budget::default())?;
    Ok(tree)
}

#[test]
fn hostile_layers_fail_cleanly_or_stay_inside() {
    let l = Limits::default();
    let escape = LayerBuilder::new()
        .raw_file(b"../../etc/x", 0o644, 0, 0, b"x")
        .finish();
    assert!(matches!(apply(&escape, &l), Err(LayerError::Path { .. })));
    let link_out = LayerBuilder::new()
        .hardlink("x", b"../../etc/shadow")
        .finish();
    assert!(matches!(apply(&link_out, &l), Err(LayerError::Path { .. })));
    let link_missing = LayerBuilder::new().hardlink("x", b"etc/shadow").finish();
    assert!(matches!(
        apply(&link_missing, &l),
        Err(LayerError::BadHardLink { .. })
    ));
    let bad_whiteout = LayerBuilder::new()
        .raw_file(b"a/.wh...", 0o644, 0, 0, b"")
        .finish();
    assert!(matches!(
        apply(&bad_whiteout, &l),
        Err(LayerError::BadWhiteout { .. })
    ));
    let truncated = LayerBuilder::new()
        .file("ok", 0o644, 0, 0, b"1")
        .truncated_file("big", 1 << 30);
    assert!(matches!(apply(&truncated, &l), Err(LayerError::Tar { .. })));

    // Absolute paths land inside; a symlink to the host's /etc followed by
    // an entry "through" it becomes a real directory of the image.
    let tricky = LayerBuilder::new()
        .raw_file(b"/abs", 0o644, 0, 0, b"a")
        .symlink("evil", "/etc")
        .file("evil/passwd", 0o644, 0, 0, b"p")
        .finish();
    let tree = apply(&tricky, &l).unwrap();
    assert!(tree.lookup(&[b"abs"]).is_some());
    let evil = tree.lookup(&[b"evil"]).unwrap();
    assert!(matches!(tree.nodes[evil].kind, Kind::Dir(_)));
    assert!(tree.lookup(&[b"evil", b"passwd"]).is_some());

    // Decompression bombs: unpacked bytes and entry counts are capped.
    let big = LayerBuilder::new()
        .file("f", 0o644, 0, 0, &vec![0u8; 1 << 20])
        .finish();
    let small = Limits {
        max_unpacked_bytes: 64 << 10,
        ..Limits::default()
    };
    assert!(matches!(apply(&big, &small), Err(LayerError::TooLarge(_))));
    let mut many = LayerBuilder::new();
    for i in 0..100 {
        many.file(&format!("f{i}"), 0o644, 0, 0, b"");
    }
    let few = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    assert!(matches!(
        apply(&many.finish(), &few),
        Err(LayerError::TooManyEntries(10))
    ));
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let layers = vec![(
        LayerBuilder::new().file("a", 0o644, 0, 0, b"a").finish(),
        Compress::Gzip,
    )];
    let config = ContainerConfig {
        cmd: Some(vec!["/a".into()]),
        ..ContainerConfig::default()
    };
    write_layout(&layout, &layers, &config);
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut tampered = bytes.clone();
            let last = tampered.len() - 10;
            tampered[last] ^= 0xff;
            std::fs::write(&path, tampered).unwrap();
        }
    }
    let store = Store::new(dir.path().join("store"));
    let err = store
        .import(&Source::Layout(layout, None), "x", &quiet())
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Oci(image_tools::oci::OciError::DigestMismatch { .. })
        ),
        "{err:?}"
    );
}

/// The test images `scripts/setup.sh` builds (image-tools/test-images/build.sh).
pub fn test_images() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("test-images");
    assert!(
        dir.join("redis.docker.tar").exists(),
        "{} is missing: run image-tools/test-images/build.sh (scripts/setup.sh does)",
        dir.display()
    );
    dir
}

#[test]
fn real_images_match_umoci_unpack_from_every_input_format() {
    let images = test_images();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("store"));
    // postgresql (460 MB unpacked, 11k entries) only from its layout: the
    // archive formats are covered by the other two.
    for (name, every_format) in [("httpd", true), ("redis", true), ("postgresql", false)] {
        let from_layout = store
            .import(
                &Source::Layout(images.join(format!("{name}.oci")), None),
                name,
                &quiet(),
            )
            .unwrap();
        if every_format {
            let archive = images.join(format!("{name}.docker.tar"));
            let from_docker = store
                .import(&Source::Archive(archive), "docker", &quiet())
                .unwrap();
            assert_eq!(from_layout.id, from_docker.id, "one image, one base image");
            // An OCI archive: a tar of the layout.
            let oci_tar = dir.path().join(format!("{name}.oci.tar"));
            run_tool(
                Command::new("tar")
                    .arg("-C")
                    .arg(images.join(format!("{name}.oci")))
                    .arg("-cf")
                    .arg(&oci_tar)
                    .arg("."),
                "tar",
            );
            let from_oci_tar = store
                .import(&Source::Archive(oci_tar), "oci-archive", &quiet())
                .unwrap();
            assert_eq!(from_oci_tar.id, from_layout.id);
        }

        let tree = dir.path().join(format!("{name}-ours"));
        extract(&store.rootfs(&from_layout.id), &tree);
        let bundle = dir.path().join(format!("{name}-umoci"));
        let mut umoci = Command::new("umoci");
        umoci.arg("unpack");
        if !is_root() {
            umoci.arg("--rootless");
        }
        run_tool(
            umoci
                .arg("--image")
                .arg(format!(
                    "{}:latest",
                    images.join(format!("{name}.oci")).display()
                ))
                .arg(&bundle),
            "umoci",
        );
        let (ours, theirs) = (listing(&tree), listing(&bundle.join("rootfs")));
        let differ: Vec<_> = theirs
            .iter()
            .filter(|(p, v)| ours.get(*p) != Some(v))
            .map(|(p, v)| (p, v, ours.get(p)))
            .take(10)
            .collect();
        assert!(differ.is_empty(), "{name}: differs from umoci: {differ:?}");
        let extra: Vec<_> = ours
            .keys()
            .filter(|p| !theirs.contains_key(*p))
            .take(10)
            .collect();
        assert!(extra.is_empty(), "{name}: not in umoci's tree: {extra:?}");
        let differ = differing_contents(&theirs, &tree, &bundle.join("rootfs"));
        assert!(differ.is_empty(), "{name}: contents differ: {differ:?}");
        if name == "postgresql" {
            // $PGDATA, made by initdb at build time, is postgres's alone.
            let data = &ours["/var/lib/postgresql/data"];
            assert_eq!((data.0, data.1), ('d', 0o700));
            if is_root() {
                assert_eq!((data.2, data.3), (from_layout.run.uid, from_layout.run.gid));
            }
            assert_eq!(
                std::fs::read(tree.join("var/lib/postgresql/data/PG_VERSION")).unwrap(),
                b"15\n"
            );
        }
        // Both trees are as large as the image: one image at a time.
        std::fs::remove_dir_all(&tree).unwrap();
        std::fs::remove_dir_all(&bundle).unwrap();
    }
    let redis_id = store.find("redis").unwrap().id;
    assert_eq!(
        raw_mode(&store.rootfs(&redis_id), "/usr/bin/passwd"),
        0o104755
    );
    let httpd = store.find("httpd").unwrap();
    assert_eq!(
        (httpd.run.uid, httpd.run.gid, httpd.run.groups.clone()),
        (1000, 1000, vec![50])
    );
    assert_eq!(httpd.run.exposed_ports, ["8080/tcp"]);
    let redis = store.find("redis").unwrap();
    assert_eq!(redis.run.entrypoint, ["redis-server"]);
    assert_ne!(redis.run.uid, 0, "redis runs as its own user");
    let postgres = store.find("postgresql").unwrap();
    assert_eq!(
        postgres.run.entrypoint,
        ["/usr/lib/postgresql/15/bin/postgres"]
    );
    assert_ne!(postgres.run.uid, 0, "postgres runs as its own user");
    assert_eq!(postgres.run.exposed_ports, ["5432/tcp"]);
    assert!(postgres
        .run
        .env
        .iter()
        .any(|e| e == "PGDATA=/var/lib/postgresql/data"));
    assert_eq!(postgres.run.stop_signal.as_deref(), Some("SIGINT"));
}

/// Imports registry `reference` with `registry` options.
fn pull(
    store: &Store,
    reference: &str,
    registry: ClientOptions,
) -> Result<StoredImage, StoreError> {
    let options = ImportOptions {
        registry,
        ..quiet()
    };
    store.import(&Source::parse(reference).unwrap(), reference, &options)
}

/// Client options that ignore the machine's `/etc/docker/certs.d`.
fn hermetic(dir: &Path) -> ClientOptions {
    ClientOptions {
        certs_dir: Some(dir.join("no-certs.d")),
        ..ClientOptions::default()
    }
}

/// The image id of the httpd test image imported from its OCI layout.
fn local_httpd(store: &Store) -> Digest {
    let layout = test_images().join("httpd.oci");
    store
        .import(&Source::Layout(layout, None), "local", &quiet())
        .unwrap()
        .id
}

/// An error and its causes on one line, as the CLI prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

#[test]
fn images_pull_from_a_local_registry_over_http() {
    let images = test_images();
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path(), None, "");
    let reference = registry.push(
        &images.join("httpd.oci"),
        "little/httpd:v1",
        &["--dest-tls-verify=false"],
    );

    let store = Store::new(dir.path().join("store"));
    let pulled = pull(&store, &reference, hermetic(dir.path())).unwrap();
    assert_eq!(
        pulled.id,
        local_httpd(&store),
        "same config digest, converted once"
    );
    assert_eq!(store.find("local").unwrap().refs.len(), 2);
    let ours = dir.path().join("x");
    extract(&store.rootfs(&pulled.id), &ours);
    assert!(ours.join("www/index.html").exists());

    let missing = format!("{}/little/none:v1", registry.host());
    let err = pull(&store, &missing, hermetic(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::Registry(_)), "{err:?}");
}

#[test]
fn images_pull_over_https_trusting_a_private_ca() {
    let images = test_images();
    let dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::new(dir.path());
    let registry = Registry::start(dir.path(), Some(&pki), "");
    let ca_dir = pki.ca_dir().to_str().unwrap();
    let reference = registry.push(
        &images.join("httpd.oci"),
        "little/httpd:v1",
        &["--dest-cert-dir", ca_dir],
    );
    let store = Store::new(dir.path().join("store"));

    // HTTPS without the CA: a certificate error, and no fallback to HTTP.
    let tls_only = ClientOptions {
        tls: true,
        ..hermetic(dir.path())
    };
    let err = pull(&store, &reference, tls_only).unwrap_err();
    assert!(
        matches!(&err, StoreError::Registry(RegistryError::Tls { url, .. })
            if url.starts_with(&format!("https://{}/", registry.host()))),
        "{err:?}"
    );
    let msg = chain(&err);
    assert!(
        msg.contains("invalid peer certificate: UnknownIssuer"),
        "{msg}"
    );

    let with_ca = ClientOptions {
        ca_certs: vec![pki.ca.clone()],
        ..hermetic(dir.path())
    };
    let pulled = pull(&store, &reference, with_ca).unwrap();
    assert_eq!(pulled.id, local_httpd(&store));

    // Docker's convention: a CA in certs.d/<host:port>/ means HTTPS with it.
    let certs_d = dir.path().join("certs.d");
    std::fs::create_dir_all(certs_d.join(registry.host())).unwrap();
    std::fs::copy(&pki.ca, certs_d.join(registry.host()).join("ca.crt")).unwrap();
    let docker_style = ClientOptions {
        certs_dir: Some(certs_d),
        ..ClientOptions::default()
    };
    assert_eq!(
        pull(&store, &reference, docker_style).unwrap().id,
        pulled.id
    );

    // The CLI: --ca-cert, $LITTLE_REGISTRY_CA, and the message without a CA.
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_little-image"));
        cmd.arg("--store")
            .arg(dir.path().join("store"))
            .args(["--quiet", "import"])
            .args(args)
            .arg(&reference)
            .env_remove("LITTLE_REGISTRY_CA")
            .env_remove("LITTLE_REGISTRY_AUTH");
        cmd
    };
    let ca = pki.ca.to_str().unwrap();
    let mut by_env = cli(&[]);
    by_env.env("LITTLE_REGISTRY_CA", ca);
    for mut cmd in [cli(&["--ca-cert", ca]), by_env] {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            pulled.id.to_string()
        );
    }
    let out = cli(&["--tls"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("TLS connection for https://")
            && stderr.contains("failed: invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );
}

#[test]
fn images_pull_with_basic_auth_over_https() {
    let images = test_images();
    let dir = tempfile::tempdir().unwrap();
    let pki = ServerPki::new(dir.path());
    let users = dir.path().join("htpasswd");
    htpasswd(&users, "alice", "s3cret");
    let auth = format!(
        "  htpasswd:\n    realm: little-test\n    path: {}\n",
        users.display()
    );
    let registry = Registry::start(dir.path(), Some(&pki), &auth);
    let reference = registry.push(
        &images.join("httpd.oci"),
        "little/httpd:v1",
        &[
            "--dest-cert-dir",
            pki.ca_dir().to_str().unwrap(),
            "--dest-creds",
            "alice:s3cret",
        ],
    );
    let store = Store::new(dir.path().join("store"));
    let with = |credentials: Option<&str>| ClientOptions {
        ca_certs: vec![pki.ca.clone()],
        credentials: credentials.map(str::to_owned),
        ..hermetic(dir.path())
    };

    let err = pull(&store, &reference, with(None)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Registry(RegistryError::NoCredentials { .. })
        ),
        "{err:?}"
    );
    let err = pull(&store, &reference, with(Some("alice:wrong"))).unwrap_err();
    assert!(
        matches!(&err, StoreError::Registry(RegistryError::Refused { url }) if url.contains("/little/httpd/")),
        "{err:?}"
    );
    assert!(chain(&err).contains("refused the credentials"), "{err}");
    let pulled = pull(&store, &reference, with(Some("alice:s3cret"))).unwrap();
    assert_eq!(pulled.id, local_httpd(&store));

    // The CLI finds the credentials where `docker login` leaves them.
    use base64::Engine as _;
    let docker = dir.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let cli = |config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_little-image"))
            .arg("--store")
            .arg(dir.path().join("store-cli"))
            .args(["--quiet", "import", "--ca-cert"])
            .arg(&pki.ca)
            .arg(&reference)
            .env_remove("LITTLE_REGISTRY_AUTH")
            .env("DOCKER_CONFIG", config)
            .output()
            .unwrap()
    };
    let out = cli(&docker);
    assert!(
        !out.status.success(),
        "no config.json: no credentials: {out:?}"
    );
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let out = cli(&docker);
    assert!(
        out.status.success(),
        "credentials from config.json: {out:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        pulled.id.to_string()
    );
}

#[test]
fn images_pull_with_bearer_tokens_from_a_token_server() {
    let images = test_images();
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(dir.path(), "alice", "s3cret");
    let registry = Registry::start(dir.path(), None, &tokens.auth_config());
    let reference = registry.push(
        &images.join("httpd.oci"),
        "little/httpd:v1",
        &["--dest-tls-verify=false", "--dest-creds", "alice:s3cret"],
    );
    let pushed = tokens.take_scopes();
    assert!(
        pushed
            .iter()
            .any(|s| s.contains("repository:little/httpd:") && s.contains("push")),
        "skopeo pushed with a token: {pushed:?}"
    );
    let store = Store::new(dir.path().join("store"));
    let with = |credentials: Option<&str>| ClientOptions {
        credentials: credentials.map(str::to_owned),
        ..hermetic(dir.path())
    };

    let pulled = pull(&store, &reference, with(Some("alice:s3cret")))
        .unwrap_or_else(|e| panic!("{}\nregistry log:\n{}", chain(&e), registry.log()));
    assert_eq!(pulled.id, local_httpd(&store));
    // One token, asked for with the scope of the registry's challenge.
    assert_eq!(tokens.take_scopes(), ["repository:little/httpd:pull"]);

    let err = pull(&store, &reference, with(Some("alice:wrong"))).unwrap_err();
    assert!(
        matches!(&err, StoreError::Registry(RegistryError::Refused { url }) if url.starts_with(&tokens.realm())),
        "{err:?}"
    );
    let err = pull(&store, &reference, with(None)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Registry(RegistryError::NoCredentials { url }) if url.starts_with(&tokens.realm())),
        "{err:?}"
    );
}
