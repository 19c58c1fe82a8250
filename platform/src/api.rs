//! The daemon's API: one JSON request line, one JSON response line, on the
//! Unix socket `<home>/little.sock`.
//!
//! | request | response `data` |
//! |---|---|
//! | `{"op":"deploy", "name":…, "image":…, "port":…, …}` ([`AppSpec`]) | the [`AppStatus`] of the deployed app |
//! | `{"op":"ps"}` | a list of [`AppStatus`] |
//! | `{"op":"logs", "app":…}` | the app's console output as a string |
//! | `{"op":"rm", "app":…}` | `null` |
//!
//! Every response is `{"ok":true,"data":…}` or `{"ok":false,"error":"…"}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

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
    /// Most instances at once.
    pub max: u32,
    /// An instance with no connection for this long is stopped.
    pub idle_timeout_ms: u64,
    /// Extra environment, `KEY=VALUE`.
    pub env: Vec<String>,
}

impl AppSpec {
    /// Checks the values a user gave.
    ///
    /// ```
    /// let mut spec = platform::api::AppSpec {
    ///     name: "web".into(), image: "x.tar".into(), port: 8080,
    ///     listen: "127.0.0.1:0".into(), memory_mib: 128, concurrency: 10,
    ///     min: 0, max: 4, idle_timeout_ms: 1000, env: vec![],
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
        if self.concurrency == 0 || self.max == 0 || self.min > self.max {
            return Err("need concurrency >= 1, max >= 1 and min <= max".into());
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
        Ok(())
    }
}

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Import, boot, snapshot and serve an app (replacing one of that name).
    Deploy(AppSpec),
    /// Every app and its instances.
    Ps,
    /// An app's console output.
    Logs {
        /// The app.
        app: String,
    },
    /// Stop and forget an app.
    Rm {
        /// The app.
        app: String,
    },
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
}

/// Sends `request` to the daemon at `sock` and waits for its answer (a
/// deploy boots a guest: no timeout).
pub fn call(sock: &Path, request: &Request) -> Result<serde_json::Value, ApiError> {
    let mut stream =
        UnixStream::connect(sock).map_err(|e| ApiError::Connect(sock.display().to_string(), e))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let response: Response = serde_json::from_str(&reply)?;
    if response.ok {
        Ok(response.data)
    } else {
        Err(ApiError::Daemon(
            response.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

/// Every app and its instances (`little ps`).
pub fn ps(sock: &Path) -> Result<Vec<AppStatus>, ApiError> {
    Ok(serde_json::from_value(call(sock, &Request::Ps)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json_lines() {
        let text = serde_json::to_string(&Request::Logs { app: "web".into() }).unwrap();
        assert_eq!(text, r#"{"op":"logs","app":"web"}"#);
        let back: Request = serde_json::from_str(r#"{"op":"ps"}"#).unwrap();
        assert!(matches!(back, Request::Ps));
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
    }
}
