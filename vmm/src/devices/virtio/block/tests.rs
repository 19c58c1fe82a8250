//! The drive flag, opening images, and what the device shows the driver.
#![allow(clippy::unwrap_used)]

use std::io::Write;

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::{Block, BlockConfig, Disk};
use crate::devices::virtio::{feature, VirtioDevice};

#[test]
fn drive_syntax() {
    let c = BlockConfig::parse("path=/a.img").unwrap();
    assert_eq!(c, BlockConfig::new("/a.img"));
    let c = BlockConfig::parse("ro,serial=disk0,path=/b").unwrap();
    assert!(c.read_only);
    assert_eq!(c.serial.as_deref(), Some("disk0"));
    for bad in [
        "",
        "ro",
        "path=",
        "path=/a,path=/b",
        "path=/a,serial=",
        "path=/a,serial=123456789012345678901",
        "path=/a,serial=a b",
        "path=/a,cache=none",
        "/a.img",
    ] {
        let e = BlockConfig::parse(bad).unwrap_err();
        assert!(e.to_string().starts_with("invalid drive"), "{bad}: {e}");
    }
}

#[test]
fn open_errors_name_the_file() {
    let e = Disk::open(&BlockConfig::new("/nonexistent/disk.img")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot open disk image /nonexistent/disk.img"
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    assert!(matches!(
        Disk::open(&BlockConfig::new(empty.path())),
        Err(super::Error::Empty(_))
    ));
}

#[test]
fn config_space_reports_capacity_and_features() {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    image.write_all(&[0u8; 64 * 512]).unwrap();
    let block = Block::new(Disk::open(&BlockConfig::new(image.path())).unwrap());
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    let mut blk = [0u8; 4];
    block.read_config(20, &mut blk);
    assert_eq!(u32::from_le_bytes(blk), 512);
    assert_eq!(block.device_type(), 2);
    assert!(block.avail_features() & feature(VIRTIO_F_VERSION_1) != 0);
    assert!(block.avail_features() & feature(VIRTIO_BLK_F_RO) == 0);
}
