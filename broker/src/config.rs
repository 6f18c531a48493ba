//! Broker configuration: defaults → TOML file → `DIRECTMQ_*` environment → flags, then
//! validated into one clear error. `docs/directmq.toml` carries every default, commented.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When a publish is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// After fdatasync (group commit). Nothing acknowledged is lost on power failure.
    Fsync,
    /// After write; fdatasync every `fsync_interval_ms`. Survives a broker crash, not a
    /// power failure within the interval.
    Interval,
}

/// Everything `directmq serve` can be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory: segments, index, certificates, ACL.
    pub data: PathBuf,
    /// QUIC address.
    pub listen: SocketAddr,
    /// HTTP address for /health and /metrics.
    pub http: SocketAddr,
    /// ACL file; `<data>/acl.toml` when unset.
    pub acl: Option<PathBuf>,
    /// CA files whose client certificates are accepted; `<data>/certs/ca.pem` when empty.
    pub ca: Vec<PathBuf>,
    /// Server certificate and key; `<data>/certs/server.{pem,key}` when unset.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Extra names for the development server certificate.
    pub server_names: Vec<String>,
    /// Largest message payload.
    pub max_message_bytes: u64,
    /// Create channels on first publish.
    pub auto_create_channels: bool,
    pub durability: DurabilityMode,
    pub fsync_interval_ms: u64,
    /// A segment file is closed at this size.
    pub segment_bytes: u64,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// How often retention looks for segments to delete.
    pub retention_interval_ms: u64,
    /// Connections idle this long are closed.
    pub idle_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: PathBuf::from("./directmq-data"),
            listen: "127.0.0.1:7070".parse().expect("literal"),
            http: "127.0.0.1:7071".parse().expect("literal"),
            acl: None,
            ca: Vec::new(),
            cert: None,
            key: None,
            server_names: Vec::new(),
            max_message_bytes: directmq_protocol::DEFAULT_MAX_MESSAGE_BYTES,
            auto_create_channels: true,
            durability: DurabilityMode::Fsync,
            fsync_interval_ms: 100,
            segment_bytes: 256 * 1024 * 1024,
            max_connections: 10_000,
            retention_interval_ms: 10_000,
            idle_timeout_ms: 30_000,
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("could not read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} = {value:?} is invalid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// Values given on the command line (highest precedence).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data: Option<PathBuf>,
    pub listen: Option<String>,
    pub http: Option<String>,
    pub acl: Option<PathBuf>,
}

impl Config {
    /// Layers defaults, the file, the environment and the flags.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        if let Some(v) = env("DIRECTMQ_DATA") {
            config.data = v.into();
        }
        let listen = flags.listen.clone().or_else(|| env("DIRECTMQ_LISTEN"));
        if let Some(v) = listen {
            config.listen = parse_addr("listen", &v)?;
        }
        let http = flags.http.clone().or_else(|| env("DIRECTMQ_HTTP"));
        if let Some(v) = http {
            config.http = parse_addr("http", &v)?;
        }
        if let Some(v) = env("DIRECTMQ_MAX_MESSAGE_BYTES") {
            config.max_message_bytes =
                v.parse()
                    .map_err(|e: std::num::ParseIntError| ConfigError::Invalid {
                        key: "max_message_bytes",
                        value: v.clone(),
                        reason: e.to_string(),
                    })?;
        }
        if let Some(v) = env("DIRECTMQ_DURABILITY") {
            config.durability = match v.as_str() {
                "fsync" => DurabilityMode::Fsync,
                "interval" => DurabilityMode::Interval,
                _ => {
                    return Err(ConfigError::Invalid {
                        key: "durability",
                        value: v,
                        reason: "use \"fsync\" or \"interval\"".into(),
                    })
                }
            };
        }
        if let Some(v) = &flags.data {
            config.data = v.clone();
        }
        if let Some(v) = &flags.acl {
            config.acl = Some(v.clone());
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: u64, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                value: value.to_string(),
                reason: reason.into(),
            })
        };
        if self.max_message_bytes == 0 || self.max_message_bytes > 1 << 30 {
            return invalid(
                "max_message_bytes",
                self.max_message_bytes,
                "must be between 1 and 1 GiB",
            );
        }
        if self.segment_bytes < 1 << 20 {
            return invalid(
                "segment_bytes",
                self.segment_bytes,
                "must be at least 1 MiB",
            );
        }
        if self.fsync_interval_ms == 0 {
            return invalid("fsync_interval_ms", 0, "must be positive");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", 0, "must be positive");
        }
        if self.idle_timeout_ms < 1000 {
            return invalid(
                "idle_timeout_ms",
                self.idle_timeout_ms,
                "must be at least 1000",
            );
        }
        Ok(())
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.data.join("certs")
    }

    pub fn acl_path(&self) -> PathBuf {
        self.acl
            .clone()
            .unwrap_or_else(|| self.data.join("acl.toml"))
    }

    pub fn ca_files(&self) -> Vec<PathBuf> {
        if self.ca.is_empty() {
            vec![self.certs_dir().join("ca.pem")]
        } else {
            self.ca.clone()
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.cert
            .clone()
            .unwrap_or_else(|| self.certs_dir().join("server.pem"))
    }

    pub fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.certs_dir().join("server.key"))
    }

    pub fn store_options(&self) -> directmq_storage::StoreOptions {
        directmq_storage::StoreOptions {
            segment_bytes: self.segment_bytes,
            durability: match self.durability {
                DurabilityMode::Fsync => directmq_storage::Durability::Fsync,
                DurabilityMode::Interval => directmq_storage::Durability::Interval(
                    Duration::from_millis(self.fsync_interval_ms),
                ),
            },
            ..directmq_storage::StoreOptions::default()
        }
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
            key,
            value: value.to_owned(),
            reason: format!("{e}; write it as IP:PORT, for example 127.0.0.1:7070"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:2\"\nmax_message_bytes = 5\n",
        )
        .unwrap();
        let env = |k: &str| (k == "DIRECTMQ_HTTP").then(|| "127.0.0.1:3".to_owned());
        let flags = Overrides {
            listen: Some("127.0.0.1:4".into()),
            ..Overrides::default()
        };
        let c = Config::load(Some(&file), env, &flags).unwrap();
        assert_eq!(c.listen.port(), 4);
        assert_eq!(c.http.port(), 3);
        assert_eq!(c.max_message_bytes, 5);
        assert_eq!(c.data, PathBuf::from("./directmq-data"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listn = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        std::fs::write(&file, "listen = \"nowhere\"\n").unwrap();
        let err = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        std::fs::write(&file, "max_message_bytes = -1\n").unwrap();
        let err = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("max_message_bytes") || err.to_string().contains("invalid"),
            "{err}"
        );
    }
}
