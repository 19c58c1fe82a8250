//! What a handler may ask of the loop, and the thin unsafe layer that turns
//! those requests into io_uring submissions.

use std::any::Any;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Core, Event, EventHandler, HandlerId, Token};

/// Most buffers one guest I/O may scatter over (Linux's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

/// Errors while preparing guest-memory I/O.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestIoError {
    /// A buffer is not inside guest memory (or crosses a region boundary).
    #[error("guest buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// No buffers, or more than [`MAX_IOVECS`].
    #[error("guest I/O needs 1 to {MAX_IOVECS} buffers, got {0}")]
    BufferCount(usize),
}

/// Buffers of an in-flight guest I/O. Holding a clone of the guest memory
/// keeps every mapping the iovecs point into alive until the kernel is done.
pub(crate) struct IoBuffers {
    _mem: GuestMemoryMmap,
    iovecs: Box<[libc::iovec]>,
}

pub(crate) enum PendingKind {
    Poll { fd: RawFd, events: u32 },
    Io(IoBuffers),
    Fsync,
    Timer(Box<types::Timespec>),
    Cancel,
}

pub(crate) struct Pending {
    pub(crate) handler: HandlerId,
    pub(crate) token: Token,
    pub(crate) kind: PendingKind,
}

impl Core {
    /// Queues `pending` and the submission built for it. The slab entry owns
    /// every buffer the submission points to, until its completion arrives.
    fn push(&mut self, pending: Pending, build: impl FnOnce(&Pending) -> squeue::Entry) {
        let entry = self.pending.vacant_entry();
        let key = entry.key() as u64;
        let pending = entry.insert(pending);
        let sqe = build(pending).user_data(key);
        loop {
            // SAFETY: every pointer in `sqe` (iovecs, timespec) points into the
            // `Pending` just stored in `self.pending`, whose heap buffers do not
            // move and which is removed only when this submission's final
            // completion has been reaped; fds are the handler's, and a closed
            // fd only makes the operation fail.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                return;
            }
            // Queue full: hand what is queued to the kernel and retry.
            if let Err(e) = self.submit() {
                tracing::warn!("io_uring submit failed while the queue was full: {e}");
                // Nothing points at the entry: it completes with the error
                // on the loop's next turn (a timer fires early, a poll is
                // re-armed, I/O reports the errno).
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                self.failed.push((key, -errno));
                return;
            }
        }
    }

    fn submit(&mut self) -> std::io::Result<usize> {
        #[cfg(test)]
        if self.fail_submits > 0 {
            self.fail_submits -= 1;
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.ring.submit()
    }

    pub(crate) fn push_poll(&mut self, handler: HandlerId, token: Token, fd: RawFd, events: u32) {
        let pending = Pending {
            handler,
            token,
            kind: PendingKind::Poll { fd, events },
        };
        self.push(pending, |_| {
            opcode::PollAdd::new(types::Fd(fd), events)
                .multi(true)
                .build()
        });
    }

    fn push_cancel(&mut self, handler: HandlerId, target: u64) {
        let pending = Pending {
            handler,
            token: 0,
            kind: PendingKind::Cancel,
        };
        self.push(pending, |_| opcode::AsyncCancel::new(target).build());
    }

    /// Cancels every poll and timer of `handler` (I/O runs to completion).
    pub(crate) fn cancel_all(&mut self, handler: HandlerId) {
        let keys: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.handler == handler
                    && matches!(p.kind, PendingKind::Poll { .. } | PendingKind::Timer(_))
            })
            .map(|(k, _)| k as u64)
            .collect();
        for key in keys {
            self.push_cancel(handler, key);
        }
    }

    fn find(&self, handler: HandlerId, token: Token, want: fn(&PendingKind) -> bool) -> Vec<u64> {
        self.pending
            .iter()
            .filter(|(_, p)| p.handler == handler && p.token == token && want(&p.kind))
            .map(|(k, _)| k as u64)
            .collect()
    }
}

/// A handler's view of the loop while it handles an event.
pub struct Ops<'a> {
    core: &'a mut Core,
    id: HandlerId,
    others: Option<&'a mut HashMap<HandlerId, Box<dyn EventHandler>>>,
}

fn guest_iovecs(
    mem: &GuestMemoryMmap,
    ranges: &[(GuestAddress, u32)],
) -> Result<Box<[libc::iovec]>, GuestIoError> {
    if ranges.is_empty() || ranges.len() > MAX_IOVECS {
        return Err(GuestIoError::BufferCount(ranges.len()));
    }
    ranges
        .iter()
        .map(|&(addr, len)| {
            let oob = GuestIoError::OutOfBounds { addr: addr.0, len };
            let size = usize::try_from(len).map_err(|_| oob.clone())?;
            let slice = mem.get_slice(addr, size).map_err(|_| oob)?;
            Ok(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: size,
            })
        })
        .collect()
}

impl<'a> Ops<'a> {
    pub(crate) fn new(core: &'a mut Core, id: HandlerId) -> Self {
        Self {
            core,
            id,
            others: None,
        }
    }

    pub(crate) fn with_others(
        core: &'a mut Core,
        id: HandlerId,
        others: &'a mut HashMap<HandlerId, Box<dyn EventHandler>>,
    ) -> Self {
        Self {
            core,
            id,
            others: Some(others),
        }
    }

    /// Whether every other handler is quiescent (no I/O in flight).
    pub fn all_quiescent(&self) -> bool {
        self.others
            .as_ref()
            .is_none_or(|others| others.values().all(|h| h.quiescent()))
    }

    /// The snapshot state of handler `id` (see [`EventHandler::save`]).
    pub fn save_handler(&mut self, id: HandlerId) -> Option<Box<dyn Any + Send>> {
        self.others.as_mut()?.get_mut(&id)?.save()
    }

    /// The id of the handler these operations act for.
    pub fn id(&self) -> HandlerId {
        self.id
    }

    /// Runs handler `id` now, on this thread, with
    /// [`Event::Notify`]: how one handler hands work to another on the same
    /// loop without a channel or an eventfd between them. Returns whether
    /// `id` was reached: not when it is gone, is the caller itself, or when
    /// called from [`EventHandler::start`] (other handlers are out of reach
    /// there).
    pub fn notify(&mut self, id: HandlerId, token: Token) -> bool {
        let Some(others) = self.others.as_deref_mut() else {
            return false;
        };
        let Some(mut handler) = others.remove(&id) else {
            return false;
        };
        handler.handle(
            Event::Notify { token },
            &mut Ops::with_others(&mut *self.core, id, others),
        );
        others.insert(id, handler);
        true
    }

    /// Watches `fd` for poll `events` (e.g. `POLLIN`) until [`unwatch`](Self::unwatch)
    /// or the handler's removal; each readiness is an [`Event::Ready`](super::Event::Ready).
    pub fn watch(&mut self, fd: RawFd, token: Token, events: u32) {
        self.core.push_poll(self.id, token, fd, events);
    }

    /// Stops watching the fd registered under `token`.
    pub fn unwatch(&mut self, token: Token) {
        for key in self
            .core
            .find(self.id, token, |k| matches!(k, PendingKind::Poll { .. }))
        {
            self.core.push_cancel(self.id, key);
        }
    }

    /// Fires [`Event::Timer`](super::Event::Timer) with `token` once, after `after`.
    pub fn timer(&mut self, token: Token, after: Duration) {
        let ts = Box::new(
            types::Timespec::new()
                .sec(after.as_secs())
                .nsec(after.subsec_nanos()),
        );
        let pending = Pending {
            handler: self.id,
            token,
            kind: PendingKind::Timer(ts),
        };
        self.core.push(pending, |p| {
            let PendingKind::Timer(ts) = &p.kind else {
                unreachable!("a timer entry was just stored")
            };
            opcode::Timeout::new(&**ts as *const types::Timespec).build()
        });
    }

    /// Cancels the timers registered under `token`.
    pub fn cancel_timer(&mut self, token: Token) {
        for key in self
            .core
            .find(self.id, token, |k| matches!(k, PendingKind::Timer(_)))
        {
            self.core.push_cancel(self.id, key);
        }
    }

    fn guest_io(
        &mut self,
        write: bool,
        fd: RawFd,
        offset: u64,
        mem: &GuestMemoryMmap,
        ranges: &[(GuestAddress, u32)],
        token: Token,
    ) -> Result<(), GuestIoError> {
        let iovecs = guest_iovecs(mem, ranges)?;
        let count =
            u32::try_from(iovecs.len()).map_err(|_| GuestIoError::BufferCount(iovecs.len()))?;
        let pending = Pending {
            handler: self.id,
            token,
            kind: PendingKind::Io(IoBuffers {
                _mem: mem.clone(),
                iovecs,
            }),
        };
        self.core.push(pending, |p| {
            let PendingKind::Io(buffers) = &p.kind else {
                unreachable!("an I/O entry was just stored")
            };
            let ptr = buffers.iovecs.as_ptr();
            if write {
                opcode::Writev::new(types::Fd(fd), ptr, count)
                    .offset(offset)
                    .build()
            } else {
                opcode::Readv::new(types::Fd(fd), ptr, count)
                    .offset(offset)
                    .build()
            }
        });
        Ok(())
    }

    /// Reads from `fd` at `offset` into the guest buffers `ranges`;
    /// completes as [`Event::Done`](super::Event::Done).
    pub fn read_to_guest(
        &mut self,
        fd: RawFd,
        offset: u64,
        mem: &GuestMemoryMmap,
        ranges: &[(GuestAddress, u32)],
        token: Token,
    ) -> Result<(), GuestIoError> {
        self.guest_io(false, fd, offset, mem, ranges, token)
    }

    /// Writes the guest buffers `ranges` to `fd` at `offset`.
    pub fn write_from_guest(
        &mut self,
        fd: RawFd,
        offset: u64,
        mem: &GuestMemoryMmap,
        ranges: &[(GuestAddress, u32)],
        token: Token,
    ) -> Result<(), GuestIoError> {
        self.guest_io(true, fd, offset, mem, ranges, token)
    }

    /// Flushes `fd` to stable storage (fdatasync).
    pub fn fsync(&mut self, fd: RawFd, token: Token) {
        let pending = Pending {
            handler: self.id,
            token,
            kind: PendingKind::Fsync,
        };
        self.core.push(pending, |_| {
            opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        });
    }

    /// Ends the loop after the current batch of events.
    pub fn stop_loop(&mut self) {
        self.core.stop = true;
    }
}
