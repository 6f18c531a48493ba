//! OpenMessaging Benchmark (OMB) workload files, mapped onto DirectMQ.
//!
//! The fields and their meaning follow OMB's `Workload` class; how each maps onto DirectMQ:
//!
//! | OMB field | here |
//! |---|---|
//! | `topics` × `partitionsPerTopic` | channels |
//! | `subscriptionsPerTopic` | durable consumers (each reads every channel) |
//! | `consumerPerSubscription` | 1 (DirectMQ allows one active session per consumer) |
//! | `topics` × `producersPerTopic` | producers (one connection each), capped on small machines |
//! | `producerRate` | `--rate` (aggregate msg/s; 0 = as fast as possible) |
//! | `messageSize`, `payloadFile`, `useRandomizedPayloads`, `randomBytesRatio`, `randomizedPayloadPoolSize` | the payloads |
//! | `consumerBacklogSizeGB`, `backlogDrainRatio` | the catch-up mode |
//! | `testDurationMinutes`, `warmupDurationMinutes` | `--duration`, `--warmup` |
//! | `keyDistributor` | recorded only: DirectMQ messages carry no key |

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Largest payload pool `useRandomizedPayloads` may ask for, in bytes.
const MAX_POOL_BYTES: u64 = 256 * 1024 * 1024;
/// Largest payload file.
const MAX_PAYLOAD_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Producers per CPU core at most (each producer is its own QUIC connection).
const PRODUCERS_PER_CORE: u32 = 8;

/// One OMB workload file, field for field. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    #[serde(default)]
    pub name: Option<String>,
    pub topics: u32,
    pub partitions_per_topic: u32,
    /// NO_KEY, KEY_ROUND_ROBIN or RANDOM_NANO in OMB; recorded only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_distributor: Option<String>,
    pub message_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_file: Option<String>,
    #[serde(default)]
    pub use_randomized_payloads: bool,
    #[serde(default)]
    pub random_bytes_ratio: f64,
    #[serde(default)]
    pub randomized_payload_pool_size: u32,
    #[serde(default)]
    pub subscriptions_per_topic: u32,
    #[serde(default = "one")]
    pub consumer_per_subscription: u32,
    pub producers_per_topic: u32,
    #[serde(default)]
    pub producer_rate: f64,
    #[serde(default, rename = "consumerBacklogSizeGB")]
    pub consumer_backlog_size_gb: f64,
    #[serde(default = "one_f64")]
    pub backlog_drain_ratio: f64,
    #[serde(default)]
    pub test_duration_minutes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_duration_minutes: Option<f64>,
}

fn one() -> u32 {
    1
}

fn one_f64() -> f64 {
    1.0
}

/// Where message payloads come from.
#[derive(Debug, Clone)]
pub enum PayloadSpec {
    /// Incompressible bytes generated per producer (the tool's default).
    Generated,
    /// Payloads used in turn; the first 8 bytes of each are overwritten with the send time.
    Pool {
        templates: Vec<Vec<u8>>,
        what: String,
    },
}

/// A workload translated into the tool's settings.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub path: PathBuf,
    pub workload: Workload,
    pub producers: u32,
    pub channels: u32,
    pub consumers: u32,
    pub message_size: u32,
    pub rate: f64,
    pub duration_s: Option<f64>,
    pub warmup_s: Option<f64>,
    pub backlog_gb: f64,
    pub drain_ratio: f64,
    pub payload: PayloadSpec,
    pub notes: Vec<String>,
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<Workload> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read the workload file {}", path.display()))?;
    parse(&text).with_context(|| format!("invalid workload file {}", path.display()))
}

/// Parses a workload (YAML). Unknown fields are an error naming the field.
pub fn parse(text: &str) -> Result<Workload> {
    let workload: Workload = serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(workload)
}

impl Workload {
    /// Translates the workload read from `path` for this machine (`cores` CPUs); a
    /// `payloadFile` is read relative to the workload file's folder.
    pub fn map(&self, path: &Path, cores: u32) -> Result<Mapped> {
        let mut notes = Vec::new();
        if self.topics == 0 {
            bail!("topics must be at least 1");
        }
        if self.partitions_per_topic == 0 {
            bail!("partitionsPerTopic must be at least 1");
        }
        if self.producers_per_topic == 0 {
            bail!("producersPerTopic must be at least 1");
        }
        let channels = self
            .topics
            .checked_mul(self.partitions_per_topic)
            .filter(|c| *c <= 1_000_000)
            .ok_or_else(|| anyhow::anyhow!("topics × partitionsPerTopic is over 1,000,000"))?;
        let consumers = self.subscriptions_per_topic;
        if self.consumer_per_subscription > 1 {
            notes.push(format!(
                "consumerPerSubscription is {}: DirectMQ allows one active session per consumer; running 1",
                self.consumer_per_subscription
            ));
        }
        let asked = u64::from(self.topics) * u64::from(self.producers_per_topic);
        let cap = (PRODUCERS_PER_CORE * cores.max(1)).max(4);
        let producers = if asked > u64::from(cap) {
            notes.push(format!(
                "topics × producersPerTopic = {asked} producers; running {cap} ({PRODUCERS_PER_CORE} per CPU core, \
                 one QUIC connection each), which still publish to all {channels} channels"
            ));
            cap
        } else {
            asked as u32
        };
        if !self.producer_rate.is_finite() || self.producer_rate < 0.0 {
            bail!("producerRate must be 0 (as fast as possible) or a positive rate");
        }
        if let Some(key) = &self.key_distributor {
            match key.as_str() {
                "NO_KEY" => {}
                "KEY_ROUND_ROBIN" | "RANDOM_NANO" => notes.push(format!(
                    "keyDistributor {key} is ignored: DirectMQ messages carry no key (channels are the partitions)"
                )),
                other => bail!(
                    "keyDistributor {other:?} is not one of NO_KEY, KEY_ROUND_ROBIN, RANDOM_NANO"
                ),
            }
        }
        let minutes = |name: &str, v: Option<f64>| -> Result<Option<f64>> {
            match v {
                Some(m) if !m.is_finite() || m < 0.0 => {
                    bail!("{name} must be a non-negative number of minutes")
                }
                Some(m) => Ok(Some(m * 60.0)),
                None => Ok(None),
            }
        };
        let duration_s = minutes("testDurationMinutes", self.test_duration_minutes)?;
        let warmup_s = minutes("warmupDurationMinutes", self.warmup_duration_minutes)?;
        if !self.consumer_backlog_size_gb.is_finite() || self.consumer_backlog_size_gb < 0.0 {
            bail!("consumerBacklogSizeGB must be 0 or a positive size");
        }
        if !(0.0..=1.0).contains(&self.backlog_drain_ratio) {
            bail!("backlogDrainRatio must be between 0.0 and 1.0");
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let (payload, message_size) = self.payload(dir, &mut notes)?;
        Ok(Mapped {
            path: path.to_owned(),
            workload: self.clone(),
            producers,
            channels,
            consumers,
            message_size,
            rate: self.producer_rate,
            duration_s,
            warmup_s,
            backlog_gb: self.consumer_backlog_size_gb,
            drain_ratio: self.backlog_drain_ratio,
            payload,
            notes,
        })
    }

    fn payload(&self, dir: &Path, notes: &mut Vec<String>) -> Result<(PayloadSpec, u32)> {
        if self.use_randomized_payloads {
            let size = self.message_size;
            if size < 8 {
                bail!(
                    "messageSize must be at least 8 bytes (the send time travels in the first 8)"
                );
            }
            if !(0.0..=1.0).contains(&self.random_bytes_ratio) {
                bail!("randomBytesRatio must be between 0.0 and 1.0");
            }
            let pool = self.randomized_payload_pool_size;
            if pool == 0 {
                bail!("useRandomizedPayloads needs randomizedPayloadPoolSize of at least 1");
            }
            if u64::from(pool) * u64::from(size) > MAX_POOL_BYTES {
                bail!(
                    "randomizedPayloadPoolSize × messageSize is over {} MiB",
                    MAX_POOL_BYTES >> 20
                );
            }
            // As OMB: the first messageSize × randomBytesRatio bytes random, the rest zeros.
            let random = ((f64::from(size) * self.random_bytes_ratio) as usize).min(size as usize);
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            let templates = (0..pool)
                .map(|_| {
                    let mut t = vec![0u8; size as usize];
                    for b in &mut t[..random] {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                    t
                })
                .collect();
            let what = format!(
                "{pool} randomized payloads, {:.0}% random bytes",
                self.random_bytes_ratio * 100.0
            );
            if self.payload_file.is_some() {
                notes.push("payloadFile is ignored: useRandomizedPayloads is true".into());
            }
            return Ok((PayloadSpec::Pool { templates, what }, size));
        }
        let Some(file) = &self.payload_file else {
            notes.push(
                "no payloadFile and useRandomizedPayloads false: incompressible generated payloads"
                    .into(),
            );
            if self.message_size < 8 {
                bail!(
                    "messageSize must be at least 8 bytes (the send time travels in the first 8)"
                );
            }
            return Ok((PayloadSpec::Generated, self.message_size));
        };
        let path = dir.join(file);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("payloadFile {}", path.display()))?
            .len();
        if len > MAX_PAYLOAD_FILE_BYTES {
            bail!(
                "payloadFile {} is over {} MiB",
                path.display(),
                MAX_PAYLOAD_FILE_BYTES >> 20
            );
        }
        let bytes = std::fs::read(&path)
            .with_context(|| format!("could not read payloadFile {}", path.display()))?;
        if bytes.len() < 8 {
            bail!(
                "payloadFile {} has {} bytes; at least 8 are needed (the send time travels in the first 8)",
                path.display(),
                bytes.len()
            );
        }
        let size = bytes.len() as u32;
        if size != self.message_size {
            notes.push(format!(
                "payloadFile has {size} bytes, messageSize says {}: sending the file's {size} bytes",
                self.message_size
            ));
        }
        let what = format!("payloadFile {}", path.display());
        Ok((
            PayloadSpec::Pool {
                templates: vec![bytes],
                what,
            },
            size,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASIC: &str = "
name: 1 topic / 1 partition / 1Kb
topics: 1
partitionsPerTopic: 16
keyDistributor: \"NO_KEY\"
messageSize: 1024
useRandomizedPayloads: true
randomBytesRatio: 0.5
randomizedPayloadPoolSize: 10
subscriptionsPerTopic: 2
consumerPerSubscription: 3
producersPerTopic: 4
producerRate: 50000
consumerBacklogSizeGB: 0
testDurationMinutes: 15
";

    #[test]
    fn maps_the_fields() {
        let w = parse(BASIC).unwrap();
        let m = w.map(Path::new("w/x.yaml"), 2).unwrap();
        assert_eq!(m.channels, 16);
        assert_eq!(m.consumers, 2);
        assert_eq!(m.producers, 4);
        assert_eq!(m.rate, 50000.0);
        assert_eq!(m.duration_s, Some(900.0));
        assert!(m.notes.iter().any(|n| n.contains("one active session")));
        match m.payload {
            PayloadSpec::Pool { templates, .. } => {
                assert_eq!(templates.len(), 10);
                assert!(templates[0][512..].iter().all(|b| *b == 0));
            }
            PayloadSpec::Generated => panic!("randomized payloads expected"),
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = parse(&format!("{BASIC}replicationFactor: 3\n")).unwrap_err();
        assert!(err.to_string().contains("replicationFactor"), "{err}");
    }

    #[test]
    fn producers_are_capped() {
        let w = parse(&BASIC.replace("producersPerTopic: 4", "producersPerTopic: 100")).unwrap();
        let m = w.map(Path::new("x.yaml"), 2).unwrap();
        assert_eq!(m.producers, 16);
        assert!(m.notes.iter().any(|n| n.contains("100 producers")));
    }

    #[test]
    fn the_standard_workloads_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let w = load(&path).unwrap();
                w.map(&path, 2).unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 5, "{seen} workloads in {}", dir.display());
    }
}
