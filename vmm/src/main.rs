//! `vmm`: boot one little.cloud microVM from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use std::time::Instant;

use vmm::builder::{self, GuestExit};
use vmm::config::{ConsoleOutput, VmConfig};
use vmm::runtime::{standby, RunOptions};
use vmm::snapshot::restore::{self, RestoreConfig};

/// Boot a Linux microVM on KVM: an uncompressed vmlinux, an initramfs, a
/// serial console. Exits 0 when the guest powers off or reboots.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, long_about = None)]
struct Args {
    /// Uncompressed ELF kernel image (vmlinux), e.g. from guest-kernel/build.sh.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["snapshot", "api_sock"])]
    kernel: Option<PathBuf>,

    /// Restore the microVM saved in this snapshot file instead of booting
    /// (its memory is mapped copy-on-write: clones share it).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initrd", "mem", "vcpus", "cmdline"])]
    snapshot: Option<PathBuf>,

    /// Control socket: accepts `ping`, `pause`, `resume`, `snapshot <path>`,
    /// `quit`, one per line. Given without --kernel or --snapshot, the VMM
    /// starts in standby and waits for `restore <snapshot>` on this socket
    /// (a pre-spawned VMM for fast wake-ups).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// With --snapshot: map the pages in this working-set file (recorded by
    /// the control command `working-set <path>`) ahead of use.
    #[arg(long, value_name = "PATH", requires = "snapshot")]
    working_set: Option<PathBuf>,

    /// Forward this process's stdin to the guest's serial console.
    #[arg(long)]
    console_input: bool,

    /// Initramfs (newc cpio) to boot as the root filesystem.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    mem: u64,

    /// Number of vCPUs (1 is the tested default on nested KVM hosts).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,

    /// Extra kernel command-line arguments, appended to the VMM's defaults.
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    cmdline: String,

    /// Use --cmdline as the whole kernel command line instead of appending it.
    #[arg(long)]
    cmdline_replace: bool,

    /// Where the guest's serial console goes: `stdout`, `null`, or a file path.
    #[arg(long, value_name = "stdout|null|PATH", default_value = "stdout")]
    console: String,

    /// A virtio-blk disk from a raw image, `path=PATH[,ro][,serial=ID]`;
    /// repeatable, the guest sees /dev/vda, /dev/vdb, ... in order.
    #[arg(long = "drive", value_name = "path=PATH[,ro][,serial=ID]")]
    drives: Vec<String>,

    /// Give the guest a virtio-net NIC on a private userspace network
    /// (guest 10.0.2.15/24, gateway 10.0.2.2 = host loopback, DNS 10.0.2.3).
    #[arg(long)]
    net: bool,

    /// Publish a host TCP port to a guest port, `[HOSTADDR:]HOSTPORT:GUESTPORT`
    /// (host address defaults to 127.0.0.1); repeatable; implies --net.
    #[arg(long, value_name = "SPEC")]
    publish: Vec<vmm::usernet::Publish>,

    /// Deny every outbound guest connection and DNS query (except --net-allow).
    #[arg(long)]
    net_deny_outbound: bool,

    /// Allow outbound connections to `A.B.C.D[/N][:PORT]`; repeatable.
    #[arg(long, value_name = "RULE")]
    net_allow: Vec<vmm::usernet::Rule>,

    /// Deny outbound connections to `A.B.C.D[/N][:PORT]`; repeatable, checked first.
    #[arg(long, value_name = "RULE")]
    net_deny: Vec<vmm::usernet::Rule>,

    /// A virtio-vsock device, `uds=PATH[,cid=N]` (cid defaults to 3): the VMM
    /// listens on PATH for `CONNECT <port>`; guest connections to host port
    /// P go to the Unix socket PATH_P.
    #[arg(long, value_name = "uds=PATH[,cid=N]")]
    vsock: Option<vmm::devices::virtio::vsock::VsockConfig>,

    /// Log filter: a level or a `target=level` list, e.g. `info` or
    /// `vmm=debug,warn`; `RUST_LOG` works too. Logs go to stderr.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

fn init_logging(filter: Option<&str>) {
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".to_owned());
    let log = vmm::logging::StderrLog::new(&filter).unwrap_or_else(|e| {
        eprintln!("vmm: {e}; logging warnings only");
        vmm::logging::StderrLog::new("warn").expect("\"warn\" is a valid filter")
    });
    if let Err(e) = log.install() {
        eprintln!("vmm: {e}");
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = Args::parse();
    init_logging(args.log.as_deref());
    let console = match args.console.as_str() {
        "stdout" => ConsoleOutput::Stdout,
        "null" => ConsoleOutput::Null,
        path => ConsoleOutput::File(PathBuf::from(path)),
    };
    let mut options = RunOptions {
        api_sock: args.api_sock,
        console_input: args.console_input,
        started: Some(started),
        ..RunOptions::default()
    };
    let drives = match args
        .drives
        .iter()
        .map(|d| vmm::devices::virtio::block::BlockConfig::parse(d))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(drives) => drives,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let net = (args.net || !args.publish.is_empty()).then(|| vmm::usernet::NetConfig {
        publish: args.publish,
        policy: vmm::usernet::Policy {
            allow_by_default: !args.net_deny_outbound,
            allow: args.net_allow,
            deny: args.net_deny,
        },
        ..Default::default()
    });
    let built = match (args.snapshot, args.kernel) {
        (Some(snapshot), _) => restore::restore(RestoreConfig {
            snapshot,
            console,
            net: net.clone(),
            drives: drives.clone(),
            vsock: args.vsock.clone(),
            working_set: args.working_set.clone(),
        }),
        (None, Some(kernel)) => builder::build(VmConfig {
            kernel,
            initrd: args.initrd,
            mem_mib: args.mem,
            vcpus: args.vcpus,
            cmdline_extra: args.cmdline,
            cmdline_replace: args.cmdline_replace,
            console,
            vsock: args.vsock,
            drives,
            net,
        }),
        (None, None) => match options.api_sock.clone() {
            Some(sock) => match standby::wait_for_restore(&sock) {
                Ok((snapshot, working_set, listener, client)) => {
                    options.restore_requested = Some(std::time::Instant::now());
                    options.api_listener = Some(listener);
                    options.notify = Some(client);
                    restore::restore(RestoreConfig {
                        snapshot,
                        console,
                        net: net.clone(),
                        drives: drives.clone(),
                        vsock: args.vsock.clone(),
                        working_set,
                    })
                }
                Err(e) => Err(e),
            },
            // clap requires --kernel unless --snapshot or --api-sock is given.
            None => return ExitCode::from(2),
        },
    };
    match built.and_then(|vm| vm.run(options)) {
        Ok(exit) => {
            tracing::info!(
                "guest {}",
                match exit {
                    GuestExit::Reset => "rebooted",
                    GuestExit::PowerOff => "powered off",
                    GuestExit::Quit => "stopped on request",
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm: error: {}", vmm::runtime::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
