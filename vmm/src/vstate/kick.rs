//! Kicking a vCPU thread out of KVM_RUN: a real-time signal whose handler
//! sets `immediate_exit` in that thread's `kvm_run`, so a kick that lands
//! just before KVM_RUN is not lost (the same scheme as Firecracker).

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;

thread_local! {
    /// The calling vCPU thread's `kvm_run` page, or null on other threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_signo: libc::c_int) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a non-null pointer was registered by this very thread with
        // `register_current` and points to its vCPU's kvm_run mapping, which
        // outlives the thread's use of KVM_RUN; a byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
pub fn install_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: `sigaction` with a zeroed struct, an `extern "C"` handler
        // that only does an async-signal-safe store, and an empty mask; the
        // old action is not needed.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// Registers the calling thread's `kvm_run` for the kick handler.
pub fn register_current(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// Forgets the calling thread's `kvm_run` (before the vCPU is dropped).
pub fn unregister_current() {
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// Sends the kick signal to `thread`.
pub fn kick(thread: libc::pthread_t) -> std::io::Result<()> {
    // SAFETY: `thread` is a live pthread of this process (the caller holds
    // its JoinHandle); sending a signal with an installed handler is benign.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}
