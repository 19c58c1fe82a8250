//! `restore-bench`: snapshot time, restore latency and memory per restored
//! guest, from one snapshot of a small guest (agent + busybox echo loop).
//!
//! Restore latency is measured from `vmm` exec to the VMM's "vCPUs running"
//! log line (host-side work: read and check the state, map guest memory
//! copy-on-write, create VM and vCPUs, restore KVM and device state), and to
//! the first byte of the guest's reply to a console line (includes guest
//! kernel work, which is emulated on nested hosts).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use image_tools::initramfs::Initramfs;
use perf::cgroup::{Charge, MemoryCgroup};
use perf::memory::{mem_available, process_memory, ProcessMemory};
use perf::{default_kernel, percentile, target_dir};
use vmm::error_chain;
use vmm::host::HostKind;
use vmm_api::{Client, Reply};

/// Snapshot, restore latency and density benchmark.
#[derive(Parser, Debug)]
#[command(name = "restore-bench", about)]
struct Args {
    /// The vmm binary (default: target/release/vmm).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Guest kernel (default: target/guest-kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 32)]
    mem: u64,
    /// Restores timed to "vCPUs running".
    #[arg(long, default_value_t = 100)]
    restores: usize,
    /// Restores timed to the first byte of a console reply.
    #[arg(long, default_value_t = 20)]
    replies: usize,
    /// Snapshots timed (the first is the one restored).
    #[arg(long, default_value_t = 5)]
    snapshots: usize,
    /// Numbers of idle guests to restore at once for the memory table.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    density: Vec<usize>,
    /// Where the snapshots go (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The static guest agent (default: target/release/guest-agent).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Drop the page cache before each timed reply (needs root): shows
    /// restores of a snapshot that is not in memory yet.
    #[arg(long)]
    cold: bool,
    /// A static busybox for the guest (default: /bin/busybox).
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Restore this snapshot (made by an earlier run with `--dir`) instead
    /// of booting and snapshotting a guest first.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Internal: hold an empty KVM VM shaped like a restored guest (irqchip,
    /// one vCPU, `--mem` MiB memslot) until killed; the memory table's
    /// "empty VM" column runs N of these to show the host kernel's own
    /// per-VM cost, which no VMM can avoid.
    #[arg(long, hide = true)]
    hold_empty_vm: bool,
}

const AGENT_CONF: &str = "arg=/bin/sh\narg=-c\narg=echo ready; while read line; do echo \"got: $line\"; done\nenv=PATH=/bin\n";

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

/// How long a control command may take before the VMM is taken for hung.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one command on a fresh connection to the VMM's control socket.
fn control(sock: &Path, command: &vmm_api::Command) -> Result<Reply, String> {
    Client::connect(sock, CONTROL_TIMEOUT)
        .and_then(|mut ctl| ctl.send(command))
        .map_err(|e| format!("{command}: {}", error_chain(&e)))
}

/// Connects to a control socket that a just-started VMM is about to open.
fn connect_within(sock: &Path, deadline: Duration) -> Result<Client, String> {
    let start = Instant::now();
    loop {
        match Client::connect(sock, CONTROL_TIMEOUT) {
            Ok(ctl) => return Ok(ctl),
            Err(_) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(format!("the vmm never listened: {}", error_chain(&e))),
        }
    }
}

fn wait_line(child: &mut Child, needle: &str, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains(&needle) {
                let _ = tx.send(());
                break;
            }
        }
    });
    rx.recv_timeout(timeout)
        .map(|()| start.elapsed())
        .map_err(|_| "timed out".to_owned())
}

/// Boots the guest, takes `count` snapshots, returns the first path and the
/// snapshot wall times the VMM reported.
fn make_snapshots(args: &Args, vmm: &Path, dir: &Path) -> Result<(PathBuf, Vec<Duration>), String> {
    let agent = args
        .agent
        .clone()
        .unwrap_or_else(|| target_dir().join("release/guest-agent"));
    let mut fs = Initramfs::new();
    for d in ["/bin", "/dev", "/proc", "/sys", "/tmp", "/run", "/little"] {
        fs.dir(d, 0o755).map_err(|e| e.to_string())?;
    }
    fs.host_file("/init", 0o755, &agent)
        .map_err(|e| e.to_string())?;
    fs.file("/little/agent.conf", 0o644, AGENT_CONF.as_bytes().to_vec())
        .map_err(|e| e.to_string())?;
    fs.host_file("/bin/busybox", 0o755, &args.busybox)
        .map_err(|e| e.to_string())?;
    fs.symlink("/bin/sh", "busybox")
        .map_err(|e| e.to_string())?;
    let initrd = dir.join("bench.cpio");
    fs.write_file(&initrd).map_err(|e| e.to_string())?;
    let sock = dir.join("api.sock");
    let kernel = args.kernel.clone().unwrap_or_else(default_kernel);
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--mem", &args.mem.to_string(), "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let booted = wait_line(&mut child, "ready", Duration::from_secs(180))?;
    println!("guest booted and ready in {}", ms(booted));
    let mut times = Vec::new();
    let first = dir.join("bench-0.snap");
    for i in 0..args.snapshots.max(1) {
        let path = dir.join(format!("bench-{i}.snap"));
        let reply = control(&sock, &vmm_api::Command::Snapshot { path: path.clone() })?;
        if let Reply::Snapshot { elapsed, .. } = reply {
            times.push(elapsed);
        }
        if i == 0 {
            println!("snapshot: {reply}");
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    let _ = control(&sock, &vmm_api::Command::Quit);
    let _ = child.wait();
    Ok((first, times))
}

fn spawn_restore(vmm: &Path, snap: &Path, console_input: bool) -> Result<Child, String> {
    spawn_restore_with(vmm, snap, console_input, &[])
}

fn spawn_restore_with(
    vmm: &Path,
    snap: &Path,
    console_input: bool,
    extra: &[&std::ffi::OsStr],
) -> Result<Child, String> {
    let mut cmd = Command::new(vmm);
    cmd.arg("--snapshot")
        .arg(snap)
        .args(["--log", "info"])
        .args(extra);
    if console_input {
        cmd.arg("--console-input");
    } else {
        cmd.args(["--console", "null"]);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())
}

/// Exec → "vCPUs running" (external), and the VMM's own figure.
fn restore_once(vmm: &Path, snap: &Path) -> Result<(Duration, Duration), String> {
    let start = Instant::now();
    let mut child = spawn_restore(vmm, snap, false)?;
    let err = child.stderr.take().ok_or("no stderr")?;
    let mut result = Err("vmm ended before its vCPUs ran".to_owned());
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.split("vCPUs running ").nth(1) {
            let external = start.elapsed();
            let internal = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| Duration::from_secs_f64(v / 1e3))
                .unwrap_or_default();
            result = Ok((external, internal));
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// A standby VMM is started and ready; time `restore` → `ok running`.
fn prespawned_once(vmm: &Path, snap: &Path, dir: &Path, i: usize) -> Result<Duration, String> {
    let sock = dir.join(format!("standby-{i}.sock"));
    let mut child = Command::new(vmm)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--console", "null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut ctl = connect_within(&sock, Duration::from_secs(5))?;
    let start = Instant::now();
    let restored = ctl.send(&vmm_api::Command::Restore {
        snapshot: snap.to_owned(),
        working_set: None,
    });
    let elapsed = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    // A killed VMM leaves its control socket behind.
    let _ = std::fs::remove_file(&sock);
    restored.map_err(|e| format!("standby restore failed: {}", error_chain(&e)))?;
    Ok(elapsed)
}

/// Restores once, serves one console line, and records the pages touched.
fn record_working_set(vmm: &Path, snap: &Path, dir: &Path) -> Result<(PathBuf, String), String> {
    let sock = dir.join("ws.sock");
    let ws = dir.join("bench.ws");
    let mut child =
        spawn_restore_with(vmm, snap, true, &["--api-sock".as_ref(), sock.as_os_str()])?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut ctl = connect_within(&sock, Duration::from_secs(5))?;
    stdin
        .write_all(b"first request\n")
        .map_err(|e| e.to_string())?;
    wait_line(&mut child, "got: first request", Duration::from_secs(60))?;
    let reply = ctl
        .send(&vmm_api::Command::WorkingSet { path: ws.clone() })
        .map_err(|e| format!("working-set failed: {}", error_chain(&e)))?;
    let _ = ctl.send(&vmm_api::Command::Quit);
    let _ = child.wait();
    Ok((ws, reply.to_string()))
}

fn drop_caches() -> Result<(), String> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("--cold needs root to drop the page cache: {e}"))
}

fn reply_once(vmm: &Path, snap: &Path, i: usize, cold: bool) -> Result<Duration, String> {
    reply_once_with(vmm, snap, i, cold, &[])
}

fn reply_once_with(
    vmm: &Path,
    snap: &Path,
    i: usize,
    cold: bool,
    extra: &[&std::ffi::OsStr],
) -> Result<Duration, String> {
    if cold {
        drop_caches()?;
    }
    let start = Instant::now();
    let mut child = spawn_restore_with(vmm, snap, true, extra)?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin
        .write_all(format!("ping-{i}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    // The reply is the entrypoint's answer line (the guest's tty echoes the
    // input first; that echo is not the reply).
    let r = wait_line(
        &mut child,
        &format!("got: ping-{i}"),
        Duration::from_secs(60),
    )
    .map(|_| start.elapsed());
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn report(name: &str, samples: &[Duration]) {
    let p = |q| percentile(samples, q).map(ms).unwrap_or_default();
    println!(
        "{name:<46} n={:<4} p50 {:>11}  p99 {:>11}  min {:>11}",
        samples.len(),
        p(50),
        p(99),
        samples.iter().min().map(|d| ms(*d)).unwrap_or_default()
    );
}

/// The summed memory of the children still running, and how many they are.
fn sum_memory(children: &mut [Child], snap: &Path) -> (ProcessMemory, u64) {
    let mut sum = ProcessMemory::default();
    let mut alive = 0u64;
    for c in children {
        if !matches!(c.try_wait(), Ok(None)) {
            continue;
        }
        if let Ok(m) = process_memory(c.id(), snap) {
            sum.guest_pss += m.guest_pss;
            sum.guest_private += m.guest_private;
            sum.vmm_pss += m.vmm_pss;
            sum.vmm_private += m.vmm_private;
            alive += 1;
        }
    }
    (sum, alive)
}

/// `n` processes in one memory cgroup (when this host lets us make one),
/// with MemAvailable from before they started; killed when dropped.
struct Group {
    children: Vec<Child>,
    cgroup: Option<MemoryCgroup>,
    mem_available_before: u64,
}

impl Group {
    /// Spawns `n` processes made by `command`, labelled `what`.
    fn spawn(what: &str, n: usize, command: impl Fn() -> Command) -> Result<Self, String> {
        let name = format!("little-bench-{}-{what}-{n}", std::process::id());
        let cgroup = match MemoryCgroup::create(&name) {
            Ok(cg) => Some(cg),
            Err(e) => {
                eprintln!("restore-bench: no memory cgroup ({e}); cgroup columns left empty");
                None
            }
        };
        let mut group = Self {
            children: Vec::with_capacity(n),
            cgroup,
            mem_available_before: mem_available().map_err(|e| e.to_string())?,
        };
        for _ in 0..n {
            let mut cmd = command();
            if let Some(cg) = &group.cgroup {
                cg.join_on_spawn(&mut cmd);
            }
            let child = cmd.spawn().map_err(|e| e.to_string())?;
            group.children.push(child);
        }
        Ok(group)
    }

    /// The MemAvailable drop and the cgroup charge, per process, now;
    /// an error unless every process is still running.
    fn measure(&mut self) -> Result<(u64, Option<Charge>), String> {
        let after = mem_available().map_err(|e| e.to_string())?;
        let charged = self.cgroup.as_ref().and_then(|cg| cg.charge().ok());
        let n = self.children.len();
        let alive = self
            .children
            .iter_mut()
            .filter_map(|c| c.try_wait().ok())
            .filter(Option::is_none)
            .count();
        if alive != n {
            return Err(format!("only {alive} of {n} were running"));
        }
        let n = n as u64;
        Ok((
            self.mem_available_before.saturating_sub(after) / n.max(1),
            charged.map(|c| c.per(n)),
        ))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // The processes go before their cgroup (a field, dropped after this).
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Per-guest memory of one density run.
struct Density {
    smaps: ProcessMemory,
    mem_available_drop: u64,
    charged: Option<Charge>,
}

fn density(vmm: &Path, snap: &Path, n: usize) -> Result<Density, String> {
    let mut group = Group::spawn("guests", n, || {
        let mut cmd = Command::new(vmm);
        cmd.arg("--snapshot")
            .arg(snap)
            .args(["--console", "null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    })?;
    // Let every guest settle into idle: a restored guest writes a few
    // pages while it resumes, and with many guests on few cores that takes
    // a while. Wait until the guests' private memory stops growing.
    std::thread::sleep(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut sample = sum_memory(&mut group.children, snap);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let next = sum_memory(&mut group.children, snap);
        let settled = next.0.guest_private <= sample.0.guest_private + sample.0.guest_private / 200;
        sample = next;
        if settled || Instant::now() > deadline {
            break;
        }
    }
    let (mem_available_drop, charged) = group.measure().map_err(|e| format!("guests: {e}"))?;
    let (sum, alive) = sum_memory(&mut group.children, snap);
    let per = |v: u64| v / alive.max(1);
    Ok(Density {
        smaps: ProcessMemory {
            guest_pss: per(sum.guest_pss),
            guest_private: per(sum.guest_private),
            vmm_pss: per(sum.vmm_pss),
            vmm_private: per(sum.vmm_private),
        },
        mem_available_drop,
        charged,
    })
}

/// Creates a VM with an in-kernel irqchip, one vCPU (its `kvm_run` page
/// mapped) and `mem_mib` of private anonymous memory, and halts it.
fn hold_empty_vm(mem_mib: u64) -> Result<(), String> {
    use kvm_bindings::kvm_userspace_memory_region;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
    vm.create_irq_chip()
        .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
    let len = usize::try_from(mem_mib << 20).map_err(|e| e.to_string())?;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_mib << 20,
        userspace_addr: addr as u64,
    };
    // SAFETY: the region is the mapping made above, which stays mapped
    // until the process exits (it is never unmapped).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    // The guest is one HLT at 0x1000 in real mode: the vCPU enters the
    // guest once (so that KVM's run-time state exists, as in an idle
    // restored guest) and then halts in the kernel for good, as no
    // interrupt ever comes.
    const HLT_AT: usize = 0x1000;
    // SAFETY: `addr` is the start of the `len`-byte mapping made above and
    // HLT_AT < len; nothing else writes this memory yet.
    unsafe { *addr.cast::<u8>().add(HLT_AT) = 0xf4 };
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = HLT_AT as u64;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    loop {
        match vcpu.run() {
            // Only a signal (EINTR) brings it back; halt again.
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
            Ok(exit) => return Err(format!("the halted vCPU exited: {exit:?}")),
        }
    }
}

/// Starts `n` empty VMs (see [`hold_empty_vm`]) and returns their
/// MemAvailable drop and cgroup charge per VM.
fn empty_vm_floor(mem_mib: u64, n: usize) -> Result<(u64, Option<Charge>), String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut group = Group::spawn("empty-vms", n, || {
        let mut cmd = Command::new(&me);
        // stderr stays: a VM that cannot be made says why.
        cmd.args(["--hold-empty-vm", "--mem", &mem_mib.to_string()])
            .stdin(Stdio::null());
        cmd
    })?;
    std::thread::sleep(Duration::from_secs(3));
    group.measure().map_err(|e| format!("empty VMs: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.hold_empty_vm {
        if let Err(e) = hold_empty_vm(args.mem) {
            eprintln!("restore-bench: {e}");
        }
        return ExitCode::FAILURE;
    }
    let vmm = args
        .vmm
        .clone()
        .unwrap_or_else(|| target_dir().join("release/vmm"));
    let host = HostKind::detect();
    println!(
        "restore-bench: host kind {}{}",
        host.name(),
        if host == HostKind::NestedEmulated {
            " (guest kernel work is instruction-emulated here; host-side figures are representative)"
        } else {
            ""
        }
    );
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("restore-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let run = || -> Result<(), String> {
        let snap = match &args.snapshot {
            Some(snap) => snap.clone(),
            None => {
                let (snap, snap_times) = make_snapshots(&args, &vmm, &dir)?;
                report(
                    &format!("snapshot ({} MiB guest, sparse file)", args.mem),
                    &snap_times,
                );
                snap
            }
        };
        let mut external = Vec::new();
        let mut internal = Vec::new();
        for _ in 0..args.restores {
            let (e, i) = restore_once(&vmm, &snap)?;
            external.push(e);
            internal.push(i);
        }
        report("restore: vmm exec -> vCPUs running", &external);
        report("restore: vmm main() -> vCPUs running", &internal);
        let mut prespawned = Vec::new();
        for i in 0..args.restores {
            prespawned.push(prespawned_once(&vmm, &snap, &dir, i)?);
        }
        report("restore: pre-spawned vmm, request -> running", &prespawned);
        let mut replies = Vec::new();
        for i in 0..args.replies {
            replies.push(reply_once(&vmm, &snap, i, args.cold)?);
        }
        let cache = if args.cold {
            "cold page cache"
        } else {
            "warm page cache"
        };
        report(
            &format!("restore: exec -> guest reply line ({cache})"),
            &replies,
        );
        let (ws, ws_reply) = record_working_set(&vmm, &snap, &dir)?;
        println!("working set after one request: {ws_reply}");
        let mut prefetched = Vec::new();
        for i in 0..args.replies {
            prefetched.push(reply_once_with(
                &vmm,
                &snap,
                i,
                args.cold,
                &["--working-set".as_ref(), ws.as_os_str()],
            )?);
        }
        report("  ... with working-set prefetch", &prefetched);
        println!(
            "{:<7} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>11} {:>11}",
            "guests",
            "guest PSS",
            "guest priv",
            "VMM PSS",
            "VMM priv",
            "MemAvail -",
            "charged",
            "of it kern",
            "empty kern",
            "MemAvail -"
        );
        let opt = |c: Option<u64>| c.map(mib).unwrap_or_else(|| "n/a".into());
        for &n in &args.density {
            let d = density(&vmm, &snap, n)?;
            let (floor_drop, floor) = empty_vm_floor(args.mem, n)?;
            println!(
                "{n:<7} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>11} {:>11}",
                mib(d.smaps.guest_pss),
                mib(d.smaps.guest_private),
                mib(d.smaps.vmm_pss),
                mib(d.smaps.vmm_private),
                mib(d.mem_available_drop),
                opt(d.charged.map(|c| c.total)),
                opt(d.charged.map(|c| c.kernel)),
                opt(floor.map(|c| c.kernel)),
                mib(floor_drop)
            );
        }
        println!(
            "(per guest. smaps: guest = the snapshot mapping, VMM = the rest of the process; \
             MemAvail - = MemAvailable drop; charged = memory-cgroup charge of the guests' \
             processes less page cache, of which kernel memory (KVM, page tables, stacks, \
             io_uring); empty kern, MemAvail - = kernel memory charged and MemAvailable \
             drop for a process holding only a VM, an irqchip, one vCPU and the memslot: \
             the host kernel's own per-VM cost, plus any process's page tables and stack)"
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restore-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
