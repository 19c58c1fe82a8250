//! `boot-time`: cold boot time of a little.cloud microVM, from `vmm` exec to
//! the agent's first console line and to the entrypoint's exit.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use perf::{default_kernel, summary, target_dir};
use vmm::host::HostKind;

/// Measure cold boot: `vmm` exec → "little-agent: started" → entrypoint exit.
#[derive(Parser, Debug)]
#[command(name = "boot-time", about)]
struct Args {
    /// The vmm binary.
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Guest kernel (default: target/guest-kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs with the agent as /init (default: target/little/demo.cpio).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Number of boots.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

struct Sample {
    agent: Duration,
    exited: Duration,
    total: Duration,
}

fn boot_once(
    vmm: &PathBuf,
    kernel: &PathBuf,
    initrd: &PathBuf,
    mem: u64,
) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--mem")
        .arg(mem.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let (mut agent, mut exited) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if agent.is_none() && line.contains("little-agent: started") {
            agent = Some(start.elapsed());
        }
        if exited.is_none() && line.contains("little-agent: entrypoint exited") {
            exited = Some(start.elapsed());
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let total = start.elapsed();
    if !status.success() {
        return Err(format!("vmm exited with {status}"));
    }
    Ok(Sample {
        agent: agent.ok_or("the agent never printed its start line")?,
        exited: exited.ok_or("the entrypoint exit was never reported")?,
        total,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let vmm = args.vmm.unwrap_or_else(|| target_dir().join("release/vmm"));
    let kernel = args.kernel.unwrap_or_else(default_kernel);
    let initrd = args
        .initrd
        .unwrap_or_else(|| target_dir().join("little/demo.cpio"));
    let host = HostKind::detect();
    println!(
        "boot-time: host kind {}{}",
        host.name(),
        if host == HostKind::NestedEmulated {
            " (guest kernel time is instruction-emulated here: not representative of hardware KVM)"
        } else {
            ""
        }
    );
    let mut samples = Vec::new();
    for run in 1..=args.runs {
        match boot_once(&vmm, &kernel, &initrd, args.mem) {
            Ok(s) => {
                println!(
                    "run {run}: agent started {}, entrypoint exited {}, vmm exited {}",
                    ms(s.agent),
                    ms(s.exited),
                    ms(s.total)
                );
                samples.push(s);
            }
            Err(e) => {
                eprintln!("boot-time: run {run} failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let report = |name: &str, f: fn(&Sample) -> Duration| {
        let v: Vec<Duration> = samples.iter().map(f).collect();
        if let Some((min, med, max)) = summary(&v) {
            println!(
                "{name:<28} min {:>10}  median {:>10}  max {:>10}",
                ms(min),
                ms(med),
                ms(max)
            );
        }
    };
    println!(
        "--- {} runs, {} MiB, 1 vCPU, host {} ---",
        samples.len(),
        args.mem,
        host.name()
    );
    report("vmm exec -> agent started", |s| s.agent);
    report("vmm exec -> entrypoint exit", |s| s.exited);
    report("vmm exec -> vmm exit", |s| s.total);
    ExitCode::SUCCESS
}
