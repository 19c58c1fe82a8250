//! `little-initramfs`: build a guest initramfs with the little.cloud agent as
//! `/init`, its configuration, and optional extra files (busybox for tests).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use image_tools::initramfs::{Error, Initramfs};

/// Build a newc cpio initramfs whose /init is the little.cloud guest agent.
#[derive(Parser, Debug)]
#[command(name = "little-initramfs", version, about)]
struct Args {
    /// Output archive.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// The static guest-agent binary, installed as /init.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// Agent configuration file, installed as /little/agent.conf.
    #[arg(long, value_name = "PATH")]
    agent_config: Option<PathBuf>,
    /// A static busybox, installed as /bin/busybox with /bin/sh pointing at it.
    #[arg(long, value_name = "PATH")]
    busybox: Option<PathBuf>,
    /// Extra file as HOST:GUEST[:OCTAL_MODE] (parent directories are created).
    #[arg(long = "file", value_name = "HOST:GUEST[:MODE]")]
    files: Vec<String>,
}

fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/')
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
}

fn build(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut fs = Initramfs::new();
    for dir in [
        "/bin", "/dev", "/etc", "/proc", "/sys", "/tmp", "/run", "/root", "/little",
    ] {
        fs.dir(dir, 0o755)?;
    }
    fs.char_dev("/dev/console", 0o600, 5, 1)?;
    fs.char_dev("/dev/null", 0o666, 1, 3)?;
    fs.host_file("/init", 0o755, &args.agent)?;
    if let Some(conf) = &args.agent_config {
        fs.host_file("/little/agent.conf", 0o644, conf)?;
    }
    if let Some(busybox) = &args.busybox {
        fs.host_file("/bin/busybox", 0o755, busybox)?;
        fs.symlink("/bin/sh", "busybox")?;
    }
    for spec in &args.files {
        let mut parts = spec.splitn(3, ':');
        let (Some(host), Some(guest)) = (parts.next(), parts.next()) else {
            return Err(format!("--file {spec:?}: expected HOST:GUEST[:MODE]").into());
        };
        let mode = match parts.next() {
            Some(m) => {
                u32::from_str_radix(m, 8).map_err(|_| format!("--file {spec:?}: bad octal mode"))?
            }
            None => 0o644,
        };
        if let Some(dir) = parent(guest) {
            fs.dirs(dir)?;
        }
        match fs.host_file(guest, mode, host.as_ref()) {
            Err(Error::Duplicate(p)) => {
                return Err(format!("--file {spec:?}: {p} already exists").into())
            }
            r => {
                r?;
            }
        }
    }
    fs.write_file(&args.out)?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match build(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("little-initramfs: error: {e}");
            ExitCode::FAILURE
        }
    }
}
