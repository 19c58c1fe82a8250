//! What the guest agent needs from an image config ([`RunConfig`], stored
//! as JSON next to the base image), the user name resolved through the
//! image's own `/etc/passwd` and `/etc/group`, and the two host-side
//! products: the agent's configuration text and the small initramfs that
//! carries the agent and that configuration.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::initramfs::{self, Initramfs};
use crate::oci::ContainerConfig;
use crate::tree::{split_path, Kind, Tree};

/// Largest `/etc/passwd` or `/etc/group` read from an image.
pub const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// Why a run configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    /// The user is a name the image's `/etc/passwd` does not have.
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    /// The group is a name the image's `/etc/group` does not have.
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    /// Neither Entrypoint nor Cmd is set.
    #[error("the image has neither Entrypoint nor Cmd")]
    NothingToRun,
    /// The agent rejects the configuration (NUL bytes, too many entries...).
    #[error("the agent configuration is invalid: {0:?}")]
    Invalid(guest_agent::config::ConfigError),
    /// Building the initramfs failed.
    #[error("building the agent initramfs failed")]
    Initramfs(#[from] initramfs::Error),
}

/// What the agent needs to run an image's entrypoint, from its config.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunConfig {
    /// Entrypoint (program and fixed arguments).
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// `KEY=VALUE` environment (with `HOME` from the user's passwd entry
    /// when the image does not set it).
    pub env: Vec<String>,
    /// Working directory (`/` when unset).
    pub working_dir: String,
    /// The image's `User` as written.
    pub user: String,
    /// Resolved user id.
    pub uid: u32,
    /// Resolved group id.
    pub gid: u32,
    /// Resolved supplementary groups (the groups that list the user).
    pub groups: Vec<u32>,
    /// Exposed ports, `port/proto`.
    pub exposed_ports: Vec<String>,
    /// Stop signal, if set.
    pub stop_signal: Option<String>,
    /// Paths the image declares as volumes (Docker's `VOLUME`), sorted.
    pub volumes: Vec<String>,
    /// The image's `HEALTHCHECK` test as an argv (empty: none): the app's
    /// default ready command.
    #[serde(default)]
    pub healthcheck: Vec<String>,
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(Passwd {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).unwrap_or(&"/").to_string(),
            })
        })
        .collect()
}

/// `(name, gid, members)` of each `/etc/group` line.
fn parse_group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members))
        })
        .collect()
}

/// Reads a regular file of the flattened image (following a final symlink
/// a few times, inside the image), `None` if it is missing or too large.
pub fn read_image_file(tree: &Tree, sources: &[PathBuf], path: &str, cap: u64) -> Option<Vec<u8>> {
    let mut path = path.as_bytes().to_vec();
    for _ in 0..8 {
        let parts = split_path(&path).ok()?;
        let node = tree.lookup(&parts)?;
        match &tree.nodes[node].kind {
            Kind::File(None) => return Some(Vec::new()),
            Kind::File(Some(d)) if d.len <= cap => {
                let file = File::open(sources.get(d.source as usize)?).ok()?;
                let mut buf = vec![0u8; usize::try_from(d.len).ok()?];
                file.read_exact_at(&mut buf, d.offset).ok()?;
                return Some(buf);
            }
            Kind::Symlink(target) => {
                path = if target.starts_with(b"/") {
                    target.clone()
                } else {
                    let mut p: Vec<u8> = parts[..parts.len().saturating_sub(1)].join(&b'/');
                    p.push(b'/');
                    p.extend_from_slice(target);
                    p
                };
            }
            _ => return None,
        }
    }
    None
}

impl RunConfig {
    /// Builds the run configuration from the image config, resolving
    /// `User` with the image's own account files (`passwd`, `group`: their
    /// contents, empty when missing), as Docker does: a name must exist; a
    /// numeric uid without an entry runs with gid 0; supplementary groups
    /// are the groups that list the user name.
    pub fn resolve(
        config: &ContainerConfig,
        passwd: &str,
        group: &str,
    ) -> Result<Self, RunConfigError> {
        let users = parse_passwd(passwd);
        let groups = parse_group(group);
        let user = config.user.clone().unwrap_or_default();
        let (user_part, group_part) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let entry = if user_part.is_empty() {
            users.iter().find(|p| p.uid == 0)
        } else if let Ok(uid) = user_part.parse::<u32>() {
            users.iter().find(|p| p.uid == uid)
        } else {
            Some(
                users
                    .iter()
                    .find(|p| p.name == user_part)
                    .ok_or_else(|| RunConfigError::UnknownUser(user_part.to_owned()))?,
            )
        };
        let uid = match (entry, user_part.parse::<u32>()) {
            (_, Ok(uid)) => uid,
            (Some(e), _) => e.uid,
            (None, _) => 0,
        };
        let mut gid = entry.map_or(0, |e| e.gid);
        if let Some(g) = group_part.filter(|g| !g.is_empty()) {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => groups
                    .iter()
                    .find(|(name, _, _)| name == g)
                    .map(|(_, gid, _)| *gid)
                    .ok_or_else(|| RunConfigError::UnknownGroup(g.to_owned()))?,
            };
        }
        let mut supplementary: Vec<u32> = match entry {
            Some(e) if group_part.is_none() => groups
                .iter()
                .filter(|(_, _, members)| members.contains(&e.name))
                .map(|(_, gid, _)| *gid)
                .filter(|g| *g != gid)
                .collect(),
            _ => Vec::new(),
        };
        supplementary.sort_unstable();
        supplementary.dedup();
        let mut env = config.env.clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            let home = entry.map_or("/", |e| e.home.as_str());
            env.push(format!("HOME={}", if home.is_empty() { "/" } else { home }));
        }
        let run = Self {
            entrypoint: config.entrypoint.clone().unwrap_or_default(),
            cmd: config.cmd.clone().unwrap_or_default(),
            env,
            working_dir: config
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into()),
            user,
            uid,
            gid,
            groups: supplementary,
            exposed_ports: config
                .exposed_ports
                .as_ref()
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default(),
            stop_signal: config.stop_signal.clone(),
            volumes: config
                .volumes
                .as_ref()
                .map(|v| v.keys().cloned().collect())
                .unwrap_or_default(),
            healthcheck: config
                .healthcheck
                .as_ref()
                .map(crate::oci::Healthcheck::argv)
                .unwrap_or_default(),
        };
        if run.entrypoint.is_empty() && run.cmd.is_empty() {
            return Err(RunConfigError::NothingToRun);
        }
        Ok(run)
    }

    /// The guest agent's configuration: argv is Entrypoint then Cmd,
    /// `args` (when given) replacing Cmd as `docker run IMAGE ARGS` does.
    /// Checked by the agent's own parser before it is returned.
    pub fn agent_config(&self, args: Option<&[String]>) -> Result<String, RunConfigError> {
        let cmd = args.unwrap_or(&self.cmd);
        let argv: Vec<Vec<u8>> = self
            .entrypoint
            .iter()
            .chain(cmd)
            .map(|s| s.as_bytes().to_vec())
            .collect();
        if argv.is_empty() {
            return Err(RunConfigError::NothingToRun);
        }
        let config = guest_agent::config::Config {
            args: argv,
            env: self.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
            cwd: self.working_dir.as_bytes().to_vec(),
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            ..guest_agent::config::Config::default()
        };
        let mut text = String::from("# written by little-image from the image config\n");
        config
            .write_to(&mut text)
            .expect("writing to a String cannot fail");
        guest_agent::config::Config::parse(text.as_bytes()).map_err(RunConfigError::Invalid)?;
        Ok(text)
    }
}

/// The initramfs that boots an image: the agent as `/init`, `config` as
/// `/little/agent.conf`, `/dev/console`, and the mount points the agent
/// uses before it switches to the image's root (`little.root=`).
pub fn agent_initramfs(agent: &Path, config: &str) -> Result<Initramfs, RunConfigError> {
    let mut fs = Initramfs::new();
    for d in ["/dev", "/proc", "/sys", "/tmp", "/run", "/little"] {
        fs.dir(d, 0o755)?;
    }
    fs.char_dev("/dev/console", 0o600, 5, 1)?;
    fs.host_file("/init", 0o755, agent)?;
    fs.file("/little/agent.conf", 0o644, config.as_bytes().to_vec())?;
    Ok(fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000:web:/www:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:web,other\nweb:x:1000:\nwheel:x:10:root\n";

    fn config(user: Option<&str>) -> ContainerConfig {
        ContainerConfig {
            entrypoint: Some(vec!["/bin/httpd".into()]),
            cmd: Some(vec!["-p".into(), "80".into()]),
            user: user.map(str::to_owned),
            ..ContainerConfig::default()
        }
    }

    #[test]
    fn user_names_resolve_through_the_images_own_files() {
        let run = RunConfig::resolve(&config(Some("web")), PASSWD, GROUP).unwrap();
        assert_eq!(
            (run.uid, run.gid, run.groups.clone()),
            (1000, 1000, vec![50])
        );
        assert!(run.env.contains(&"HOME=/www".to_string()));
        let run = RunConfig::resolve(&config(Some("web:wheel")), PASSWD, GROUP).unwrap();
        assert_eq!((run.uid, run.gid), (1000, 10));
        assert!(run.groups.is_empty());
        let run = RunConfig::resolve(&config(Some("4242")), PASSWD, GROUP).unwrap();
        assert_eq!((run.uid, run.gid), (4242, 0));
        let run = RunConfig::resolve(&config(None), PASSWD, GROUP).unwrap();
        assert_eq!((run.uid, run.gid, run.groups), (0, 0, vec![10]));
        assert!(matches!(
            RunConfig::resolve(&config(Some("nobody")), PASSWD, GROUP),
            Err(RunConfigError::UnknownUser(_))
        ));
        assert!(matches!(
            RunConfig::resolve(&config(Some("web:nogroup")), PASSWD, GROUP),
            Err(RunConfigError::UnknownGroup(_))
        ));
    }

    #[test]
    fn agent_config_is_entrypoint_then_cmd_and_parses_back() {
        let run = RunConfig::resolve(&config(Some("web")), PASSWD, GROUP).unwrap();
        let text = run.agent_config(None).unwrap();
        let parsed = guest_agent::config::Config::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.args, [&b"/bin/httpd"[..], b"-p", b"80"]);
        assert_eq!(
            (parsed.uid, parsed.gid, parsed.groups),
            (1000, 1000, vec![50])
        );
        let text = run.agent_config(Some(&["-x".to_string()])).unwrap();
        let parsed = guest_agent::config::Config::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.args, [&b"/bin/httpd"[..], b"-x"]);
        let mut bad = run.clone();
        bad.env.push("A=\0".into());
        assert!(matches!(
            bad.agent_config(None),
            Err(RunConfigError::Invalid(_))
        ));
    }
}
