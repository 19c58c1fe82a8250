//! The `vmm` command line.
//!
//! A library module, so that tests can check that what other programs build
//! (`vmm_api::launch`) is what this parser accepts.

use std::path::PathBuf;

use clap::Parser;

/// Boot a Linux microVM on KVM: an uncompressed vmlinux, an initramfs, a
/// serial console. Exits 0 when the guest powers off or reboots.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Args {
    /// Uncompressed ELF kernel image (vmlinux), e.g. from guest-kernel/build.sh.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["snapshot", "api_sock"])]
    pub kernel: Option<PathBuf>,

    /// Restore the microVM saved in this snapshot file instead of booting
    /// (its memory is mapped copy-on-write: clones share it).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initrd", "mem", "vcpus", "cmdline"])]
    pub snapshot: Option<PathBuf>,

    /// Control socket: accepts `ping`, `pause`, `resume`, `snapshot <path>`,
    /// `quit`, one per line. Given without --kernel or --snapshot, the VMM
    /// starts in standby and waits for `restore <snapshot>` on this socket
    /// (a pre-spawned VMM for fast wake-ups).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// With --snapshot: map the pages in this working-set file (recorded by
    /// the control command `working-set <path>`) ahead of use.
    #[arg(long, value_name = "PATH", requires = "snapshot")]
    pub working_set: Option<PathBuf>,

    /// Forward this process's stdin to the guest's serial console.
    #[arg(long)]
    pub console_input: bool,

    /// Initramfs (newc cpio) to boot as the root filesystem.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub mem: u64,

    /// Number of vCPUs (1 is the tested default on nested KVM hosts).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,

    /// Extra kernel command-line arguments, appended to the VMM's defaults.
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub cmdline: String,

    /// Use --cmdline as the whole kernel command line instead of appending it.
    #[arg(long)]
    pub cmdline_replace: bool,

    /// Where the guest's serial console goes: `stdout`, `null`, or a file path.
    #[arg(long, value_name = "stdout|null|PATH", default_value = "stdout")]
    pub console: String,

    /// With a console file: when it reaches this many bytes it is renamed
    /// to `PATH.1` (replacing an older one) and a new file starts, so at
    /// most twice this is kept; 0 for no cap.
    #[arg(long, value_name = "BYTES", default_value_t = crate::devices::legacy::console_log::DEFAULT_MAX_BYTES)]
    pub console_max_bytes: u64,

    /// A virtio-blk disk from a raw image, `path=PATH[,ro][,serial=ID]`;
    /// repeatable, the guest sees /dev/vda, /dev/vdb, ... in order.
    #[arg(long = "drive", value_name = "path=PATH[,ro][,serial=ID]")]
    pub drives: Vec<String>,

    /// Give the guest a virtio-net NIC on a private userspace network
    /// (guest 10.0.2.15/24, gateway 10.0.2.2 = host loopback, DNS 10.0.2.3;
    /// see --net-isolated).
    #[arg(long)]
    pub net: bool,

    /// Publish a host TCP port to a guest port, `[HOSTADDR:]HOSTPORT:GUESTPORT`
    /// (host address defaults to 127.0.0.1); repeatable; implies --net.
    #[arg(long, value_name = "SPEC")]
    pub publish: Vec<crate::usernet::Publish>,

    /// Isolate the guest network: the guest reaches the public internet and
    /// DNS (10.0.2.3) and nothing else. Refused with a TCP RST: the host's
    /// loopback (so the gateway 10.0.2.2), every address of the host's
    /// interfaces, link-local 169.254.0.0/16 (cloud metadata), private
    /// 10/8, 172.16/12, 192.168/16, CGNAT 100.64/10, 0.0.0.0/8, multicast,
    /// broadcast and reserved ranges. --net-allow opens exceptions.
    #[arg(long)]
    pub net_isolated: bool,

    /// Deny every outbound guest connection and DNS query (except --net-allow).
    #[arg(long)]
    pub net_deny_outbound: bool,

    /// Allow outbound connections to the host-side destination
    /// `A.B.C.D[/N][:PORT]`, even under --net-isolated; repeatable. Rules
    /// match where the VMM really connects, after its mapping: a guest
    /// connect to the gateway 10.0.2.2:P goes to the host's 127.0.0.1:P, so
    /// `--net-allow 127.0.0.1:5432` lets the guest reach the host's
    /// loopback port 5432 as 10.0.2.2:5432. DNS matches 10.0.2.3:53 and the
    /// host resolver's address.
    #[arg(long, value_name = "RULE")]
    pub net_allow: Vec<crate::usernet::Rule>,

    /// Deny outbound connections to the host-side destination
    /// `A.B.C.D[/N][:PORT]` (127.0.0.1 for the gateway 10.0.2.2, as for
    /// --net-allow); repeatable, checked first.
    #[arg(long, value_name = "RULE")]
    pub net_deny: Vec<crate::usernet::Rule>,

    /// A virtio-vsock device, `uds=PATH[,cid=N]` (cid defaults to 3): the VMM
    /// listens on PATH for `CONNECT <port>`; guest connections to host port
    /// P go to the Unix socket PATH_P.
    #[arg(long, value_name = "uds=PATH[,cid=N]")]
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,

    /// Jail the VMM before any guest runs: join the --jail-cgroup folders,
    /// enter new mount, PID, IPC and UTS namespaces (and a user namespace
    /// without --jail-user), make DIR the root with only the binds and a
    /// private /proc in it, drop every capability and set no_new_privs.
    /// Every other path on the command line is then a path inside DIR.
    /// The started process prints the jailed VMM's pid and exits 0.
    #[arg(long, value_name = "DIR")]
    pub jail_root: Option<PathBuf>,

    /// Run the jailed VMM as this unprivileged user and group (needs root).
    #[arg(long, value_name = "UID:GID", requires = "jail_root")]
    pub jail_user: Option<crate::jail::User>,

    /// A cgroup folder the jailed VMM joins; repeatable (one per cgroup v1
    /// hierarchy).
    #[arg(long, value_name = "DIR", requires = "jail_root")]
    pub jail_cgroup: Vec<PathBuf>,

    /// Show a host file or folder inside the jail at JAIL, read-write;
    /// repeatable.
    #[arg(long, value_name = "HOST=JAIL", requires = "jail_root")]
    pub jail_bind: Vec<crate::jail::BindSpec>,

    /// Show a host file or folder inside the jail at JAIL, read-only;
    /// repeatable.
    #[arg(long, value_name = "HOST=JAIL", requires = "jail_root")]
    pub jail_bind_ro: Vec<crate::jail::BindSpec>,

    /// Confine every thread to a seccomp allow-list (on by default with
    /// --jail-root): a system call outside it kills the VMM.
    #[arg(long, conflicts_with = "no_seccomp")]
    pub seccomp: bool,

    /// Run without seccomp filters even when jailed (debugging only).
    #[arg(long)]
    pub no_seccomp: bool,

    /// With seccomp on: log system calls outside the allow-lists (kernel
    /// audit log) instead of killing the VMM, to find what a new code path
    /// needs.
    #[arg(long)]
    pub seccomp_log: bool,

    /// Log filter: a level or a `target=level` list, e.g. `info` or
    /// `vmm=debug,warn`; `RUST_LOG` works too. Logs go to stderr.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

impl Args {
    /// The jail these arguments ask for, if any.
    pub fn jail(&self) -> Option<crate::jail::Config> {
        let root = self.jail_root.clone()?;
        Some(crate::jail::Config {
            root,
            user: self.jail_user,
            cgroups: self.jail_cgroup.clone(),
            binds: self.jail_bind.clone(),
            binds_ro: self.jail_bind_ro.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use clap::Parser;
    use vmm_api::launch::{Bind, Boot, Console, Devices, Drive, Jail, NetPolicy, Start, VmmArgs};

    use super::Args;
    use crate::devices::virtio::block::BlockConfig;

    fn parse(args: &VmmArgs) -> Args {
        let argv = std::iter::once(OsString::from("vmm")).chain(args.to_args());
        Args::try_parse_from(argv).expect("vmm accepts the command line vmm-api builds")
    }

    fn devices() -> Devices {
        Devices {
            drives: vec![
                Drive {
                    path: "/apps/a/rootfs.erofs".into(),
                    read_only: true,
                    serial: None,
                },
                Drive {
                    path: "/apps/a/data.img".into(),
                    read_only: false,
                    serial: Some("vol0".into()),
                },
            ],
            net: true,
            vsock: Some("/apps/a/i/1/v.sock".into()),
        }
    }

    fn net_policy() -> NetPolicy {
        NetPolicy {
            isolated: true,
            allow: vec![
                "127.0.0.1:5432".parse().expect("rule"),
                "10.0.0.0/8:443".parse().expect("rule"),
            ],
        }
    }

    /// The network policy as this parser reads it.
    fn parsed_policy(args: &Args) -> NetPolicy {
        NetPolicy {
            isolated: args.net_isolated,
            allow: args.net_allow.clone(),
        }
    }

    /// The devices as this parser reads them: drives, net, vsock socket.
    fn parsed_devices(args: &Args) -> (Vec<BlockConfig>, bool, Option<std::path::PathBuf>) {
        let drives = args
            .drives
            .iter()
            .map(|d| BlockConfig::parse(d).expect("a valid --drive"))
            .collect();
        let vsock = args.vsock.as_ref().map(|v| v.uds_path.clone());
        (drives, args.net, vsock)
    }

    #[test]
    fn a_boot_is_read_as_built() {
        let args = parse(&VmmArgs {
            start: Start::Boot(Boot {
                kernel: "/k/vmlinux".into(),
                initrd: Some("/apps/a/agent.cpio".into()),
                mem_mib: Some(256),
                cmdline: "little.root=/dev/vda little.rootfstype=erofs".into(),
            }),
            devices: devices(),
            net_policy: net_policy(),
            api_sock: Some("/apps/a/boot/api.sock".into()),
            console: Console::File {
                path: "/apps/a/logs/boot.log".into(),
                max_bytes: Some(1 << 20),
            },
            jail: None,
        });
        assert_eq!(args.kernel.as_deref(), Some("/k/vmlinux".as_ref()));
        assert_eq!(args.initrd.as_deref(), Some("/apps/a/agent.cpio".as_ref()));
        assert_eq!(args.mem, 256);
        assert_eq!(args.cmdline, "little.root=/dev/vda little.rootfstype=erofs");
        assert_eq!(
            args.api_sock.as_deref(),
            Some("/apps/a/boot/api.sock".as_ref())
        );
        assert_eq!(args.console, "/apps/a/logs/boot.log");
        assert_eq!(args.console_max_bytes, 1 << 20);
        assert!(args.snapshot.is_none());
        assert_eq!(parsed_policy(&args), net_policy());
        assert!(!args.net_deny_outbound && args.net_deny.is_empty());
    }

    #[test]
    fn a_console_file_without_a_cap_gets_the_vmm_default() {
        let args = parse(&VmmArgs {
            start: Start::Standby,
            devices: Devices::default(),
            net_policy: NetPolicy::default(),
            api_sock: Some("/apps/a/i/1/api.sock".into()),
            console: Console::file("/apps/a/logs/1.log"),
            jail: None,
        });
        assert_eq!(args.console, "/apps/a/logs/1.log");
        assert_eq!(
            args.console_max_bytes,
            crate::devices::legacy::console_log::DEFAULT_MAX_BYTES
        );
    }

    #[test]
    fn standby_and_restore_get_the_devices_of_the_boot() {
        let boot = VmmArgs {
            start: Start::Boot(Boot::new("/k/vmlinux")),
            devices: devices(),
            net_policy: net_policy(),
            api_sock: None,
            console: Console::Null,
            jail: None,
        };
        let standby = VmmArgs {
            start: Start::Standby,
            api_sock: Some("/apps/a/i/1/api.sock".into()),
            ..boot.clone()
        };
        let restore = VmmArgs {
            start: Start::Restore {
                snapshot: "/apps/a/app.snap".into(),
                working_set: Some("/apps/a/app.ws".into()),
            },
            ..boot.clone()
        };
        let booted = parsed_devices(&parse(&boot));
        let (drives, net, vsock) = &booted;
        assert_eq!(drives.len(), 2);
        assert!(drives[0].read_only && !drives[1].read_only);
        assert_eq!(drives[0].path, std::path::Path::new("/apps/a/rootfs.erofs"));
        assert!(*net);
        assert_eq!(vsock.as_deref(), Some("/apps/a/i/1/v.sock".as_ref()));

        let standby = parse(&standby);
        assert!(standby.kernel.is_none() && standby.snapshot.is_none());
        assert!(
            standby.api_sock.is_some(),
            "a standby vmm waits on its socket"
        );
        assert_eq!(parsed_devices(&standby), booted);

        let restore = parse(&restore);
        assert_eq!(
            restore.snapshot.as_deref(),
            Some("/apps/a/app.snap".as_ref())
        );
        assert_eq!(
            restore.working_set.as_deref(),
            Some("/apps/a/app.ws".as_ref())
        );
        assert_eq!(parsed_devices(&restore), booted);
        assert_eq!(parsed_policy(&restore), net_policy());
    }

    #[test]
    fn a_restore_may_run_under_another_policy_than_its_boot() {
        let boot = VmmArgs {
            start: Start::Boot(Boot::new("/k/vmlinux")),
            devices: devices(),
            net_policy: NetPolicy::default(),
            api_sock: None,
            console: Console::Null,
            jail: None,
        };
        let restore = VmmArgs {
            start: Start::Standby,
            net_policy: net_policy(),
            api_sock: Some("/apps/a/i/1/api.sock".into()),
            ..boot.clone()
        };
        let (boot, restore) = (parse(&boot), parse(&restore));
        assert_eq!(parsed_devices(&restore), parsed_devices(&boot));
        assert_eq!(parsed_policy(&boot), NetPolicy::default());
        assert_eq!(parsed_policy(&restore), net_policy());
    }

    #[test]
    fn rules_naming_the_guest_network_are_refused() {
        let argv = [
            "vmm",
            "--kernel",
            "k",
            "--net",
            "--net-allow",
            "10.0.2.2:5432",
        ];
        let err = Args::try_parse_from(argv).expect_err("10.0.2.2 is no host-side address");
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
        let argv = ["vmm", "--kernel", "k", "--net", "--net-deny", "10.0.2.3"];
        assert!(Args::try_parse_from(argv).is_ok());
    }

    #[test]
    fn a_jail_is_read_as_built() {
        let args = parse(&VmmArgs {
            start: Start::Standby,
            devices: devices(),
            net_policy: NetPolicy::default(),
            api_sock: Some("/api.sock".into()),
            console: Console::file("/log/console.log"),
            jail: Some(Jail {
                root: "/apps/a/i/1".into(),
                user: Some((3000001, 3000002)),
                cgroups: vec!["/cg/memory/1".into(), "/cg/pids/1".into()],
                binds: vec![
                    Bind {
                        host: "/apps/a/logs/1".into(),
                        jail: "/log".into(),
                        read_only: false,
                    },
                    Bind {
                        host: "/apps/a/app.snap".into(),
                        jail: "/app.snap".into(),
                        read_only: true,
                    },
                ],
            }),
        });
        let jail = args.jail().expect("a jail");
        assert_eq!(jail.root, std::path::Path::new("/apps/a/i/1"));
        let user = jail.user.expect("a user");
        assert_eq!((user.uid, user.gid), (3000001, 3000002));
        assert_eq!(jail.cgroups.len(), 2);
        assert_eq!(jail.binds.len(), 1);
        assert_eq!(jail.binds[0].jail, std::path::Path::new("/log"));
        assert_eq!(jail.binds_ro.len(), 1);
        assert_eq!(
            jail.binds_ro[0].host,
            std::path::Path::new("/apps/a/app.snap")
        );
    }
}
