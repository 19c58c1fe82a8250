//! Event loops for tests: one on a thread of its own ([`LoopThread`]), and
//! reaching a running handler's snapshot hooks the way the control socket
//! does, from another handler on the same loop ([`on_loop`], [`save_handler`]).

use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{Event, EventHandler, HandlerId, LoopHandle, Ops};

/// What [`save_handler`] saw: whether every other handler was quiescent,
/// and what the target's [`EventHandler::save`] returned.
pub type Saved = (bool, Option<Box<dyn Any + Send>>);

/// Runs its job once its eventfd is readable.
struct Probe<F, R> {
    evt: EventFd,
    job: Option<F>,
    tx: Sender<R>,
}

impl<F, R> EventHandler for Probe<F, R>
where
    F: FnOnce(&mut Ops<'_>) -> R + Send,
    R: Send,
{
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.evt.as_raw_fd(), 0, libc::POLLIN as u32);
    }

    fn handle(&mut self, _event: Event, ops: &mut Ops<'_>) {
        let _ = self.evt.read();
        ops.unwatch(0);
        if let Some(job) = self.job.take() {
            let _ = self.tx.send(job(ops));
        }
    }
}

/// Runs `job` on the loop behind `handle`, as a handler handling an event
/// (where the other handlers are in reach, as for the control socket), and
/// returns what it returned. Handlers added before are started by then.
///
/// # Panics
/// If the loop does not answer within five seconds.
pub fn on_loop<F, R>(handle: &LoopHandle, job: F) -> R
where
    F: FnOnce(&mut Ops<'_>) -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    evt.write(1).expect("eventfd write");
    let id = handle
        .add(Box::new(Probe {
            evt,
            job: Some(job),
            tx,
        }))
        .expect("loop running");
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the loop answers");
    let _ = handle.remove(id);
    result
}

/// Asks the loop behind `handle` for handler `target`'s snapshot state.
///
/// # Panics
/// If the loop does not answer within five seconds.
pub fn save_handler(handle: &LoopHandle, target: HandlerId) -> Saved {
    on_loop(handle, move |ops| {
        (ops.all_quiescent(), ops.save_handler(target))
    })
}

/// An event loop running on a thread of its own (a loop is not `Send`, so
/// it is built there), stopped and joined when dropped.
pub struct LoopThread {
    handle: LoopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopThread {
    /// Starts the loop.
    ///
    /// # Panics
    /// If io_uring cannot be set up.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut event_loop = super::EventLoop::new(64).expect("io_uring");
            tx.send(event_loop.handle()).expect("the test waits");
            event_loop.run().expect("the loop runs");
        });
        let handle = rx.recv().expect("the loop thread starts");
        Self {
            handle,
            thread: Some(thread),
        }
    }

    /// Adds and removes handlers on the loop.
    pub fn handle(&self) -> &LoopHandle {
        &self.handle
    }
}

impl Drop for LoopThread {
    fn drop(&mut self) {
        let _ = self.handle.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
