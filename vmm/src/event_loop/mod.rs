//! The VMM's single device event loop, on io_uring.
//!
//! One thread per VMM owns every device's runtime state, timers and sockets.
//! vCPU threads never touch them: a guest notification arrives as an
//! ioeventfd becoming readable, the handler processes its queue here and
//! raises an irqfd. Handlers are added from any thread through a
//! [`LoopHandle`]; once added they live on the loop thread until removed.
//!
//! Readiness uses multishot `POLL_ADD`, file I/O uses `READV`/`WRITEV`/`FSYNC`
//! straight into and out of guest memory, timers use `TIMEOUT`. An idle VMM
//! blocks in `io_uring_enter` and costs no CPU. The ring is created
//! disabled and restricted to exactly these opcodes (and no `register`
//! operation) before it is enabled (`IORING_REGISTER_RESTRICTIONS`), so a
//! compromised VMM cannot use it to reach what its seccomp filter forbids.
//!
//! ```
//! use std::os::fd::AsRawFd;
//! use vmm::event_loop::{Event, EventHandler, EventLoop, Ops};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! struct Once(EventFd);
//! impl EventHandler for Once {
//!     fn start(&mut self, ops: &mut Ops<'_>) {
//!         ops.watch(self.0.as_raw_fd(), 1, libc::POLLIN as u32);
//!     }
//!     fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
//!         assert!(matches!(event, Event::Ready { token: 1, .. }));
//!         ops.stop_loop();
//!     }
//! }
//!
//! let mut event_loop = EventLoop::new(64).unwrap();
//! let evt = EventFd::new(0).unwrap();
//! evt.write(1).unwrap();
//! event_loop.handle().add(Box::new(Once(evt))).unwrap();
//! event_loop.run().unwrap();
//! ```

mod ops;

use std::any::Any;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::IoUring;
use slab::Slab;
use vmm_sys_util::eventfd::EventFd;

pub use ops::{GuestIoError, Ops};
use ops::{Pending, PendingKind};

/// Identifies a handler on the loop.
pub type HandlerId = u32;
/// A handler's own name for one of its fds, operations or timers.
pub type Token = u32;

/// What a handler is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A watched fd is ready (`revents` as from poll(2)).
    Ready {
        /// The token given to [`Ops::watch`].
        token: Token,
        /// Poll events that fired.
        revents: u32,
    },
    /// An I/O operation finished: bytes transferred, or a negative errno.
    Done {
        /// The token given when submitting.
        token: Token,
        /// Result as io_uring reports it.
        result: i32,
    },
    /// A timer fired.
    Timer {
        /// The token given to [`Ops::timer`].
        token: Token,
    },
    /// Another handler on the loop has work for this one
    /// ([`Ops::notify`]).
    Notify {
        /// The token the other handler gave.
        token: Token,
    },
}

/// A device's handler (or any other component) living on the event loop.
pub trait EventHandler: Send {
    /// Called once on the loop thread when the handler is added: register fds here.
    fn start(&mut self, ops: &mut Ops<'_>);
    /// Called for each event of this handler.
    fn handle(&mut self, event: Event, ops: &mut Ops<'_>);
    /// Called when the handler is removed or the loop ends.
    fn stop(&mut self) {}

    /// Whether the handler has no I/O in flight; a snapshot waits until
    /// every handler is quiescent.
    fn quiescent(&self) -> bool {
        true
    }

    /// The handler's state for a snapshot (queue positions and whatever the
    /// device needs to carry on), or `None` if it holds nothing to save. The
    /// value is of a type the code that added the handler knows and
    /// downcasts to (the virtio transport's
    /// [`RuntimeState`](crate::devices::virtio::persist::RuntimeState)).
    fn save(&mut self) -> Option<Box<dyn Any + Send>> {
        None
    }
}

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// io_uring could not be set up (old kernel, `io_uring_disabled`, limits).
    #[error("failed to set up io_uring")]
    Setup(#[source] std::io::Error),
    /// The ring could not be restricted to the loop's opcodes.
    #[error("failed to restrict io_uring to the event loop's opcodes")]
    Restrict(#[source] std::io::Error),
    /// The wake-up eventfd could not be created.
    #[error("failed to create the event loop's wake-up eventfd")]
    EventFd(#[source] std::io::Error),
    /// Submitting to or waiting on io_uring failed.
    #[error("io_uring_enter failed")]
    Enter(#[source] std::io::Error),
    /// The loop has ended; nothing can be added any more.
    #[error("the event loop has stopped")]
    Stopped,
}

enum Command {
    Add(HandlerId, Box<dyn EventHandler>),
    Remove(HandlerId),
    Stop,
}

/// Adds and removes handlers from any thread.
#[derive(Clone)]
pub struct LoopHandle {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
    next_id: Arc<AtomicU32>,
}

impl LoopHandle {
    fn send(&self, cmd: Command) -> Result<(), Error> {
        self.tx.send(cmd).map_err(|_| Error::Stopped)?;
        self.wake.write(1).map_err(|_| Error::Stopped)
    }

    /// Hands `handler` to the loop; it starts on the loop thread.
    pub fn add(&self, handler: Box<dyn EventHandler>) -> Result<HandlerId, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send(Command::Add(id, handler))?;
        Ok(id)
    }

    /// Removes a handler: its watches and timers are cancelled, its `stop` runs.
    pub fn remove(&self, id: HandlerId) -> Result<(), Error> {
        self.send(Command::Remove(id))
    }

    /// Ends [`EventLoop::run`].
    pub fn stop(&self) -> Result<(), Error> {
        self.send(Command::Stop)
    }
}

/// Loop state shared with [`Ops`].
pub(crate) struct Core {
    ring: IoUring,
    pending: Slab<Pending>,
    /// Operations whose submission failed (key, negative errno): they
    /// complete with that error on the loop's next turn, so their entries
    /// and buffers are freed and their handlers told.
    failed: Vec<(u64, i32)>,
    stop: bool,
    /// Test hook: how many of the next submissions fail with `EBUSY`.
    #[cfg(test)]
    fail_submits: usize,
}

/// The event loop. Create it, hand out [`LoopHandle`]s, then [`run`](Self::run).
pub struct EventLoop {
    core: Core,
    handlers: HashMap<HandlerId, Box<dyn EventHandler>>,
    rx: Receiver<Command>,
    handle: LoopHandle,
}

/// The only submissions the loop's ring accepts.
const OPCODES: [u8; 6] = [
    io_uring::opcode::PollAdd::CODE,
    io_uring::opcode::Readv::CODE,
    io_uring::opcode::Writev::CODE,
    io_uring::opcode::Fsync::CODE,
    io_uring::opcode::Timeout::CODE,
    io_uring::opcode::AsyncCancel::CODE,
];

/// A ring that accepts only [`OPCODES`], with no flags a submission may
/// set beyond the ones the loop uses, and no further `register` calls.
fn restricted_ring(entries: u32) -> Result<IoUring, Error> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(entries)
        .map_err(Error::Setup)?;
    let mut restrictions: Vec<Restriction> =
        OPCODES.iter().map(|op| Restriction::sqe_op(*op)).collect();
    restrictions.push(Restriction::sqe_flags_allowed(0));
    let submitter = ring.submitter();
    submitter
        .register_restrictions(&mut restrictions)
        .map_err(Error::Restrict)?;
    submitter.register_enable_rings().map_err(Error::Restrict)?;
    Ok(ring)
}

/// Handler id of the loop's own command channel.
const LOOP_ID: HandlerId = HandlerId::MAX;

impl EventLoop {
    /// A loop whose ring holds `entries` submissions (rounded up to a power of two).
    pub fn new(entries: u32) -> Result<Self, Error> {
        let ring = restricted_ring(entries.next_power_of_two())?;
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        let (tx, rx) = mpsc::channel();
        let mut core = Core {
            ring,
            pending: Slab::new(),
            failed: Vec::new(),
            stop: false,
            #[cfg(test)]
            fail_submits: 0,
        };
        core.push_poll(LOOP_ID, 0, wake.as_raw_fd(), libc::POLLIN as u32);
        Ok(Self {
            core,
            handlers: HashMap::new(),
            rx,
            handle: LoopHandle {
                tx,
                wake,
                next_id: Arc::new(AtomicU32::new(0)),
            },
        })
    }

    /// A handle for adding handlers.
    pub fn handle(&self) -> LoopHandle {
        self.handle.clone()
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Add(id, mut handler) => {
                handler.start(&mut Ops::new(&mut self.core, id));
                self.handlers.insert(id, handler);
            }
            Command::Remove(id) => {
                if let Some(mut handler) = self.handlers.remove(&id) {
                    self.core.cancel_all(id);
                    handler.stop();
                }
            }
            Command::Stop => self.core.stop = true,
        }
    }

    fn drain_commands(&mut self) {
        let _ = self.handle.wake.read();
        while let Ok(cmd) = self.rx.try_recv() {
            self.apply(cmd);
        }
    }

    /// Runs until a handler calls [`Ops::stop_loop`] or a handle calls
    /// [`LoopHandle::stop`]; then stops every handler.
    pub fn run(&mut self) -> Result<(), Error> {
        self.drain_commands();
        while !self.core.stop {
            // Failed submissions are due now: do not block before them.
            let want = usize::from(self.core.failed.is_empty());
            match self.core.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(Error::Enter(e)),
            }
            let completions: Vec<(u64, i32, u32)> = self
                .core
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (key, result, flags) in completions {
                self.complete(key, result, flags);
            }
            for (key, result) in std::mem::take(&mut self.core.failed) {
                self.complete(key, result, 0);
            }
        }
        for (_, mut handler) in self.handlers.drain() {
            handler.stop();
        }
        Ok(())
    }

    fn complete(&mut self, key: u64, result: i32, flags: u32) {
        let Ok(key) = usize::try_from(key) else {
            return;
        };
        let Some(entry) = self.core.pending.get(key) else {
            return;
        };
        let (handler_id, token) = (entry.handler, entry.token);
        let poll = match entry.kind {
            PendingKind::Poll { fd, events } => Some((fd, events)),
            _ => None,
        };
        let is_timer = matches!(entry.kind, PendingKind::Timer(_));
        let is_cancel = matches!(entry.kind, PendingKind::Cancel);
        let event = if let Some((fd, events)) = poll {
            if !io_uring::cqueue::more(flags) {
                self.core.pending.remove(key);
                // A multishot poll ends on errors or when the kernel drops
                // it: re-arm while its owner is alive and still wants it.
                let alive = handler_id == LOOP_ID || self.handlers.contains_key(&handler_id);
                if alive && result != -libc::ECANCELED {
                    self.core.push_poll(handler_id, token, fd, events);
                }
            }
            if result < 0 {
                return;
            }
            Event::Ready {
                token,
                revents: u32::try_from(result).unwrap_or(0),
            }
        } else {
            self.core.pending.remove(key);
            if is_cancel || (is_timer && result == -libc::ECANCELED) {
                return;
            }
            if is_timer {
                Event::Timer { token }
            } else {
                Event::Done { token, result }
            }
        };
        if handler_id == LOOP_ID {
            self.drain_commands();
            return;
        }
        // The handler is taken out of the map while it runs, so that it can
        // reach the others through `Ops` (a snapshot collects their state).
        if let Some(mut handler) = self.handlers.remove(&handler_id) {
            handler.handle(
                event,
                &mut Ops::with_others(&mut self.core, handler_id, &mut self.handlers),
            );
            self.handlers.insert(handler_id, handler);
        }
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(test)]
mod tests;
