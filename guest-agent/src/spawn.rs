//! Starting the entrypoint.
//!
//! Everything the child needs is prepared in a [`Plan`] before the child
//! exists; the child (a `CLONE_VM | CLONE_VFORK` child sharing the agent's
//! memory) then only makes system calls, never allocates, and ends in
//! `execve` or `exit(127)`.

use crate::console::Console;
use crate::sys::{self, CStrArray, Errno, MaskHow};
use alloc::ffi::CString;
use alloc::vec::Vec;
use guest_agent::config::Config;
use guest_agent::env::{build_env, exec_candidates, lookup, ExecSearch, DEFAULT_PATH};
use guest_agent::report::Event;

/// Stack for the child, which runs until `execve`: formatting one error
/// line is the deepest it goes.
const CHILD_STACK_LEN: usize = 64 * 1024;

/// Exit code of a child that could not exec, as shells use.
pub const EXEC_FAILED: u8 = 127;

/// User and groups to switch to.
pub struct Credentials {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

/// What the child does, prepared in the parent.
pub struct Plan {
    program: Vec<u8>,
    candidates: Vec<CString>,
    argv: CStrArray,
    envp: CStrArray,
    cwd: CString,
    credentials: Option<Credentials>,
    take_console: bool,
    console: Console,
}

impl Plan {
    /// Prepares the entrypoint of `config`. `pid1` selects the guest
    /// behaviour (switch credentials, take the console as controlling
    /// terminal); the host test mode runs as the invoking user.
    pub fn new(config: &Config, nested: bool, pid1: bool, console: Console) -> sys::Result<Self> {
        Self::with_args(config, &config.args, nested, pid1, pid1, console)
    }

    /// Prepares `config`'s ready command: the entrypoint's user,
    /// environment and working directory, without the console's terminal.
    pub fn ready_command(
        config: &Config,
        nested: bool,
        pid1: bool,
        console: Console,
    ) -> sys::Result<Self> {
        Self::with_args(config, &config.ready_cmd, nested, pid1, false, console)
    }

    fn with_args(
        config: &Config,
        args: &[Vec<u8>],
        nested: bool,
        pid1: bool,
        take_console: bool,
        console: Console,
    ) -> sys::Result<Self> {
        let env = build_env(&config.env, nested);
        let program = args.first().cloned().unwrap_or_default();
        let path = lookup(&env, b"PATH").unwrap_or(DEFAULT_PATH);
        let candidates = exec_candidates(&program, path)
            .into_iter()
            .map(|c| CString::new(c).map_err(|_| sys::EINVAL))
            .collect::<sys::Result<Vec<_>>>()?;
        Ok(Self {
            candidates,
            argv: CStrArray::new(args.iter().map(Vec::as_slice))?,
            envp: CStrArray::new(env.iter().map(Vec::as_slice))?,
            cwd: CString::new(config.cwd.as_slice()).map_err(|_| sys::EINVAL)?,
            credentials: pid1.then(|| Credentials {
                uid: config.uid,
                gid: config.gid,
                groups: config.groups.clone(),
            }),
            take_console,
            program,
            console,
        })
    }

    /// The environment the entrypoint gets.
    pub fn env(&self) -> &[CString] {
        self.envp.strings()
    }

    /// The paths `execve` will try, in order.
    pub fn candidates(&self) -> &[CString] {
        &self.candidates
    }
}

/// Starts the entrypoint; returns its pid once it has exec'd (or failed
/// to, in which case it exits 127 and its SIGCHLD follows).
pub fn spawn(plan: &Plan) -> sys::Result<i32> {
    spawn_on(plan, &mut ChildStack::new())
}

/// A stack for spawned children, reusable: each child is done with it
/// once [`spawn_on`] returns. The agent's heap frees only its latest
/// block, so what spawns again and again keeps one of these.
pub struct ChildStack(Vec<u8>);

impl ChildStack {
    /// A fresh stack.
    pub fn new() -> Self {
        Self(alloc::vec![0u8; CHILD_STACK_LEN])
    }
}

/// [`spawn`] on `stack`.
pub fn spawn_on(plan: &Plan, stack: &mut ChildStack) -> sys::Result<i32> {
    let arg = core::ptr::from_ref(plan) as usize;
    sys::spawn_vfork(child_main, arg, &mut stack.0)
}

extern "C" fn child_main(arg: usize) -> ! {
    // SAFETY: `arg` is the address of the Plan that `spawn` borrows; with
    // CLONE_VFORK the parent sleeps inside `spawn` until this child execs
    // or exits, so the Plan outlives every use here, and nobody writes it.
    let plan = unsafe { &*(arg as *const Plan) };
    sys::exit(run_child(plan))
}

/// The child's work; returns the exit code when exec is impossible.
fn run_child(plan: &Plan) -> u8 {
    // The agent blocks the signals it reads from its signalfd; the mask
    // survives execve, so clear it for the entrypoint.
    let _ = sys::sigprocmask(MaskHow::Set, 0);
    // Own session and process group: forwarded signals go to the group,
    // and the console's Ctrl-C reaches it.
    let _ = sys::setsid();
    if plan.take_console {
        // Best effort: without a controlling terminal, job control and
        // Ctrl-C from the console do not work, but the program does.
        let _ = sys::set_controlling_tty(0);
    }
    if let Some(creds) = &plan.credentials {
        // Groups first: they need the privilege that setuid gives up.
        let switched = sys::setgroups(&creds.groups)
            .map_err(|e| ("setgroups", e))
            .and_then(|()| sys::setgid(creds.gid).map_err(|e| ("setgid", e)))
            .and_then(|()| sys::setuid(creds.uid).map_err(|e| ("setuid", e)));
        if let Err((what, Errno(errno))) = switched {
            let _ = plan.console.report(Event::Fatal { what, errno });
            return EXEC_FAILED;
        }
    }
    if let Err(Errno(errno)) = sys::chdir(&plan.cwd) {
        let _ = plan.console.report(Event::Fatal {
            what: "chdir",
            errno,
        });
        return EXEC_FAILED;
    }
    let mut search = ExecSearch::default();
    for candidate in &plan.candidates {
        let Errno(errno) = sys::execve(candidate, &plan.argv, &plan.envp);
        if !search.failed(errno) {
            break;
        }
    }
    let _ = plan.console.report(Event::ExecFailed {
        path: &plan.program,
        errno: search.errno(),
    });
    EXEC_FAILED
}
