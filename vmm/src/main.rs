//! `vmm`: boot one little.cloud microVM from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use std::time::Instant;

use vmm::api::{self, standby};
use vmm::builder;
use vmm::cli::Args;
use vmm::config::{ConsoleOutput, RestoreConfig, VmConfig};
use vmm::vmm::{GuestExit, RunOptions};

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
    if let Err(e) = vmm::stop_signal::install() {
        eprintln!("vmm: error: {}", vmm::error_chain(&e));
        return ExitCode::FAILURE;
    }
    // Read from the host before the jail hides it.
    let wants_net = args.net || !args.publish.is_empty();
    let dns_upstream = wants_net.then(vmm::usernet::host_resolver);
    let host_addrs = match (wants_net && args.net_isolated, args.jail_root.is_some()) {
        (true, true) => match vmm::usernet::host_addresses() {
            Ok(addrs) => Some(addrs),
            Err(e) => {
                eprintln!("vmm: error: cannot list the host's addresses: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    if let Some(jail) = args.jail() {
        if let Err(e) = vmm::jail::enter(&jail) {
            eprintln!("vmm: error: {}", vmm::error_chain(&e));
            return ExitCode::FAILURE;
        }
    }
    if (args.seccomp || args.jail_root.is_some()) && !args.no_seccomp {
        let mode = if args.seccomp_log {
            vmm::seccomp::Mode::Log
        } else {
            vmm::seccomp::Mode::Kill
        };
        if let Err(e) = vmm::seccomp::install(mode) {
            eprintln!("vmm: error: {}", vmm::error_chain(&e));
            return ExitCode::FAILURE;
        }
    }
    let console = || match args.console.as_str() {
        "stdout" => ConsoleOutput::Stdout,
        "null" => ConsoleOutput::Null,
        path => ConsoleOutput::File {
            path: PathBuf::from(path),
            max_bytes: args.console_max_bytes,
        },
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
            isolated: args.net_isolated,
            allow: args.net_allow,
            deny: args.net_deny,
        },
        dns_upstream,
        host_addrs,
        ..Default::default()
    });
    let mut options = RunOptions {
        console_input: args.console_input,
        started: Some(started),
        ..RunOptions::default()
    };
    let restore = |snapshot, working_set| RestoreConfig {
        snapshot,
        console: console(),
        net: net.clone(),
        drives: drives.clone(),
        vsock: args.vsock.clone(),
        working_set,
    };
    let api_sock = args.api_sock.clone();
    let launched = match (args.snapshot.clone(), args.kernel.clone()) {
        (Some(snapshot), _) => launch(
            builder::build_from_snapshot(restore(snapshot, args.working_set.clone())),
            api_sock.as_deref(),
            None,
            options,
        ),
        (None, Some(kernel)) => launch(
            builder::build(VmConfig {
                kernel,
                initrd: args.initrd.clone(),
                mem_mib: args.mem,
                vcpus: args.vcpus,
                cmdline_extra: args.cmdline.clone(),
                cmdline_replace: args.cmdline_replace,
                console: console(),
                vsock: args.vsock.clone(),
                drives: drives.clone(),
                net: net.clone(),
            }),
            api_sock.as_deref(),
            None,
            options,
        ),
        (None, None) => match api_sock.as_deref() {
            Some(sock) => match standby::wait_for_restore(sock) {
                Ok((snapshot, working_set, listener, client)) => {
                    options.restore_requested = Some(Instant::now());
                    options.notify = Some(client);
                    launch(
                        builder::build_from_snapshot(restore(snapshot, working_set)),
                        None,
                        Some(listener),
                        options,
                    )
                }
                Err(e) => Err(e.into()),
            },
            // clap requires --kernel unless --snapshot or --api-sock is given.
            None => return ExitCode::from(2),
        },
    };
    if let Some(sock) = &api_sock {
        let _ = std::fs::remove_file(sock);
    }
    match launched {
        Ok(exit) => {
            tracing::info!(
                "guest {}",
                match exit {
                    GuestExit::Reset => "rebooted",
                    GuestExit::PowerOff => "powered off",
                    GuestExit::Quit => match vmm::stop_signal::received() {
                        Some(libc::SIGINT) => "stopped by SIGINT",
                        Some(libc::SIGTERM) => "stopped by SIGTERM",
                        _ => "stopped on request",
                    },
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm: error: {}", vmm::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// Starts a built VM, serves its control socket (bound at `api_sock`, or
/// the standby's `listener`) and runs it until it ends.
fn launch(
    built: Result<vmm::vmm::BuiltVm, builder::Error>,
    api_sock: Option<&std::path::Path>,
    listener: Option<std::os::unix::net::UnixListener>,
    options: RunOptions,
) -> Result<GuestExit, Box<dyn std::error::Error>> {
    let built = built?;
    let listener = match listener {
        Some(l) => Some(l),
        None => api_sock.map(api::bind).transpose()?,
    };
    let vm = built.start(options)?;
    if let Some(listener) = listener {
        api::serve(&vm, listener)?;
    }
    Ok(vm.run()?)
}
