//! `image-bench`: `little-image import` of the offline test images (OCI
//! layouts from image-tools/test-images/build.sh) against the baseline of
//! `umoci unpack` to a directory followed by `mkfs.erofs` of it: wall time
//! (median of `--runs`, each into a fresh store) and base image size.
//!
//! Both paths read the same gzip layers and write an uncompressed erofs
//! image; the baseline also writes every file to the host filesystem
//! first (as root, to keep owners) and reads it back.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use image_tools::store::{ImportOptions, Source, Store};
use perf::target_dir;

/// Time importing OCI images vs umoci unpack + mkfs.erofs.
#[derive(Parser, Debug)]
#[command(name = "image-bench", about)]
struct Args {
    /// Test image names under target/test-images (NAME.oci).
    #[arg(long, default_values_t = ["httpd", "redis", "postgresql"].map(String::from))]
    images: Vec<String>,
    /// Runs per measurement (the median is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

fn ours(layout: &Path, work: &Path) -> Result<(Duration, u64), String> {
    let store = Store::new(work.join("store"));
    let options = ImportOptions {
        quiet: true,
        ..ImportOptions::default()
    };
    let start = Instant::now();
    let image = store
        .import(&Source::Layout(layout.to_owned(), None), "bench", &options)
        .map_err(|e| format!("import: {e}"))?;
    let took = start.elapsed();
    let _ = std::fs::remove_dir_all(work.join("store"));
    Ok((took, image.rootfs_bytes))
}

fn baseline(layout: &Path, work: &Path) -> Result<(Duration, u64), String> {
    let bundle = work.join("bundle");
    let image = work.join("baseline.erofs");
    let start = Instant::now();
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle))?;
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(bundle.join("rootfs")))?;
    let took = start.elapsed();
    let size = std::fs::metadata(&image).map_err(|e| e.to_string())?.len();
    let _ = std::fs::remove_dir_all(&bundle);
    let _ = std::fs::remove_file(&image);
    Ok((took, size))
}

fn bench(args: &Args) -> Result<(), String> {
    let images = target_dir().join("test-images");
    println!(
        "{:<10} {:>12} {:>12} {:>14} {:>14} {:>8}",
        "image", "import ms", "baseline ms", "erofs bytes", "baseline bytes", "speedup"
    );
    for name in &args.images {
        let layout: PathBuf = images.join(format!("{name}.oci"));
        if !layout.exists() {
            return Err(format!(
                "{} is missing: run image-tools/test-images/build.sh",
                layout.display()
            ));
        }
        let (mut ours_t, mut base_t) = (Vec::new(), Vec::new());
        let (mut ours_size, mut base_size) = (0, 0);
        for _ in 0..args.runs.max(1) {
            let work = tempfile::tempdir().map_err(|e| e.to_string())?;
            let (t, s) = ours(&layout, work.path())?;
            ours_t.push(t);
            ours_size = s;
            let (t, s) = baseline(&layout, work.path())?;
            base_t.push(t);
            base_size = s;
        }
        let (o, b) = (median(ours_t), median(base_t));
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>14} {:>14} {:>7.2}x",
            name,
            o.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            ours_size,
            base_size,
            b.as_secs_f64() / o.as_secs_f64()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match bench(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("image-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
