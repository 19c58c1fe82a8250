//! A new, empty volume filled on the host with what the image has at its
//! mount path, as Docker fills a new volume (postgres' `$PGDATA`, its
//! owner and modes): `fsck.erofs --extract` (Debian's erofs-utils) copies
//! the app's base image into a scratch folder with owners and modes, and
//! `mkfs.ext4 -d` (e2fsprogs) makes the volume again from the path's
//! tree, at its size and label. Done natively before the first boot, this
//! costs a second where the guest's kernel would take minutes on a nested
//! host; the guest agent still fills a volume the host could not (a
//! daemon that is not root cannot keep the files' owners).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors filling a volume.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// A tool failed or is missing.
    #[error("{0} failed: {1}")]
    Tool(&'static str, String),
    /// A scratch file operation failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// What [`fill`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// The volume now holds the image's tree.
    Filled,
    /// The volume already holds data: left as it is.
    NotEmpty,
    /// The image has no folder (or an empty one) at the path.
    NothingThere,
    /// Not root: the files' owners cannot be kept; the guest fills it.
    LeftToTheGuest,
}

/// Runs `program args` (through the volume store's runner), its stdout.
fn run(program: &'static str, args: &[&std::ffi::OsStr]) -> Result<String, FillError> {
    let mut command = Command::new(program);
    command.args(args);
    crate::volume::run_tool("", program, &mut command).map_err(|e| match e {
        crate::volume::VolumeError::Tool(_, said) => FillError::Tool(program, said),
        other => FillError::Tool(program, other.to_string()),
    })
}

/// The names in folder `dir` of ext4 image `image`, from `debugfs ls -p`
/// (`/inode/mode/uid/gid/name/size/` lines), `.` and `..` left out. A
/// name with a `/` cannot exist, so the fields split cleanly.
fn names(image: &Path, dir: &str) -> Result<Vec<String>, FillError> {
    let request = format!("ls -p {dir}");
    let listing = run(
        "debugfs",
        &["-R".as_ref(), request.as_ref(), image.as_os_str()],
    )?;
    let all: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .collect();
    // debugfs exits 0 when it cannot open the image or the folder; every
    // folder it can read lists itself.
    if !all.contains(&".") {
        return Err(FillError::Tool(
            "debugfs",
            format!("cannot list {dir} in {}", image.display()),
        ));
    }
    Ok(all
        .into_iter()
        // Unused slots of a folder's blocks list with an empty name.
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_owned)
        .collect())
}

/// Whether ext4 image `image` holds nothing but an empty `lost+found`.
pub fn is_empty(image: &Path) -> Result<bool, FillError> {
    let root = names(image, "/")?;
    Ok(match root.as_slice() {
        [] => true,
        [only] if only == "lost+found" => names(image, "/lost+found")?.is_empty(),
        _ => false,
    })
}

/// Fills `volume` (labelled `label`), when it is new and empty, with the
/// tree at `guest_path` in the erofs image `rootfs`, through a scratch
/// folder under `scratch` that is removed afterwards.
pub fn fill(
    rootfs: &Path,
    guest_path: &str,
    volume: &Path,
    label: &str,
    scratch: &Path,
) -> Result<Filled, FillError> {
    if !crate::jail::running_as_root() {
        return Ok(Filled::LeftToTheGuest);
    }
    if !is_empty(volume)? {
        return Ok(Filled::NotEmpty);
    }
    crate::home::create_dir_all(scratch).map_err(|e| io(scratch, e))?;
    // One folder per volume: deploys of different apps (never of one
    // volume) fill side by side.
    let work = scratch.join(format!("fill-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let result = fill_from(rootfs, guest_path, volume, label, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn io(path: &Path, e: std::io::Error) -> FillError {
    FillError::Io(path.display().to_string(), e)
}

fn fill_from(
    rootfs: &Path,
    guest_path: &str,
    volume: &Path,
    label: &str,
    work: &Path,
) -> Result<Filled, FillError> {
    let extract = std::ffi::OsString::from(format!("--extract={}", work.display()));
    run(
        "fsck.erofs",
        &[
            extract.as_os_str(),
            "--preserve".as_ref(),
            rootfs.as_os_str(),
        ],
    )?;
    // The path is absolute, without `.` or `..` parts
    // (`VolumeMount::validate`). A symlink on the way would be followed on
    // the host, not in the image: such a path is left to the guest.
    let mut tree: PathBuf = work.to_owned();
    for part in guest_path.split('/').filter(|p| !p.is_empty()) {
        tree.push(part);
        match std::fs::symlink_metadata(&tree) {
            Ok(m) if m.file_type().is_symlink() => return Ok(Filled::LeftToTheGuest),
            Ok(_) => {}
            Err(_) => return Ok(Filled::NothingThere),
        }
    }
    let is_dir = std::fs::symlink_metadata(&tree).is_ok_and(|m| m.is_dir());
    let has_files = is_dir
        && std::fs::read_dir(&tree)
            .map_err(|e| io(&tree, e))?
            .next()
            .is_some();
    if !has_files {
        return Ok(Filled::NothingThere);
    }
    crate::volume::mkfs(label, volume, Some(&tree))
        .map_err(|e| FillError::Tool("mkfs.ext4", e.to_string()))?;
    Ok(Filled::Filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dir: &Path) -> PathBuf {
        let path = dir.join("v.ext4");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(crate::volume::MIN_SIZE)
            .unwrap();
        crate::volume::mkfs("v", &path, None).unwrap();
        path
    }

    #[test]
    fn a_new_volume_is_empty_and_one_made_from_a_tree_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = volume(dir.path());
        assert!(is_empty(&path).unwrap());
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/file"), b"data").unwrap();
        std::fs::set_permissions(&tree, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        crate::volume::mkfs("v", &path, Some(&tree)).unwrap();
        assert!(!is_empty(&path).unwrap());
        assert_eq!(names(&path, "/sub").unwrap(), ["file"]);
        let root = run(
            "debugfs",
            &["-R".as_ref(), "ls -p /".as_ref(), path.as_os_str()],
        )
        .unwrap();
        assert!(
            root.lines().next().unwrap().starts_with("/2/040700/"),
            "the root folder takes the tree's mode: {root}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_volume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        assert!(is_empty(&path).is_err());
    }
}
