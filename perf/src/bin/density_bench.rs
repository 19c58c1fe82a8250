//! `density-bench`: memory per idle instance and wake latency as the
//! number of idle instances on the host grows.
//!
//! Deploys one app (the busybox httpd test image by default) the way
//! `little deploy` does (import, boot to READY, snapshot), then for each N
//! restores N idle instances of its snapshot through the platform's own
//! code (`platform::instance`: a standby `vmm` with the app's device flags,
//! `restore <snapshot>`, the agent channel answered), and measures:
//! host memory per instance (MemAvailable drop / N, and PSS / private
//! bytes from `/proc/<pid>/smaps` as `restore-bench` does), then the wake
//! latency of a new instance at that N: a client connects to a listener,
//! the accepted socket is handed to a freshly restored instance (standby
//! pre-spawned, as `little serve` keeps one), and the client times connect
//! → first byte of the HTTP reply. Prints a table and, with `--svg`, plots
//! memory per instance and wake latency against N.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use perf::memory::{mem_available, process_memory};
use perf::{default_kernel, percentile, target_dir};
use platform::api::AppSpec;
use platform::db::AppRecord;
use platform::instance::{Instance, Standby};
use platform::settings::Settings;
use vmm::host::HostKind;

/// Memory per idle instance and wake latency against the number of idle
/// instances.
#[derive(Parser, Debug)]
#[command(name = "density-bench", about)]
struct Args {
    /// Numbers of idle instances, e.g. 10,100,1000.
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    n: Vec<usize>,
    /// Wakes timed at each N.
    #[arg(long, default_value_t = 20)]
    wakes: usize,
    /// Write an SVG plot here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The image to deploy.
    #[arg(long, default_value = "target/test-images/httpd.oci")]
    image: PathBuf,
    /// Its guest port (an HTTP server).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Guest memory, MiB (as `little deploy --memory`).
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Seconds the idle instances settle before memory is read.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Guest kernel (default: target/guest-kernel/vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Run the VMMs jailed as `little serve` does (namespaces, pivot_root,
    /// the app's uid, cgroup, seccomp), without, or both in one run (N of
    /// each, restored and woken alternately).
    #[arg(long, value_enum, default_value = "off")]
    jail: JailMode,
}

/// Which VMMs `--jail` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum JailMode {
    /// Unjailed only.
    Off,
    /// Jailed only.
    On,
    /// Unjailed and jailed, alternately, for each N.
    Both,
}

impl JailMode {
    fn runs(self) -> &'static [bool] {
        match self {
            JailMode::Off => &[false],
            JailMode::On => &[true],
            JailMode::Both => &[false, true],
        }
    }
}

/// One N's figures; memory in bytes per instance.
struct Row {
    n: usize,
    jailed: bool,
    /// Standby `restore` → `ok running` (host side), median over the N
    /// idle instances.
    restore_p50: Duration,
    /// MemAvailable drop per instance (MemAvailable while they ran, until
    /// `row` fills in the baseline).
    drop: u64,
    pss: u64,
    private: u64,
    guest_pss: u64,
    vmm_pss: u64,
    wake_p50: Duration,
    wake_p99: Duration,
    handed: Duration,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Connect, send a GET, wait for the first byte; then drain.
fn first_byte(port: u16) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte)
        .map_err(|e| format!("no reply: {e}"))?;
    let t = start.elapsed();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(t)
}

struct Bench {
    settings: Settings,
    record: AppRecord,
    next_id: u64,
}

impl Bench {
    fn standby(&mut self) -> Result<Standby, String> {
        self.next_id += 1;
        Standby::spawn(&self.settings, &self.record, self.next_id, None).map_err(|e| e.to_string())
    }

    /// A restored instance and how long its restore took (`restore` →
    /// `ok running`, the standby already waiting).
    fn instance(&mut self) -> Result<(Instance, Duration), String> {
        let standby = self.standby()?;
        let start = Instant::now();
        let instance = standby.restore().map_err(|e| e.to_string())?;
        Ok((instance, start.elapsed()))
    }

    /// A pre-spawned standby; a client connects; the accepted socket goes
    /// to the instance restored in that standby. (client time, accept →
    /// handed).
    fn wake(&mut self) -> Result<(Duration, Duration), String> {
        let standby = self.standby()?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let client = std::thread::spawn(move || first_byte(port));
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        let accepted = Instant::now();
        let instance = standby.restore().map_err(|e| e.to_string())?;
        instance.reserve();
        let handed = instance.hand_over(&stream, self.record.spec.port);
        let handed_after = accepted.elapsed();
        drop(stream);
        let result = client
            .join()
            .map_err(|_| "client thread panicked".to_owned())
            .and_then(|r| r);
        instance.kill();
        handed.map_err(|e| e.to_string())?;
        Ok((result?, handed_after))
    }

    /// N idle instances per entry of `modes` (jailed or not), restored
    /// alternately so both see the same host; then `wakes` wakes per mode,
    /// alternating too. One row per mode; the MemAvailable drop is over
    /// every instance of the run.
    fn row(
        &mut self,
        n: usize,
        wakes: usize,
        settle: Duration,
        modes: &[bool],
    ) -> Result<Vec<Row>, String> {
        let before = mem_available().map_err(|e| e.to_string())?;
        let mut idle: Vec<(bool, Instance)> = Vec::with_capacity(n * modes.len());
        let mut restores: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); modes.len()];
        let restored = (|| {
            for _ in 0..n {
                for (m, &jailed) in modes.iter().enumerate() {
                    self.settings.jail = jailed;
                    let (instance, took) = self.instance()?;
                    idle.push((jailed, instance));
                    restores[m].push(took);
                }
            }
            Ok::<_, String>(())
        })();
        let measured = restored.and_then(|()| {
            std::thread::sleep(settle);
            let during = mem_available().map_err(|e| e.to_string())?;
            let mut rows = Vec::new();
            let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(wakes); modes.len()];
            let mut handed = vec![Duration::ZERO; modes.len()];
            for _ in 0..wakes {
                for (m, &jailed) in modes.iter().enumerate() {
                    self.settings.jail = jailed;
                    let (t, h) = self.wake()?;
                    times[m].push(t);
                    handed[m] += h;
                }
            }
            for (m, &jailed) in modes.iter().enumerate() {
                // The guest's memory is the snapshot mapping, named as the
                // VMM opened it.
                let snapshot = if jailed {
                    PathBuf::from(platform::jail::SNAPSHOT)
                } else {
                    self.record.snapshot.clone()
                };
                let (mut guest_pss, mut guest_private, mut vmm_pss, mut vmm_private) = (0, 0, 0, 0);
                for (_, i) in idle.iter().filter(|(j, _)| *j == jailed) {
                    if !i.alive() {
                        return Err(format!("instance {} died while idle", i.id));
                    }
                    let m = process_memory(i.pid, &snapshot).map_err(|e| e.to_string())?;
                    guest_pss += m.guest_pss;
                    guest_private += m.guest_private;
                    vmm_pss += m.vmm_pss;
                    vmm_private += m.vmm_private;
                }
                times[m].sort();
                restores[m].sort();
                let list: Vec<String> = times[m].iter().map(|t| format!("{:.0}", ms(*t))).collect();
                let jail = if jailed { "on" } else { "off" };
                println!("  N={n} jail {jail}: wakes, ms: {}", list.join(" "));
                let per = |v: u64| v / n.max(1) as u64;
                rows.push(Row {
                    n,
                    jailed,
                    restore_p50: percentile(&restores[m], 50).unwrap_or_default(),
                    drop: during,
                    pss: per(guest_pss + vmm_pss),
                    private: per(guest_private + vmm_private),
                    guest_pss: per(guest_pss),
                    vmm_pss: per(vmm_pss),
                    wake_p50: percentile(&times[m], 50).unwrap_or_default(),
                    wake_p99: percentile(&times[m], 99).unwrap_or_default(),
                    handed: handed[m] / u32::try_from(wakes.max(1)).unwrap_or(1),
                });
            }
            Ok(rows)
        });
        let count = idle.len();
        for (_, i) in idle {
            i.kill();
        }
        // MemAvailable drifts with whatever else the host runs: the
        // baseline is the mean of the readings before the restores and
        // after the kills.
        std::thread::sleep(Duration::from_secs(1));
        let after = mem_available().map_err(|e| e.to_string())?;
        measured.map(|mut rows| {
            let baseline = before / 2 + after / 2;
            for r in &mut rows {
                r.drop = baseline.saturating_sub(r.drop) / count.max(1) as u64;
            }
            rows
        })
    }
}

/// A round upper bound for an axis: 1, 2 or 5 × 10^k above `v`.
fn nice_max(v: f64) -> f64 {
    let v = v.max(1e-9) * 1.1;
    let k = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * k)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * k)
}

/// Two panels: memory per instance, and wake latency, against N (log x).
fn svg(rows: &[Row], title: &str) -> String {
    const W: f64 = 360.0;
    const H: f64 = 300.0;
    let (left, right, top, bottom) = (58.0, 20.0, 48.0, 52.0);
    let ns: Vec<f64> = rows.iter().map(|r| r.n as f64).collect();
    let (lo, hi) = (
        ns.iter().cloned().fold(f64::MAX, f64::min).log10(),
        ns.iter().cloned().fold(f64::MIN, f64::max).log10(),
    );
    let span = if hi > lo { hi - lo } else { 1.0 };
    let x =
        |n: f64, off: f64| off + left + 10.0 + (n.log10() - lo) / span * (W - left - right - 20.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"16\" text-anchor=\"middle\" font-size=\"12\">{title}</text>\n",
        2.0 * W,
        H,
        W
    );
    type Series<'a> = (&'a str, &'a str, &'a str, Box<dyn Fn(&Row) -> f64 + 'a>);
    let panels: [(&str, &str, Vec<Series>); 2] = [
        (
            "memory per idle instance",
            "MiB",
            vec![
                (
                    "MemAvailable drop / N",
                    "#1f77b4",
                    "",
                    Box::new(|r: &Row| mib(r.drop)),
                ),
                ("PSS", "#2ca02c", "6,3", Box::new(|r: &Row| mib(r.pss))),
                (
                    "private",
                    "#d62728",
                    "2,3",
                    Box::new(|r: &Row| mib(r.private)),
                ),
            ],
        ),
        (
            "wake, connect \u{2192} first byte",
            "ms",
            vec![
                ("p99", "#d62728", "", Box::new(|r: &Row| ms(r.wake_p99))),
                ("p50", "#1f77b4", "6,3", Box::new(|r: &Row| ms(r.wake_p50))),
            ],
        ),
    ];
    for (p, (name, unit, series)) in panels.iter().enumerate() {
        let off = p as f64 * W;
        let ymax = nice_max(
            rows.iter()
                .flat_map(|r| series.iter().map(move |s| (s.3)(r)))
                .fold(0.0, f64::max),
        );
        let y = |v: f64| H - bottom - v / ymax * (H - top - bottom);
        out += &format!(
            "<text x=\"{}\" y=\"36\" text-anchor=\"middle\">{name} ({unit})</text>\n",
            off + W / 2.0
        );
        for t in 0..=4 {
            let v = ymax * f64::from(t) / 4.0;
            let (x1, x2, yv) = (off + left, off + W - right, y(v));
            // Quarter ticks of a small scale need decimals (1.25, 2.5...).
            let label = if ymax < 40.0 && v.fract() != 0.0 {
                format!("{v:.2}")
            } else {
                format!("{v:.0}")
            };
            out += &format!(
                "<line x1=\"{x1}\" x2=\"{x2}\" y1=\"{yv:.1}\" y2=\"{yv:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>\n",
                x1 - 4.0,
                yv + 4.0,
            );
        }
        for &n in &ns {
            out += &format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>\n",
                x(n, off),
                H - bottom + 16.0
            );
        }
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">idle instances N</text>\n\
             <line x1=\"{l}\" x2=\"{l}\" y1=\"{top}\" y2=\"{b}\" stroke=\"black\"/>\
             <line x1=\"{l}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"black\"/>\n",
            off + W / 2.0,
            H - bottom + 32.0,
            off + W - right,
            l = off + left,
            b = H - bottom,
        );
        for (k, (label, color, dash, value)) in series.iter().enumerate() {
            let points: Vec<String> = rows
                .iter()
                .map(|r| format!("{:.1},{:.1}", x(r.n as f64, off), y(value(r))))
                .collect();
            out += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>\n",
                points.join(" ")
            );
            for r in rows {
                out += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                    x(r.n as f64, off),
                    y(value(r))
                );
            }
            let ly = H - 8.0;
            let lx = off
                + left
                + series[..k]
                    .iter()
                    .map(|s| s.0.len() as f64 * 6.0 + 40.0)
                    .sum::<f64>();
            out += &format!(
                "<line x1=\"{lx}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/>\
                 <text x=\"{}\" y=\"{ly}\">{label}</text>\n",
                lx + 18.0,
                ly - 4.0,
                ly - 4.0,
                lx + 22.0
            );
        }
    }
    out + "</svg>\n"
}

fn main() -> ExitCode {
    let args = Args::parse();
    let host = HostKind::detect();
    let emulated = host == HostKind::NestedEmulated;
    println!(
        "density-bench: host kind {}, {} cores{}",
        host.name(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if emulated {
            " (guest kernel work is instruction-emulated here: wake times are guest-bound; memory and host-side figures are representative)"
        } else {
            ""
        }
    );
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("density-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Jailed VMMs become this process's children once their jailing
    // process exits, as they become the daemon's.
    if let Err(e) = platform::process::become_subreaper() {
        eprintln!("density-bench: {e}");
        return ExitCode::FAILURE;
    }
    let run = || -> Result<(), String> {
        let jailing = args.jail != JailMode::Off;
        let cgroups = if jailing && platform::jail::running_as_root() {
            let tree = platform::cgroup::tree_name(tmp.path());
            Some(
                platform::cgroup::Cgroups::open(&tree)
                    .map_err(|e| platform::daemon::error_chain(&e))?,
            )
        } else {
            None
        };
        let settings = Settings {
            home: tmp.path().to_path_buf(),
            kernel: args.kernel.clone().unwrap_or_else(default_kernel),
            vmm: target_dir().join("release/vmm"),
            agent: target_dir().join("release/guest-agent"),
            standby: 1,
            jail: jailing,
            cgroups,
        };
        let image = std::fs::canonicalize(&args.image)
            .map_err(|e| format!("{}: {e}", args.image.display()))?;
        let spec = AppSpec {
            name: "density".into(),
            image: image.display().to_string(),
            port: args.port,
            listen: "127.0.0.1:0".into(),
            memory_mib: args.memory,
            concurrency: 10,
            min: 0,
            max: u32::MAX,
            idle_timeout_ms: 1000,
            env: Vec::new(),
            allow_host: Vec::new(),
            volumes: Vec::new(),
            ready_timeout_ms: 600_000,
            ready_cmd: None,
        };
        let start = Instant::now();
        // Jailed or not, every run restores the one snapshot this boot
        // takes (jailed when any run is, so its files are the app's user's).
        let record = platform::deploy::deploy(
            &settings,
            &spec,
            platform::jail::uid_base(),
            Vec::new(),
            None,
        )
        .map_err(|e| platform::daemon::error_chain(&e))?;
        println!(
            "deploy {} ({} MiB guest): {:.1} s",
            args.image.display(),
            args.memory,
            start.elapsed().as_secs_f64()
        );
        let mut bench = Bench {
            settings,
            record,
            next_id: 0,
        };
        println!(
            "{:>6} {:>5} {:>10} {:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
            "N",
            "jail",
            "restore",
            "MemAvail drop",
            "PSS",
            "private",
            "guest PSS",
            "VMM PSS",
            "wake p50",
            "wake p99",
            "hand-over"
        );
        let mut rows = Vec::new();
        for &n in &args.n {
            let settle = Duration::from_secs(args.settle);
            // Like for like: unjailed VMMs each compete for the CPU as a
            // process of weight 100; the jailed ones sit in one cgroup tree,
            // which gets the weight of as many processes.
            if let Some(tree) = &bench.settings.cgroups {
                let weight = u64::try_from(n + args.wakes + 1).unwrap_or(u64::MAX) * 100;
                tree.set_cpu_weight(weight)
                    .map_err(|e| platform::daemon::error_chain(&e))?;
            }
            for r in bench.row(n, args.wakes, settle, args.jail.runs())? {
                println!(
                "{:>6} {:>5} {:>7.2} ms {:>10.2} MiB {:>6.2} MiB {:>6.2} MiB {:>6.2} MiB {:>6.2} MiB {:>7.1} ms {:>7.1} ms {:>9.2} ms",
                r.n,
                if r.jailed { "on" } else { "off" },
                ms(r.restore_p50),
                mib(r.drop),
                mib(r.pss),
                mib(r.private),
                mib(r.guest_pss),
                mib(r.vmm_pss),
                ms(r.wake_p50),
                ms(r.wake_p99),
                ms(r.handed)
            );
                rows.push(r);
            }
        }
        println!(
            "(restore: a standby vmm's restore -> vCPUs running, host side, median over the N; memory per idle instance; wake: a new instance restored in a pre-spawned standby vmm while N idle ones run, client connect -> first byte, {} wakes per N{}; hand-over: accept -> socket handed to the restored instance, mean, host side)",
            args.wakes,
            if emulated { ", guest kernel emulated" } else { "" }
        );
        if let Some(tree) = &bench.settings.cgroups {
            tree.remove();
        }
        if let Some(path) = &args.svg {
            let title = format!(
                "little.cloud density: busybox httpd, {} MiB guest, host {}{}",
                args.memory,
                host.name(),
                if emulated {
                    " (guest kernel emulated)"
                } else {
                    ""
                }
            );
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            std::fs::write(path, svg(&rows, &title))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            println!("plot written to {}", path.display());
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("density-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
