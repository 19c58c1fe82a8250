//! The daemon's API: one JSON request line, one JSON response line, on the
//! Unix socket `<home>/little.sock`.
//!
//! | request | response `data` |
//! |---|---|
//! | `{"op":"deploy", "name":…, "image":…, "port":…, "allow_host":["127.0.0.1:5432"], …}` ([`AppSpec`]) | the [`AppStatus`] of the deployed app |
//! | `{"op":"ps"}` | a list of [`AppStatus`] |
//! | `{"op":"logs", "app":…}` | the app's console output as a string |
//! | `{"op":"rm", "app":…}` | `null` |
//!
//! Every response is `{"ok":true,"data":…}` or `{"ok":false,"error":"…"}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vmm_api::net::Rule;

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
    /// Host-side destinations the app's guests may reach besides the public
    /// internet and DNS (every VMM of an app runs `--net-isolated`); in
    /// JSON, strings `A.B.C.D[/N][:PORT]`. `127.0.0.1:5432` opens the
    /// host's loopback port 5432, which the guest reaches as `10.0.2.2:5432`.
    /// Absent in records from before it existed.
    #[serde(default, with = "rule_strings")]
    pub allow_host: Vec<Rule>,
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
    ///     allow_host: vec!["127.0.0.1:5432".parse().unwrap()],
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

    /// The app's network as `little ps` shows it: `isolated`, then the
    /// opened destinations.
    ///
    /// ```
    /// # let mut spec = platform::api::AppSpec {
    /// #     name: "web".into(), image: "x.tar".into(), port: 8080,
    /// #     listen: "127.0.0.1:0".into(), memory_mib: 128, concurrency: 10,
    /// #     min: 0, max: 4, idle_timeout_ms: 1000, env: vec![], allow_host: vec![],
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
        }
    }

    #[test]
    fn a_deploy_carries_its_host_rules_as_strings() {
        let text = serde_json::to_string(&Request::Deploy(spec())).unwrap();
        assert!(
            text.contains(r#""allow_host":["127.0.0.1:5432","10.1.0.0/16"]"#),
            "{text}"
        );
        let Request::Deploy(back) = serde_json::from_str(&text).unwrap() else {
            panic!("a deploy");
        };
        assert_eq!(back, spec());
    }

    #[test]
    fn a_deploy_without_host_rules_opens_nothing_and_bad_rules_are_refused() {
        let mut json = serde_json::to_value(Request::Deploy(spec())).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("allow_host");
        let Request::Deploy(back) = serde_json::from_value(json.clone()).unwrap() else {
            panic!("a deploy");
        };
        assert!(back.allow_host.is_empty());
        for bad in ["10.0.2.2:5432", "localhost:5432", "10.0.0.0/40"] {
            json["allow_host"] = serde_json::json!([bad]);
            let err = serde_json::from_value::<Request>(json.clone()).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
