//! The vsock device's handler on the event loop: moves packets between
//! the three queues and the [`Muxer`], and owes the guest a transport reset
//! event after a restore.

use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Interest, Muxer, LISTENER, SWEEP};
use super::packet::{self, RxBuffer, EVENT_LEN, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET};
use super::persist::VsockState;
use crate::devices::virtio::persist::{DeviceState, RuntimeState};
use crate::devices::virtio::{
    ActivateContext, ActivateError, Interrupt, DRAIN_BUDGET, VIRTIO_MMIO_INT_VRING,
};
use crate::event_loop::{Event, EventHandler, Ops};

/// Queue indices.
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
/// The device's queues: receive, transmit, event.
pub(super) const QUEUE_COUNT: usize = 3;

/// The device's handler on the event loop, once the driver is ready.
pub(super) struct VsockHandler {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
    guest_cid: u64,
    /// Set after a chain fault: the device waits for the driver's reset.
    broken: bool,
    /// A transport reset event is owed to the guest (after a restore); it
    /// goes out in the first buffer the driver has on the event queue.
    reset_pending: bool,
}

/// Pops the next available chain; `Err` when the avail ring is invalid.
fn pop<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

impl VsockHandler {
    /// A handler for the driver's queues in `ctx` in front of `muxer`;
    /// `reset_pending`: first tell the guest its transport was reset
    /// (after a restore).
    pub(super) fn new(
        ctx: ActivateContext,
        muxer: Muxer,
        guest_cid: u64,
        reset_pending: bool,
    ) -> Result<Self, ActivateError> {
        if ctx.queues.len() != QUEUE_COUNT || ctx.queue_events.len() != QUEUE_COUNT {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_COUNT,
                got: ctx.queues.len(),
            });
        }
        Ok(Self {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            muxer,
            guest_cid,
            broken: false,
            reset_pending,
        })
    }

    fn fault(&mut self, what: &dyn std::fmt::Display) {
        tracing::warn!("virtio-vsock: {what}; device needs reset");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    /// Takes up to [`DRAIN_BUDGET`] chains off the TX queue into the muxer;
    /// past that, signals the queue's eventfd to come back for the rest.
    fn process_tx(&mut self) {
        let mut used = false;
        for taken in 0.. {
            if taken == DRAIN_BUDGET {
                if let Err(e) = self.queue_events[TX].write(1) {
                    tracing::warn!("virtio-vsock: re-arming the TX queue failed: {e}");
                }
                break;
            }
            let mem = &self.mem;
            let chain = match pop(&mut self.queues[TX], mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.fault(&e),
            };
            let head = chain.head_index();
            match packet::read_tx(mem, chain, self.guest_cid) {
                Ok(Ok(pkt)) => self.muxer.handle_tx(&pkt),
                Ok(Err(rejected)) => {
                    tracing::debug!("virtio-vsock: {}; answering RST", rejected.reason);
                    self.muxer.handle_rejected(&rejected.hdr);
                }
                Err(e) => return self.fault(&e),
            }
            if let Err(e) = self.queues[TX].add_used(mem, head, 0) {
                return self.fault(&e);
            }
            used = true;
        }
        if used {
            self.notify();
        }
    }

    /// Fills RX buffers with what the muxer has for the guest.
    fn process_rx(&mut self) {
        let mut used = false;
        while self.muxer.has_rx() {
            let mem = &self.mem;
            let chain = match pop(&mut self.queues[RX], mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => return self.fault(&e),
            };
            let head = chain.head_index();
            let buffer = match RxBuffer::new(mem, chain) {
                Ok(b) => b,
                Err(e) => return self.fault(&e),
            };
            let Some((hdr, payload)) = self.muxer.next_rx(buffer.payload_capacity()) else {
                // Nothing after all: hand the buffer back for next time.
                self.queues[RX].go_to_previous_position();
                break;
            };
            let len = match buffer.write(hdr, &payload) {
                Ok(len) => len,
                Err(e) => return self.fault(&e),
            };
            if let Err(e) = self.queues[RX].add_used(mem, head, len) {
                return self.fault(&e);
            }
            used = true;
        }
        if used {
            self.notify();
        }
    }

    /// Sends the owed transport reset event, if the driver has posted an
    /// event buffer (Linux keeps eight there from probe time on).
    fn process_evt(&mut self) {
        if !self.reset_pending {
            return;
        }
        let mem = &self.mem;
        let chain = match pop(&mut self.queues[EVT], mem) {
            Ok(Some(chain)) => chain,
            // None yet: sent when the driver notifies the event queue.
            Ok(None) => return,
            Err(e) => return self.fault(&e),
        };
        let head = chain.head_index();
        let Some(desc) = chain.into_iter().next() else {
            return self.fault(&"empty event queue chain");
        };
        if !desc.is_write_only() || desc.len() < EVENT_LEN {
            return self.fault(&"event queue buffer is not a writable virtio_vsock_event");
        }
        let id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le();
        if let Err(e) = mem.write_obj(id, desc.addr()) {
            return self.fault(&e);
        }
        if let Err(e) = self.queues[EVT].add_used(mem, head, EVENT_LEN) {
            return self.fault(&e);
        }
        self.reset_pending = false;
        tracing::debug!("virtio-vsock: transport reset event sent");
        self.notify();
    }

    fn notify(&self) {
        if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
            tracing::warn!("virtio-vsock: failed to raise the interrupt: {e}");
        }
    }

    fn apply(&mut self, ops: &mut Ops<'_>) {
        for interest in self.muxer.take_interests() {
            match interest {
                Interest::Watch { fd, token, events } => ops.watch(fd, token, events),
                Interest::Unwatch(token) => ops.unwatch(token),
                Interest::Timer(after) => ops.timer(SWEEP, after),
            }
        }
    }
}

impl EventHandler for VsockHandler {
    fn start(&mut self, ops: &mut Ops<'_>) {
        for (token, evt) in (0u32..).zip(&self.queue_events) {
            ops.watch(evt.as_raw_fd(), token, libc::POLLIN as u32);
        }
        self.muxer.start();
        // The reset goes first: the guest must drop its old sockets before
        // it sees any packet of the new muxer.
        self.process_evt();
        self.process_tx();
        self.process_rx();
        self.apply(ops);
    }

    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        if self.broken {
            return;
        }
        match event {
            Event::Ready { token, revents } => match usize::try_from(token) {
                Ok(q @ (RX | TX | EVT)) => {
                    let _ = self.queue_events[q].read();
                    match q {
                        TX => self.process_tx(),
                        EVT => self.process_evt(),
                        _ => {}
                    }
                }
                _ if token == LISTENER => self.muxer.accept(),
                _ => self.muxer.ready(token, revents),
            },
            Event::Timer { token: SWEEP } => self.muxer.sweep(),
            Event::Timer { .. } | Event::Done { .. } | Event::Notify { .. } => {}
        }
        if !self.broken {
            self.process_rx();
        }
        self.apply(ops);
    }

    /// The three queues. Nothing else is carried: streams are reset on
    /// restore ([`VsockState`]) and the guest CID comes from the `--vsock`
    /// flags.
    fn save(&mut self) -> Option<Box<dyn Any + Send>> {
        let queues: Vec<&Queue> = self.queues.iter().collect();
        Some(Box::new(RuntimeState::new(
            &queues,
            DeviceState::Vsock(VsockState::default()),
        )))
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
