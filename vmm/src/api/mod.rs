//! The VMM's control: the control socket of a running VM ([`server`])
//! and standby mode, a VMM waiting to be told what to restore
//! ([`standby`]). Both speak [`vmm_api`]'s typed protocol.

pub mod server;
pub mod standby;

use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::vmm::Vmm;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control socket could not be set up.
    #[error("cannot listen on control socket {0}")]
    Socket(String, #[source] std::io::Error),
    /// The control socket could not join the VM's event loop.
    #[error(transparent)]
    Vmm(#[from] crate::vmm::Error),
}

/// Binds the control socket, replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    let name = path.display().to_string();
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| Error::Socket(name.clone(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::Socket(name.clone(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Socket(name, e))?;
    Ok(listener)
}

/// Serves control commands on `listener` for `vmm`, on its event loop.
pub fn serve(vmm: &Vmm, listener: UnixListener) -> Result<(), Error> {
    let server = server::ApiServer::new(listener, vmm.handle().clone(), vmm.inbound().cloned());
    vmm.add_handler(Box::new(server))?;
    Ok(())
}
