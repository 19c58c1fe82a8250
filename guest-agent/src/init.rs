//! The agent as PID 1: boot the guest's user space, run the entrypoint,
//! then restart the VM (the VMM turns the restart into its own exit).

use crate::console::Console;
use crate::ready::{Readiness, ReadyCommand};
use crate::spawn::{spawn, Plan};
use crate::supervise::{stop, wait_entrypoint, Signals};
use crate::sys::{self, Errno, EBADF, O_RDWR};
use crate::vsock::HostLink;
use alloc::ffi::CString;
use alloc::vec::Vec;
use guest_agent::cmdline::BootOptions;
use guest_agent::config::{Config, ConfigError, MAX_FILE_LEN};
use guest_agent::mounts::{mount_ok, Mount, DEV, EEXIST, PROC, REST};
use guest_agent::report::Event;
use guest_agent::signals::Scope;
use guest_agent::volume::Problem;

/// Largest `/proc/cmdline` read (the x86 command line is 2048 bytes).
const CMDLINE_CAP: usize = 4096;

/// Why the boot stopped.
enum Failure {
    Sys {
        what: &'static str,
        errno: i32,
    },
    Config(ConfigError),
    Volume {
        serial: Vec<u8>,
        path: Vec<u8>,
        problem: Problem,
    },
}

impl Failure {
    fn event(&self) -> Event<'_> {
        match *self {
            Self::Sys { what, errno } => Event::Fatal { what, errno },
            Self::Config(err) => Event::BadConfig(err),
            Self::Volume {
                ref serial,
                ref path,
                problem,
            } => Event::VolumeFailed {
                serial,
                path,
                problem,
            },
        }
    }
}

fn fatal(what: &'static str) -> impl Fn(Errno) -> Failure {
    move |Errno(errno)| Failure::Sys { what, errno }
}

/// PID 1's whole life.
pub fn main() -> ! {
    let mut console = Console::default();
    announce(&mut console);
    if let Err(failure) = boot(&mut console) {
        let _ = console.report(failure.event());
    }
    restart(console)
}

/// Prints the start line, first giving init a console if the kernel could
/// not (an initramfs without `/dev/console` leaves fds 0-2 closed).
fn announce(console: &mut Console) {
    if console.report(Event::Started) == Err(EBADF) {
        let _ = sys::mkdir(DEV.target, DEV.dir_mode);
        let _ = mount(&DEV);
        if let Ok(fd) = sys::open(c"/dev/console", O_RDWR) {
            for target in 0..3 {
                let _ = sys::dup2(fd, target);
            }
            if fd > 2 {
                sys::close(fd);
            }
        }
        let _ = console.report(Event::Started);
    }
}

fn mount(m: &Mount) -> sys::Result<()> {
    match sys::mount(m.source, m.target, m.fstype, m.flags, m.data) {
        Err(Errno(errno)) if !mount_ok(errno) => Err(Errno(errno)),
        _ => Ok(()),
    }
}

/// Creates the mount point and mounts; optional mounts only report.
fn mount_step(m: &Mount, console: Console) -> Result<(), Failure> {
    if let Err(Errno(errno)) = sys::mkdir(m.target, m.dir_mode) {
        if errno != EEXIST {
            let _ = console.report(Event::Skipped {
                what: "mkdir",
                errno,
            });
        }
    }
    match mount(m) {
        Ok(()) => Ok(()),
        Err(Errno(errno)) if m.required => Err(Failure::Sys {
            what: m.what,
            errno,
        }),
        Err(Errno(errno)) => {
            let _ = console.report(Event::Skipped {
                what: m.what,
                errno,
            });
            Ok(())
        }
    }
}

fn boot(console: &mut Console) -> Result<(), Failure> {
    mount_step(&PROC, *console)?;
    let cmdline =
        sys::read_file(c"/proc/cmdline", CMDLINE_CAP).map_err(fatal("read /proc/cmdline"))?;
    let options = BootOptions::parse(&cmdline);
    console.verbose = options.verbose;

    let path = CString::new(options.config_path).map_err(|_| fatal("config path")(sys::EINVAL))?;
    let _ = console.report(Event::Progress {
        what: "config",
        subject: options.config_path,
    });
    let file = sys::read_file(&path, MAX_FILE_LEN).map_err(fatal("read config"))?;
    let config = Config::parse(&file).map_err(Failure::Config)?;
    drop(file);
    console.verbose |= config.verbose;

    for m in &REST {
        mount_step(m, *console)?;
    }
    // `little.root=`: the image's disk, under an overlay, becomes `/`.
    if let Some(steps) = guest_agent::rootfs::RootOptions::parse(&cmdline).plan() {
        crate::switch_root::run(&steps).map_err(|(what, errno)| Failure::Sys { what, errno })?;
    }
    // Volumes mount in the image's root, over what the image has there.
    crate::volumes::attach_all(&config.volumes, *console).map_err(|(volume, problem)| {
        Failure::Volume {
            serial: volume.serial.clone(),
            path: volume.path.clone(),
            problem,
        }
    })?;
    // `little.dns=`: the VMM's network names its DNS forwarder.
    if let Some(text) = guest_agent::dns::resolv_conf(&cmdline) {
        if let Err(Errno(errno)) = sys::write_file(c"/etc/resolv.conf", 0o644, &text) {
            let _ = console.report(Event::Skipped {
                what: "write /etc/resolv.conf",
                errno,
            });
        }
    }
    if let Err(Errno(errno)) = sys::sethostname(&config.hostname) {
        let _ = console.report(Event::Skipped {
            what: "sethostname",
            errno,
        });
    }
    if let Err(Errno(errno)) = sys::interface_up(b"lo") {
        let _ = console.report(Event::Skipped {
            what: "loopback up",
            errno,
        });
    }

    // The host channel (vsock), if the VM has one and the host listens.
    let command = if config.ready_cmd.is_empty() {
        None
    } else {
        let plan = Plan::ready_command(&config, options.nested, true, *console)
            .map_err(fatal("prepare the ready command"))?;
        Some(ReadyCommand::new(plan))
    };
    let mut link = HostLink::open(Readiness::new(config.ready_port, command));
    let signals = Signals::open().map_err(fatal("signalfd"))?;
    let plan =
        Plan::new(&config, options.nested, true, *console).map_err(fatal("prepare entrypoint"))?;
    let _ = console.report(Event::Progress {
        what: "exec",
        subject: &config.args[0],
    });
    let pid = spawn(&plan).map_err(fatal("clone"))?;
    drop(plan);
    let status = wait_entrypoint(&signals, pid, *console, &mut link)
        .map_err(fatal("wait for entrypoint"))?;
    let _ = console.report(Event::EntrypointExited(status));
    link.exited(status);
    stop(&signals, Scope::Everyone, config.stop_grace_ms, *console);
    crate::volumes::detach_all(&config.volumes, *console);
    link.close();
    Ok(())
}

/// Flushes filesystems (`sync` waits until every file system, the
/// volumes included, is on its disk) and restarts the VM. The VMM boots the kernel with
/// `reboot=k`, so the restart goes out through the keyboard controller's
/// reset line and the VMM exits. PID 1 must never exit (the kernel would
/// panic), so if the restart fails the agent parks.
pub fn restart(console: Console) -> ! {
    sys::sync();
    let Errno(errno) = sys::reboot_restart();
    let _ = console.report(Event::Fatal {
        what: "reboot",
        errno,
    });
    loop {
        // Wait forever without spinning; signals stay blocked or are
        // ignored by PID 1.
        let _ = sys::poll_readable(-1, u64::from(u32::MAX));
    }
}
