//! `blk_bench`: virtio-blk throughput and IOPS in a guest versus the same
//! I/O on the host file.
//!
//! One program, `perf/guest/blkbench.c` (compiled static with `cc`), runs
//! the same patterns on both sides at queue depth 1: 4 KiB random reads and
//! writes, 1 MiB sequential reads and writes. In the guest it opens
//! `/dev/vda` with O_DIRECT, so every operation goes through virtio-blk;
//! the VMM serves it with buffered io_uring reads/writes on the image. On
//! the host it runs on the image file, buffered (what the VMM itself does)
//! and with O_DIRECT. The guest boots once and runs it as its entrypoint
//! (no forks).
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/blk_bench --ops-4k 2000 --ops-1m 64
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Parser;
use perf::{default_kernel, target_dir};
use vmm::host::HostKind;

/// Measure virtio-blk in a guest against the host file.
#[derive(Parser, Debug)]
#[command(name = "blk_bench", about)]
struct Args {
    /// 4 KiB operations per random pattern.
    #[arg(long, default_value_t = 2000)]
    ops_4k: u64,
    /// 1 MiB operations per sequential pattern.
    #[arg(long, default_value_t = 64)]
    ops_1m: u64,
    /// Disk image size in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// Guest kernel (default: target/guest-kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
}

/// One pattern's figures.
#[derive(Clone, Debug)]
struct Figure {
    pattern: String,
    iops: f64,
    mbps: f64,
}

fn parse(output: &str) -> Vec<Figure> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("blkbench: ")?;
            let mut words = rest.split_whitespace();
            let pattern = words.next()?.to_owned();
            let field = |key: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(key)?.parse::<f64>().ok())
            };
            Some(Figure {
                pattern,
                iops: field("iops=")?,
                mbps: field("mbps=")?,
            })
        })
        .collect()
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fill_image(path: &Path, mib: u64) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..mib {
        f.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())
}

fn bench(args: &Args) -> Result<(), String> {
    let work = target_dir().join("blk-bench");
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let tool = work.join("blkbench");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/blkbench.c");
    run(Command::new("cc")
        .args(["-O2", "-static", "-o"])
        .arg(&tool)
        .arg(&source))?;
    let image = work.join("disk.img");
    fill_image(&image, args.disk_mib)?;
    let (ops_4k, ops_1m) = (args.ops_4k.to_string(), args.ops_1m.to_string());

    let host_buffered = parse(&run(Command::new(&tool)
        .arg(&image)
        .args([&ops_4k, &ops_1m]))?);
    let host_direct = parse(&run(Command::new(&tool)
        .arg(&image)
        .args([&ops_4k, &ops_1m, "direct"]))?);

    let conf = work.join("agent.conf");
    std::fs::write(
        &conf,
        format!("arg=/blkbench\narg=/dev/vda\narg={ops_4k}\narg={ops_1m}\narg=direct\n"),
    )
    .map_err(|e| e.to_string())?;
    let initrd = work.join("initrd.cpio");
    let bin = target_dir().join("release");
    run(Command::new(bin.join("little-initramfs"))
        .arg("--out")
        .arg(&initrd)
        .arg("--agent")
        .arg(bin.join("guest-agent"))
        .arg("--agent-config")
        .arg(&conf)
        .arg("--file")
        .arg(format!("{}:/blkbench:755", tool.display())))?;
    fill_image(&image, args.disk_mib)?;
    let kernel = args.kernel.clone().unwrap_or_else(default_kernel);
    let console = run(Command::new(bin.join("vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--mem")
        .arg("256")
        .arg("--drive")
        .arg(format!("path={}", image.display())))?;
    let guest = parse(&console);
    if guest.len() != 4 {
        return Err(format!("the guest did not report 4 patterns:\n{console}"));
    }

    println!(
        "{:<12} {:>12} {:>10} | {:>12} {:>10} | {:>12} {:>10} | {:>9}",
        "pattern",
        "guest MB/s",
        "guest IOPS",
        "host MB/s",
        "host IOPS",
        "direct MB/s",
        "dir. IOPS",
        "guest/host"
    );
    for g in &guest {
        let find = |v: &[Figure]| v.iter().find(|f| f.pattern == g.pattern).cloned();
        let (Some(h), Some(d)) = (find(&host_buffered), find(&host_direct)) else {
            return Err(format!("host run lacks {}", g.pattern));
        };
        println!(
            "{:<12} {:>12.1} {:>10.0} | {:>12.1} {:>10.0} | {:>12.1} {:>10.0} | {:>8.4}x",
            g.pattern,
            g.mbps,
            g.iops,
            h.mbps,
            h.iops,
            d.mbps,
            d.iops,
            g.iops / h.iops
        );
    }
    println!(
        "guest: O_DIRECT on /dev/vda through virtio-blk, QD1; host: the image file, \
         buffered (what the VMM does) and O_DIRECT; guest/host = guest IOPS / host buffered IOPS"
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let host = HostKind::detect();
    println!(
        "blk_bench: host kind {}{}",
        host.name(),
        if host == HostKind::NestedEmulated {
            " (guest kernel code is instruction-emulated here: guest-side figures are \
             emulated and say nothing about hardware KVM)"
        } else {
            ""
        }
    );
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk_bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tool_lines() {
        let out = "junk\nblkbench: randread4k ops=10 bytes=40960 seconds=0.5 iops=20 mbps=0.1\r\n";
        let f = parse(out);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].pattern, "randread4k");
        assert_eq!(f[0].iops, 20.0);
        assert_eq!(f[0].mbps, 0.1);
    }
}
