//! The device's handler on the event loop: the two virtqueues, and the
//! userspace stack with the host sockets it watches and its timer.

use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::lock;
use super::persist::NetState;
use super::queues::{read_tx_frame, write_rx_frame, QueueError};
use crate::devices::virtio::persist::{DeviceState, RuntimeState};
use crate::devices::virtio::{Interrupt, DRAIN_BUDGET, VIRTIO_MMIO_INT_VRING};
use crate::event_loop::{Event, EventHandler, HandlerId, Ops, Token};
use crate::usernet::{Stack, WatchRequest, FIRST_TOKEN};

const RX_TOKEN: Token = 0;
const TX_TOKEN: Token = 1;
const TIMER_TOKEN: Token = 2;
// The stack's host fds have tokens of their own, from FIRST_TOKEN up.
const _: () = assert!(TIMER_TOKEN < FIRST_TOKEN);
/// The [`Event::Notify`] token of a connection handed to the stack.
pub(super) const NOTIFY_INBOUND: Token = 0;

/// What outlives a device reset: the stack with its host sockets, and the
/// counters [`super::InboundHandle::counts`] reads.
pub(super) struct Backend {
    pub(super) stack: Stack,
    /// Handed-over connections taken (or refused) so far.
    pub(super) taken: u64,
    /// The handler running the device's queues, while one is on the loop.
    pub(super) handler: Option<HandlerId>,
}

impl Backend {
    pub(super) fn new(stack: Stack) -> Self {
        Self {
            stack,
            taken: 0,
            handler: None,
        }
    }
}

/// The event-loop handler of an activated device.
pub(super) struct NetHandler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    interrupt: Arc<Interrupt>,
    /// The MAC the guest read from config space, saved with the queues.
    mac: [u8; 6],
    backend: Arc<Mutex<Backend>>,
    /// This handler's id on the loop, once started.
    id: Option<HandlerId>,
    timer_at: Option<Instant>,
    broken: bool,
}

/// Pops up to `budget` transmit chains, hands their frames to the stack,
/// returns them used. Returns whether the budget ran out (more may wait).
pub(super) fn process_tx(
    mem: &GuestMemoryMmap,
    tx: &mut Queue,
    stack: &mut Stack,
    interrupt: &Interrupt,
    budget: usize,
) -> Result<bool, QueueError> {
    let mut used = false;
    for _ in 0..budget {
        let chain = tx.iter(mem).map_err(QueueError::AvailRing)?.next();
        let Some(chain) = chain else {
            notify(mem, tx, interrupt, used)?;
            return Ok(false);
        };
        let head = chain.head_index();
        let frame = read_tx_frame(mem, chain)?;
        tx.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
        used = true;
        if let Some(frame) = frame {
            stack.guest_frame(&frame);
        }
    }
    notify(mem, tx, interrupt, used)?;
    Ok(true)
}

/// Moves the stack's frames into receive chains while the guest has them.
pub(super) fn process_rx(
    mem: &GuestMemoryMmap,
    rx: &mut Queue,
    stack: &mut Stack,
    interrupt: &Interrupt,
) -> Result<(), QueueError> {
    let mut used = false;
    while !stack.to_guest().is_empty() {
        let chain = rx.iter(mem).map_err(QueueError::AvailRing)?.next();
        let Some(chain) = chain else {
            break;
        };
        let head = chain.head_index();
        let Some(frame) = stack.to_guest().pop_front() else {
            break;
        };
        let len = write_rx_frame(mem, chain, &frame)?;
        rx.add_used(mem, head, len).map_err(QueueError::UsedRing)?;
        used = true;
    }
    notify(mem, rx, interrupt, used)
}

fn notify(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    interrupt: &Interrupt,
    used: bool,
) -> Result<(), QueueError> {
    if used
        && queue
            .needs_notification(mem)
            .map_err(QueueError::UsedRing)?
    {
        if let Err(e) = interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
            tracing::warn!("virtio-net: interrupt failed: {e}");
        }
    }
    Ok(())
}

impl NetHandler {
    /// A handler for the `[rx, tx]` queues, notified through `[rx, tx]`
    /// eventfds, in front of `backend`'s stack.
    pub(super) fn new(
        mem: GuestMemoryMmap,
        [rx, tx]: [Queue; 2],
        [rx_evt, tx_evt]: [EventFd; 2],
        interrupt: Arc<Interrupt>,
        mac: [u8; 6],
        backend: Arc<Mutex<Backend>>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            interrupt,
            mac,
            backend,
            id: None,
            timer_at: None,
            broken: false,
        }
    }

    fn run(&mut self, ops: &mut Ops<'_>, token: Option<(Token, u32)>) {
        if self.broken {
            return;
        }
        if let Err(e) = self.pass(ops, token) {
            self.fail(&e);
        }
    }

    /// One pass: the event's own work, then the stack, the receive queue,
    /// the stack's watch changes and its timer.
    fn pass(&mut self, ops: &mut Ops<'_>, token: Option<(Token, u32)>) -> Result<(), QueueError> {
        let mut backend = lock(&self.backend);
        let stack = &mut backend.stack;
        match token {
            Some((RX_TOKEN | TIMER_TOKEN, _)) | None => {}
            Some((TX_TOKEN, _)) => {
                let more = process_tx(
                    &self.mem,
                    &mut self.tx,
                    stack,
                    &self.interrupt,
                    DRAIN_BUDGET,
                )?;
                if more {
                    // Come back after the loop's other work.
                    if let Err(e) = self.tx_evt.write(1) {
                        tracing::warn!("virtio-net: re-arming the transmit queue failed: {e}");
                    }
                }
            }
            Some((token, revents)) => stack.host_ready(token, revents),
        }
        // Room in the guest's buffers first: the stack takes in no guest
        // frame while its queue toward the guest is full.
        process_rx(&self.mem, &mut self.rx, stack, &self.interrupt)?;
        stack.poll();
        process_rx(&self.mem, &mut self.rx, stack, &self.interrupt)?;
        for request in stack.take_requests() {
            match request {
                WatchRequest::Watch { fd, token, events } => ops.watch(fd, token, events),
                WatchRequest::Unwatch { token } => ops.unwatch(token),
            }
        }
        let delay = stack.poll_delay();
        drop(backend);
        self.arm_timer(ops, delay);
        Ok(())
    }

    /// Keeps one timer armed for the stack's next deadline (`delay` from
    /// now), re-arming only when the deadline moves earlier (a late timer
    /// just finds less to do).
    fn arm_timer(&mut self, ops: &mut Ops<'_>, delay: Option<Duration>) {
        let Some(delay) = delay else {
            return;
        };
        let at = Instant::now() + delay;
        let earlier = self
            .timer_at
            .is_none_or(|armed| at + Duration::from_millis(1) < armed);
        if earlier {
            if self.timer_at.is_some() {
                ops.cancel_timer(TIMER_TOKEN);
            }
            ops.timer(TIMER_TOKEN, delay);
            self.timer_at = Some(at);
        }
    }

    fn fail(&mut self, e: &QueueError) {
        tracing::warn!("virtio-net: {e}; the device needs a reset");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }
}

impl EventHandler for NetHandler {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.rx_evt.as_raw_fd(), RX_TOKEN, libc::POLLIN as u32);
        ops.watch(self.tx_evt.as_raw_fd(), TX_TOKEN, libc::POLLIN as u32);
        self.id = Some(ops.id());
        {
            let mut backend = lock(&self.backend);
            backend.handler = self.id;
            backend.stack.watch_all();
        }
        // The driver may have queued frames, and the stack taken
        // connections, before the handler started.
        self.run(ops, Some((TX_TOKEN, 0)));
    }

    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        let token = match event {
            Event::Ready { token, revents } => {
                match token {
                    RX_TOKEN => drop(self.rx_evt.read()),
                    TX_TOKEN => drop(self.tx_evt.read()),
                    _ => {}
                }
                Some((token, revents))
            }
            Event::Timer { .. } => {
                self.timer_at = None;
                Some((TIMER_TOKEN, 0))
            }
            // A connection was handed to the stack: a pass starts it.
            Event::Notify { .. } | Event::Done { .. } => None,
        };
        self.run(ops, token);
    }

    /// The two queues and the MAC. The stack (smoltcp and host sockets)
    /// is not saved: a restore starts a fresh one.
    fn save(&mut self) -> Option<Box<dyn Any + Send>> {
        Some(Box::new(RuntimeState::new(
            &[&self.rx, &self.tx],
            DeviceState::Net(NetState::new(self.mac)),
        )))
    }

    fn stop(&mut self) {
        let mut backend = lock(&self.backend);
        if backend.handler == self.id {
            backend.handler = None;
        }
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
