//! Registry credentials from Docker's client config, the file `docker
//! login` writes: `$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`. Its `auths` map is keyed by registry (a host,
//! a `host:port`, or a URL such as `https://index.docker.io/v1/` for
//! Docker Hub); an entry holds `auth` (base64 of `user:password`) or
//! `username` and `password`. Credential helpers (`credsStore`,
//! `credHelpers`) keep their secrets elsewhere and are not run: for such a
//! registry give the credentials yourself (`--creds`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Largest config file read.
const MAX_CONFIG: u64 = 1 << 20;

/// Docker Hub's names: what a reference says, and what `docker login`
/// writes as its key.
const DOCKER_HUB: [&str; 4] = [
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// Why the config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    /// It exists but could not be read.
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    /// It is larger than any such config is.
    #[error("{0} is over {MAX_CONFIG} bytes")]
    TooLarge(String),
    /// It is not the JSON Docker writes.
    #[error("{0} is not a Docker client config")]
    Parse(String, #[source] serde_json::Error),
    /// The entry for the registry holds no usable credentials.
    #[error("{path}: the entry for {registry} is not base64 of USER:PASSWORD")]
    BadAuth {
        /// The config file.
        path: String,
        /// Its key.
        registry: String,
    },
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The config file Docker's client reads, whether or not it exists.
pub fn default_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir).join("config.json")),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(".docker/config.json")),
    }
}

/// `user:password` for `registry` from the default config; none without
/// a config or an entry.
pub fn credentials(registry: &str) -> Result<Option<String>, DockerConfigError> {
    match default_path() {
        Some(path) => credentials_in(&path, registry),
        None => Ok(None),
    }
}

/// `user:password` for `registry` (a reference's host or `host:port`)
/// from the config at `path`; none when the file or its entry is missing.
pub fn credentials_in(path: &Path, registry: &str) -> Result<Option<String>, DockerConfigError> {
    let name = path.display().to_string();
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DockerConfigError::Read(name, e)),
    };
    let mut text = Vec::new();
    file.take(MAX_CONFIG + 1)
        .read_to_end(&mut text)
        .map_err(|e| DockerConfigError::Read(name.clone(), e))?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(DockerConfigError::TooLarge(name));
    }
    let config: ConfigFile =
        serde_json::from_slice(&text).map_err(|e| DockerConfigError::Parse(name.clone(), e))?;
    let Some((key, entry)) = config
        .auths
        .iter()
        .find(|(key, _)| same_registry(key, registry))
    else {
        return Ok(None);
    };
    let bad = || DockerConfigError::BadAuth {
        path: name.clone(),
        registry: key.clone(),
    };
    match (&entry.auth, &entry.username, &entry.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad())?;
            let pair = String::from_utf8(decoded).map_err(|_| bad())?;
            if !pair.contains(':') {
                return Err(bad());
            }
            Ok(Some(pair))
        }
        (_, Some(user), Some(password)) => Ok(Some(format!("{user}:{password}"))),
        // An entry `docker login` left for a credential helper.
        _ => Ok(None),
    }
}

/// Whether config key `key` names `registry`: keys may be URLs with a
/// scheme and a path, and Docker Hub goes by several names.
fn same_registry(key: &str, registry: &str) -> bool {
    let host = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = host.split('/').next().unwrap_or(host);
    host.eq_ignore_ascii_case(registry)
        || (DOCKER_HUB.contains(&host) && DOCKER_HUB.contains(&registry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn entries_are_found_by_host_url_or_docker_hub_alias() {
        // "alice:s3cret" and "bob:pw" in base64.
        let (_dir, path) = config(
            r#"{"auths": {
                "registry.example.com:5000": {"auth": "YWxpY2U6czNjcmV0"},
                "https://index.docker.io/v1/": {"auth": "Ym9iOnB3"},
                "helper.example.com": {},
                "plain.example.com": {"username": "carol", "password": "x:y"}
            }, "credsStore": "desktop"}"#,
        );
        let got = |registry: &str| credentials_in(&path, registry).unwrap();
        assert_eq!(
            got("registry.example.com:5000").as_deref(),
            Some("alice:s3cret")
        );
        assert_eq!(got("docker.io").as_deref(), Some("bob:pw"));
        assert_eq!(got("plain.example.com").as_deref(), Some("carol:x:y"));
        assert_eq!(got("helper.example.com"), None, "a helper's entry");
        assert_eq!(got("registry.example.com"), None, "another port");
        assert_eq!(got("ghcr.io"), None);
        let missing = path.with_file_name("none.json");
        assert_eq!(credentials_in(&missing, "ghcr.io").unwrap(), None);
    }

    #[test]
    fn a_bad_config_is_a_clear_error() {
        let (_dir, path) = config(r#"{"auths": {"r.example.com": {"auth": "%%%"}}}"#);
        let e = credentials_in(&path, "r.example.com").unwrap_err();
        assert!(e.to_string().contains("not base64 of USER:PASSWORD"), "{e}");
        let (_dir, path) = config("{not json");
        let e = credentials_in(&path, "r.example.com").unwrap_err();
        assert!(e.to_string().contains("not a Docker client config"), "{e}");
        let (_dir, path) = config(&" ".repeat(MAX_CONFIG as usize + 1));
        let e = credentials_in(&path, "r.example.com").unwrap_err();
        assert!(e.to_string().contains("over"), "{e}");
    }
}
