//! The daemon's API: one JSON request line (at most [`MAX_REQUEST`]
//! bytes), one JSON response line, on the Unix socket
//! `<home>/little.sock` (mode 0600; the daemon answers only its own uid
//! and root).
//!
//! | request | response `data` |
//! |---|---|
//! | `{"op":"deploy", "name":…, "image":…, "port":…, "allow_host":["127.0.0.1:5432"], …}` ([`AppSpec`]) | the [`AppStatus`] of the deployed app (env values masked) |
//! | `{"op":"ps", "show_env":false}` | a list of [`AppStatus`]; env values masked unless `show_env` |
//! | `{"op":"logs", "app":…, "follow":false}` | `null`, then the console output as raw bytes until the daemon closes (with `follow`, until the client does) |
//! | `{"op":"rm", "app":…}` | `null` |
//! | `{"op":"volume-create", "name":…, "size":…}` | the new volume's [`VolumeInfo`](crate::volume::VolumeInfo) |
//! | `{"op":"volume-ls"}` | a list of [`VolumeInfo`](crate::volume::VolumeInfo) |
//! | `{"op":"volume-rm", "name":…}` | `null` (refused while an app mounts it) |
//! | `{"op":"volume-export", "name":…}` | an [`Exported`], then its `bytes` bytes of tar archive |
//! | `{"op":"volume-import", "name":…, "archive":"/abs/backup.tar"}` | an [`Exported`] |
//!
//! Every response is `{"ok":true,"data":…}` or `{"ok":false,"error":"…"}`.
//! An over-long or malformed request gets an error and the connection is
//! closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm_api::net::Rule;

use crate::volume::VolumeMount;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached.
    #[error("cannot reach the little daemon at {0} (is `little serve` running?)")]
    Connect(String, #[source] std::io::Error),
    /// Sending or receiving failed.
    #[error("the daemon connection failed")]
    Io(#[from] std::io::Error),
    /// A line was not the JSON expected.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
    /// The daemon answered with an error.
    #[error("{0}")]
    Daemon(String),
    /// What the daemon sent could not be written out (a closed stdout).
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// The longest request line the daemon reads, newline included.
pub const MAX_REQUEST: usize = 1 << 20;

/// Why the daemon did not get a request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The client closed before sending anything.
    #[error("the client sent no request")]
    Empty,
    /// The line is longer than [`MAX_REQUEST`].
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// Reading failed (or timed out).
    #[error("cannot read the request")]
    Io(#[from] std::io::Error),
    /// The line is not a request.
    #[error("malformed request")]
    Json(#[from] serde_json::Error),
}

/// Reads one request line from a client, holding at most
/// [`MAX_REQUEST`] bytes of it: a longer one is refused without reading
/// the rest.
///
/// ```
/// use platform::api::{read_request, Request, RequestError, MAX_REQUEST};
///
/// let mut ok = &b"{\"op\":\"rm\",\"app\":\"web\"}\n"[..];
/// assert!(matches!(read_request(&mut ok), Ok(Request::Rm { .. })));
/// let long = vec![b' '; MAX_REQUEST + 1];
/// assert!(matches!(read_request(&mut &long[..]), Err(RequestError::TooLong)));
/// ```
pub fn read_request(reader: &mut impl BufRead) -> Result<Request, RequestError> {
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_REQUEST + 1).unwrap_or(u64::MAX);
    reader.take(limit).read_until(b'\n', &mut line)?;
    if line.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    if line.is_empty() {
        return Err(RequestError::Empty);
    }
    Ok(serde_json::from_slice(&line)?)
}

/// What env values are shown as: `KEY=***`.
pub const MASK: &str = "***";

/// `KEY=VALUE` entries with their values replaced by [`MASK`].
///
/// ```
/// let env = vec!["TOKEN=s3cret".to_owned(), "A=b=c".to_owned()];
/// assert_eq!(platform::api::mask_env(&env), ["TOKEN=***", "A=***"]);
/// ```
pub fn mask_env(env: &[String]) -> Vec<String> {
    env.iter()
        .map(|e| {
            let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
            format!("{key}={MASK}")
        })
        .collect()
}

/// What to deploy and how to scale it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// The app's name (letters, digits, `-`, `_`; at most 32).
    pub name: String,
    /// An image reference, OCI layout directory or image archive.
    pub image: String,
    /// The guest port the app listens on.
    pub port: u16,
    /// Where the daemon listens for the app (`127.0.0.1:0`: any free port).
    pub listen: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Connections one instance takes at once.
    pub concurrency: u32,
    /// Instances kept running even when idle.
    pub min: u32,
    /// Most instances at once; 0: the default, 1 for an app with a volume
    /// (its own or one its image declares), else 10.
    #[serde(default)]
    pub max: u32,
    /// An instance with no connection for this long is stopped.
    pub idle_timeout_ms: u64,
    /// Extra environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Host-side destinations the app's guests may reach besides the public
    /// internet and DNS (every VMM of an app runs `--net-isolated`); in
    /// JSON, strings `A.B.C.D[/N][:PORT]`. `127.0.0.1:5432` opens the
    /// host's loopback port 5432, which the guest reaches as `10.0.2.2:5432`.
    /// Absent in records from before it existed.
    #[serde(default, with = "rule_strings")]
    pub allow_host: Vec<Rule>,
    /// How long a boot (the deploy's, or a cold boot of an app whose
    /// volumes moved on) may take until the app accepts on its port.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
    /// Volumes mounted in the app's guests (`NAME:/guest/path`), each
    /// attached read-write: an app with a volume runs one instance at a
    /// time. Absent in records from before volumes existed.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// A command the guest runs (`/bin/sh -c`, as the app's user) once
    /// the port accepts, again until it exits 0: the app is ready, and its
    /// snapshot taken, only then. `None`: the image's `HEALTHCHECK`, if
    /// any; an empty string: none.
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

/// The settings `little scale` changes on a running app; `None` keeps
/// the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scale {
    /// Instances kept running even when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// Most instances at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Connections one instance takes at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// An instance with no connection for this long is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

impl Scale {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Longest [`AppSpec::ready_cmd`].
pub const MAX_READY_CMD: usize = 4096;

fn default_ready_timeout_ms() -> u64 {
    u64::try_from(crate::deploy::READY_TIMEOUT.as_millis()).unwrap_or(u64::MAX)
}

/// [`AppSpec::allow_host`] as JSON strings, checked when read.
mod rule_strings {
    use serde::{Deserialize, Deserializer, Serializer};
    use vmm_api::net::Rule;

    pub fn serialize<S: Serializer>(rules: &[Rule], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(rules.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Rule>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

impl AppSpec {
    /// Checks the values a user gave.
    ///
    /// ```
    /// let mut spec = platform::api::AppSpec {
    ///     name: "web".into(), image: "x.tar".into(), port: 8080,
    ///     listen: "127.0.0.1:0".into(), memory_mib: 128, concurrency: 10,
    ///     min: 0, max: 4, idle_timeout_ms: 1000, env: vec![],
    ///     allow_host: vec!["127.0.0.1:5432".parse().unwrap()], volumes: vec![],
    ///     ready_timeout_ms: 600_000,
    ///     ready_cmd: None,
    /// };
    /// assert!(spec.validate().is_ok());
    /// spec.name = "../etc".into();
    /// assert!(spec.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(format!(
                "invalid app name {:?}: use 1-32 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if self.port == 0 {
            return Err("the guest port must be 1-65535".into());
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "invalid listen address {:?}: expected ADDR:PORT",
                self.listen
            ));
        }
        if !(16..=65536).contains(&self.memory_mib) {
            return Err("memory must be 16-65536 MiB".into());
        }
        if !(1000..=86_400_000).contains(&self.ready_timeout_ms) {
            return Err("the ready timeout must be 1 s to 24 h".into());
        }
        if self.concurrency == 0 || (self.max != 0 && self.min > self.max) {
            return Err("need concurrency >= 1 and min <= max".into());
        }
        if let Some(cmd) = &self.ready_cmd {
            if cmd.len() > MAX_READY_CMD || cmd.contains('\0') {
                return Err(format!(
                    "the ready command must be at most {MAX_READY_CMD} bytes, without NUL"
                ));
            }
        }
        if let Some(bad) = self
            .env
            .iter()
            .find(|e| !e.contains('=') || e.contains('\n'))
        {
            return Err(format!(
                "invalid environment entry {bad:?}: expected KEY=VALUE"
            ));
        }
        self.validate_volumes()
    }

    /// This spec with `scale` applied, checked as a deploy's would be
    /// (an app with a volume keeps `max` 1).
    ///
    /// ```
    /// use platform::api::{AppSpec, Scale};
    /// let spec = AppSpec {
    ///     name: "web".into(), image: "x.tar".into(), port: 8080,
    ///     listen: "127.0.0.1:0".into(), memory_mib: 128, concurrency: 10,
    ///     min: 0, max: 4, idle_timeout_ms: 1000, env: vec![], allow_host: vec![],
    ///     volumes: vec![], ready_timeout_ms: 600_000, ready_cmd: None,
    /// };
    /// let more = Scale { max: Some(8), min: Some(1), ..Scale::default() };
    /// let scaled = spec.scaled(&more).unwrap();
    /// assert_eq!((scaled.min, scaled.max, scaled.concurrency), (1, 8, 10));
    /// assert!(spec.scaled(&Scale { min: Some(5), ..Scale::default() }).is_err());
    /// assert!(spec.scaled(&Scale { max: Some(0), ..Scale::default() }).is_err());
    /// ```
    pub fn scaled(&self, scale: &Scale) -> Result<AppSpec, String> {
        let mut spec = self.clone();
        if scale.max == Some(0) {
            return Err("max must be at least 1".into());
        }
        spec.min = scale.min.unwrap_or(spec.min);
        spec.max = scale.max.unwrap_or(spec.max);
        spec.concurrency = scale.concurrency.unwrap_or(spec.concurrency);
        spec.idle_timeout_ms = scale.idle_timeout_ms.unwrap_or(spec.idle_timeout_ms);
        spec.validate()?;
        Ok(spec)
    }

    /// Gives an unset `max` its default (see [`Self::max`]).
    pub fn resolve_max(&mut self) {
        if self.max == 0 {
            self.max = if self.volumes.is_empty() { 10 } else { 1 };
        }
    }

    fn validate_volumes(&self) -> Result<(), String> {
        if self.volumes.len() > crate::volume::MAX_PER_APP {
            return Err(format!(
                "at most {} volumes per app",
                crate::volume::MAX_PER_APP
            ));
        }
        for (i, m) in self.volumes.iter().enumerate() {
            m.validate()?;
            if let Some(other) = self.volumes[..i]
                .iter()
                .find(|o| o.name == m.name || o.path == m.path)
            {
                return Err(format!("volumes {other} and {m} share a name or a path"));
            }
        }
        if !self.volumes.is_empty() && self.max > 1 {
            return Err(format!(
                "--max {}: an app with a volume runs one instance at a time (one writer); \
                 it still takes --concurrency connections at once",
                self.max
            ));
        }
        Ok(())
    }

    /// The app's network as `little ps` shows it: `isolated`, then the
    /// opened destinations.
    ///
    /// ```
    /// # let mut spec = platform::api::AppSpec {
    /// #     name: "web".into(), image: "x.tar".into(), port: 8080,
    /// #     listen: "127.0.0.1:0".into(), memory_mib: 128, concurrency: 10,
    /// #     min: 0, max: 4, idle_timeout_ms: 1000, env: vec![], allow_host: vec![], volumes: vec![],
    /// #     ready_timeout_ms: 600_000,
    /// #     ready_cmd: None,
    /// # };
    /// assert_eq!(spec.network(), "isolated");
    /// spec.allow_host = vec!["127.0.0.1:5432".parse().unwrap(), "10.1.0.0/16".parse().unwrap()];
    /// assert_eq!(spec.network(), "isolated, allow-host 127.0.0.1:5432 10.1.0.0/16");
    /// ```
    pub fn network(&self) -> String {
        let mut text = String::from("isolated");
        if !self.allow_host.is_empty() {
            text.push_str(", allow-host");
            for rule in &self.allow_host {
                text.push(' ');
                text.push_str(&rule.to_string());
            }
        }
        text
    }
}

/// A secret the daemon uses once and never stores or prints (its `Debug`
/// is `***`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Import, boot, snapshot and serve an app (replacing one of that name).
    Deploy {
        /// The app.
        #[serde(flatten)]
        spec: AppSpec,
        /// `user:password` for the image's registry: used for this pull,
        /// never stored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        registry_auth: Option<Secret>,
    },
    /// Every app and its instances.
    Ps {
        /// Show env values (masked otherwise).
        #[serde(default)]
        show_env: bool,
    },
    /// An app's console output, streamed after the response line.
    Logs {
        /// The app.
        app: String,
        /// Keep streaming what the app's VMs write, until the client
        /// closes.
        #[serde(default)]
        follow: bool,
    },
    /// Change a running app's scaling settings without a redeploy.
    Scale {
        /// The app.
        app: String,
        /// What changes.
        #[serde(flatten)]
        scale: Scale,
    },
    /// Stop and forget an app.
    Rm {
        /// The app.
        app: String,
    },
    /// Make a volume: a sparse ext4 image of `size` bytes.
    #[serde(rename = "volume-create")]
    VolumeCreate {
        /// Its name.
        name: String,
        /// Its size in bytes.
        size: u64,
    },
    /// Every volume (a list of [`crate::volume::VolumeInfo`]).
    #[serde(rename = "volume-ls")]
    VolumeLs,
    /// Remove a volume no app uses.
    #[serde(rename = "volume-rm")]
    VolumeRm {
        /// Its name.
        name: String,
    },
    /// A volume as a tar archive, streamed after the response line (an
    /// [`Exported`]), taken while the app that mounts it is held with no
    /// instance running.
    #[serde(rename = "volume-export")]
    VolumeExport {
        /// Its name.
        name: String,
    },
    /// Make or replace a volume from an archive `volume-export` made,
    /// while the app that mounts it is held with no instance running.
    #[serde(rename = "volume-import")]
    VolumeImport {
        /// Its name.
        name: String,
        /// The archive, an absolute path the daemon reads.
        archive: PathBuf,
    },
}

impl Request {
    /// A deploy of `spec` with no registry credentials.
    pub fn deploy(spec: AppSpec) -> Self {
        Self::Deploy {
            spec,
            registry_auth: None,
        }
    }
}

/// The response to `volume-export` (then `bytes` bytes of archive), and
/// to `volume-import`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exported {
    /// The volume.
    pub volume: crate::volume::VolumeInfo,
    /// Size of the archive that follows (`volume-export`).
    #[serde(default)]
    pub bytes: u64,
    /// The app that mounts it, and how many of its instances were
    /// suspended (or stopped) for a consistent copy.
    #[serde(default)]
    pub held: Option<(String, usize)>,
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    /// A success carrying `data`.
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }

    /// A failure.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// One running instance, as `little ps` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Instance number, unique within the daemon's life.
    pub id: u64,
    /// The instance's `vmm` process.
    pub pid: u32,
    /// Time since its restore, in milliseconds.
    pub age_ms: u64,
    /// Open connections (handed over and not yet closed).
    pub connections: usize,
    /// Resident memory of the `vmm` process (from /proc), KiB.
    pub rss_kib: u64,
}

/// One app, as `little ps` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppStatus {
    /// What was deployed.
    pub spec: AppSpec,
    /// Where the daemon listens for it.
    pub listen: String,
    /// The snapshot instances are restored from.
    pub snapshot: String,
    /// Running instances.
    pub instances: Vec<InstanceStatus>,
    /// Pre-spawned standby VMMs (no guest yet) waiting to restore.
    pub standby: usize,
    /// Why its last instance to die on its own died (out of memory,
    /// seccomp, its exit), if one did.
    #[serde(default)]
    pub last_death: Option<String>,
    /// The unprivileged uid (and gid) its VMMs run as, when the daemon
    /// runs as root; `None`: a user namespace as the daemon's user.
    #[serde(default)]
    pub user: Option<u32>,
    /// How its last instance started: restored from the deploy snapshot,
    /// or booted cold because its volumes moved on since that snapshot.
    #[serde(default)]
    pub last_start: Option<String>,
}

/// Sends `request` and reads the response line; the reader is left
/// where the response ends.
fn send(
    sock: &Path,
    request: &Request,
) -> Result<(serde_json::Value, BufReader<UnixStream>), ApiError> {
    let mut stream =
        UnixStream::connect(sock).map_err(|e| ApiError::Connect(sock.display().to_string(), e))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    let sent = stream.write_all(line.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    let got = reader.read_line(&mut reply);
    // A daemon that refuses the peer answers before reading: its line
    // explains a failed send.
    if reply.is_empty() {
        sent?;
        got?;
    }
    let response: Response = serde_json::from_str(&reply)?;
    if response.ok {
        Ok((response.data, reader))
    } else {
        Err(ApiError::Daemon(
            response.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

/// Sends `request` to the daemon at `sock` and waits for its answer (a
/// deploy boots a guest: no timeout).
pub fn call(sock: &Path, request: &Request) -> Result<serde_json::Value, ApiError> {
    send(sock, request).map(|(data, _)| data)
}

/// Every app and its instances (`little ps`), env values masked.
pub fn ps(sock: &Path) -> Result<Vec<AppStatus>, ApiError> {
    let request = Request::Ps { show_env: false };
    Ok(serde_json::from_value(call(sock, &request)?)?)
}

/// Copies the archive of volume `name` to `out` as the daemon streams
/// it (`little volume export`); fails if it ends short.
pub fn export(sock: &Path, name: &str, out: &mut impl Write) -> Result<Exported, ApiError> {
    let request = Request::VolumeExport {
        name: name.to_owned(),
    };
    let (data, reader) = send(sock, &request)?;
    let exported: Exported = serde_json::from_value(data)?;
    let copied = std::io::copy(&mut reader.take(exported.bytes), out).map_err(ApiError::Output)?;
    out.flush().map_err(ApiError::Output)?;
    if copied != exported.bytes {
        return Err(ApiError::Daemon(format!(
            "the archive was cut short after {copied} of {} bytes",
            exported.bytes
        )));
    }
    Ok(exported)
}

/// Copies `app`'s console output to `out` as the daemon streams it, a
/// chunk at a time (`little logs`); with `follow`, until the daemon
/// closes (the app is removed) or `out` fails.
pub fn logs(sock: &Path, app: &str, follow: bool, out: &mut impl Write) -> Result<(), ApiError> {
    let request = Request::Logs {
        app: app.to_owned(),
        follow,
    };
    let (_, mut reader) = send(sock, &request)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return out.flush().map_err(ApiError::Output),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.write_all(&buf[..n]).map_err(ApiError::Output)?;
        if follow {
            out.flush().map_err(ApiError::Output)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json_lines() {
        let logs = Request::Logs {
            app: "web".into(),
            follow: true,
        };
        let text = serde_json::to_string(&logs).unwrap();
        assert_eq!(text, r#"{"op":"logs","app":"web","follow":true}"#);
        let back: Request = serde_json::from_str(r#"{"op":"ps"}"#).unwrap();
        assert!(matches!(back, Request::Ps { show_env: false }));
        let back: Request = serde_json::from_str(r#"{"op":"logs","app":"web"}"#).unwrap();
        assert!(matches!(back, Request::Logs { follow: false, .. }));
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
    }

    fn spec() -> AppSpec {
        AppSpec {
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
            allow_host: vec![
                "127.0.0.1:5432".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            volumes: vec![],
            ready_timeout_ms: 600_000,
            ready_cmd: None,
        }
    }

    #[test]
    fn volume_requests_and_an_apps_volumes_round_trip() {
        let create: Request =
            serde_json::from_str(r#"{"op":"volume-create","name":"pg","size":1073741824}"#)
                .unwrap();
        assert!(matches!(
            create,
            Request::VolumeCreate {
                size: 1_073_741_824,
                ..
            }
        ));
        assert!(matches!(
            serde_json::from_str(r#"{"op":"volume-ls"}"#).unwrap(),
            Request::VolumeLs
        ));
        let mut with = spec();
        with.max = 1;
        with.volumes = vec!["pg:/var/lib/postgresql/data".parse().unwrap()];
        with.validate().expect("one volume, one instance");
        let text = serde_json::to_string(&Request::deploy(with.clone())).unwrap();
        let Request::Deploy { spec: back, .. } = serde_json::from_str(&text).unwrap() else {
            panic!("a deploy");
        };
        assert_eq!(back, with);
    }

    #[test]
    fn the_ready_timeout_defaults_to_two_minutes_and_is_bounded() {
        let mut json = serde_json::to_value(spec()).unwrap();
        json.as_object_mut().unwrap().remove("ready_timeout_ms");
        let back: AppSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back.ready_timeout_ms, 120_000);
        let mut short = spec();
        short.ready_timeout_ms = 10;
        assert!(short.validate().is_err());
    }

    #[test]
    fn an_app_with_a_volume_has_one_writer_and_distinct_mounts() {
        let mut with = spec();
        with.volumes = vec!["pg:/data".parse().unwrap()];
        let e = with.validate().expect_err("max 4 with a volume");
        assert!(e.contains("one instance at a time"), "{e}");
        with.max = 1;
        with.volumes.push("pg:/other".parse().unwrap());
        assert!(with.validate().is_err(), "one volume twice");
        with.volumes[1] = "other:/data".parse().unwrap();
        assert!(with.validate().is_err(), "one path twice");
    }

    #[test]
    fn registry_credentials_travel_with_a_deploy_and_never_print() {
        let request = Request::Deploy {
            spec: spec(),
            registry_auth: Some(Secret("alice:s3cret".into())),
        };
        assert!(!format!("{request:?}").contains("s3cret"));
        let text = serde_json::to_string(&request).unwrap();
        let Request::Deploy {
            spec: back,
            registry_auth: Some(Secret(auth)),
        } = serde_json::from_str(&text).unwrap()
        else {
            panic!("a deploy with credentials: {text}");
        };
        assert_eq!((back, auth.as_str()), (spec(), "alice:s3cret"));
        let plain = serde_json::to_string(&Request::deploy(spec())).unwrap();
        assert!(!plain.contains("registry_auth"), "{plain}");
    }

    #[test]
    fn a_deploy_carries_its_host_rules_as_strings() {
        let text = serde_json::to_string(&Request::deploy(spec())).unwrap();
        assert!(
            text.contains(r#""allow_host":["127.0.0.1:5432","10.1.0.0/16"]"#),
            "{text}"
        );
        let Request::Deploy { spec: back, .. } = serde_json::from_str(&text).unwrap() else {
            panic!("a deploy");
        };
        assert_eq!(back, spec());
    }

    #[test]
    fn a_deploy_without_host_rules_opens_nothing_and_bad_rules_are_refused() {
        let mut json = serde_json::to_value(Request::deploy(spec())).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("allow_host");
        let Request::Deploy { spec: back, .. } = serde_json::from_value(json.clone()).unwrap()
        else {
            panic!("a deploy");
        };
        assert!(back.allow_host.is_empty());
        for bad in ["10.0.2.2:5432", "localhost:5432", "10.0.0.0/40"] {
            json["allow_host"] = serde_json::json!([bad]);
            let err = serde_json::from_value::<Request>(json.clone()).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    /// A reader that counts what was taken from it.
    struct Endless {
        taken: usize,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            buf.fill(b'x');
            self.taken += buf.len();
            Ok(buf.len())
        }
    }

    /// A client that sends without end and no newline is refused after
    /// `MAX_REQUEST` bytes: the daemon reads no more than that (plus one
    /// buffer) and holds no more than that.
    #[test]
    fn an_endless_request_is_refused_after_max_request_bytes() {
        let mut endless = Endless { taken: 0 };
        let mut reader = BufReader::new(&mut endless);
        let e = read_request(&mut reader).unwrap_err();
        assert!(matches!(e, RequestError::TooLong), "{e}");
        assert_eq!(e.to_string(), "request longer than 1048576 bytes");
        drop(reader);
        assert!(
            endless.taken <= MAX_REQUEST + 64 * 1024,
            "{}",
            endless.taken
        );
    }

    #[test]
    fn a_request_of_max_request_bytes_is_read_and_one_more_is_not() {
        let fits = |len: usize| {
            let body = r#"{"op":"ps"}"#;
            let line = format!("{body}{}\n", " ".repeat(len - body.len() - 1));
            assert_eq!(line.len(), len);
            read_request(&mut line.as_bytes())
        };
        assert!(matches!(fits(MAX_REQUEST), Ok(Request::Ps { .. })));
        assert!(matches!(fits(MAX_REQUEST + 1), Err(RequestError::TooLong)));
        assert!(matches!(
            read_request(&mut &b""[..]),
            Err(RequestError::Empty)
        ));
        assert!(matches!(
            read_request(&mut &b"{\"op\":\"ps\""[..]),
            Err(RequestError::Json(_))
        ));
    }
}
