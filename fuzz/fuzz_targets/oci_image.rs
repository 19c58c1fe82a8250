//! OCI image import: manifests, indexes and configs (parse, platform
//! selection, user resolution) and layer tarballs (flattening with
//! whiteouts and links under small caps, then the erofs writer on the
//! result). None of it may panic, hang or allocate past the caps.
//!
//! Input: the first byte picks the parser; the rest is the document or
//! the tar stream (two layers, split at the first 0xff byte run "\xff\xff").

#![no_main]

use image_tools::layer::{apply_tar_bytes, Budget, Limits};
use image_tools::oci::{self, AnyManifest, ImageConfig, Parsed};
use image_tools::runconfig::RunConfig;
use image_tools::tree::Tree;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(Parsed::Index(list)) = AnyManifest::parse(rest) {
                let _ = oci::select(&list, Some("latest"));
                let _ = oci::select(&list, None);
            }
        }
        1 => {
            let text = String::from_utf8_lossy(rest);
            let (config, accounts) = text.split_once('\u{0}').unwrap_or((&text, ""));
            let (passwd, group) = accounts.split_once('\u{0}').unwrap_or((accounts, ""));
            if let Ok(image) = oci::parse::<ImageConfig>(config.as_bytes(), "config") {
                let container = image.config.unwrap_or_default();
                if let Ok(run) = RunConfig::resolve(&container, passwd, group) {
                    let _ = run.agent_config(None);
                }
            }
        }
        _ => {
            let limits = Limits {
                max_unpacked_bytes: 8 << 20,
                max_entries: 4096,
                max_xattr_bytes: 4096,
            };
            let split = rest
                .windows(2)
                .position(|w| w == [0xff, 0xff])
                .unwrap_or(rest.len());
            let layers = [&rest[..split], rest.get(split + 2..).unwrap_or(&[])];
            let mut tree = Tree::new();
            let mut budget = Budget::default();
            for (i, layer) in layers.iter().enumerate() {
                if apply_tar_bytes(&mut tree, i, layer, &limits, &mut budget).is_err() {
                    return;
                }
            }
            // Only the first layer's bytes back file data (source 0); files
            // of the second point past them and must fail, not panic.
            let Ok(dir) = tempfile::tempdir() else {
                return;
            };
            let source = dir.path().join("layer0.tar");
            if std::fs::write(&source, layers[0]).is_ok() {
                let _ = image_tools::erofs::write_image(
                    &tree,
                    &[source],
                    &dir.path().join("out.erofs"),
                    [0; 16],
                );
            }
        }
    }
});
