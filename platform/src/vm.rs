//! One VM folder: an app's devices and network policy, and where their
//! host ends live.
//!
//! Deploy boots the app in `<app dir>/boot`, each instance runs in
//! `<app dir>/i/<id>`; both get their `vmm` devices from [`devices`], so
//! the snapshot the boot takes restores in every instance's VMM, and their
//! network policy from [`net_policy`], so every VMM of an app is isolated
//! alike.

use std::path::{Path, PathBuf};

use guest_agent::protocol::AGENT_PORT;
use vmm_api::launch::{Console, Devices, Drive, NetPolicy};

use crate::api::AppSpec;
use crate::volume;

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
/// `/dev/vda`, its volumes read-write after it (the `i`-th with serial
/// [`volume::serial`]`(i)`), a NIC, and the vsock device the agent reaches
/// the host with (host end in `dir`).
pub fn devices(rootfs: &Path, volumes: &[PathBuf], dir: &Path) -> Devices {
    let base = Drive {
        path: rootfs.to_owned(),
        read_only: true,
        serial: None,
    };
    let volumes = volumes.iter().enumerate().map(|(i, path)| Drive {
        path: path.clone(),
        read_only: false,
        serial: Some(volume::serial(i)),
    });
    Devices {
        drives: std::iter::once(base).chain(volumes).collect(),
        net: true,
        vsock: Some(dir.join("v.sock")),
    }
}

/// The network policy of every VM of an app: isolated (public internet and
/// DNS only), with the app's `--allow-host` rules opened.
pub fn net_policy(spec: &AppSpec) -> NetPolicy {
    NetPolicy {
        isolated: true,
        allow: spec.allow_host.clone(),
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
        let vsock = devices(Path::new("/images/r.erofs"), &[], dir).vsock;
        let uds = vsock.expect("every VM has the agent's vsock device");
        assert_eq!(
            agent_socket(dir).into_os_string().into_string().unwrap(),
            format!("{}_1024", uds.display())
        );
    }

    #[test]
    fn every_vm_of_an_app_is_isolated_with_the_apps_host_rules() {
        let mut spec = crate::api::AppSpec {
            name: "web".into(),
            image: "x.tar".into(),
            port: 8080,
            listen: "127.0.0.1:0".into(),
            memory_mib: 128,
            concurrency: 10,
            min: 0,
            max: 4,
            idle_timeout_ms: 1000,
            env: vec![],
            allow_host: vec![],
            volumes: vec![],
            ready_timeout_ms: 600_000,
            ready_cmd: None,
        };
        assert_eq!(
            net_policy(&spec),
            NetPolicy {
                isolated: true,
                allow: vec![]
            }
        );
        spec.allow_host = vec!["127.0.0.1:5432".parse().unwrap()];
        let policy = net_policy(&spec);
        assert!(policy.isolated);
        assert_eq!(policy.allow, spec.allow_host);
        // What reaches the vmm command line, for the boot and for a standby.
        for start in [
            vmm_api::launch::Start::Boot(vmm_api::launch::Boot::new("vmlinux")),
            vmm_api::launch::Start::Standby,
        ] {
            let args = vmm_api::launch::VmmArgs {
                start,
                devices: devices(
                    Path::new("/images/r.erofs"),
                    &[PathBuf::from("/home/volumes/data.ext4")],
                    Path::new("/apps/web/i/1"),
                ),
                net_policy: net_policy(&spec),
                api_sock: None,
                console: vmm_api::launch::Console::Null,
                jail: None,
            }
            .to_args();
            let drives: Vec<&std::ffi::OsString> = args
                .iter()
                .zip(args.iter().skip(1))
                .filter(|(flag, _)| *flag == "--drive")
                .map(|(_, spec)| spec)
                .collect();
            assert_eq!(
                drives,
                [
                    "path=/images/r.erofs,ro",
                    "path=/home/volumes/data.ext4,serial=vol0"
                ]
            );
            let net = args.iter().position(|a| a == "--net").expect("a NIC");
            assert_eq!(
                args[net..net + 4],
                ["--net", "--net-isolated", "--net-allow", "127.0.0.1:5432"]
            );
        }
    }
}
