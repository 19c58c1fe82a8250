//! The virtio-vsock device (type 19): config space, activation, and the
//! event-loop handler that moves packets between the queues and the
//! [`Muxer`].

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Interest, Muxer, LISTENER, SWEEP};
use super::packet::{self, RxBuffer, EVENT_LEN, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET};
use super::{Error, VsockConfig};
use crate::devices::virtio::persist::RuntimeState;
use crate::devices::virtio::{
    feature, read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};
use crate::event_loop::{Event, EventHandler, HandlerId, LoopHandle, Ops};

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// A virtio-vsock device with the hybrid Unix-socket backend.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    acked_features: u64,
    running: Option<(LoopHandle, HandlerId)>,
}

impl Vsock {
    /// Binds the host socket at `config.uds_path` (a stale socket file left
    /// by a dead VMM is replaced; a live one is an error).
    pub fn new(config: &VsockConfig) -> Result<Self, Error> {
        config.validate()?;
        let listener = bind(&config.uds_path)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Bind(config.uds_path.clone(), e))?;
        Ok(Self {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
            listener,
            acked_features: 0,
            running: None,
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }
}

fn bind(path: &std::path::Path) -> Result<UnixListener, Error> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // In use by a live listener, or left behind by a dead one?
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::Bind(path.to_path_buf(), e));
            }
            std::fs::remove_file(path).map_err(|e| Error::Bind(path.to_path_buf(), e))?;
            UnixListener::bind(path).map_err(|e| Error::Bind(path.to_path_buf(), e))
        }
        Err(e) => Err(Error::Bind(path.to_path_buf(), e)),
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The config space is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.start_runtime(ctx, false)
    }

    fn runtime(&self) -> Option<HandlerId> {
        self.running.as_ref().map(|(_, id)| *id)
    }

    /// Streams are not carried over a snapshot: their host ends (Unix
    /// sockets of another VMM process) do not exist here. The queues resume
    /// where they were, the muxer starts empty, and the guest is told with a
    /// transport reset event, so its kernel drops every socket (and re-reads
    /// its CID) as after a live migration.
    fn restore_runtime(
        &mut self,
        ctx: ActivateContext,
        _extra: &[u8],
    ) -> Result<(), ActivateError> {
        self.start_runtime(ctx, true)
    }

    fn reset(&mut self) {
        // Removing the handler cancels its watches and drops the muxer,
        // which closes every stream; the listener stays bound.
        if let Some((event_loop, id)) = self.running.take() {
            let _ = event_loop.remove(id);
        }
        self.acked_features = 0;
    }
}

impl Vsock {
    /// Puts the runtime on the loop; `reset_pending`: first tell the guest
    /// its transport was reset (after a restore).
    fn start_runtime(
        &mut self,
        ctx: ActivateContext,
        reset_pending: bool,
    ) -> Result<(), ActivateError> {
        if ctx.queues.len() != QUEUE_SIZES.len() || ctx.queue_events.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len(),
            });
        }
        let listener = self.listener.try_clone().map_err(ActivateError::Backend)?;
        let runtime = VsockRuntime {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            muxer: Muxer::new(self.guest_cid, self.uds_path.clone(), listener),
            guest_cid: self.guest_cid,
            broken: false,
            reset_pending,
        };
        let id = ctx
            .event_loop
            .add(Box::new(runtime))
            .map_err(|e| ActivateError::Backend(std::io::Error::other(e)))?;
        self.running = Some((ctx.event_loop, id));
        Ok(())
    }
}

/// The device's life on the event loop once the driver is ready.
pub struct VsockRuntime {
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

impl VsockRuntime {
    fn fault(&mut self, what: &dyn std::fmt::Display) {
        tracing::warn!("virtio-vsock: {what}; device needs reset");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    /// Drains the TX queue into the muxer.
    fn process_tx(&mut self) {
        let mut used = false;
        loop {
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

impl EventHandler for VsockRuntime {
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
    /// restore ([`Vsock::restore_runtime`](VirtioDevice::restore_runtime))
    /// and the guest CID comes from the `--vsock` flags.
    fn save(&mut self) -> Option<Vec<u8>> {
        let queues: Vec<&Queue> = self.queues.iter().collect();
        Some(RuntimeState::encode(&queues, Vec::new()))
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
