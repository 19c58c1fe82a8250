//! `little`: the little.cloud daemon (`little serve`) and its CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use platform::api::{self, AppStatus, Request};
use platform::appfile::{AppFile, DeployFlags};
use platform::daemon::Daemon;
use platform::settings::Settings;
use platform::volume::VolumeInfo;

/// little.cloud: run OCI images as KVM microVMs that wake on a request and
/// scale to zero.
#[derive(Parser, Debug)]
#[command(name = "little", version)]
struct Cli {
    /// State folder: database, image store, snapshots, logs and the API
    /// socket `little.sock` [default: $LITTLE_HOME, else ~/.little]
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon: serve every deployed app, answer the CLI.
    Serve {
        /// Guest kernel [default: $LITTLE_VMLINUX, else
        /// <dir of little>/../guest-kernel/vmlinux]
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// The vmm binary [default: next to little]
        #[arg(long, value_name = "PATH")]
        vmm: Option<PathBuf>,
        /// The static guest-agent binary [default: next to little]
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
        /// Prometheus metrics at http://ADDR/metrics
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        metrics: SocketAddr,
        /// Pre-spawned standby VMMs per app (no guest, ~2 MiB each) that
        /// restore on a request; 0 spawns the VMM on the request.
        #[arg(long, value_name = "N", default_value_t = 1)]
        standby: usize,
        /// Run VMMs without their jail (no namespaces, cgroups or user
        /// change): for debugging only, never with untrusted images.
        #[arg(long)]
        no_jail: bool,
    },
    /// Import an image, boot it once, snapshot it when it is ready, and
    /// serve it (replaces an app of the same name). Settings come from the
    /// flags, else the app file (-f, or ./little.toml when there is one),
    /// else the defaults shown.
    Deploy {
        /// App name (letters, digits, '-', '_').
        name: Option<String>,
        /// The app file (TOML: name, image, port, listen, memory,
        /// concurrency, min, max, idle_timeout, ready_timeout, ready_cmd,
        /// allow_host, volumes, [env]) [default: ./little.toml if there]
        #[arg(short = 'f', long = "file", value_name = "PATH")]
        file: Option<PathBuf>,
        /// Image: registry reference, OCI layout directory, OCI or
        /// `docker save` archive.
        #[arg(long)]
        image: Option<String>,
        /// The port the app listens on in the guest.
        #[arg(long)]
        port: Option<u16>,
        /// Host address the daemon listens on for this app [default:
        /// 127.0.0.1:0, any free port; a redeploy keeps its port].
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Guest memory, MiB [default: 128].
        #[arg(long, value_name = "MiB")]
        memory: Option<u32>,
        /// Connections one instance serves at once [default: 10].
        #[arg(long, value_name = "N")]
        concurrency: Option<u32>,
        /// Instances kept running when idle [default: 0].
        #[arg(long, value_name = "N")]
        min: Option<u32>,
        /// Most instances at once [default: 10; 1, the only value allowed,
        /// for an app with a volume].
        #[arg(long, value_name = "N")]
        max: Option<u32>,
        /// Stop an instance after this long without a connection (500ms,
        /// 1s, 2m) [default: 1s].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        idle_timeout: Option<u64>,
        /// Extra environment for the app (repeatable; sets or overrides a
        /// key of the app file's). A bare KEY takes its value from this
        /// command's environment, which keeps the value off the command
        /// line other users can see in /proc.
        #[arg(long, value_name = "KEY=VALUE|KEY")]
        env: Vec<String>,
        /// Open a host-side destination to the app, whose VMs otherwise
        /// reach only the public internet and DNS (repeatable). The rule
        /// names where the VMM connects: `127.0.0.1:5432` opens the host's
        /// loopback port 5432, which the app reaches as 10.0.2.2:5432;
        /// `10.1.0.0/16` a private network.
        #[arg(long, value_name = "ADDR[/N][:PORT]")]
        allow_host: Vec<vmm_api::net::Rule>,
        /// Mount a volume (`little volume create`) at a path in the guest,
        /// read-write (repeatable). A new, empty volume is first filled
        /// with what the image has at that path. An app with a volume runs
        /// one instance at a time.
        #[arg(long, value_name = "NAME:/PATH")]
        volume: Vec<platform::volume::VolumeMount>,
        /// How long a boot may take until the app is ready (the deploy's,
        /// and the cold boot of an app whose volumes moved on) [default:
        /// 2m].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        ready_timeout: Option<u64>,
        /// A shell command the guest runs, as the app's user, once --port
        /// accepts, and again until it exits 0: only then is the app ready
        /// and its snapshot taken (`pg_isready -q -t 0`: a database that
        /// accepts while it starts up). Default: the image's HEALTHCHECK;
        /// '' for none.
        #[arg(long, value_name = "COMMAND")]
        ready_cmd: Option<String>,
        /// Credentials for the image's registry, used for this pull and
        /// never stored (else $LITTLE_REGISTRY_AUTH, else the registry's
        /// entry in ~/.docker/config.json, as `docker login` wrote it).
        #[arg(long, value_name = "USER:PASSWORD")]
        creds: Option<String>,
    },
    /// List apps and their instances (age, connections, memory); env
    /// values are masked (`KEY=***`) unless --show-env.
    Ps {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
        /// Show the apps' env values.
        #[arg(long)]
        show_env: bool,
    },
    /// Print an app's console output (first boot and every instance;
    /// each VM's rotated `.1` part before its current file).
    Logs {
        /// The app.
        app: String,
        /// Keep printing what the app's VMs write, across log rotations
        /// and new instances (like `tail -F`), until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Change a running app's scaling settings, without a redeploy: they
    /// apply at once (a lowered --max stops idle instances over it) and
    /// hold across daemon restarts until the next deploy.
    Scale {
        /// The app.
        app: String,
        /// Instances kept running when idle.
        #[arg(long, value_name = "N")]
        min: Option<u32>,
        /// Most instances at once (1 for an app with a volume).
        #[arg(long, value_name = "N")]
        max: Option<u32>,
        /// Connections one instance serves at once.
        #[arg(long, value_name = "N")]
        concurrency: Option<u32>,
        /// Stop an instance after this long without a connection (500ms, 1s, 2m).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        idle_timeout: Option<u64>,
    },
    /// Stop an app's instances and forget it (its volumes are kept).
    Rm {
        /// The app.
        app: String,
    },
    /// Persistent volumes: ext4 disks an app mounts read-write.
    #[command(subcommand)]
    Volume(VolumeCmd),
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Make a volume: a sparse ext4 image (it takes disk space as it fills).
    Create {
        /// Its name (letters, digits, '-', '_').
        name: String,
        /// Its size: 512M, 1G, 10G.
        #[arg(long, default_value = "1G", value_parser = parse_volume_size)]
        size: u64,
    },
    /// List volumes: size, space taken on the host, the app that mounts it.
    Ls {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume and its data (refused while an app mounts it).
    Rm {
        /// Its name.
        name: String,
    },
    /// Write a volume to stdout as a tar archive (its sparse ext4 image):
    /// `little volume export data > data.tar`. The app that mounts it is
    /// suspended first and held until the copy is made.
    Export {
        /// Its name.
        name: String,
    },
    /// Make a volume from an archive `volume export` wrote, or replace its
    /// contents (the app that mounts it is suspended and held meanwhile,
    /// and boots cold with the imported data next).
    Import {
        /// Its name.
        name: String,
        /// The archive.
        archive: std::path::PathBuf,
    },
}

fn parse_volume_size(text: &str) -> Result<u64, String> {
    platform::volume::parse_size(text).map_err(|e| e.to_string())
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    platform::appfile::parse_duration_ms(s)
}

/// The credentials for `image`'s registry: `--creds`, else
/// `$LITTLE_REGISTRY_AUTH`, else Docker's client config; none for an image
/// that is not a registry reference.
fn registry_auth(image: &str, creds: Option<String>) -> Result<Option<String>, String> {
    if let Some(given) = creds.or_else(|| std::env::var("LITTLE_REGISTRY_AUTH").ok()) {
        return Ok(Some(given));
    }
    match image_tools::store::Source::parse(image) {
        Ok(image_tools::store::Source::Registry(reference)) => {
            image_tools::docker_config::credentials(&reference.registry)
                .map_err(|e| platform::daemon::error_chain(&e))
        }
        _ => Ok(None),
    }
}

fn home(cli: &Cli) -> PathBuf {
    cli.home
        .clone()
        .unwrap_or_else(image_tools::store::Store::default_root)
}

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn print_ps(apps: &[AppStatus]) {
    if apps.is_empty() {
        println!("no apps deployed");
    }
    for a in apps {
        println!(
            "{}  http://{}  -> guest :{}  instances {}  standby {}  (concurrency {}, min {}, max {}, idle {} ms)  net: {}",
            a.spec.name,
            a.listen,
            a.spec.port,
            a.instances.len(),
            a.standby,
            a.spec.concurrency,
            a.spec.min,
            a.spec.max,
            a.spec.idle_timeout_ms,
            a.spec.network()
        );
        if let Some(uid) = a.user {
            println!("  runs as uid/gid {uid}");
        }
        if !a.spec.env.is_empty() {
            println!("  env {}", a.spec.env.join(" "));
        }
        for v in &a.spec.volumes {
            println!("  volume {v}");
        }
        if let Some(start) = &a.last_start {
            println!("  last start: {start}");
        }
        if let Some(death) = &a.last_death {
            println!("  last death: {death}");
        }
        if !a.instances.is_empty() {
            println!(
                "  {:>6} {:>8} {:>10} {:>6} {:>10}",
                "ID", "PID", "AGE", "CONNS", "RSS"
            );
        }
        for i in &a.instances {
            println!(
                "  {:>6} {:>8} {:>9.1}s {:>6} {:>7} MiB",
                i.id,
                i.pid,
                Duration::from_millis(i.age_ms).as_secs_f64(),
                i.connections,
                i.rss_kib / 1024
            );
        }
    }
}

use std::time::Duration;

fn run(cli: Cli) -> Result<(), String> {
    let home = home(&cli);
    let sock = home.join("little.sock");
    let call = |r: Request| api::call(&sock, &r).map_err(|e| platform::daemon::error_chain(&e));
    match cli.command {
        Cmd::Serve {
            kernel,
            vmm,
            agent,
            metrics,
            standby,
            no_jail,
        } => {
            let kernel = kernel
                .or_else(|| std::env::var_os("LITTLE_VMLINUX").map(PathBuf::from))
                .unwrap_or_else(|| beside_me("../guest-kernel/vmlinux"));
            let settings = Settings {
                home,
                kernel,
                vmm: vmm.unwrap_or_else(|| beside_me("vmm")),
                agent: agent.unwrap_or_else(|| beside_me("guest-agent")),
                standby,
                jail: !no_jail,
                cgroups: None,
            };
            let daemon = Daemon::open(settings).map_err(|e| platform::daemon::error_chain(&e))?;
            eprintln!("little: metrics on http://{metrics}/metrics");
            daemon
                .serve(Some(metrics))
                .map_err(|e| platform::daemon::error_chain(&e))
        }
        Cmd::Deploy {
            name,
            file,
            image,
            port,
            listen,
            memory,
            concurrency,
            min,
            max,
            idle_timeout,
            env,
            allow_host,
            volume: volumes,
            ready_timeout,
            ready_cmd,
            creds,
        } => {
            let file = match file {
                Some(path) => Some(path),
                None => {
                    let here = PathBuf::from("little.toml");
                    here.is_file().then(|| {
                        eprintln!("little: reading ./little.toml");
                        here
                    })
                }
            };
            let app_file = file
                .as_deref()
                .map(AppFile::load)
                .transpose()
                .map_err(|e| platform::daemon::error_chain(&e))?;
            let env = env
                .into_iter()
                .map(|e| {
                    if e.contains('=') {
                        return Ok(e);
                    }
                    std::env::var(&e)
                        .map(|value| format!("{e}={value}"))
                        .map_err(|_| format!("--env {e}: {e} is not set in this environment"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let image = image.map(|image| match std::fs::canonicalize(&image) {
                Ok(p) => p.display().to_string(),
                Err(_) => image,
            });
            let flags = DeployFlags {
                settings: AppFile {
                    name,
                    image,
                    port,
                    listen,
                    memory,
                    concurrency,
                    min,
                    max,
                    idle_timeout,
                    ready_timeout,
                    ready_cmd,
                    env: std::collections::BTreeMap::new(),
                    allow_host,
                    volumes,
                },
                env,
            };
            let spec = platform::appfile::resolve(app_file, flags)?;
            let registry_auth = registry_auth(&spec.image, creds)?.map(api::Secret);
            let data = call(Request::Deploy {
                spec,
                registry_auth,
            })?;
            let status: AppStatus = serde_json::from_value(data).map_err(|e| e.to_string())?;
            println!(
                "deployed {}: http://{}  (snapshot {})",
                status.spec.name, status.listen, status.snapshot
            );
            println!("try: curl http://{}/", status.listen);
            Ok(())
        }
        Cmd::Ps { json, show_env } => {
            let data = call(Request::Ps { show_env })?;
            if json {
                println!("{data}");
                return Ok(());
            }
            let apps: Vec<AppStatus> = serde_json::from_value(data).map_err(|e| e.to_string())?;
            print_ps(&apps);
            Ok(())
        }
        Cmd::Logs { app, follow } => {
            let mut out = std::io::stdout().lock();
            match api::logs(&sock, &app, follow, &mut out) {
                // `little logs web | head`: the reader had enough.
                Err(api::ApiError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    Ok(())
                }
                result => result.map_err(|e| platform::daemon::error_chain(&e)),
            }
        }
        Cmd::Scale {
            app,
            min,
            max,
            concurrency,
            idle_timeout,
        } => {
            let scale = api::Scale {
                min,
                max,
                concurrency,
                idle_timeout_ms: idle_timeout,
            };
            if scale.is_empty() {
                return Err(
                    "nothing to change: give --min, --max, --concurrency or --idle-timeout".into(),
                );
            }
            let data = call(Request::Scale { app, scale })?;
            let a: AppStatus = serde_json::from_value(data).map_err(|e| e.to_string())?;
            println!(
                "scaled {}: min {}, max {}, concurrency {}, idle {} ms",
                a.spec.name, a.spec.min, a.spec.max, a.spec.concurrency, a.spec.idle_timeout_ms
            );
            Ok(())
        }
        Cmd::Rm { app } => {
            call(Request::Rm { app: app.clone() })?;
            println!("removed {app}");
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Create { name, size }) => {
            let data = call(Request::VolumeCreate { name, size })?;
            let info: VolumeInfo = serde_json::from_value(data).map_err(|e| e.to_string())?;
            println!("created volume {} ({} MiB)", info.name, info.size >> 20);
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Ls { json }) => {
            let data = call(Request::VolumeLs)?;
            if json {
                println!("{data}");
                return Ok(());
            }
            let list: Vec<VolumeInfo> = serde_json::from_value(data).map_err(|e| e.to_string())?;
            if list.is_empty() {
                println!("no volumes");
            }
            for v in list {
                println!(
                    "{}  {} MiB  ({} MiB on disk)  {}",
                    v.name,
                    v.size >> 20,
                    v.allocated >> 20,
                    v.app
                        .map_or("unused".to_owned(), |a| format!("mounted by {a}"))
                );
            }
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Rm { name }) => {
            call(Request::VolumeRm { name: name.clone() })?;
            println!("removed volume {name}");
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Export { name }) => {
            use std::io::IsTerminal;
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                return Err(
                    "refusing to write an archive to a terminal: redirect it (> backup.tar)".into(),
                );
            }
            let exported = platform::api::export(&sock, &name, &mut stdout.lock())
                .map_err(|e| platform::daemon::error_chain(&e))?;
            say_held(&exported, "exported");
            Ok(())
        }
        Cmd::Volume(VolumeCmd::Import { name, archive }) => {
            let archive = std::fs::canonicalize(&archive)
                .map_err(|e| format!("{}: {e}", archive.display()))?;
            let data = call(Request::VolumeImport {
                name: name.clone(),
                archive,
            })?;
            let imported: platform::api::Exported =
                serde_json::from_value(data).map_err(|e| e.to_string())?;
            say_held(&imported, "imported");
            println!(
                "imported volume {name} ({} MiB)",
                imported.volume.size >> 20
            );
            Ok(())
        }
    }
}

/// Says on stderr which app was held for an export or import.
fn say_held(done: &platform::api::Exported, what: &str) {
    if let Some((app, stopped)) = &done.held {
        eprintln!(
            "little: {what} volume {} while app {app} was held ({stopped} instance(s) suspended first)",
            done.volume.name
        );
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("little: error: {e}");
            ExitCode::FAILURE
        }
    }
}
