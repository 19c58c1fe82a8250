//! The volume store against real `mkfs.ext4` in a temporary home.

use super::*;

fn store() -> (tempfile::TempDir, Volumes) {
    let dir = tempfile::tempdir().expect("tempdir");
    let volumes = Volumes::new(dir.path());
    (dir, volumes)
}

#[test]
fn a_created_volume_is_a_sparse_owner_only_ext4_image() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, volumes) = store();
    let info = volumes.create("data", 64 << 20).expect("create");
    assert_eq!(info.size, 64 << 20);
    assert!(
        info.allocated < info.size,
        "sparse: {} of {} bytes allocated",
        info.allocated,
        info.size
    );
    let path = volumes.open("data").expect("an ext4 image");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
    assert!(matches!(
        volumes.create("data", 64 << 20),
        Err(VolumeError::Exists(_))
    ));
}

#[test]
fn listing_names_each_volume_and_who_uses_it() {
    let (_dir, volumes) = store();
    assert!(volumes.list(|_| None).expect("empty list").is_empty());
    volumes.create("b", MIN_SIZE).expect("create b");
    volumes.create("a", MIN_SIZE).expect("create a");
    let listed = volumes
        .list(|name| (name == "b").then(|| "web".to_owned()))
        .expect("list");
    let names: Vec<(&str, Option<&str>)> = listed
        .iter()
        .map(|v| (v.name.as_str(), v.app.as_deref()))
        .collect();
    assert_eq!(names, [("a", None), ("b", Some("web"))]);
}

#[test]
fn a_volume_in_use_is_not_removed() {
    let (_dir, volumes) = store();
    volumes.create("data", MIN_SIZE).expect("create");
    let e = volumes
        .remove("data", Some("pg".into()))
        .expect_err("in use");
    assert!(e.to_string().contains("used by app \"pg\""), "{e}");
    assert!(volumes.open("data").is_ok(), "still there");
    volumes.remove("data", None).expect("remove");
    assert!(matches!(
        volumes.open("data"),
        Err(VolumeError::NotFound(_))
    ));
    assert!(matches!(
        volumes.remove("data", None),
        Err(VolumeError::NotFound(_))
    ));
}

#[test]
fn bad_names_sizes_and_files_are_refused() {
    let (_dir, volumes) = store();
    for name in ["", "../x", "a/b", &"x".repeat(33)] {
        assert!(
            matches!(volumes.create(name, MIN_SIZE), Err(VolumeError::Name(_))),
            "{name:?}"
        );
    }
    assert!(matches!(
        volumes.create("tiny", 4096),
        Err(VolumeError::Size(_))
    ));
    assert!(matches!(
        volumes.open("missing"),
        Err(VolumeError::NotFound(_))
    ));
    // A file of another kind where a volume should be.
    std::fs::create_dir_all(&volumes.dir).expect("dir");
    std::fs::write(volumes.path("junk"), vec![0u8; 4096]).expect("write");
    let e = volumes.open("junk").expect_err("not ext4");
    assert!(matches!(e, VolumeError::NotExt4(..)), "{e}");
}

#[test]
fn guest_paths_must_be_absolute_and_plain() {
    for bad in [
        "d:",
        "d:/",
        "d:rel",
        "d:/a/../b",
        "d:/a//b",
        "d:/a/./b",
        "d:/a:b",
        "bad name:/x",
    ] {
        assert!(bad.parse::<VolumeMount>().is_err(), "{bad:?}");
    }
    let ok: VolumeMount = "d:/var/lib/data".parse().expect("valid");
    assert_eq!(ok.to_string(), "d:/var/lib/data");
}

#[test]
fn an_export_imports_as_the_same_sparse_image_and_bad_archives_change_nothing() {
    let (dir, volumes) = store();
    let scratch = dir.path().join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    let made = volumes.create("data", 256 << 20).expect("create");
    let archive = dir.path().join("data.tar");
    volumes.export("data", &archive).expect("export");
    let archived = std::fs::metadata(&archive).unwrap().len();
    assert!(
        archived < made.size / 4,
        "the archive keeps the holes: {archived} bytes for a {} byte image",
        made.size
    );

    let copy = volumes.import("copy", &archive, &scratch).expect("import");
    assert_eq!(copy.size, made.size);
    assert!(copy.allocated < copy.size / 4, "still sparse: {copy:?}");
    let original = std::fs::read(volumes.path("data")).unwrap();
    assert!(original == std::fs::read(volumes.path("copy")).unwrap());
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch cleaned"
    );

    // Not an archive; two members; a member that is not ext4: each refused,
    // and the volume they would replace is left as it was.
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar archive at all").unwrap();
    let e = volumes.import("copy", &junk, &scratch).unwrap_err();
    assert!(matches!(e, VolumeError::Archive(..)), "{e}");
    let two = dir.path().join("two.tar");
    let status = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&two)
        .arg("-C")
        .arg(dir.path())
        .args(["data.tar", "junk.tar"])
        .status()
        .unwrap();
    assert!(status.success());
    let e = volumes.import("copy", &two, &scratch).unwrap_err();
    assert!(e.to_string().contains("2 members"), "{e}");
    let not_ext4 = dir.path().join("zeros.tar");
    std::fs::write(dir.path().join("zeros.ext4"), vec![0u8; 16 << 20]).unwrap();
    let status = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&not_ext4)
        .arg("-C")
        .arg(dir.path())
        .arg("zeros.ext4")
        .status()
        .unwrap();
    assert!(status.success());
    let e = volumes.import("copy", &not_ext4, &scratch).unwrap_err();
    assert!(e.to_string().contains("superblock"), "{e}");
    assert!(original == std::fs::read(volumes.path("copy")).unwrap());
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch cleaned"
    );
    assert!(matches!(
        volumes.export("missing", &archive),
        Err(VolumeError::NotFound(_))
    ));
}

#[test]
fn paths_an_image_declares_get_private_volumes_unless_mounted() {
    let mut spec: crate::api::AppSpec = serde_json::from_value(serde_json::json!({
        "name": "pg", "image": "x", "port": 5432, "listen": "127.0.0.1:0",
        "memory_mib": 128, "concurrency": 10, "min": 0, "idle_timeout_ms": 1000,
        "env": [], "volumes": [{"name": "mine", "path": "/srv"}],
    }))
    .expect("a spec without max");
    assert_eq!(spec.max, 0, "unset");
    let declared = [
        "/var/lib/postgresql/data/".to_owned(),
        "/srv".to_owned(),
        "logs".to_owned(),
    ];
    let mounts = private_mounts(&spec, &declared).expect("mounts");
    let paths: Vec<&str> = mounts.iter().map(|m| m.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/var/lib/postgresql/data", "/logs"],
        "/srv is mounted already"
    );
    assert_eq!(
        mounts[0].name,
        private_name("pg", "/var/lib/postgresql/data")
    );
    spec.volumes.extend(mounts);
    spec.resolve_max();
    assert_eq!(spec.max, 1, "an app with volumes defaults to one instance");
    assert!(
        private_mounts(&spec, &["/".to_owned()]).is_err(),
        "/ cannot be a volume"
    );
    let long = "a".repeat(32);
    assert!(check_name(&private_name(&long, "/data")).is_ok());
}
