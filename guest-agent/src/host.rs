//! Modes for running the agent as an ordinary process (its pid is not 1),
//! for host tests and manual checks:
//!
//! - `guest-agent --check-config FILE [--nested]`: parse FILE, print it
//!   back in canonical form followed by `#` comment lines with the
//!   effective environment and the exec candidates; exit 0, or 1 with the
//!   error on stderr.
//! - `guest-agent --run FILE [--nested]`: run the entrypoint as PID 1
//!   would (same spawn, signal forwarding, reaping, console lines and stop
//!   round) but without mounts, hostname, loopback or credential changes,
//!   stopping only the entrypoint's process group, and exiting with the
//!   entrypoint's shell code (status, or 128 + signal) instead of
//!   restarting.
//! - `guest-agent --copy-tree SRC DST`: fill directory DST from directory
//!   SRC exactly as a new volume is filled from the image at boot (see
//!   [`crate::copy_tree`]); print `filled`, `not empty` or `no source`
//!   and exit 0, or print the errno and exit 1.
//! - `guest-agent --vsock-test LISTEN HOSTPORT TCPPORT` (inside a guest,
//!   as an entrypoint): connect to host vsock port HOSTPORT, send
//!   `hello from the guest`, print the host's one-line answer; listen on
//!   127.0.0.1:TCPPORT (for `ready_port`); accept one vsock stream on port
//!   LISTEN and echo it until end-of-file; exit 0. A diagnostic for the
//!   vsock device in both directions with no process besides the agent.

use crate::console::Console;
use crate::copy_tree::Outcome;
use crate::spawn::{spawn, Plan};
use crate::supervise::{stop, wait_entrypoint, Signals};
use crate::sys::{self, Errno};
use alloc::ffi::CString;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use guest_agent::config::{write_escaped, Config, MAX_FILE_LEN};
use guest_agent::report::{Event, LineBuf};
use guest_agent::signals::Scope;

const USAGE: &str = "usage: guest-agent --check-config FILE [--nested]\n       guest-agent --run FILE [--nested]\n       guest-agent --copy-tree SRC DST\n(as PID 1 it takes no arguments)\n";

/// Entry point when not PID 1; returns the exit code.
pub fn main(args: &[&[u8]]) -> u8 {
    if let [_, b"--vsock-test", listen, host_port, tcp_port] = args {
        return crate::vsock::self_test(listen, host_port, tcp_port);
    }
    if let [_, b"--copy-tree", src, dst] = args {
        return copy_tree(src, dst);
    }
    let (mode, file, nested) = match args {
        [_, mode, file] => (*mode, *file, false),
        [_, mode, file, b"--nested"] => (*mode, *file, true),
        _ => return usage(),
    };
    let config = match load(file) {
        Ok(config) => config,
        Err(()) => return 1,
    };
    match mode {
        b"--check-config" => check(&config, nested),
        b"--run" => run(&config, nested),
        _ => usage(),
    }
}

fn usage() -> u8 {
    let _ = sys::write_all(2, USAGE.as_bytes());
    2
}

fn eprint(line: core::fmt::Arguments<'_>) {
    let _ = sys::write_all(2, LineBuf::<512>::line(line).as_bytes());
}

fn load(file: &[u8]) -> Result<Config, ()> {
    let path = CString::new(file).map_err(|_| eprint(format_args!("bad path")))?;
    let bytes = sys::read_file(&path, MAX_FILE_LEN)
        .map_err(|Errno(errno)| eprint(format_args!("read config failed: errno {errno}")))?;
    Config::parse(&bytes).map_err(|err| eprint(format_args!("{err}")))
}

fn check(config: &Config, nested: bool) -> u8 {
    let plan = match Plan::new(config, nested, false, Console::default()) {
        Ok(plan) => plan,
        Err(Errno(errno)) => {
            eprint(format_args!("prepare entrypoint failed: errno {errno}"));
            return 1;
        }
    };
    let mut out = String::new();
    let listed = (|| {
        config.write_to(&mut out)?;
        for entry in plan.env() {
            out.write_str("# effective env ")?;
            write_escaped(&mut out, entry.as_bytes())?;
            out.write_char('\n')?;
        }
        for candidate in plan.candidates() {
            out.write_str("# exec candidate ")?;
            write_escaped(&mut out, candidate.as_bytes())?;
            out.write_char('\n')?;
        }
        Ok::<(), core::fmt::Error>(())
    })();
    if listed.is_err() || sys::write_all(1, out.as_bytes()).is_err() {
        return 1;
    }
    0
}

fn run(config: &Config, nested: bool) -> u8 {
    let console = Console {
        verbose: config.verbose,
    };
    let _ = console.report(Event::Started);
    // Orphans of the entrypoint come back to us, as they would to PID 1.
    let _ = sys::set_child_subreaper();
    let result = (|| {
        let signals = Signals::open()?;
        let plan = Plan::new(config, nested, false, console)?;
        let _ = console.report(Event::Progress {
            what: "exec",
            subject: &config.args[0],
        });
        let pid = spawn(&plan)?;
        drop(plan);
        let status = wait_entrypoint(&signals, pid, console, &mut crate::vsock::HostLink::none())?;
        let _ = console.report(Event::EntrypointExited(status));
        stop(&signals, Scope::Group(pid), config.stop_grace_ms, console);
        Ok::<u8, Errno>(status.code())
    })();
    result.unwrap_or_else(|Errno(errno)| {
        let _ = console.report(Event::Fatal { what: "run", errno });
        1
    })
}

fn copy_tree(src: &[u8], dst: &[u8]) -> u8 {
    let (Ok(src), Ok(dst)) = (CString::new(src), CString::new(dst)) else {
        return usage();
    };
    match crate::copy_tree::fill(&src, &dst) {
        Ok(outcome) => {
            let word: &[u8] = match outcome {
                Outcome::Filled => b"filled\n",
                Outcome::NotEmpty => b"not empty\n",
                Outcome::NoSource => b"no source\n",
            };
            u8::from(sys::write_all(1, word).is_err())
        }
        Err(Errno(errno)) => {
            eprint(format_args!("copy failed: errno {errno}"));
            1
        }
    }
}

/// Collects argv from the initial stack.
pub fn args(argc: usize, argv: *const *const u8) -> Vec<&'static [u8]> {
    (0..argc)
        .map(|i| {
            // SAFETY: the kernel put argc valid pointers at argv, each to a
            // NUL-terminated string that stays for the process's lifetime.
            unsafe { core::ffi::CStr::from_ptr((*argv.add(i)).cast()) }.to_bytes()
        })
        .collect()
}
