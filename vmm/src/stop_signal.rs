//! SIGINT and SIGTERM stop the VMM cleanly, as the control socket's `quit`
//! does: the event loop ends, the VM is torn down and the control socket
//! removed. Before a VM runs (a standby waiting for `restore`, a boot
//! being built) the process exits at once, as the default action would.
//!
//! The handler is needed even for the default behaviour: a jailed VMM is
//! PID 1 of its PID namespace, and the kernel drops signals the namespace's
//! init has no handler for, so without one Ctrl-C and `kill` did nothing.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{Event, EventHandler, Ops};

/// The eventfd the handler writes to while a VM runs; -1 otherwise.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The last stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Why installing the handler failed.
#[derive(Debug, thiserror::Error)]
pub enum StopSignalError {
    /// `sigaction` failed for a signal.
    #[error("cannot handle signal {0}")]
    Install(libc::c_int, #[source] std::io::Error),
    /// The eventfd could not be made.
    #[error("cannot make the stop eventfd")]
    EventFd(#[source] std::io::Error),
}

extern "C" fn on_stop(signo: libc::c_int) {
    RECEIVED.store(signo, Ordering::Relaxed);
    let fd = STOP_FD.load(Ordering::Acquire);
    if fd < 0 {
        // SAFETY: `_exit` is async-signal-safe and ends the process at
        // once; nothing of the VMM runs yet that would need tearing down.
        unsafe { libc::_exit(128 + signo) };
    }
    let one = 1u64;
    // SAFETY: `write` is async-signal-safe; `fd` is the watcher's eventfd,
    // kept open until its `Drop` has reset STOP_FD, and the source is an
    // 8-byte local.
    unsafe { libc::write(fd, std::ptr::from_ref(&one).cast(), 8) };
}

/// Installs the SIGINT and SIGTERM handler and unblocks both (once,
/// before any thread starts, so that every thread inherits the mask): a
/// process inherits its blocked signals from its parent, and `little
/// serve` blocks these in every thread to `sigwait` for them.
pub fn install() -> Result<(), StopSignalError> {
    // SAFETY: sigset_t is plain data that sigemptyset initializes; the
    // signal numbers are valid and the old mask is not needed.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(StopSignalError::Install(
            libc::SIGTERM,
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    for signo in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `sigaction` with a zeroed struct, an `extern "C"` handler
        // that only makes async-signal-safe calls, SA_RESTART so that no
        // other call sees EINTR, and an empty mask; the old action is not
        // needed.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signo, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(StopSignalError::Install(
                signo,
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The signal that stopped the VMM, if one did.
pub fn received() -> Option<libc::c_int> {
    match RECEIVED.load(Ordering::Relaxed) {
        0 => None,
        signo => Some(signo),
    }
}

/// The event-loop side: a stop signal calls `stop`, then ends the loop.
pub struct StopWatcher {
    fd: EventFd,
    stop: Box<dyn FnMut() + Send>,
}

impl StopWatcher {
    /// Makes the watcher the handler's target; a signal that came before
    /// this (the VM being built) already ended the process.
    pub fn new(stop: Box<dyn FnMut() + Send>) -> Result<Self, StopSignalError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(StopSignalError::EventFd)?;
        STOP_FD.store(fd.as_raw_fd(), Ordering::Release);
        Ok(Self { fd, stop })
    }
}

impl Drop for StopWatcher {
    fn drop(&mut self) {
        // From here a signal exits the process again, before the eventfd
        // closes.
        let _ =
            STOP_FD.compare_exchange(self.fd.as_raw_fd(), -1, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl EventHandler for StopWatcher {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.fd.as_raw_fd(), 0, libc::POLLIN as u32);
    }

    fn handle(&mut self, _event: Event, ops: &mut Ops<'_>) {
        let _ = self.fd.read();
        (self.stop)();
        ops.stop_loop();
    }
}
