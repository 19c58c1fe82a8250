//! The virtio-net device as the MMIO transport sees it: features, the MAC
//! in config space, and the handler it starts on activation.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::QueueT;

use super::handler::{Backend, NetHandler};
use super::{Error, InboundHandle, QUEUE_SIZE};
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{
    feature, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};
use crate::event_loop::EventHandler;
use crate::usernet::{NetConfig, Stack};

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    acked_features: u64,
    /// The stack outlives device resets: the device, its handler while
    /// active, and every [`InboundHandle`] share it.
    backend: Arc<Mutex<Backend>>,
    published: Vec<(SocketAddr, u16)>,
}

impl Net {
    /// A device for `config`; its published ports are bound here, so a
    /// port in use fails the VM's start rather than its first connection.
    pub fn new(config: &NetConfig) -> Result<Self, Error> {
        let stack = Stack::new(config)?;
        let published = stack.published();
        Ok(Self {
            mac: config.mac,
            acked_features: 0,
            backend: Arc::new(Mutex::new(Backend::new(stack))),
            published,
        })
    }

    /// A handle for handing accepted host connections to the guest.
    pub fn inbound(&self) -> InboundHandle {
        InboundHandle {
            backend: self.backend.clone(),
        }
    }

    /// The bound host address of each `--publish` listener and its guest port.
    pub fn published(&self) -> &[(SocketAddr, u16)] {
        &self.published
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MAC)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only once VIRTIO_F_VERSION_1 is negotiated.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn EventHandler>, ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
        } = ctx;
        let got = queues.len();
        let (Ok([rx, tx]), Ok([rx_evt, tx_evt])) =
            (<[_; 2]>::try_from(queues), <[_; 2]>::try_from(queue_events))
        else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        for (index, queue) in [&rx, &tx].into_iter().enumerate() {
            if !queue.ready() {
                return Err(ActivateError::InvalidQueue(index));
            }
        }
        Ok(Box::new(NetHandler::new(
            mem,
            [rx, tx],
            [rx_evt, tx_evt],
            interrupt,
            self.mac,
            self.backend.clone(),
        )))
    }

    /// The queues resume where they were and the guest keeps the MAC it
    /// read at probe time; the stack is this VMM's fresh one (its own
    /// `--publish` listeners, no connections), so a guest TCP connection
    /// from before the snapshot is answered with RST when it next sends.
    fn restore(
        &mut self,
        ctx: ActivateContext,
        state: &DeviceState,
    ) -> Result<Box<dyn EventHandler>, ActivateError> {
        let DeviceState::Net(state) = state else {
            return Err(state.mismatch("virtio-net").into());
        };
        state.check()?;
        self.mac = state.mac;
        self.activate(ctx)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}
