//! Deploy: import the image, boot it once, snapshot it when it is ready.
//!
//! The agent config comes from the image config (image-tools) plus the
//! app's `--env` and `ready_port=<app port>`, so the agent's `READY` on the
//! host channel means "the app accepts connections": the snapshot taken
//! right then restores into an instance that serves at once.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use image_tools::runconfig::agent_initramfs;
use image_tools::store::{ImportOptions, Source, Store};

use crate::api::AppSpec;
use crate::db::AppRecord;
use crate::settings::Settings;

/// Boot to `READY` on a nested, emulated host takes 10-60 s.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

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
    #[error("the agent config is invalid: {0}")]
    AgentConfig(String),
    /// The agent initramfs could not be written.
    #[error("cannot write {0}")]
    Initramfs(String, #[source] image_tools::initramfs::Error),
    /// A file or folder of the app could not be written.
    #[error("cannot write {0}")]
    Io(String, #[source] std::io::Error),
    /// The first boot failed.
    #[error("the first boot failed: {0} (console: {1})")]
    Boot(String, String),
    /// The snapshot failed.
    #[error("the snapshot failed: {0}")]
    Snapshot(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeployError + '_ {
    move |e| DeployError::Io(path.display().to_string(), e)
}

/// The agent config for `spec` from the image's run config text.
///
/// ```
/// let base = "# from the image\narg=/bin/httpd\n";
/// let conf = platform::deploy::app_agent_config(base, &["A=1".into()], 8080);
/// assert!(conf.ends_with("env=A=1\nready_port=8080\n"));
/// ```
pub fn app_agent_config(image_config: &str, env: &[String], port: u16) -> String {
    let mut text = image_config.to_owned();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    for e in env {
        text.push_str(&format!("env={e}\n"));
    }
    text.push_str(&format!("ready_port={port}\n"));
    text
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text.get(start..).unwrap_or_default().to_owned()
}

/// Imports, boots and snapshots `spec` under `<home>/apps/<name>`. The
/// listen address is filled in by the caller.
pub fn deploy(settings: &Settings, spec: &AppSpec) -> Result<AppRecord, DeployError> {
    let store = Store::new(settings.home.join("images"));
    let source =
        Source::parse(&spec.image).map_err(|e| DeployError::Import(spec.image.clone(), e))?;
    let options = ImportOptions {
        quiet: true,
        ..ImportOptions::default()
    };
    let image = store
        .import(&source, &spec.name, &options)
        .map_err(|e| DeployError::Import(spec.image.clone(), e))?;
    let config = app_agent_config(&image.run.agent_config(None)?, &spec.env, spec.port);
    guest_agent_check(&config)?;

    let dir = settings.home.join("apps").join(&spec.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    let boot = dir.join("boot");
    std::fs::create_dir_all(&boot).map_err(io(&boot))?;
    std::fs::create_dir_all(dir.join("logs")).map_err(io(&dir))?;
    let initrd = dir.join("agent.cpio");
    agent_initramfs(&settings.agent, &config)?
        .write_file(&initrd)
        .map_err(|e| DeployError::Initramfs(initrd.display().to_string(), e))?;
    let rootfs = store.rootfs(&image.id);
    let snapshot = dir.join("app.snap");
    first_boot(
        settings,
        spec,
        &boot,
        &initrd,
        &rootfs,
        &dir.join("logs/boot.log"),
        &snapshot,
    )?;
    let _ = std::fs::remove_dir_all(&boot);
    Ok(AppRecord {
        spec: spec.clone(),
        listen: spec.listen.clone(),
        dir,
        snapshot,
        rootfs,
        deployed_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    })
}

fn guest_agent_check(config: &str) -> Result<(), DeployError> {
    guest_agent::config::Config::parse(config.as_bytes())
        .map(|_| ())
        .map_err(|e| DeployError::AgentConfig(format!("{e:?}")))
}

fn first_boot(
    settings: &Settings,
    spec: &AppSpec,
    boot: &Path,
    initrd: &Path,
    rootfs: &Path,
    console: &Path,
    snapshot: &Path,
) -> Result<(), DeployError> {
    let agent = UnixListener::bind(boot.join("v.sock_1024")).map_err(io(boot))?;
    agent.set_nonblocking(true).map_err(io(boot))?;
    let api = boot.join("api.sock");
    let mut child = Command::new(&settings.vmm)
        .arg("--kernel")
        .arg(&settings.kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--mem")
        .arg(spec.memory_mib.to_string())
        .arg("--drive")
        .arg(format!("path={},ro", rootfs.display()))
        .arg("--cmdline")
        .arg("little.root=/dev/vda little.rootfstype=erofs")
        .arg("--net")
        .arg("--vsock")
        .arg(format!("uds={}", boot.join("v.sock").display()))
        .arg("--api-sock")
        .arg(&api)
        .arg("--console")
        .arg(console)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(&settings.vmm))?;
    let fail = |child: &mut std::process::Child, why: String| {
        let _ = child.kill();
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        }
        let _ = child.wait();
        DeployError::Boot(format!("{why} {}", err.trim()), tail(console))
    };
    let start = Instant::now();
    let stream = loop {
        match agent.accept() {
            Ok((s, _)) => break s,
            Err(_) if start.elapsed() > READY_TIMEOUT => {
                return Err(fail(&mut child, "the agent never connected".into()))
            }
            Err(_) => {
                if !matches!(child.try_wait(), Ok(None)) {
                    return Err(fail(&mut child, "vmm exited".into()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(READY_TIMEOUT));
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(n) if n > 0 => {}
            _ => return Err(fail(&mut child, "the agent hung up before READY".into())),
        }
        match line.trim() {
            "READY" => break,
            l if l.starts_with("EXIT") => {
                return Err(fail(&mut child, format!("the entrypoint ended ({l})")))
            }
            _ => {}
        }
    }
    let control = |cmd: &str| -> Result<String, DeployError> {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&api).map_err(io(&api))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io(&api))?;
        writeln!(s, "{cmd}").map_err(io(&api))?;
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).map_err(io(&api))?;
        Ok(reply.trim().to_owned())
    };
    let reply = control(&format!("snapshot {}", snapshot.display()))?;
    if !reply.starts_with("ok") {
        let _ = child.kill();
        let _ = child.wait();
        return Err(DeployError::Snapshot(reply));
    }
    let _ = control("quit");
    let start = Instant::now();
    while matches!(child.try_wait(), Ok(None)) {
        if start.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Where the app's files go (exposed for `little logs`).
pub fn logs_dir(record: &AppRecord) -> PathBuf {
    record.dir.join("logs")
}
