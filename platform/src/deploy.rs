//! Deploy: import the image, boot it once, snapshot it when it is ready.
//!
//! The agent config comes from the image config (image-tools) plus the
//! app's `--env` and `ready_port=<app port>`, so the agent's `READY` on the
//! host channel means "the app accepts connections": the snapshot taken
//! right then restores into an instance that serves at once.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_agent::protocol::{AgentMsg, LineReader, MAX_LINE};
use guest_agent::status::ExitStatus;
use image_tools::runconfig::agent_initramfs;
use image_tools::store::{ImportOptions, Source, Store};
use vmm_api::launch::{Boot, Start, VmmArgs};
use vmm_api::{Client, ClientError, Command};

use crate::api::AppSpec;
use crate::db::AppRecord;
use crate::fill;
use crate::home;
use crate::jail::{self, JailPlan};
use crate::process::{ProcessError, VmmProcess};
use crate::settings::Settings;
use crate::suspend::{Pairing, SuspendError};
use crate::vm;
use crate::volume;

/// How long a boot may take to `READY` unless the app says otherwise
/// (`--ready-timeout`): long enough for a server on hardware KVM, and for
/// a small one on a nested, emulated host (10-60 s); a database there
/// needs minutes (its start-up is emulated guest-kernel work) and says so
/// with its own timeout. The agent probes the app's port until the host's
/// deadline ends the boot.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the snapshot may take (it writes the guest memory out).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// The kernel arguments that mount the app's base image as the root.
const ROOT_CMDLINE: &str = "little.root=/dev/vda little.rootfstype=erofs";

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The image could not be imported.
    #[error("cannot import image {0:?}")]
    Import(String, #[source] image_tools::store::StoreError),
    /// The image has nothing to run, or its config is invalid.
    #[error("cannot make the agent config")]
    RunConfig(#[from] image_tools::runconfig::RunConfigError),
    /// The agent config with the app's settings does not parse.
    #[error("the agent config is invalid")]
    AgentConfig(#[source] guest_agent::config::ConfigError),
    /// The agent initramfs could not be written.
    #[error("cannot write {0}")]
    Initramfs(String, #[source] image_tools::initramfs::Error),
    /// A file or folder of the app could not be written.
    #[error("cannot write {0}")]
    Io(String, #[source] std::io::Error),
    /// The first boot's jail could not be prepared.
    #[error("cannot prepare the first boot's jail")]
    Jail(#[from] jail::JailError),
    /// The first boot's `vmm` could not be started.
    #[error("cannot start the first boot")]
    Spawn(#[from] ProcessError),
    /// The first boot did not get to `READY`; with what the `vmm` wrote on
    /// stderr and the end of the guest console.
    #[error("the first boot failed: {failure} {stderr} (console: {console})")]
    Boot {
        /// What went wrong.
        failure: BootFailure,
        /// The `vmm`'s stderr.
        stderr: String,
        /// The last 2,000 bytes of the guest console.
        console: String,
    },
    /// The `vmm` did not write the snapshot.
    #[error("the snapshot failed")]
    Snapshot(#[source] ClientError),
    /// The app's settings do not hold with what its image declares.
    #[error("{0}")]
    Spec(String),
    /// An app-private volume could not be made.
    #[error("cannot make the app's volume")]
    Volume(#[source] volume::VolumeError),
    /// A new volume could not be filled from the image.
    #[error("cannot fill volume {0:?} from the image")]
    Fill(String, #[source] fill::FillError),
    /// The snapshot and the volumes could not be made durable together.
    #[error("cannot settle the snapshot with the volumes")]
    Settle(#[from] SuspendError),
}

/// Why the first boot did not get to `READY`.
#[derive(Debug, thiserror::Error)]
pub enum BootFailure {
    /// The agent did not connect in time.
    #[error("the agent never connected")]
    NoAgent,
    /// The `vmm` ended before the agent connected.
    #[error("vmm exited")]
    VmmExited,
    /// The agent's channel closed before `READY`.
    #[error("the agent hung up before READY")]
    HungUp,
    /// The agent sent a line longer than the protocol allows: the channel
    /// was closed rather than drained.
    #[error("the agent sent a line over {MAX_LINE} bytes")]
    LineTooLong,
    /// The app was not ready within the boot deadline: its port did not
    /// accept, or its ready command did not exit 0.
    #[error("the app was not ready within {0:?} of the boot (its port must accept, then its ready command, if any, exit 0)")]
    NotReady(Duration),
    /// The app's entrypoint ended before it was ready.
    #[error("the entrypoint ended ({})", AgentMsg::Exit(*.0))]
    EntrypointEnded(ExitStatus),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeployError + '_ {
    move |e| DeployError::Io(path.display().to_string(), e)
}

/// The agent config for `spec` from the image's run config text and its
/// `HEALTHCHECK` (`image_ready`, an argv; the ready command unless the
/// spec sets its own).
///
/// ```
/// let mut spec: platform::api::AppSpec = serde_json::from_str(r#"{"name":"web",
///     "image":"i","port":8080,"listen":"127.0.0.1:0","memory_mib":128,
///     "concurrency":1,"min":0,"max":1,"idle_timeout_ms":1000,"env":["A=1\\n"]}"#).unwrap();
/// spec.volumes = vec!["data:/srv/data".parse().unwrap()];
/// let base = "# from the image\narg=/bin/httpd\n";
/// let conf = platform::deploy::app_agent_config(base, &spec, &[]);
/// assert!(conf.ends_with("env=A=1\\\\n\nready_port=8080\nvolume=vol0:/srv/data\n"));
/// let image_ready = ["pg_isready".to_string()];
/// let conf = platform::deploy::app_agent_config(base, &spec, &image_ready);
/// assert!(conf.contains("ready_port=8080\nready_arg=pg_isready\n"));
/// spec.ready_cmd = Some("test -e /tmp/up".into());
/// let conf = platform::deploy::app_agent_config(base, &spec, &image_ready);
/// assert!(conf.contains("ready_arg=/bin/sh\nready_arg=-c\nready_arg=test -e /tmp/up\n"));
/// spec.ready_cmd = Some(String::new());
/// assert!(!platform::deploy::app_agent_config(base, &spec, &image_ready).contains("ready_arg"));
/// ```
pub fn app_agent_config(image_config: &str, spec: &AppSpec, image_ready: &[String]) -> String {
    use guest_agent::config::write_entry;
    let mut text = image_config.to_owned();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    // Writing to a String cannot fail.
    for e in &spec.env {
        let _ = write_entry(&mut text, "env", e.as_bytes());
    }
    text.push_str(&format!("ready_port={}\n", spec.port));
    let ready: Vec<String> = match spec.ready_cmd.as_deref() {
        None => image_ready.to_vec(),
        Some("") => Vec::new(),
        Some(cmd) => vec!["/bin/sh".into(), "-c".into(), cmd.into()],
    };
    for arg in &ready {
        let _ = write_entry(&mut text, "ready_arg", arg.as_bytes());
    }
    text.push_str(&volume::agent_lines(&spec.volumes));
    text
}

/// Imports, boots and snapshots `spec` under `<home>/apps/<name>`. The
/// listen address is filled in by the caller.
///
/// With the jail on, the boot runs as `uid` (when the daemon is root) in
/// `<app>/boot`, which holds only the kernel, the initramfs, the base image
/// and its log folder; it writes the snapshot there, and every file an
/// instance reads is then given to the app's user, mode 0600.
pub fn deploy(
    settings: &Settings,
    spec: &AppSpec,
    uid: u32,
    mut volume_files: Vec<PathBuf>,
    registry_auth: Option<String>,
) -> Result<AppRecord, DeployError> {
    let mut spec = spec.clone();
    // The same store as `little-image --store <home>`.
    let store = Store::new(&settings.home);
    let source =
        Source::parse(&spec.image).map_err(|e| DeployError::Import(spec.image.clone(), e))?;
    let mut options = ImportOptions {
        quiet: true,
        ..ImportOptions::default()
    };
    options.registry.credentials = registry_auth;
    let image = store
        .import(&source, &spec.name, &options)
        .map_err(|e| DeployError::Import(spec.image.clone(), e))?;
    let private = volume::private_mounts(&spec, &image.run.volumes).map_err(DeployError::Spec)?;
    for mount in private {
        volume_files.push(private_volume(settings, &mount)?);
        spec.volumes.push(mount);
    }
    spec.resolve_max();
    spec.validate().map_err(DeployError::Spec)?;
    let spec = &spec;
    let config = app_agent_config(&image.run.agent_config(None)?, spec, &image.run.healthcheck);
    guest_agent_check(&config)?;

    let dir = settings.home.join("apps").join(&spec.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    home::create_dir_all(&dir).map_err(io(&dir))?;
    // The agent config in it carries the app's env values.
    let initrd = dir.join("agent.cpio");
    let file = home::create_file(&initrd).map_err(io(&initrd))?;
    agent_initramfs(&settings.agent, &config)?
        .write(std::io::BufWriter::new(file))
        .and_then(|mut w| w.flush().map_err(image_tools::initramfs::Error::Write))
        .map_err(|e| DeployError::Initramfs(initrd.display().to_string(), e))?;
    let record = AppRecord {
        spec: spec.clone(),
        listen: spec.listen.clone(),
        snapshot: dir.join("app.snap"),
        dir,
        rootfs: store.rootfs(&image.id),
        deployed_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        uid,
        volume_files,
    };
    let user = jail::user_of(&record);
    jail::give(&initrd, user, 0o600)?;
    if user.is_some() {
        // The shared base image is read by every app's user, through its
        // jail only: the home above it is the daemon's alone (0700).
        jail::give(&record.rootfs, None, 0o644)?;
    }
    fill_volumes(settings, &record)?;
    boot_and_snapshot(settings, &record)?;
    Ok(record)
}

/// The file of `mount`, an app-private volume for a path the image
/// declares: made (sparse, [`volume::DEFAULT_SIZE`]) on the app's first
/// deploy, kept across redeploys and `little rm` (as Docker keeps an
/// anonymous volume), removed with `little volume rm`.
fn private_volume(
    settings: &Settings,
    mount: &volume::VolumeMount,
) -> Result<PathBuf, DeployError> {
    let volumes = volume::Volumes::new(&settings.home);
    match volumes.create(&mount.name, volume::DEFAULT_SIZE) {
        Ok(_) | Err(volume::VolumeError::Exists(_)) => {}
        Err(e) => return Err(DeployError::Volume(e)),
    }
    volumes.open(&mount.name).map_err(DeployError::Volume)
}

/// Fills each new, empty volume of `record` with what its image has at
/// the mount path, on the host ([`fill`]); what the host cannot fill,
/// the guest agent does at the first boot.
fn fill_volumes(settings: &Settings, record: &AppRecord) -> Result<(), DeployError> {
    let scratch = settings.home.join("tmp");
    for (mount, file) in record.spec.volumes.iter().zip(&record.volume_files) {
        let filled = fill::fill(&record.rootfs, &mount.path, file, &mount.name, &scratch)
            .map_err(|e| DeployError::Fill(mount.name.clone(), e))?;
        if filled == fill::Filled::Filled {
            eprintln!(
                "little: {}: volume {} filled with the image's {}",
                record.spec.name, mount.name, mount.path
            );
        }
    }
    Ok(())
}

/// Boots `record`'s app in `<app>/boot` and (re)writes its snapshot,
/// given to the app's user. This is the deploy's first boot, and how an
/// app whose volumes moved on since its snapshot starts again: a cold
/// boot with the volumes as they are (ext4 replays its journal), after
/// which the snapshot matches them again.
pub fn boot_and_snapshot(settings: &Settings, record: &AppRecord) -> Result<(), DeployError> {
    let boot = record.dir.join("boot");
    let logs = record.dir.join("logs").join("boot");
    if boot.exists() {
        std::fs::remove_dir_all(&boot).map_err(io(&boot))?;
    }
    home::create_dir_all(&boot).map_err(io(&boot))?;
    home::create_dir_all(&logs).map_err(io(&logs))?;
    let initrd = record.dir.join("agent.cpio");
    first_boot(settings, record, &boot, &initrd, &logs)?;
    jail::give(&record.snapshot, jail::user_of(record), 0o600)?;
    let _ = std::fs::remove_dir_all(&boot);
    if !record.volume_files.is_empty() {
        Pairing::new(&record.dir, &record.volume_files).settle_boot(&record.snapshot)?;
    }
    Ok(())
}

fn boot_cgroup(spec: &AppSpec) -> String {
    format!("{}-boot", spec.name)
}

fn guest_agent_check(config: &str) -> Result<(), DeployError> {
    guest_agent::config::Config::parse(config.as_bytes())
        .map(|_| ())
        .map_err(DeployError::AgentConfig)
}

/// Boots the app in `boot` (its jail's root when jailed), waits for
/// `READY`, and has the VMM write the snapshot to `app.snapshot`.
fn first_boot(
    settings: &Settings,
    app: &AppRecord,
    boot: &Path,
    initrd: &Path,
    logs: &Path,
) -> Result<(), DeployError> {
    let agent = UnixListener::bind(vm::agent_socket(boot)).map_err(io(boot))?;
    agent.set_nonblocking(true).map_err(io(boot))?;
    let api = vm::api_socket(boot);
    let console = logs.join(jail::CONSOLE);
    let mut args = VmmArgs {
        start: Start::Boot(Boot {
            kernel: settings.kernel.clone(),
            initrd: Some(initrd.to_owned()),
            mem_mib: Some(app.spec.memory_mib.into()),
            cmdline: ROOT_CMDLINE.into(),
        }),
        devices: vm::devices(&app.rootfs, &app.volume_files, boot),
        net_policy: vm::net_policy(&app.spec),
        api_sock: Some(api.clone()),
        console: vm::console(console.clone()),
        jail: None,
    };
    // Where the VMM writes the snapshot, as it names it.
    let mut written = app.snapshot.clone();
    // Removed (its processes killed) when the boot is over, however it ends.
    let mut _group = None;
    if settings.jail {
        let plan = JailPlan {
            app,
            root: boot,
            logs,
            snapshot: None,
            suspended: None,
            cgroup: boot_cgroup(&app.spec),
        };
        let (jailed, group) = plan.confine(args, settings.cgroups.as_ref())?;
        args = jailed;
        _group = group;
        written = PathBuf::from(jail::SNAPSHOT);
    }
    let mut child = VmmProcess::spawn(&settings.vmm, &args, true)?;
    // The agent's channel stays open until the VMM is gone, as the guest
    // saw it when the snapshot was taken.
    let deadline = Duration::from_millis(app.spec.ready_timeout_ms);
    let _channel = match wait_ready(&agent, &mut child, deadline) {
        Ok(channel) => channel,
        Err(failure) => {
            child.kill();
            let mut stderr = String::new();
            if let Some(pipe) = child.stderr() {
                let _ = pipe.take(64 * 1024).read_to_string(&mut stderr);
            }
            let _ = child.wait();
            return Err(DeployError::Boot {
                failure,
                stderr: stderr.trim().to_owned(),
                console: crate::logs::tail(&console, 2000),
            });
        }
    };
    let snapshot = Command::Snapshot {
        path: written.clone(),
    };
    let taken = Client::connect(&api, CONTROL_TIMEOUT).and_then(|mut c| c.send(&snapshot));
    if let Err(e) = taken {
        child.kill_and_wait();
        return Err(DeployError::Snapshot(e));
    }
    if let Ok(mut c) = Client::connect(&api, CONTROL_TIMEOUT) {
        let _ = c.send(&Command::Quit);
    }
    let start = Instant::now();
    while matches!(child.try_wait(), Ok(None)) {
        if start.elapsed() > Duration::from_secs(5) {
            child.kill_and_wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if settings.jail {
        let inside = boot.join(written.strip_prefix("/").unwrap_or(&written));
        std::fs::rename(&inside, &app.snapshot).map_err(io(&app.snapshot))?;
    }
    Ok(())
}

/// Waits for the agent of the booting `child` to connect and say `READY`
/// (other agent lines are ignored, as the protocol asks); returns the
/// agent's channel.
fn wait_ready(
    agent: &UnixListener,
    child: &mut VmmProcess,
    deadline: Duration,
) -> Result<UnixStream, BootFailure> {
    let start = Instant::now();
    let mut stream = loop {
        match agent.accept() {
            Ok((s, _)) => break s,
            Err(_) if start.elapsed() > deadline => return Err(BootFailure::NoAgent),
            Err(_) => {
                if !matches!(child.try_wait(), Ok(None)) {
                    return Err(BootFailure::VmmExited);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let _ = stream.set_nonblocking(false);
    let mut lines = LineReader::new();
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(BootFailure::NotReady(deadline));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(lines.spare()) {
            Ok(n) if n > 0 => lines.filled(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(BootFailure::NotReady(deadline))
            }
            _ => return Err(BootFailure::HungUp),
        }
        while let Some(line) = lines.next_line() {
            match line.map(AgentMsg::parse) {
                Ok(Ok(AgentMsg::Ready)) => return Ok(stream),
                Ok(Ok(AgentMsg::Exit(status))) => return Err(BootFailure::EntrypointEnded(status)),
                _ => {}
            }
        }
        if lines.overlong() {
            return Err(BootFailure::LineTooLong);
        }
    }
}

/// Where the app's files go (exposed for `little logs`).
pub fn logs_dir(record: &AppRecord) -> PathBuf {
    record.dir.join("logs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_failure_says_what_ended_it_then_the_vmm_and_the_console() {
        let error = DeployError::Boot {
            failure: BootFailure::EntrypointEnded(ExitStatus::Exited(3)),
            stderr: "vmm: warning".into(),
            console: "[    0.1] booting".into(),
        };
        assert_eq!(
            error.to_string(),
            "the first boot failed: the entrypoint ended (EXIT status=3) vmm: warning (console: [    0.1] booting)"
        );
    }

    /// A boot as `wait_ready` sees it: the agent socket's listener, a
    /// stand-in `vmm` process (a `sleep`) and the agent's end, connected.
    fn booting() -> (tempfile::TempDir, UnixListener, VmmProcess, UnixStream) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        // Reaped by the VmmProcess that takes it over.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let vmm = VmmProcess::from_child(&child);
        let agent = UnixStream::connect(&sock).unwrap();
        (dir, listener, vmm, agent)
    }

    /// An agent that connects but whose app never accepts ends the boot at
    /// the app's own deadline, which the error names.
    #[test]
    fn a_boot_ends_at_the_apps_ready_deadline() {
        let (_dir, listener, mut vmm, mut agent) = booting();
        agent.write_all(b"HELLO 1\n").unwrap();
        let deadline = Duration::from_secs(1);
        let result = wait_ready(&listener, &mut vmm, deadline);
        vmm.kill_and_wait();
        match result {
            Err(failure @ BootFailure::NotReady(d)) => {
                assert_eq!(d, deadline);
                assert!(failure.to_string().contains("within 1s"), "{failure}");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// A booting guest whose agent sends 64 MiB without a newline fails
    /// the boot as soon as a line is over `MAX_LINE`, and the channel is
    /// closed before the flood is read.
    #[test]
    fn a_booting_agent_that_floods_one_line_fails_the_boot() {
        let (_dir, listener, mut vmm, mut agent) = booting();
        let total = 64 << 20;
        let flood = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < total {
                match agent.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            sent
        });
        let result = wait_ready(&listener, &mut vmm, READY_TIMEOUT);
        vmm.kill_and_wait();
        assert!(
            matches!(result, Err(BootFailure::LineTooLong)),
            "{:?}",
            result.map(|_| ())
        );
        let sent = flood.join().unwrap();
        assert!(sent < total, "the whole 64 MiB was read: {sent} bytes");
    }
}
