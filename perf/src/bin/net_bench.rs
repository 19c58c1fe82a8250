//! `net-bench`: host→guest TCP throughput and round-trip latency through
//! `vmm --publish` (virtio-net + the userspace smoltcp stack), next to the
//! same measurements over plain host loopback.
//!
//! The guest runs busybox: `nc -l -p 5001 > /dev/null` as a sink and
//! `nc -ll -p 5002 -e cat` as an echo server. On a nested, emulated KVM
//! host the guest kernel's TCP work runs in KVM's instruction emulator, so
//! the guest-side figures there say little about hardware KVM; the VMM's
//! own CPU time per MiB (host-side, native) is printed too.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use perf::{default_kernel, percentile, target_dir};
use vmm::host::HostKind;

/// Measure throughput and latency through the VMM's userspace network.
#[derive(Parser, Debug)]
#[command(name = "net-bench", about)]
struct Args {
    /// Guest kernel (default: target/guest-kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// MiB to send host→guest.
    #[arg(long, default_value_t = 16)]
    mib: usize,
    /// Round trips for the latency measurement.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
}

const SINK_PORT: u16 = 5001;
const ECHO_PORT: u16 = 5002;
const AGENT_CONF: &str =
    "arg=/bin/sh\narg=-c\narg=/bin/busybox nc -ll -p 5002 -e /bin/busybox cat & \
exec /bin/busybox nc -l -p 5001 > /dev/null\nenv=PATH=/bin\n";

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn initramfs(dir: &Path) -> Result<PathBuf, String> {
    let conf = dir.join("agent.conf");
    std::fs::write(&conf, AGENT_CONF).map_err(|e| e.to_string())?;
    let out = dir.join("net-bench.cpio");
    let release = target_dir().join("release");
    let status = Command::new(release.join("little-initramfs"))
        .arg("--out")
        .arg(&out)
        .arg("--agent")
        .arg(release.join("guest-agent"))
        .arg("--agent-config")
        .arg(&conf)
        .arg("--busybox")
        .arg("/bin/busybox")
        .status()
        .map_err(|e| format!("little-initramfs: {e} (cargo build --release --workspace)"))?;
    status
        .success()
        .then_some(out)
        .ok_or_else(|| "little-initramfs failed".to_owned())
}

/// Round-trip times of 64-byte messages on an echo connection.
fn round_trips(stream: &mut TcpStream, n: usize) -> Result<Vec<Duration>, String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    (0..n)
        .map(|_| {
            let t = Instant::now();
            stream.write_all(&msg).map_err(|e| e.to_string())?;
            stream.read_exact(&mut back).map_err(|e| e.to_string())?;
            Ok(t.elapsed())
        })
        .collect()
}

/// Sends `bytes` and waits for the peer to close: MiB/s end to end.
fn throughput(stream: &mut TcpStream, bytes: usize) -> Result<f64, String> {
    let chunk = vec![0xa5u8; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        stream.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        sent += n;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok(bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

/// The same two measurements against threads on host loopback.
fn loopback(bytes: usize, n: usize) -> Result<(f64, Vec<Duration>), String> {
    let sink = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let echo = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let (sink_addr, echo_addr) = (
        sink.local_addr().map_err(|e| e.to_string())?,
        echo.local_addr().map_err(|e| e.to_string())?,
    );
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = sink.accept() {
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
    });
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = echo.accept() {
            let _ = s.set_nodelay(true);
            let mut r = s.try_clone().expect("clone of an accepted socket");
            let _ = std::io::copy(&mut r, &mut s);
        }
    });
    let mut e = TcpStream::connect(echo_addr).map_err(|e| e.to_string())?;
    let rtts = round_trips(&mut e, n)?;
    let mut s = TcpStream::connect(sink_addr).map_err(|e| e.to_string())?;
    Ok((throughput(&mut s, bytes)?, rtts))
}

/// CPU time (user + system) of the main thread of process `pid` so far:
/// the VMM's event loop, where the device and the network stack run (vCPU
/// threads, which carry the emulated guest's time on a nested host, are
/// left out).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant and takes no pointers.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    Some(Duration::from_millis(ticks * 1000 / hz.max(1)))
}

/// Connects to the guest echo server once it answers.
fn wait_for_echo(port: u16, deadline: Duration) -> Result<(TcpStream, Duration), String> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let mut b = [0u8; 1];
            if s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() {
                let _ = s.set_read_timeout(None);
                return Ok((s, start.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err("the guest echo server never answered".into())
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &Args) -> Result<(), String> {
    let host = HostKind::detect();
    let emulated = host == HostKind::NestedEmulated;
    println!(
        "host: {host:?}{}",
        if emulated {
            " (guest kernel emulated: guest-side figures are EMULATED, not hardware KVM)"
        } else {
            ""
        }
    );
    let dir = std::env::temp_dir().join(format!("net-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let initrd = initramfs(&dir)?;
    let kernel = args.kernel.clone().unwrap_or_else(default_kernel);
    let (sink_port, echo_port) = (free_port()?, free_port()?);
    let child = Command::new(target_dir().join("release/vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--console", "null"])
        .arg("--publish")
        .arg(format!("127.0.0.1:{sink_port}:{SINK_PORT}"))
        .arg("--publish")
        .arg(format!("127.0.0.1:{echo_port}:{ECHO_PORT}"))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start vmm: {e}"))?;
    let vmm = Vmm(child);
    let pid = vmm.0.id();
    let (mut echo, ready) = wait_for_echo(echo_port, Duration::from_secs(180))?;
    println!(
        "guest echo answering {:.1} s after vmm start",
        ready.as_secs_f64()
    );

    let bytes = args.mib << 20;
    let (lo_mibs, lo_rtt) = loopback(bytes, args.round_trips)?;
    let vm_rtt = round_trips(&mut echo, args.round_trips)?;
    let mut sink = TcpStream::connect(("127.0.0.1", sink_port)).map_err(|e| e.to_string())?;
    let cpu_before = cpu_time(pid);
    let vm_mibs = throughput(&mut sink, bytes)?;
    let cpu = cpu_time(pid)
        .zip(cpu_before)
        .map(|(a, b)| a.saturating_sub(b));
    drop(vmm);
    let _ = std::fs::remove_dir_all(&dir);

    let tag = if emulated { " [emulated guest]" } else { "" };
    println!("\n| what | host loopback | through vmm --publish | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| host→guest throughput, {} MiB | {lo_mibs:.0} MiB/s | {vm_mibs:.1} MiB/s{tag} | {:.3}x |",
        args.mib,
        vm_mibs / lo_mibs
    );
    for p in [50, 99] {
        let (lo, vm) = (ms(percentile(&lo_rtt, p)), ms(percentile(&vm_rtt, p)));
        println!(
            "| 64-byte round trip p{p}, {} trips | {lo:.3} ms | {vm:.3} ms{tag} | +{:.3} ms added |",
            args.round_trips,
            vm - lo
        );
    }
    if let Some(cpu) = cpu {
        println!(
            "\nVMM event-loop thread CPU (user+sys; virtio-net device + smoltcp stack) during the throughput run: {:.0} ms for {} MiB = {:.1} ms/MiB (host-side, native)",
            cpu.as_secs_f64() * 1000.0,
            args.mib,
            cpu.as_secs_f64() * 1000.0 / args.mib as f64
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
