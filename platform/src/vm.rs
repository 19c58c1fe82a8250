//! One VM folder: an app's devices, and where their host ends live.
//!
//! Deploy boots the app in `<app dir>/boot`, each instance runs in
//! `<app dir>/i/<id>`; both get their `vmm` devices from [`devices`], so
//! the snapshot the boot takes restores in every instance's VMM.

use std::path::{Path, PathBuf};

use guest_agent::protocol::AGENT_PORT;
use vmm_api::launch::{Console, Devices, Drive};

/// A VM's console log is renamed to `<log>.1` at this size and started
/// again, so a guest keeps at most twice this on disk per VM.
pub const CONSOLE_MAX_BYTES: u64 = 8 << 20;

/// The console of every VM of an app: the log file at `path`, capped at
/// [`CONSOLE_MAX_BYTES`].
pub fn console(path: PathBuf) -> Console {
    Console::File {
        path,
        max_bytes: Some(CONSOLE_MAX_BYTES),
    }
}

/// The devices of every VM of an app: its base image read-only as
/// `/dev/vda`, a NIC, and the vsock device the agent reaches the host with
/// (host end in `dir`).
pub fn devices(rootfs: &Path, dir: &Path) -> Devices {
    Devices {
        drives: vec![Drive {
            path: rootfs.to_owned(),
            read_only: true,
        }],
        net: true,
        vsock: Some(dir.join("v.sock")),
    }
}

/// Where the agent of the VM in `dir` connects (the vsock device's socket
/// for host port [`AGENT_PORT`]).
pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join(format!("v.sock_{AGENT_PORT}"))
}

/// The control socket of the VMM in `dir`.
pub fn api_socket(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_socket_is_the_vsock_socket_for_its_port() {
        let dir = Path::new("/apps/a/i/7");
        let vsock = devices(Path::new("/images/r.erofs"), dir).vsock;
        let uds = vsock.expect("every VM has the agent's vsock device");
        assert_eq!(
            agent_socket(dir).into_os_string().into_string().unwrap(),
            format!("{}_1024", uds.display())
        );
    }
}
