//! The virtio-vsock device (type 19) as the MMIO transport sees it: the
//! guest CID in config space, the bound host socket, and the handler it
//! starts on activation.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::handler::{VsockHandler, QUEUE_COUNT};
use super::muxer::Muxer;
use super::{Error, VsockConfig};
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{
    feature, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};
use crate::event_loop::EventHandler;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; QUEUE_COUNT] = [QUEUE_SIZE; QUEUE_COUNT];

/// A virtio-vsock device with the hybrid Unix-socket backend.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    acked_features: u64,
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
    /// The handler (and with it every stream) is gone with the transport;
    /// the socket file goes with the device.
    fn drop(&mut self) {
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

    fn activate(&mut self, ctx: ActivateContext) -> Result<Box<dyn EventHandler>, ActivateError> {
        Ok(Box::new(self.handler(ctx, false)?))
    }

    /// Streams are not carried over a snapshot: their host ends (Unix
    /// sockets of another VMM process) do not exist here. The queues resume
    /// where they were, the muxer starts empty, and the guest is told with a
    /// transport reset event, so its kernel drops every socket (and re-reads
    /// its CID) as after a live migration.
    fn restore(
        &mut self,
        ctx: ActivateContext,
        state: &DeviceState,
    ) -> Result<Box<dyn EventHandler>, ActivateError> {
        let DeviceState::Vsock(state) = state else {
            return Err(state.mismatch("virtio-vsock").into());
        };
        state.check()?;
        Ok(Box::new(self.handler(ctx, true)?))
    }

    /// The transport removes the handler, which drops the muxer and closes
    /// every stream; the listener stays bound.
    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

impl Vsock {
    /// The handler for `ctx`'s queues with a fresh muxer on a clone of the
    /// listener; `reset_pending`: first tell the guest its transport was
    /// reset (after a restore).
    fn handler(
        &self,
        ctx: ActivateContext,
        reset_pending: bool,
    ) -> Result<VsockHandler, ActivateError> {
        let listener = self.listener.try_clone().map_err(ActivateError::Backend)?;
        let muxer = Muxer::new(self.guest_cid, self.uds_path.clone(), listener);
        VsockHandler::new(ctx, muxer, self.guest_cid, reset_pending)
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
