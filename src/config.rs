//! The daemon's configuration: one TOML file, parsed with serde, every key
//! documented in `docs/config.md` and `examples/replblk.toml`.
//!
//! Parsing is strict (unknown keys are errors, so a typo never silently
//! falls back to a default) and validation happens here, before anything is
//! opened or bound, so a bad file gives one clear message and no side effects.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Granularity every export size must be a multiple of.
pub const SIZE_ALIGN: u64 = 4096;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

fn default_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 10809)))
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_workers() -> usize {
    8
}
fn default_max_connections() -> usize {
    256
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default, rename = "resource")]
    pub resources: Vec<ResourceConfig>,
}

/// `[nbd]`: how NBD clients reach this daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// TCP address to listen on; `listen = ""` disables TCP.
    #[serde(default = "default_listen", deserialize_with = "de_opt_addr")]
    pub listen: Option<SocketAddr>,
    /// Optional unix-domain socket path to listen on as well.
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// A client must finish option haggling within this time.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Requests served in parallel on one connection.
    #[serde(default = "default_workers")]
    pub workers_per_connection: usize,
    /// Connections (in handshake or transmission) accepted at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On SIGTERM, how long to wait for in-flight requests to finish.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: default_listen(),
            unix_socket: None,
            handshake_timeout_ms: default_handshake_timeout_ms(),
            workers_per_connection: default_workers(),
            max_connections: default_max_connections(),
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
        }
    }
}

/// `[[resource]]`: one exported volume.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Export name clients ask for (`nbd://host:port/NAME`).
    pub name: String,
    /// Backing file or block device. It must exist; replblk never creates
    /// or resizes it.
    pub disk: PathBuf,
    /// Bytes to export; defaults to the whole backing store. Must be a
    /// multiple of 4096 and no larger than the backing store.
    #[serde(default)]
    pub size: Option<u64>,
    /// Refuse writes, trims and zeroing.
    #[serde(default)]
    pub read_only: bool,
    /// Free text shown by `nbdinfo --list`.
    #[serde(default)]
    pub description: String,
    /// Serve clients that ask for the empty export name ("").
    #[serde(default)]
    pub default: bool,
}

fn de_opt_addr<'de, D>(de: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = String::deserialize(de)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("bad socket address {s:?}: {e}")))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a config file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.resources.is_empty() {
            return invalid("no [[resource]] defined; nothing to export".into());
        }
        if self.nbd.listen.is_none() && self.nbd.unix_socket.is_none() {
            return invalid(
                "[nbd] has neither listen nor unix_socket; clients could not connect".into(),
            );
        }
        if self.nbd.workers_per_connection == 0 || self.nbd.workers_per_connection > 256 {
            return invalid(format!(
                "[nbd] workers_per_connection = {} must be between 1 and 256",
                self.nbd.workers_per_connection
            ));
        }
        if self.nbd.max_connections == 0 {
            return invalid("[nbd] max_connections must be at least 1".into());
        }
        if self.nbd.handshake_timeout_ms == 0 {
            return invalid("[nbd] handshake_timeout_ms must be at least 1".into());
        }
        let mut names = HashSet::new();
        let mut defaults = 0;
        for r in &self.resources {
            if r.name.is_empty() {
                return invalid("a [[resource]] has an empty name".into());
            }
            if r.name.len() > replblk_proto::nbd::MAX_STRING
                || r.name.chars().any(|c| c.is_control() || c == '/')
            {
                return invalid(format!(
                    "resource name {:?} must be at most 4096 bytes, without '/' or control characters",
                    r.name
                ));
            }
            if !names.insert(r.name.as_str()) {
                return invalid(format!("resource {:?} is defined twice", r.name));
            }
            if let Some(size) = r.size {
                if size == 0 || size % SIZE_ALIGN != 0 {
                    return invalid(format!(
                        "resource {:?}: size = {size} is not a positive multiple of 4 KiB",
                        r.name
                    ));
                }
            }
            if r.default {
                defaults += 1;
            }
        }
        if defaults > 1 {
            return invalid("more than one resource has default = true".into());
        }
        Ok(())
    }

    /// The resource served to clients asking for the empty name: the one
    /// marked `default`, or the only one.
    pub fn default_resource(&self) -> Option<&str> {
        match self.resources.iter().find(|r| r.default) {
            Some(r) => Some(&r.name),
            None if self.resources.len() == 1 => Some(&self.resources[0].name),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[resource]]\nname = \"r0\"\ndisk = \"/tmp/x\"\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.nbd.listen, default_listen());
        assert_eq!(c.nbd.workers_per_connection, 8);
        assert_eq!(c.default_resource(), Some("r0"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse(&format!("{MINIMAL}colour = \"blue\"\n")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::parse(&format!("[nbd]\nlisten_addr = \"x\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn size_must_be_a_multiple_of_4k() {
        let err = Config::parse(&format!("{MINIMAL}size = 4097\n")).unwrap_err();
        assert!(err.to_string().contains("multiple of 4 KiB"), "{err}");
        assert!(Config::parse(&format!("{MINIMAL}size = 8192\n")).is_ok());
    }

    #[test]
    fn duplicate_names_and_missing_resources_are_rejected() {
        assert!(Config::parse("").is_err());
        let err = Config::parse(&format!("{MINIMAL}{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn empty_listen_disables_tcp_but_needs_a_unix_socket() {
        let err = Config::parse(&format!("[nbd]\nlisten = \"\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("neither"), "{err}");
        let c = Config::parse(&format!(
            "[nbd]\nlisten = \"\"\nunix_socket = \"/tmp/s\"\n{MINIMAL}"
        ))
        .expect("valid");
        assert!(c.nbd.listen.is_none());
    }

    #[test]
    fn bad_addresses_are_reported() {
        let err = Config::parse(&format!("[nbd]\nlisten = \"nowhere\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("nowhere"), "{err}");
    }
}
