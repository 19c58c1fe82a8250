//! `little-image`: import OCI and Docker images into little.cloud's local
//! store as read-only erofs base images, list and remove them, and write
//! the agent initramfs that boots one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use image_tools::registry::ClientOptions;
use image_tools::runconfig;
use image_tools::store::{ImportOptions, Source, Store};

/// Import container images (OCI layouts, OCI or `docker save` archives,
/// registry references) and boot them unmodified under the little.cloud agent.
#[derive(Parser, Debug)]
#[command(name = "little-image", version)]
struct Args {
    /// The home whose `images/` is the store, shared with `little`
    /// [default: $LITTLE_HOME, else ~/.little].
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Print only results and errors: no progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Import an image: an OCI layout directory (DIR or DIR:TAG), an OCI
    /// archive or `docker save` tar file, or a registry reference
    /// (`[host[:port]/]name[:tag|@sha256:...]`). Prints the image id.
    ///
    /// Registries are spoken to over HTTPS, except loopback ones
    /// (localhost, 127.*, [::1]), which get plain HTTP unless --tls is
    /// passed or a CA is given (--ca-cert, $LITTLE_REGISTRY_CA, or a *.crt
    /// file in /etc/docker/certs.d/HOST[:PORT]/). --plain-http forces HTTP.
    /// HTTPS never falls back to HTTP.
    Import {
        /// What to import.
        #[arg(value_name = "REF|PATH")]
        source: String,
        /// Name to record for the image (default: the argument as given).
        #[arg(long)]
        name: Option<String>,
        /// Talk plain HTTP to the registry.
        #[arg(long, conflicts_with_all = ["tls", "ca_cert"])]
        plain_http: bool,
        /// Talk HTTPS even to a loopback registry.
        #[arg(long)]
        tls: bool,
        /// Trust the CA certificates of this PEM file too (repeatable; else
        /// the ':'-separated files of $LITTLE_REGISTRY_CA).
        #[arg(long, value_name = "PATH")]
        ca_cert: Vec<PathBuf>,
        /// Registry credentials as USER:PASSWORD (or $LITTLE_REGISTRY_AUTH;
        /// else the registry's entry in Docker's ~/.docker/config.json, as
        /// `docker login` wrote it).
        #[arg(long, value_name = "USER:PASSWORD")]
        creds: Option<String>,
    },
    /// List stored images: id, size, names.
    Ls,
    /// Remove a stored image, by name or (a prefix of) its id.
    Rm {
        /// Names or ids.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Print where a stored image's base image is, for `vmm --drive`.
    Path {
        /// Name or id.
        image: String,
    },
    /// Write the initramfs that boots a stored image: the agent as /init
    /// and the image's entrypoint as its configuration. Boot with
    /// `vmm --initrd OUT --drive path=<base image>,ro --cmdline
    /// "little.root=/dev/vda little.rootfstype=erofs"`.
    Initramfs {
        /// Name or id.
        image: String,
        /// The static guest-agent binary.
        #[arg(long, value_name = "PATH")]
        agent: PathBuf,
        /// Output archive.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Arguments replacing the image's Cmd (as `docker run IMAGE ARGS`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::new(args.store.clone().unwrap_or_else(Store::default_root));
    match args.command {
        Command::Import {
            source,
            name,
            plain_http,
            tls,
            ca_cert,
            creds,
        } => {
            let ca_certs = match std::env::var_os("LITTLE_REGISTRY_CA") {
                Some(list) if ca_cert.is_empty() && !plain_http => std::env::split_paths(&list)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect(),
                _ => ca_cert,
            };
            let parsed = Source::parse(&source)?;
            let credentials = match creds.or_else(|| std::env::var("LITTLE_REGISTRY_AUTH").ok()) {
                Some(given) => Some(given),
                None => match &parsed {
                    Source::Registry(reference) => {
                        image_tools::docker_config::credentials(&reference.registry)?
                    }
                    _ => None,
                },
            };
            let options = ImportOptions {
                registry: ClientOptions {
                    plain_http,
                    tls,
                    ca_certs,
                    certs_dir: None,
                    credentials,
                },
                quiet: args.quiet,
                ..ImportOptions::default()
            };
            let image = store.import(&parsed, name.as_deref().unwrap_or(&source), &options)?;
            if args.quiet {
                println!("{}", image.id);
            } else {
                println!(
                    "{} {} ({} bytes, {} inodes)",
                    image.id,
                    store.rootfs(&image.id).display(),
                    image.rootfs_bytes,
                    image.inodes
                );
            }
        }
        Command::Ls => {
            let images = store.list()?;
            if !args.quiet {
                println!("{:<14} {:>12}  NAMES", "ID", "SIZE");
            }
            for i in images {
                println!(
                    "{:<14} {:>12}  {}",
                    &i.id.hex()[..12],
                    i.rootfs_bytes,
                    i.refs.join(", ")
                );
            }
        }
        Command::Rm { images } => {
            for name in images {
                let image = store.remove(&name)?;
                if !args.quiet {
                    println!("removed {}", image.id);
                }
            }
        }
        Command::Path { image } => {
            let image = store.find(&image)?;
            println!("{}", store.rootfs(&image.id).display());
        }
        Command::Initramfs {
            image,
            agent,
            out,
            args: extra,
        } => {
            let image = store.find(&image)?;
            let config = image
                .run
                .agent_config((!extra.is_empty()).then_some(extra.as_slice()))?;
            runconfig::agent_initramfs(&agent, &config)?.write_file(&out)?;
            if !args.quiet {
                println!("{}", out.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("little-image: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
