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

/// What a channel does when it hits `max_age_ms` or `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    /// Refuse publishes with STORAGE_FULL until consumers catch up (nothing is lost).
    Refuse,
    /// Move every consumer past the oldest unconsumed messages so the bound holds; what
    /// is skipped is counted (`directmq_dropped_messages_total`, `Consumer::dropped`).
    DropOldest,
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
    /// Log data no longer in the page cache is read past it (`O_DIRECT`) where the file
    /// system allows; `false` reads everything through the cache (docs/storage.md §5).
    pub direct_reads: bool,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// How often retention looks for segments to delete and checks the bounds below.
    pub retention_interval_ms: u64,
    /// Per channel, by default: refuse publishes once the oldest message not yet committed
    /// by every consumer is older than this (0: no bound).
    pub max_age_ms: u64,
    /// Per channel, by default: refuse publishes once this many payload bytes are not yet
    /// committed by every consumer (0: no bound).
    pub max_bytes: u64,
    /// Per channel, by default: what hitting `max_age_ms` or `max_bytes` does.
    pub on_full: OnFull,
    /// Refuse publishes once the log's segment files (plus appends in flight) would exceed
    /// this many bytes (0: no budget).
    pub max_disk_bytes: u64,
    /// Refuse publishes once the data directory's filesystem is this full, in percent
    /// (100: never).
    pub disk_high_water_percent: u8,
    /// Connections idle this long are closed.
    pub idle_timeout_ms: u64,
    /// Connections in their handshake at once; more wait or are refused (handshake flood).
    pub max_handshakes: u32,
    /// Streams one connection may have open at once (one per channel it publishes to or
    /// consumes, plus control and watches).
    pub max_streams_per_connection: u32,
    /// A frame must finish arriving this long after its first byte (slow senders).
    pub frame_timeout_ms: u64,
    /// A consumer with lag whose commit has not moved for this long is reported stalled.
    pub stalled_after_ms: u64,
    /// How often the certificate, key, CA and ACL files are checked for changes (they are
    /// also reloaded on SIGHUP); 0 turns the check off.
    pub reload_interval_ms: u64,
    /// Accept connections without a client certificate that present a signed token in
    /// their Hello (`directmq token issue`). Off: a certificate is required in the TLS
    /// handshake.
    pub allow_tokens: bool,
    /// Token signing keys; `<data>/token-keys.toml` when unset (created on first start).
    pub token_keys: Option<PathBuf>,
    /// Longest lifetime of an issued or renewed token.
    pub max_token_ttl_ms: u64,
    /// Per-channel settings by name prefix (`[[channel]]` tables); the longest matching
    /// prefix wins, unset keys fall back to the broker-wide value.
    #[serde(rename = "channel")]
    pub channels: Vec<ChannelOverride>,
}

/// Settings for the channels under one prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelOverride {
    /// Channel-name prefix (`""` matches every channel).
    pub prefix: String,
    pub durability: Option<DurabilityMode>,
    /// At most the broker-wide `max_message_bytes`, which sizes the frame limit.
    pub max_message_bytes: Option<u64>,
    /// Retention bounds for these channels (0: no bound); see the broker-wide keys.
    pub max_age_ms: Option<u64>,
    pub max_bytes: Option<u64>,
    pub on_full: Option<OnFull>,
}

/// The settings that apply to one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSettings {
    pub durability: directmq_storage::Durability,
    pub max_message_bytes: u64,
    /// 0: no bound.
    pub max_age_ms: u64,
    /// 0: no bound.
    pub max_bytes: u64,
    pub on_full: OnFull,
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
            direct_reads: true,
            max_connections: 10_000,
            retention_interval_ms: 10_000,
            max_age_ms: 0,
            max_bytes: 0,
            on_full: OnFull::Refuse,
            max_disk_bytes: 0,
            disk_high_water_percent: 95,
            idle_timeout_ms: 30_000,
            max_handshakes: 1024,
            max_streams_per_connection: 20_000,
            frame_timeout_ms: 120_000,
            stalled_after_ms: 60_000,
            reload_interval_ms: 2_000,
            allow_tokens: false,
            token_keys: None,
            max_token_ttl_ms: 30 * 24 * 3_600_000,
            channels: Vec::new(),
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
                    message: one_line(&text, &e),
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
        if self.max_handshakes == 0 {
            return invalid("max_handshakes", 0, "must be positive");
        }
        if self.max_streams_per_connection < 2 {
            return invalid(
                "max_streams_per_connection",
                u64::from(self.max_streams_per_connection),
                "must be at least 2 (the control stream and one more)",
            );
        }
        if self.frame_timeout_ms < 100 {
            return invalid(
                "frame_timeout_ms",
                self.frame_timeout_ms,
                "must be at least 100",
            );
        }
        if self.disk_high_water_percent == 0 || self.disk_high_water_percent > 100 {
            return invalid(
                "disk_high_water_percent",
                u64::from(self.disk_high_water_percent),
                "must be between 1 and 100",
            );
        }
        if self.max_token_ttl_ms == 0 {
            return invalid("max_token_ttl_ms", 0, "must be positive");
        }
        if self.stalled_after_ms == 0 {
            return invalid("stalled_after_ms", 0, "must be positive");
        }
        let mut prefixes = std::collections::HashSet::new();
        for c in &self.channels {
            if let Err(e) = directmq_protocol::validate_prefix(&c.prefix) {
                return Err(ConfigError::Invalid {
                    key: "channel.prefix",
                    value: c.prefix.clone(),
                    reason: e.to_string(),
                });
            }
            if !prefixes.insert(c.prefix.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "channel.prefix",
                    value: c.prefix.clone(),
                    reason: "appears in more than one [[channel]] table".into(),
                });
            }
            if let Some(max) = c.max_message_bytes {
                if max == 0 || max > self.max_message_bytes {
                    return invalid(
                        "channel.max_message_bytes",
                        max,
                        "must be between 1 and the broker-wide max_message_bytes",
                    );
                }
            }
        }
        Ok(())
    }

    /// The settings for channel `name`: its longest matching `[[channel]]` prefix over the
    /// broker-wide values.
    pub fn channel_settings(&self, name: &str) -> ChannelSettings {
        let o = self
            .channels
            .iter()
            .filter(|c| name.starts_with(&c.prefix))
            .max_by_key(|c| c.prefix.len());
        let durability = o.and_then(|o| o.durability).unwrap_or(self.durability);
        ChannelSettings {
            durability: self.storage_durability(durability),
            max_message_bytes: o
                .and_then(|o| o.max_message_bytes)
                .unwrap_or(self.max_message_bytes),
            max_age_ms: o.and_then(|o| o.max_age_ms).unwrap_or(self.max_age_ms),
            max_bytes: o.and_then(|o| o.max_bytes).unwrap_or(self.max_bytes),
            on_full: o.and_then(|o| o.on_full).unwrap_or(self.on_full),
        }
    }

    fn storage_durability(&self, mode: DurabilityMode) -> directmq_storage::Durability {
        match mode {
            DurabilityMode::Fsync => directmq_storage::Durability::Fsync,
            DurabilityMode::Interval => directmq_storage::Durability::Interval(
                Duration::from_millis(self.fsync_interval_ms),
            ),
        }
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.data.join("certs")
    }

    pub fn acl_path(&self) -> PathBuf {
        self.acl
            .clone()
            .unwrap_or_else(|| self.data.join("acl.toml"))
    }

    pub fn token_keys_path(&self) -> PathBuf {
        self.token_keys
            .clone()
            .unwrap_or_else(|| self.data.join("token-keys.toml"))
    }

    pub fn revoked_tokens_path(&self) -> PathBuf {
        self.data.join("revoked-tokens.txt")
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

    /// The QUIC transport settings of the broker's endpoint.
    pub fn net_options(&self) -> directmq_client::net::NetOptions {
        directmq_client::net::NetOptions {
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_streams: self.max_streams_per_connection,
            max_handshakes: self.max_handshakes,
            ..directmq_client::net::NetOptions::default()
        }
    }

    pub fn store_options(&self) -> directmq_storage::StoreOptions {
        directmq_storage::StoreOptions {
            segment_bytes: self.segment_bytes,
            durability: self.storage_durability(self.durability),
            direct_reads: self.direct_reads,
            ..directmq_storage::StoreOptions::default()
        }
    }
}

/// A TOML error as one sentence with its line and column (toml's own rendering spans
/// several lines with a source excerpt).
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    // Name the key: the `key = ...` of the line, under its `[table]` if any.
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(table), Some(key)) => {
            format!("line {line}, column {column}: {table}.{key}: {message}")
        }
        (None, Some(key)) => format!("line {line}, column {column}: {key}: {message}"),
        _ => format!("line {line}, column {column}: {message}"),
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
    fn direct_reads_are_on_unless_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "segment_bytes = 2097152\n").unwrap();
        let c = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap();
        assert!(c.store_options().direct_reads);
        std::fs::write(&file, "direct_reads = false\n").unwrap();
        let c = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap();
        assert!(!c.store_options().direct_reads);
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
        std::fs::write(&file, "[[channel]]\nprefix = \"a//\"\n").unwrap();
        let err = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("channel.prefix"), "{err}");
        std::fs::write(
            &file,
            "[[channel]]\nprefix = \"a/\"\nmax_message_bytes = 0\n",
        )
        .unwrap();
        let err = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("channel.max_message_bytes"),
            "{err}"
        );
        std::fs::write(&file, "[[channel]]\nprefix = \"a/\"\nretain = 1\n").unwrap();
        let err = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("retain"), "{err}");
    }

    #[test]
    fn the_longest_matching_channel_prefix_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "max_message_bytes = 1000\n\
             [[channel]]\nprefix = \"dc-a/\"\ndurability = \"interval\"\nmax_message_bytes = 500\n\
             [[channel]]\nprefix = \"dc-a/logs/\"\nmax_message_bytes = 100\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), |_| None, &Overrides::default()).unwrap();
        let fsync = directmq_storage::Durability::Fsync;
        let interval = directmq_storage::Durability::Interval(Duration::from_millis(100));
        let s = c.channel_settings("dc-b/x");
        assert_eq!((s.durability, s.max_message_bytes), (fsync, 1000));
        let s = c.channel_settings("dc-a/x");
        assert_eq!((s.durability, s.max_message_bytes), (interval, 500));
        // The longer prefix sets only the size; durability comes from the broker default,
        // not from the shorter prefix.
        let s = c.channel_settings("dc-a/logs/1");
        assert_eq!((s.durability, s.max_message_bytes), (fsync, 100));
    }
}
