//! The block queue's handler on the event loop: pops chains when the guest
//! notifies, submits reads, writes and flushes to io_uring straight into
//! guest memory, and completes each request when its I/O finishes.

use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use slab::Slab;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::persist::BlockState;
use super::request::{self, Limits, Rejected, Request, RequestType, VIRTIO_BLK_S_OK};
use super::Disk;
use crate::devices::virtio::persist::{DeviceState, RuntimeState};
use crate::devices::virtio::{Interrupt, VIRTIO_MMIO_INT_VRING};
use crate::event_loop::{Event, EventHandler, Ops, Token};

/// Token of the queue-notification eventfd; I/O tokens are slab keys below it.
const QUEUE_TOKEN: Token = Token::MAX;

/// An I/O submitted to the ring, waiting for its completion.
#[derive(Debug)]
struct InFlight {
    head: u16,
    status: GuestAddress,
    /// Bytes the I/O must transfer to succeed (0 for a flush).
    expect: u32,
    /// Used-ring length on success: bytes written into guest buffers.
    used_len: u32,
}

/// The request queue of one block device.
pub(super) struct BlockHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<Interrupt>,
    disk: Arc<Disk>,
    inflight: Slab<InFlight>,
    /// The guest broke the protocol: nothing more is processed until reset.
    broken: bool,
    /// Requests completed since the last interrupt decision.
    completed: bool,
}

impl BlockHandler {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        queue_evt: EventFd,
        interrupt: Arc<Interrupt>,
        disk: Arc<Disk>,
    ) -> Self {
        Self {
            mem,
            queue,
            queue_evt,
            interrupt,
            disk,
            inflight: Slab::new(),
            broken: false,
            completed: false,
        }
    }

    fn fail(&mut self, why: &dyn std::fmt::Display) {
        if !self.broken {
            tracing::warn!("virtio-blk: {why}; the device needs a reset");
            self.broken = true;
            self.interrupt.set_needs_reset();
        }
    }

    /// Most requests in flight at once: a well-behaved driver can have no
    /// more than the queue size outstanding.
    fn inflight_cap(&self) -> usize {
        usize::from(self.queue.size())
    }

    /// Pops every available chain (up to the in-flight cap), re-checking
    /// after re-enabling notifications so no notification is lost.
    fn process_queue(&mut self, ops: &mut Ops<'_>) {
        let mem = self.mem.clone();
        let limits = Limits {
            capacity: self.disk.capacity(),
            read_only: self.disk.read_only(),
        };
        loop {
            if let Err(e) = self.queue.disable_notification(&mem) {
                return self.fail(&e);
            }
            let mut parsed = Vec::new();
            let room = self.inflight_cap().saturating_sub(self.inflight.len());
            match self.queue.iter(&mem) {
                Ok(iter) => {
                    for chain in iter.take(room) {
                        parsed.push(request::parse(chain, &mem, limits));
                    }
                }
                Err(e) => return self.fail(&e),
            }
            let full = parsed.len() == room;
            for p in parsed {
                match p {
                    Ok(req) => self.submit(req, ops),
                    Err(rejected) => self.reject(rejected),
                }
                if self.broken {
                    return;
                }
            }
            if full {
                // Completions resume processing once there is room again.
                break;
            }
            match self.queue.enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return self.fail(&e),
            }
        }
        self.notify();
    }

    fn reject(&mut self, rejected: Rejected) {
        let Rejected {
            head,
            status,
            error,
        } = rejected;
        match status {
            Some(status) => {
                tracing::debug!("virtio-blk: request failed: {error}");
                self.complete(head, status, error.status_code(), 1);
            }
            None => self.fail(&error),
        }
    }

    fn submit(&mut self, req: Request, ops: &mut Ops<'_>) {
        let fd = self.disk.file().as_raw_fd();
        let (expect, used_len) = match req.kind {
            RequestType::In => (req.data_len, req.data_len.saturating_add(1)),
            RequestType::Out => (req.data_len, 1),
            RequestType::Flush => (0, 1),
            RequestType::Discard { sectors } | RequestType::WriteZeroes { sectors, .. } => {
                // fallocate is a metadata operation: done here, not on the ring.
                let punch = !matches!(req.kind, RequestType::WriteZeroes { unmap: false, .. });
                let done = self.disk.fallocate(
                    punch,
                    req.offset(),
                    u64::from(sectors) * super::SECTOR_SIZE,
                );
                let status = match done {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(e) => {
                        tracing::debug!("virtio-blk: fallocate failed: {e}");
                        request::VIRTIO_BLK_S_IOERR
                    }
                };
                return self.complete(req.head, req.status, status, 1);
            }
            RequestType::GetId => {
                let written = self.write_id(&req);
                let status = if written.is_some() {
                    VIRTIO_BLK_S_OK
                } else {
                    request::VIRTIO_BLK_S_IOERR
                };
                return self.complete(req.head, req.status, status, written.unwrap_or(0) + 1);
            }
        };
        let entry = self.inflight.vacant_entry();
        let Ok(token) = Token::try_from(entry.key()) else {
            return self.complete(req.head, req.status, request::VIRTIO_BLK_S_IOERR, 1);
        };
        entry.insert(InFlight {
            head: req.head,
            status: req.status,
            expect,
            used_len,
        });
        let submitted = match req.kind {
            RequestType::In => ops.read_to_guest(fd, req.offset(), &self.mem, &req.data, token),
            RequestType::Out => ops.write_from_guest(fd, req.offset(), &self.mem, &req.data, token),
            _ => {
                ops.fsync(fd, token);
                Ok(())
            }
        };
        if let Err(e) = submitted {
            tracing::debug!("virtio-blk: cannot submit I/O: {e}");
            let _ = self.inflight.try_remove(entry_key(token));
            self.complete(req.head, req.status, request::VIRTIO_BLK_S_IOERR, 1);
        }
    }

    /// Copies the serial into the data buffers; returns the bytes written.
    fn write_id(&self, req: &Request) -> Option<u32> {
        let id = self.disk.id();
        let mut done = 0usize;
        for &(addr, len) in &req.data {
            if done == id.len() {
                break;
            }
            let n = usize::try_from(len).ok()?.min(id.len() - done);
            self.mem.write_slice(&id[done..done + n], addr).ok()?;
            done += n;
        }
        u32::try_from(done).ok()
    }

    /// Writes the status byte and puts the chain on the used ring.
    fn complete(&mut self, head: u16, status: GuestAddress, code: u8, used_len: u32) {
        if let Err(e) = self.mem.write_obj(code, status) {
            return self.fail(&e);
        }
        if let Err(e) = self.queue.add_used(&self.mem, head, used_len) {
            return self.fail(&e);
        }
        self.completed = true;
    }

    /// Raises the interrupt if anything completed and the driver wants it.
    fn notify(&mut self) {
        if !std::mem::take(&mut self.completed) || self.broken {
            return;
        }
        match self.queue.needs_notification(&self.mem) {
            Ok(true) => {
                if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                    tracing::warn!("virtio-blk: cannot raise the interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => self.fail(&e),
        }
    }

    fn io_done(&mut self, token: Token, result: i32, ops: &mut Ops<'_>) {
        let Some(done) = self.inflight.try_remove(entry_key(token)) else {
            return;
        };
        if self.broken {
            return;
        }
        let ok = u32::try_from(result).is_ok_and(|n| n == done.expect);
        if !ok {
            tracing::debug!(
                "virtio-blk: I/O returned {result}, expected {} bytes",
                done.expect
            );
        }
        let (code, used_len) = if ok {
            (VIRTIO_BLK_S_OK, done.used_len)
        } else {
            (request::VIRTIO_BLK_S_IOERR, 1)
        };
        let was_full = self.inflight.len() + 1 >= self.inflight_cap();
        self.complete(done.head, done.status, code, used_len);
        if was_full && !self.broken {
            // The queue may hold chains left there when the cap was hit.
            self.process_queue(ops);
        } else {
            self.notify();
        }
    }
}

fn entry_key(token: Token) -> usize {
    usize::try_from(token).unwrap_or(usize::MAX)
}

impl EventHandler for BlockHandler {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.queue_evt.as_raw_fd(), QUEUE_TOKEN, libc::POLLIN as u32);
        // The driver may have queued requests before the handler started.
        self.process_queue(ops);
    }

    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        match event {
            Event::Ready { token, .. } if token == QUEUE_TOKEN => {
                let _ = self.queue_evt.read();
                if !self.broken {
                    self.process_queue(ops);
                }
            }
            Event::Done { token, result } => self.io_done(token, result, ops),
            _ => {}
        }
    }

    /// Quiescent with no read, write or flush on the ring: those complete
    /// into guest memory and the used ring, which a snapshot must not miss.
    fn quiescent(&self) -> bool {
        self.inflight.is_empty()
    }

    /// The queue is all there is: every request is either still on the
    /// avail ring (picked up again after a restore) or already used.
    fn save(&mut self) -> Option<Box<dyn Any + Send>> {
        Some(Box::new(RuntimeState::new(
            &[&self.queue],
            DeviceState::Block(BlockState::default()),
        )))
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
