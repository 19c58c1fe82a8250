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
    /// (guest 10.0.2.15/24, gateway 10.0.2.2 = host loopback, DNS 10.0.2.3).
    #[arg(long)]
    pub net: bool,

    /// Publish a host TCP port to a guest port, `[HOSTADDR:]HOSTPORT:GUESTPORT`
    /// (host address defaults to 127.0.0.1); repeatable; implies --net.
    #[arg(long, value_name = "SPEC")]
    pub publish: Vec<crate::usernet::Publish>,

    /// Deny every outbound guest connection and DNS query (except --net-allow).
    #[arg(long)]
    pub net_deny_outbound: bool,

    /// Allow outbound connections to `A.B.C.D[/N][:PORT]`; repeatable.
    #[arg(long, value_name = "RULE")]
    pub net_allow: Vec<crate::usernet::Rule>,

    /// Deny outbound connections to `A.B.C.D[/N][:PORT]`; repeatable, checked first.
    #[arg(long, value_name = "RULE")]
    pub net_deny: Vec<crate::usernet::Rule>,

    /// A virtio-vsock device, `uds=PATH[,cid=N]` (cid defaults to 3): the VMM
    /// listens on PATH for `CONNECT <port>`; guest connections to host port
    /// P go to the Unix socket PATH_P.
    #[arg(long, value_name = "uds=PATH[,cid=N]")]
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,

    /// Log filter: a level or a `target=level` list, e.g. `info` or
    /// `vmm=debug,warn`; `RUST_LOG` works too. Logs go to stderr.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use clap::Parser;
    use vmm_api::launch::{Boot, Console, Devices, Drive, Start, VmmArgs};

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
                },
                Drive {
                    path: "/apps/a/data.img".into(),
                    read_only: false,
                },
            ],
            net: true,
            vsock: Some("/apps/a/i/1/v.sock".into()),
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
            api_sock: Some("/apps/a/boot/api.sock".into()),
            console: Console::File {
                path: "/apps/a/logs/boot.log".into(),
                max_bytes: Some(1 << 20),
            },
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
    }

    #[test]
    fn a_console_file_without_a_cap_gets_the_vmm_default() {
        let args = parse(&VmmArgs {
            start: Start::Standby,
            devices: Devices::default(),
            api_sock: Some("/apps/a/i/1/api.sock".into()),
            console: Console::file("/apps/a/logs/1.log"),
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
            api_sock: None,
            console: Console::Null,
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
    }
}
