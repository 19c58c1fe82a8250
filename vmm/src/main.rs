//! `vmm`: boot one little.cloud microVM from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use std::time::Instant;

use vmm::builder::{self, GuestExit};
use vmm::cli::Args;
use vmm::config::{ConsoleOutput, VmConfig};
use vmm::runtime::{standby, RunOptions};
use vmm::snapshot::restore::{self, RestoreConfig};

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
