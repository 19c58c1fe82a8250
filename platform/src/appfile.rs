//! The app file, `little.toml`: an app's settings in one place, in the
//! spirit of `fly.toml`. `little deploy -f little.toml` reads it (or
//! `./little.toml` when there is one); flags override what it says.
//!
//! ```toml
//! name = "web"
//! image = "app.oci"              # relative to the file's folder
//! port = 8080                    # the port the app listens on in the guest
//! listen = "127.0.0.1:8080"
//! memory = 128                   # MiB
//! concurrency = 10
//! min = 0
//! max = 10
//! idle_timeout = "1s"
//! ready_timeout = "2m"
//! ready_cmd = "pg_isready -q -t 0"
//! allow_host = ["127.0.0.1:5432"]
//! volumes = ["data:/var/lib/app"]
//!
//! [env]
//! MODE = "production"
//! ```
//!
//! Unknown keys and values of the wrong type are errors that name the
//! line, so a typo never silently deploys a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::api::AppSpec;
use crate::volume::VolumeMount;
use vmm_api::net::Rule;

/// Largest app file read.
const MAX_FILE: u64 = 1 << 20;

/// Why an app file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AppFileError {
    /// It could not be read.
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    /// It is larger than any app file needs to be.
    #[error("{0} is over {MAX_FILE} bytes")]
    TooLarge(String),
    /// It is not valid TOML, has an unknown key or a value of the wrong
    /// type (the message names the line).
    #[error("{0}: {1}")]
    Parse(String, String),
}

/// What an app file may say; every key is optional (flags fill the rest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    /// The app's name.
    pub name: Option<String>,
    /// Image: registry reference, OCI layout directory, OCI or `docker
    /// save` archive (a path is relative to the file's folder).
    pub image: Option<String>,
    /// The port the app listens on in the guest.
    pub port: Option<u16>,
    /// Host address the daemon listens on for the app.
    pub listen: Option<String>,
    /// Guest memory, MiB.
    pub memory: Option<u32>,
    /// Connections one instance serves at once.
    pub concurrency: Option<u32>,
    /// Instances kept running when idle.
    pub min: Option<u32>,
    /// Most instances at once.
    pub max: Option<u32>,
    /// Stop an instance after this long without a connection.
    #[serde(default, deserialize_with = "duration_ms")]
    pub idle_timeout: Option<u64>,
    /// How long a boot may take until the app is ready.
    #[serde(default, deserialize_with = "duration_ms")]
    pub ready_timeout: Option<u64>,
    /// The ready command (`""`: none, not even the image's HEALTHCHECK).
    pub ready_cmd: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host-side destinations the app may reach.
    #[serde(default, deserialize_with = "parsed_list")]
    pub allow_host: Vec<Rule>,
    /// Volumes, `NAME:/guest/path`.
    #[serde(default, deserialize_with = "parsed_list")]
    pub volumes: Vec<VolumeMount>,
}

/// `500ms`, `1s`, `2m`, `1h`, or bare milliseconds, in milliseconds.
///
/// ```
/// use platform::appfile::parse_duration_ms;
/// assert_eq!(parse_duration_ms("1s"), Ok(1000));
/// assert_eq!(parse_duration_ms("250ms"), Ok(250));
/// assert_eq!(parse_duration_ms("2m"), Ok(120_000));
/// assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
/// assert_eq!(parse_duration_ms("40"), Ok(40));
/// assert!(parse_duration_ms("soon").is_err());
/// ```
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let (digits, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000)
    } else if let Some(v) = s.strip_suffix('h') {
        (v, 3_600_000)
    } else {
        (s, 1)
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(scale))
        .ok_or_else(|| format!("invalid duration {s:?}: expected e.g. 500ms, 1s, 2m"))
}

fn duration_ms<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration_ms(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn parsed_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
        })
        .collect()
}

impl AppFile {
    /// Parses an app file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, AppFileError> {
        toml::from_str(text).map_err(|e| AppFileError::Parse(origin.to_owned(), e.to_string()))
    }

    /// Reads and parses the file at `path`; a relative `image` path that
    /// exists beside the file is made absolute.
    pub fn load(path: &Path) -> Result<Self, AppFileError> {
        use std::io::Read;
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| AppFileError::Read(name.clone(), e))?;
        let mut text = String::new();
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| AppFileError::Read(name.clone(), e))?;
        if text.len() as u64 > MAX_FILE {
            return Err(AppFileError::TooLarge(name));
        }
        let mut app = Self::parse(&text, &name)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(image) = &app.image {
            let beside = dir.join(image);
            if Path::new(image).is_relative() && beside.exists() {
                app.image = Some(absolute(&beside).display().to_string());
            }
        }
        Ok(app)
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// What `little deploy`'s flags say: the same settings as a file's
/// (`None` or empty leaves the file's value, then the default; its `env`
/// map is unused), and `--env KEY=VALUE` entries, which set or override a
/// key of the file's.
#[derive(Clone, Debug, Default)]
pub struct DeployFlags {
    /// Every other flag, by its app-file key (`--allow-host` and
    /// `--volume` add to the file's).
    pub settings: AppFile,
    /// `--env KEY=VALUE`.
    pub env: Vec<String>,
}

/// The spec to deploy: each value from the flags, else the app file,
/// else the default; an error names everything still missing.
///
/// ```
/// use platform::appfile::{resolve, AppFile, DeployFlags};
/// let file = AppFile::parse("name = \"web\"\nimage = \"app.oci\"\nport = 80\nmax = 3\n[env]\nA = \"1\"\n", "t").unwrap();
/// let settings = AppFile { max: Some(5), ..AppFile::default() };
/// let flags = DeployFlags { settings, env: vec!["B=2".into()] };
/// let spec = resolve(Some(file), flags).unwrap();
/// assert_eq!((spec.name.as_str(), spec.port, spec.max, spec.memory_mib), ("web", 80, 5, 128));
/// assert_eq!(spec.env, ["A=1", "B=2"]);
/// let missing = resolve(None, DeployFlags::default()).unwrap_err();
/// assert!(missing.contains("an app name, --image, --port"), "{missing}");
/// ```
pub fn resolve(file: Option<AppFile>, flags: DeployFlags) -> Result<AppSpec, String> {
    let file = file.unwrap_or_default();
    let (flags, flag_env) = (flags.settings, flags.env);
    let name = flags.name.or(file.name);
    let image = flags.image.or(file.image);
    let port = flags.port.or(file.port);
    let mut missing = Vec::new();
    if name.is_none() {
        missing.push("an app name");
    }
    if image.is_none() {
        missing.push("--image");
    }
    if port.is_none() {
        missing.push("--port");
    }
    let (Some(name), Some(image), Some(port)) = (name, image, port) else {
        return Err(format!(
            "deploy needs {} (as flags, or as name, image and port in an app file: -f little.toml)",
            missing.join(", ")
        ));
    };
    let mut env = file.env;
    if let Some(bad) = env.keys().find(|k| k.is_empty() || k.contains('=')) {
        return Err(format!("invalid environment key {bad:?} in the app file"));
    }
    for entry in flag_env {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| format!("invalid environment entry {entry:?}: expected KEY=VALUE"))?;
        env.insert(key.to_owned(), value.to_owned());
    }
    let mut allow_host = file.allow_host;
    allow_host.extend(flags.allow_host);
    let mut volumes = file.volumes;
    volumes.extend(flags.volumes);
    let spec = AppSpec {
        name,
        image,
        port,
        listen: flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:0".into()),
        memory_mib: flags.memory.or(file.memory).unwrap_or(128),
        concurrency: flags.concurrency.or(file.concurrency).unwrap_or(10),
        min: flags.min.or(file.min).unwrap_or(0),
        // The daemon resolves an unset max once it knows the volumes the
        // image declares.
        max: flags.max.or(file.max).unwrap_or(0),
        idle_timeout_ms: flags.idle_timeout.or(file.idle_timeout).unwrap_or(1000),
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        allow_host,
        volumes,
        ready_timeout_ms: flags
            .ready_timeout
            .or(file.ready_timeout)
            .unwrap_or(u64::try_from(crate::deploy::READY_TIMEOUT.as_millis()).unwrap_or(u64::MAX)),
        ready_cmd: flags.ready_cmd.or(file.ready_cmd),
    };
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every malformed app file gets one error naming the line and what
    /// is wrong with it.
    #[test]
    fn malformed_app_files_are_clear_errors_with_the_line() {
        let cases: &[(&str, &[&str])] = &[
            (
                "name = \"web\"\nimgae = \"x\"\n",
                &["line 2", "unknown field `imgae`"],
            ),
            (
                "port = \"8080\"\n",
                &["line 1", "invalid type: string \"8080\", expected u16"],
            ),
            ("port = 70000\n", &["line 1", "u16"]),
            ("memory = -1\n", &["line 1", "u32"]),
            (
                "name = \"web\"\nidle_timeout = \"soon\"\n",
                &["line 2", "invalid duration \"soon\""],
            ),
            ("idle_timeout = 5\n", &["line 1", "expected a string"]),
            ("volumes = [\"data\"]\n", &["line 1", "\"data\""]),
            (
                "volumes = \"data:/x\"\n",
                &["line 1", "expected a sequence"],
            ),
            (
                "allow_host = [\"not an address\"]\n",
                &["line 1", "not an address"],
            ),
            ("[env]\nA = 1\n", &["line 2", "expected a string"]),
            (
                "name = \"web\"\nname = \"api\"\n",
                &["line 2", "duplicate key"],
            ),
            ("name = \"web\n", &["line 1"]),
            (
                "[stop]\nsignal = \"SIGTERM\"\n",
                &["line 1", "unknown field `stop`"],
            ),
        ];
        for (text, wanted) in cases {
            let error = AppFile::parse(text, "little.toml").unwrap_err().to_string();
            assert!(error.starts_with("little.toml: "), "{text:?}: {error}");
            for w in *wanted {
                assert!(error.contains(w), "{text:?}: {error:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn a_full_app_file_gives_every_setting() {
        let text = r#"
name = "pg"
image = "registry.example/pg:16"
port = 5432
listen = "127.0.0.1:15432"
memory = 256
concurrency = 4
min = 0
max = 1
idle_timeout = "30s"
ready_timeout = "5m"
ready_cmd = "pg_isready -q -t 0"
allow_host = ["127.0.0.1:6379"]
volumes = ["pgdata:/var/lib/postgresql/data"]

[env]
POSTGRES_PASSWORD = "s3cret"
"#;
        let spec = resolve(
            Some(AppFile::parse(text, "t").unwrap()),
            DeployFlags::default(),
        )
        .unwrap();
        assert_eq!(spec.name, "pg");
        assert_eq!(spec.listen, "127.0.0.1:15432");
        assert_eq!((spec.memory_mib, spec.concurrency, spec.max), (256, 4, 1));
        assert_eq!(
            (spec.idle_timeout_ms, spec.ready_timeout_ms),
            (30_000, 300_000)
        );
        assert_eq!(spec.ready_cmd.as_deref(), Some("pg_isready -q -t 0"));
        assert_eq!(spec.allow_host[0].to_string(), "127.0.0.1:6379");
        assert_eq!(
            spec.volumes[0].to_string(),
            "pgdata:/var/lib/postgresql/data"
        );
        assert_eq!(spec.env, ["POSTGRES_PASSWORD=s3cret"]);
    }

    /// Values that parse but a deploy refuses are refused here too.
    #[test]
    fn a_file_the_spec_refuses_is_an_error() {
        let file = AppFile::parse("name = \"../x\"\nimage = \"i\"\nport = 80\n", "t").unwrap();
        let error = resolve(Some(file), DeployFlags::default()).unwrap_err();
        assert!(error.contains("invalid app name"), "{error}");
        let file = AppFile::parse(
            "name = \"a\"\nimage = \"i\"\nport = 80\nmin = 3\nmax = 2\n",
            "t",
        )
        .unwrap();
        assert!(resolve(Some(file), DeployFlags::default()).is_err());
    }

    #[test]
    fn an_image_path_is_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("app.oci")).unwrap();
        let path = dir.path().join("little.toml");
        std::fs::write(&path, "image = \"app.oci\"\n").unwrap();
        let app = AppFile::load(&path).unwrap();
        let want = std::fs::canonicalize(dir.path().join("app.oci")).unwrap();
        assert_eq!(app.image.as_deref(), Some(want.to_str().unwrap()));
        std::fs::write(&path, "image = \"docker.io/library/redis:7\"\n").unwrap();
        let app = AppFile::load(&path).unwrap();
        assert_eq!(app.image.as_deref(), Some("docker.io/library/redis:7"));
    }
}
