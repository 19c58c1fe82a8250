//! The `vmm` command line, built from typed parts.
//!
//! A snapshot restores only into a VMM with the devices it was taken with:
//! the same `--drive`s in the same order, `--net`, `--vsock` (the host-side
//! paths may differ). Giving the boot that makes a snapshot and every
//! restore of it one [`Devices`] value keeps them the same. The network
//! policy ([`NetPolicy`]) is host-side state, not a device: a restore may
//! run under another policy than the boot did.
//!
//! ```
//! use vmm_api::launch::{Boot, Console, Devices, Drive, NetPolicy, Start, VmmArgs};
//!
//! let devices = Devices {
//!     drives: vec![Drive { path: "rootfs.erofs".into(), read_only: true, serial: None }],
//!     net: true,
//!     vsock: Some("v.sock".into()),
//! };
//! let standby = VmmArgs {
//!     start: Start::Standby,
//!     devices: devices.clone(),
//!     net_policy: NetPolicy {
//!         isolated: true,
//!         allow: vec!["127.0.0.1:5432".parse().expect("a valid rule")],
//!     },
//!     api_sock: Some("api.sock".into()),
//!     console: Console::Null,
//!     jail: None,
//! };
//! assert_eq!(
//!     standby.to_args(),
//!     ["--drive", "path=rootfs.erofs,ro", "--net", "--net-isolated",
//!      "--net-allow", "127.0.0.1:5432", "--vsock", "uds=v.sock",
//!      "--api-sock", "api.sock", "--console", "null"],
//! );
//! let boot = VmmArgs {
//!     start: Start::Boot(Boot::new("vmlinux")),
//!     ..standby
//! };
//! assert_eq!(boot.to_args()[..2], ["--kernel", "vmlinux"]);
//! ```

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use crate::net::Rule;

/// A virtio-blk disk (`--drive path=PATH[,ro][,serial=ID]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    /// The raw image file.
    pub path: PathBuf,
    /// Offer it read-only.
    pub read_only: bool,
    /// What the device answers to GET_ID (at most 20 bytes): how the guest
    /// tells disks apart (`/sys/block/vdX/serial`).
    pub serial: Option<String>,
}

/// The guest's devices besides the console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    /// Disks, `/dev/vda`, `/dev/vdb`, … in order.
    pub drives: Vec<Drive>,
    /// A virtio-net NIC on the VMM's private userspace network (`--net`).
    pub net: bool,
    /// A virtio-vsock device whose host end is the Unix socket at this path
    /// (`--vsock uds=PATH`).
    pub vsock: Option<PathBuf>,
}

/// What the guest behind the `--net` NIC may reach (host-side: it may differ
/// between the boot that makes a snapshot and its restores). Ignored
/// without [`Devices::net`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetPolicy {
    /// Public internet and DNS only (`--net-isolated`): no host loopback
    /// (the gateway `10.0.2.2`), no address of the host, no private,
    /// link-local, multicast or reserved range.
    pub isolated: bool,
    /// Host-side destinations opened anyway (`--net-allow RULE`, each);
    /// `127.0.0.1:P` opens the host's loopback port P as `10.0.2.2:P`.
    pub allow: Vec<Rule>,
}

/// What a fresh boot needs besides the devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boot {
    /// The uncompressed kernel (`--kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`--initrd`).
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB (`--mem`); `None` for the VMM's default.
    pub mem_mib: Option<u64>,
    /// Kernel arguments appended to the VMM's (`--cmdline`); empty for none.
    pub cmdline: String,
}

impl Boot {
    /// A boot of `kernel` with the VMM's defaults for everything else.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            mem_mib: None,
            cmdline: String::new(),
        }
    }
}

/// How the VMM gets its guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Boot a kernel.
    Boot(Boot),
    /// Restore a snapshot right away (`--snapshot`).
    Restore {
        /// The snapshot file.
        snapshot: PathBuf,
        /// Pages to read ahead (`--working-set`).
        working_set: Option<PathBuf>,
    },
    /// Start with no guest and wait for [`Command::Restore`](crate::Command::Restore)
    /// on the control socket, which [`VmmArgs::api_sock`] must name.
    Standby,
}

/// Where the guest's serial console goes (`--console`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Console {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// Nowhere.
    Null,
    /// This file (a path spelled `stdout` or `null` reads as the others),
    /// owner-only; at `max_bytes` it is renamed to `PATH.1` and a new one
    /// starts, so at most twice that is kept (`--console-max-bytes`).
    File {
        /// The file.
        path: PathBuf,
        /// The cap in bytes (0: none); `None` for the VMM's default, 8 MiB.
        max_bytes: Option<u64>,
    },
}

impl Console {
    /// A console file with the VMM's default cap.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::File {
            path: path.into(),
            max_bytes: None,
        }
    }
}

/// A host path made visible inside the jail (`--jail-bind HOST=JAIL`,
/// `--jail-bind-ro HOST=JAIL`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// The file or folder on the host.
    pub host: PathBuf,
    /// Where the VMM sees it: an absolute path inside the jail's root.
    pub jail: PathBuf,
    /// Mounted read-only (the VMM cannot write through it).
    pub read_only: bool,
}

/// The jail the VMM puts itself in before any guest runs (`--jail-*`).
///
/// The VMM joins `cgroups`, enters new mount, PID, IPC and UTS namespaces
/// (and a user namespace when it does not run as root), makes `root` its
/// `/` with only `binds` (and a private `/proc`) in it, drops to `uid:gid`
/// with no capabilities and `no_new_privs`, and closes every inherited file
/// descriptor but stdio. Every path in the rest of the command line is then
/// a path inside the jail. The process the caller starts forks the jailed
/// VMM, writes its pid as one decimal line to stdout and exits 0: a caller
/// that wants to wait for the VMM makes itself a child subreaper first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    /// The folder that becomes the VMM's `/` (`--jail-root`); its own
    /// files (sockets) are created in it.
    pub root: PathBuf,
    /// The unprivileged user and group the VMM runs as (`--jail-user
    /// UID:GID`); `None` keeps the caller's, inside a user namespace.
    pub user: Option<(u32, u32)>,
    /// cgroup folders the VMM joins before it forks (`--jail-cgroup`).
    pub cgroups: Vec<PathBuf>,
    /// Host paths the VMM may use.
    pub binds: Vec<Bind>,
}

/// A whole `vmm` command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmArgs {
    /// Boot, restore, or standby.
    pub start: Start,
    /// The guest's devices.
    pub devices: Devices,
    /// The network policy (with [`Devices::net`]).
    pub net_policy: NetPolicy,
    /// The control socket (`--api-sock`).
    pub api_sock: Option<PathBuf>,
    /// The serial console.
    pub console: Console,
    /// The jail; `None` runs the VMM as it is started.
    pub jail: Option<Jail>,
}

impl VmmArgs {
    /// The arguments, without the program name.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = Args::default();
        match &self.start {
            Start::Boot(boot) => {
                args.flag_value("--kernel", &boot.kernel);
                if let Some(initrd) = &boot.initrd {
                    args.flag_value("--initrd", initrd);
                }
                if let Some(mem) = boot.mem_mib {
                    args.flag_value("--mem", mem.to_string());
                }
                if !boot.cmdline.is_empty() {
                    args.flag_value("--cmdline", &boot.cmdline);
                }
            }
            Start::Restore {
                snapshot,
                working_set,
            } => {
                args.flag_value("--snapshot", snapshot);
                if let Some(ws) = working_set {
                    args.flag_value("--working-set", ws);
                }
            }
            Start::Standby => {}
        }
        for drive in &self.devices.drives {
            let mut spec = OsString::from("path=");
            spec.push(&drive.path);
            if drive.read_only {
                spec.push(",ro");
            }
            if let Some(serial) = &drive.serial {
                spec.push(",serial=");
                spec.push(serial);
            }
            args.flag_value("--drive", spec);
        }
        if self.devices.net {
            args.0.push("--net".into());
            if self.net_policy.isolated {
                args.0.push("--net-isolated".into());
            }
            for rule in &self.net_policy.allow {
                args.flag_value("--net-allow", rule.to_string());
            }
        }
        if let Some(uds) = &self.devices.vsock {
            let mut spec = OsString::from("uds=");
            spec.push(uds);
            args.flag_value("--vsock", spec);
        }
        if let Some(sock) = &self.api_sock {
            args.flag_value("--api-sock", sock);
        }
        match &self.console {
            Console::Stdout => {}
            Console::Null => args.flag_value("--console", "null"),
            Console::File { path, max_bytes } => {
                args.flag_value("--console", path);
                if let Some(max) = max_bytes {
                    args.flag_value("--console-max-bytes", max.to_string());
                }
            }
        }
        if let Some(jail) = &self.jail {
            args.flag_value("--jail-root", &jail.root);
            if let Some((uid, gid)) = jail.user {
                args.flag_value("--jail-user", format!("{uid}:{gid}"));
            }
            for cgroup in &jail.cgroups {
                args.flag_value("--jail-cgroup", cgroup);
            }
            for bind in &jail.binds {
                let mut spec = bind.host.as_os_str().to_owned();
                spec.push("=");
                spec.push(&bind.jail);
                let flag = if bind.read_only {
                    "--jail-bind-ro"
                } else {
                    "--jail-bind"
                };
                args.flag_value(flag, spec);
            }
        }
        args.0
    }

    /// A [`std::process::Command`] running `vmm` with these arguments.
    pub fn command(&self, vmm: impl AsRef<OsStr>) -> std::process::Command {
        let mut command = std::process::Command::new(vmm);
        command.args(self.to_args());
        command
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag_value(&mut self, flag: &str, value: impl AsRef<OsStr>) {
        self.0.push(flag.into());
        self.0.push(value.as_ref().to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_names_every_part() {
        let args = VmmArgs {
            start: Start::Boot(Boot {
                kernel: "/k/vmlinux".into(),
                initrd: Some("/a/agent.cpio".into()),
                mem_mib: Some(256),
                cmdline: "little.root=/dev/vda".into(),
            }),
            devices: Devices {
                drives: vec![
                    Drive {
                        path: "/a/rootfs.erofs".into(),
                        read_only: true,
                        serial: None,
                    },
                    Drive {
                        path: "/a/data.img".into(),
                        read_only: false,
                        serial: Some("vol0".into()),
                    },
                ],
                net: false,
                vsock: None,
            },
            net_policy: NetPolicy {
                isolated: true,
                allow: vec!["127.0.0.1:5432".parse().unwrap()],
            },
            api_sock: None,
            console: Console::File {
                path: "/a/boot.log".into(),
                max_bytes: Some(4096),
            },
            jail: None,
        };
        assert_eq!(
            args.to_args(),
            [
                "--kernel",
                "/k/vmlinux",
                "--initrd",
                "/a/agent.cpio",
                "--mem",
                "256",
                "--cmdline",
                "little.root=/dev/vda",
                "--drive",
                "path=/a/rootfs.erofs,ro",
                "--drive",
                "path=/a/data.img,serial=vol0",
                "--console",
                "/a/boot.log",
                "--console-max-bytes",
                "4096",
            ]
        );
    }

    #[test]
    fn the_network_policy_follows_the_nic() {
        let mut args = VmmArgs {
            start: Start::Standby,
            devices: Devices {
                net: true,
                ..Devices::default()
            },
            net_policy: NetPolicy {
                isolated: true,
                allow: vec![
                    "127.0.0.1:5432".parse().unwrap(),
                    "10.0.0.0/8".parse().unwrap(),
                ],
            },
            api_sock: None,
            console: Console::Stdout,
            jail: None,
        };
        assert_eq!(
            args.to_args(),
            [
                "--net",
                "--net-isolated",
                "--net-allow",
                "127.0.0.1:5432",
                "--net-allow",
                "10.0.0.0/8",
            ]
        );
        args.net_policy.isolated = false;
        assert_eq!(
            args.to_args(),
            [
                "--net",
                "--net-allow",
                "127.0.0.1:5432",
                "--net-allow",
                "10.0.0.0/8"
            ]
        );
        // Without a NIC there is nothing to apply a policy to.
        args.devices.net = false;
        args.net_policy.isolated = true;
        assert!(args.to_args().is_empty());
    }

    #[test]
    fn a_restore_names_its_snapshot_and_working_set() {
        let args = VmmArgs {
            start: Start::Restore {
                snapshot: "/a/app.snap".into(),
                working_set: Some("/a/app.ws".into()),
            },
            devices: Devices::default(),
            net_policy: NetPolicy::default(),
            api_sock: Some("/a/api.sock".into()),
            console: Console::Stdout,
            jail: None,
        };
        assert_eq!(
            args.to_args(),
            [
                "--snapshot",
                "/a/app.snap",
                "--working-set",
                "/a/app.ws",
                "--api-sock",
                "/a/api.sock",
            ]
        );
    }

    #[test]
    fn the_command_runs_the_given_binary() {
        let args = VmmArgs {
            start: Start::Standby,
            devices: Devices::default(),
            net_policy: NetPolicy::default(),
            api_sock: Some("api.sock".into()),
            console: Console::Null,
            jail: None,
        };
        let command = args.command("/usr/bin/vmm");
        assert_eq!(command.get_program(), "/usr/bin/vmm");
        assert_eq!(
            command.get_args().collect::<Vec<_>>(),
            ["--api-sock", "api.sock", "--console", "null"]
        );
    }

    #[test]
    fn a_jail_names_its_root_user_cgroups_and_binds() {
        let args = VmmArgs {
            start: Start::Standby,
            devices: Devices::default(),
            net_policy: NetPolicy::default(),
            api_sock: Some("/api.sock".into()),
            console: Console::Null,
            jail: Some(Jail {
                root: "/apps/a/i/1".into(),
                user: Some((3000001, 3000001)),
                cgroups: vec!["/sys/fs/cgroup/pids/little/1".into()],
                binds: vec![
                    Bind {
                        host: "/images/r.erofs".into(),
                        jail: "/rootfs.erofs".into(),
                        read_only: true,
                    },
                    Bind {
                        host: "/apps/a/logs/1".into(),
                        jail: "/log".into(),
                        read_only: false,
                    },
                ],
            }),
        };
        assert_eq!(
            args.to_args()[4..],
            [
                "--jail-root",
                "/apps/a/i/1",
                "--jail-user",
                "3000001:3000001",
                "--jail-cgroup",
                "/sys/fs/cgroup/pids/little/1",
                "--jail-bind-ro",
                "/images/r.erofs=/rootfs.erofs",
                "--jail-bind",
                "/apps/a/logs/1=/log",
            ]
        );
    }
}
