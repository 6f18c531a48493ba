//! `directmq-bench`: the end-to-end load benchmark.
//!
//! Producers (one client connection each) publish fixed-size messages to channels, pipelined
//! with a bounded number of unacknowledged messages; durable consumers (one connection each,
//! reading every channel) receive them. Every publish→ack latency and every publish→delivery
//! latency goes into an HDR histogram; throughput and latency count only messages sent after
//! the warm-up. With `--rate`, sends are scheduled at fixed intervals and latency runs from
//! each message's *intended* send time, so a stalled broker cannot hide its stall
//! (coordinated omission).
//!
//! Without `--broker` it starts `directmq serve` from its own directory as a child process on
//! a temporary data directory and kills it at the end.
//!
//! `--workload FILE.yaml` runs an OpenMessaging Benchmark workload (see `workload.rs`),
//! including its backlog-then-drain ("catch-up") mode; `--probe` measures the disk's and
//! QUIC's limits beside the result (`probe.rs`); `--report FILE.html` draws the per-second
//! series (`report.rs`). `--wan-rtt-ms` puts an emulated WAN link between the clients and
//! the broker; `directmq-bench wan-proxy` runs that link on its own (`wan_cli.rs`).

mod probe;
mod report;
mod wan_cli;
mod workload;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use directmq_benches::wan::{self, Impairment, Proxy};
use directmq_client::{
    Client, ClientConfig, Consumer, MultiProducer, PendingAck, Producer, ProducerOptions,
    StartPosition,
};
use directmq_protocol::ErrorCode;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::probe::Probe;
use crate::report::Series;
use crate::workload::PayloadSpec;

/// How long acks or deliveries may stop before the run is declared failed, and how long
/// outstanding acks and consumers may take once publishing ended.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// How long the child broker may take to answer `GET /health` with 200.
const HEALTH_ATTEMPTS: u32 = 300;
const HEALTH_PAUSE: Duration = Duration::from_millis(50);
/// A producer never has more than this much payload unacknowledged, whatever `--in-flight`.
const MAX_IN_FLIGHT_BYTES: u64 = 256 * 1024 * 1024;
/// How often a subscription refused with CHANNEL_NOT_FOUND is retried during set-up.
const SUBSCRIBE_ATTEMPTS: u32 = 200;
const SUBSCRIBE_PAUSE: Duration = Duration::from_millis(10);
/// Consumers commit every this many messages (and once at the end).
const COMMIT_EVERY: u64 = 1024;
/// Histogram range: 1 µs to one hour, three significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// How often the catch-up controller looks at the backlog.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);
/// OMB's floor for "the backlog is drained", in messages.
const MIN_BACKLOG_MSGS: u64 = 1000;

/// The backlog (in messages) at or below which a catch-up counts as drained: what the
/// drain ratio leaves, and at least OMB's 1,000 messages, but never more than 1% of the
/// backlog (a backlog of a few large messages must really be read).
fn drained_below(backlog_msgs: u64, left_by_ratio: u64) -> u64 {
    left_by_ratio.max(MIN_BACKLOG_MSGS.min(backlog_msgs / 100))
}
/// Catch-up phases (`Ctx::phase`).
const PHASE_RUN: u8 = 0;
const PHASE_BUILD: u8 = 1;
const PHASE_DRAIN: u8 = 2;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "directmq-bench",
    version,
    about = "Load benchmark for DirectMQ: publish and consume throughput, ack and end-to-end latency percentiles",
    after_help = "Examples:\n  \
        directmq-bench --producers 4 --channels 16 --duration 10\n  \
        directmq-bench --rate 10000 --consumers 1 --probe --report run.html --json run.json\n  \
        directmq-bench --workload benches/workloads/1-topic-1-partition-1kb.yaml --duration 30\n  \
        directmq-bench --workload benches/workloads/backlog-1-topic-1-partition-1kb.yaml --backlog-gb 0.2 --duration 5\n  \
        directmq-bench --wan-rtt-ms 50 --message-size 1048576 --messages 500 --consumers 1\n  \
        directmq-bench wan-proxy --listen 127.0.0.1:7443 --upstream 127.0.0.1:7070 --delay-ms 25 --loss 0.02",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Tool>,
    /// Producers; each is its own client connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    producers: u32,
    /// Channels, assigned round-robin to producers (a producer with several publishes to
    /// them in turn).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    channels: u32,
    /// Durable consumers, each its own connection reading every channel (0: publish only).
    #[arg(long, default_value_t = 0)]
    consumers: u32,
    /// Payload bytes per message (at least 8: the send time travels in the first 8 bytes).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(8..))]
    message_size: u32,
    /// Messages per producer; the run ends when all are acknowledged (instead of --duration).
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    messages: Option<u64>,
    /// Seconds of measured publishing after the warm-up [default: 10, or the workload's
    /// testDurationMinutes]. In catch-up mode publishing lasts at least this long and until
    /// the backlog is drained.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of publishing at the start that are not measured [default: 1, or the
    /// workload's warmupDurationMinutes].
    #[arg(long)]
    warmup: Option<f64>,
    /// Target publish rate in messages per second across all producers (0: as fast as
    /// possible). Latency is then measured from each message's scheduled send time.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Most unacknowledged messages per producer (also capped at 256 MiB of payload).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Most messages per batch a producer sends (the client's
    /// ProducerOptions.max_batch_messages) [default: the client's, 2048].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    batch: Option<u32>,
    /// How a producer publishes to its channels: `per-channel` (a publish stream per
    /// channel, a Producer each) or `shared` (one multi-channel stream, a MultiProducer,
    /// whose frames carry batches for many channels). `auto`: shared when a producer has
    /// more than one channel.
    #[arg(long, value_enum, default_value_t = Streams::Auto)]
    streams: Streams,
    /// When the broker acknowledges: `fsync` (after the data is fdatasync'd) or `interval`
    /// (before; synced on a timer). Sets DIRECTMQ_DURABILITY for the broker this tool starts;
    /// with --broker it is only recorded in the JSON `config` (the running broker's own
    /// setting applies) [default: the broker's, fsync].
    #[arg(long, value_enum)]
    durability: Option<Durability>,
    /// Run an OpenMessaging Benchmark workload file (YAML): topics × partitionsPerTopic
    /// channels, subscriptionsPerTopic durable consumers, topics × producersPerTopic
    /// producers, producerRate, messageSize, payloadFile / randomized payloads,
    /// consumerBacklogSizeGB (catch-up mode), testDurationMinutes. --duration, --warmup,
    /// --backlog-gb, --batch, --in-flight and --durability still apply.
    #[arg(long, conflicts_with_all = ["producers", "channels", "consumers", "message_size", "rate", "messages"])]
    workload: Option<PathBuf>,
    /// Catch-up mode (overrides the workload's consumerBacklogSizeGB): consumers subscribe,
    /// stay paused while producers build a backlog of this many GB (2^30 bytes, summed over
    /// consumers), then start; the drain rate is reported. Producers keep publishing at
    /// --rate meanwhile (with no --rate they stop once the backlog is built).
    #[arg(long, conflicts_with = "messages")]
    backlog_gb: Option<f64>,
    /// Before the run, measure the data directory's fdatasync'd append bandwidth (64 KiB and
    /// 1 MiB writes) and one QUIC stream on loopback, and show the results as fractions of
    /// them.
    #[arg(long)]
    probe: bool,
    /// Write a self-contained HTML report (throughput and latency over time, summary).
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// Address of a running broker (host:port); without it a broker is started here.
    #[arg(long, requires = "certs")]
    broker: Option<String>,
    /// Folder with ca.pem, client.pem and client.key for --broker.
    #[arg(long, requires = "broker")]
    certs: Option<PathBuf>,
    /// HTTP address of the running broker's /metrics, to report its fsyncs (optional).
    #[arg(long, requires = "broker")]
    broker_http: Option<SocketAddr>,
    /// The `directmq` binary to start when no --broker is given [default: next to this one].
    #[arg(long, conflicts_with = "broker")]
    broker_bin: Option<PathBuf>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Consumers commit only every 1,024 messages, not also whenever they caught up (shows
    /// whether the broker keeps delivering without hearing from the client).
    #[arg(long)]
    no_idle_commit: bool,
    /// With --messages: fail if publishing takes longer than this many seconds. In catch-up
    /// mode: the most seconds building the backlog may take, and then draining it. Always:
    /// the most seconds consumers may take to receive everything once publishing ended.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Put an emulated WAN link between every client and the broker: the WAN proxy (see
    /// `wan-proxy`) runs in this process and delays each direction by half this round trip,
    /// without loss.
    #[arg(long, value_name = "MS")]
    wan_rtt_ms: Option<f64>,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Tool {
    /// Relay QUIC between clients and a broker through an emulated WAN link (delay, jitter,
    /// loss, reordering, duplication, rate limit, cuts), or measure the relay itself
    /// (--self-test).
    WanProxy(wan_cli::WanProxyArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Durability {
    Fsync,
    Interval,
}

impl Durability {
    fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Interval => "interval",
        }
    }
}

/// The catch-up mode's targets.
#[derive(Debug, Clone, Copy)]
struct BacklogPlan {
    gb: f64,
    /// The backlog to build, in messages summed over consumers.
    target_msgs: u64,
    /// The drain is over once the backlog is at most this (OMB: at least 1,000 messages,
    /// or what `backlogDrainRatio` leaves).
    empty_msgs: u64,
    drain_ratio: f64,
}

/// The run as it will be done: flags and workload file resolved.
/// How producers publish (`--streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Streams {
    Auto,
    PerChannel,
    Shared,
}

/// Channels per producer above which `--streams auto` shares one stream.
const SHARED_ABOVE_CHANNELS: u32 = 1;

struct Plan {
    producers: u32,
    channels: u32,
    consumers: u32,
    message_size: u32,
    messages: Option<u64>,
    duration: f64,
    warmup: f64,
    rate: f64,
    in_flight: usize,
    batch: Option<u32>,
    /// One multi-channel stream per producer instead of a stream per channel.
    shared: bool,
    idle_commit: bool,
    timeout: f64,
    /// What the child broker is told, or what was asked of a running one.
    durability: Option<Durability>,
    /// Whether `durability` reaches the broker (it does not with --broker).
    local_broker: bool,
    backlog: Option<BacklogPlan>,
    /// Payloads to send in turn; `None`: generated per producer.
    payload: Option<Arc<Vec<Vec<u8>>>>,
    payload_what: String,
    workload: Option<workload::Mapped>,
    notes: Vec<String>,
}

impl Plan {
    fn new(args: &Args) -> Result<Plan> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
        let mapped = match &args.workload {
            Some(path) => Some(
                workload::load(path)?
                    .map(path, cores)
                    .with_context(|| format!("workload {}", path.display()))?,
            ),
            None => None,
        };
        let mut notes = Vec::new();
        let (producers, channels, consumers, message_size, rate) = match &mapped {
            Some(m) => {
                notes.extend(m.notes.iter().cloned());
                (m.producers, m.channels, m.consumers, m.message_size, m.rate)
            }
            None => (
                args.producers,
                args.channels,
                args.consumers,
                args.message_size,
                args.rate,
            ),
        };
        let duration = args
            .duration
            .or(mapped.as_ref().and_then(|m| m.duration_s))
            .unwrap_or(10.0);
        let warmup = args
            .warmup
            .or(mapped.as_ref().and_then(|m| m.warmup_s))
            .unwrap_or(1.0);
        let positive = |name: &str, v: f64, zero_ok: bool| -> Result<()> {
            if !v.is_finite() || v < 0.0 || (!zero_ok && v == 0.0) {
                bail!("--{name} must be a positive number of seconds, not {v}");
            }
            Ok(())
        };
        positive("duration", duration, false)?;
        positive("warmup", warmup, true)?;
        positive("timeout", args.timeout, false)?;
        if !rate.is_finite() || rate < 0.0 {
            bail!("--rate must be 0 (as fast as possible) or a positive number of messages per second");
        }
        let backlog_gb = match args.backlog_gb {
            Some(gb) if !gb.is_finite() || gb <= 0.0 => {
                bail!("--backlog-gb must be a positive number of GB, not {gb}")
            }
            Some(gb) => Some(gb),
            None => mapped.as_ref().map(|m| m.backlog_gb).filter(|gb| *gb > 0.0),
        };
        let backlog = match backlog_gb {
            Some(gb) => {
                if consumers == 0 {
                    bail!("the catch-up mode (a backlog size) needs at least one consumer (subscriptionsPerTopic)");
                }
                let bytes = gb * (1u64 << 30) as f64;
                let capacity = (bytes / f64::from(message_size)).ceil() as u64;
                let drain_ratio = mapped.as_ref().map_or(1.0, |m| m.drain_ratio);
                let left = ((1.0 - drain_ratio) * capacity as f64) as u64;
                if rate == 0.0 {
                    notes.push(
                        "catch-up at producerRate 0 (as fast as possible): producers build the backlog at full speed \
                         and stop once it is built, so the drain measures catch-up alone"
                            .into(),
                    );
                }
                notes.push(
                    "catch-up mode: end-to-end latency includes the time messages waited in the backlog; \
                     the drain rate is the figure that measures catch-up"
                        .into(),
                );
                Some(BacklogPlan {
                    gb,
                    target_msgs: capacity.max(1),
                    empty_msgs: drained_below(capacity, left),
                    drain_ratio,
                })
            }
            None => None,
        };
        let (payload, payload_what) = match mapped.as_ref().map(|m| &m.payload) {
            Some(PayloadSpec::Pool { templates, what }) => {
                (Some(Arc::new(templates.clone())), what.clone())
            }
            _ => (None, "generated, incompressible".to_owned()),
        };
        let by_bytes = (MAX_IN_FLIGHT_BYTES / u64::from(message_size)).max(1);
        let in_flight = u64::from(args.in_flight).min(by_bytes) as usize;
        let durability = args.durability.or_else(|| {
            // The child inherits our environment: say what it will see.
            match std::env::var("DIRECTMQ_DURABILITY").ok().as_deref() {
                Some("fsync") => Some(Durability::Fsync),
                Some("interval") => Some(Durability::Interval),
                _ => None,
            }
        });
        Ok(Plan {
            producers,
            channels,
            consumers,
            message_size,
            messages: args.messages,
            duration,
            warmup,
            rate,
            in_flight,
            batch: args.batch,
            shared: match args.streams {
                Streams::Shared => true,
                Streams::PerChannel => false,
                Streams::Auto => channels.div_ceil(producers.max(1)) > SHARED_ABOVE_CHANNELS,
            },
            idle_commit: !args.no_idle_commit,
            timeout: args.timeout,
            durability,
            local_broker: args.broker.is_none(),
            backlog,
            payload,
            payload_what,
            workload: mapped,
            notes,
        })
    }

    fn durability_label(&self) -> String {
        match (self.local_broker, self.durability) {
            (true, Some(d)) => d.as_str().to_owned(),
            (true, None) => "fsync (broker default)".to_owned(),
            (false, Some(d)) => {
                format!(
                    "{} (recorded only: the running broker's setting applies)",
                    d.as_str()
                )
            }
            (false, None) => "as configured on the broker".to_owned(),
        }
    }

    fn producer_options(&self) -> ProducerOptions {
        // The tool's own cap (with --in-flight) bounds what is outstanding; the client's
        // default byte cap would otherwise hold one 64 MiB message in flight at a time.
        let mut options = ProducerOptions {
            max_in_flight_bytes: MAX_IN_FLIGHT_BYTES as usize,
            ..ProducerOptions::default()
        };
        if let Some(batch) = self.batch {
            options.max_batch_messages = batch as usize;
        }
        options
    }

    fn config_json(&self, broker: &str) -> Value {
        let mut config = json!({
            "producers": self.producers,
            "channels": self.channels,
            "consumers": self.consumers,
            "message_size": self.message_size,
            "messages": self.messages,
            "duration_s": if self.messages.is_some() { Value::Null } else { json!(self.duration) },
            "warmup_s": self.warmup,
            "rate": self.rate,
            "in_flight": self.in_flight,
            "batch_max_messages": self.producer_options().max_batch_messages,
            "streams": if self.shared { "shared" } else { "per-channel" },
            "idle_commit": self.idle_commit,
            "broker": broker,
            "durability": self.durability_label(),
            "payload": self.payload_what,
            "backlog_gb": self.backlog.map(|b| b.gb),
        });
        if let Some(b) = &self.backlog {
            config["backlog_target_msgs"] = json!(b.target_msgs);
            config["backlog_empty_msgs"] = json!(b.empty_msgs);
            config["backlog_drain_ratio"] = json!(b.drain_ratio);
        }
        if let Some(m) = &self.workload {
            config["workload"] = json!({
                "file": m.path.display().to_string(),
                "fields": serde_json::to_value(&m.workload).unwrap_or(Value::Null),
            });
        }
        config
    }
}

/// The same allocator as the broker's: the load generator shares the machine with the
/// broker, and glibc's malloc and free cost it a sixth of its CPU samples at 10,000 channels.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let args = Args::parse();
    let result = match &args.command {
        Some(Tool::WanProxy(wan_args)) => wan_cli::run(wan_args),
        None => real_main(&args),
    };
    if let Err(e) = result {
        eprintln!("directmq-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(args: &Args) -> Result<()> {
    let mut plan = Plan::new(args)?;
    for note in &plan.notes {
        eprintln!("directmq-bench: note: {note}");
    }
    // Dropped (killed) on every way out of this function, errors included.
    let local = match &args.broker {
        Some(_) => None,
        None => Some(LocalBroker::start(
            args.broker_bin.as_deref(),
            args.durability,
        )?),
    };
    let mut target = match (&local, &args.broker, &args.certs) {
        (Some(b), _, _) => Target {
            addr: b.quic_addr.to_string(),
            server_name: None,
            certs: b.certs.clone(),
        },
        (None, Some(addr), Some(certs)) => Target {
            addr: addr.clone(),
            server_name: None,
            certs: certs.clone(),
        },
        _ => unreachable!("clap requires --certs with --broker"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let broker_addr = target.addr.clone();
    // Dropped (its tasks stopped) on every way out of this function.
    let wan_proxy = match args.wan_rtt_ms {
        Some(rtt_ms) => {
            let proxy = runtime.block_on(start_wan(&mut target, rtt_ms))?;
            let note = format!(
                "clients reach the broker through the WAN proxy in this process: round trip {rtt_ms} ms \
                 ({} ms each way), no loss; the proxy shares this process's CPU",
                rtt_ms / 2.0
            );
            eprintln!(
                "directmq-bench: {} → {broker_addr}: {note}; seed {}",
                proxy.local_addr(),
                proxy.seed()
            );
            plan.notes.push(note);
            Some(proxy)
        }
        None => None,
    };
    let probe = if args.probe {
        let dir = match &local {
            Some(b) => b.dir().to_owned(),
            None => std::env::current_dir().context("could not find the current directory")?,
        };
        eprintln!(
            "directmq-bench: probing fdatasync'd appends in {} and one QUIC stream on loopback",
            dir.display()
        );
        let p = runtime
            .block_on(probe::run(&dir))
            .context("the --probe measurement failed")?;
        eprintln!(
            "directmq-bench: probe: disk fdatasync 64 KiB {:.0} MB/s, 1 MiB {:.0} MB/s; QUIC {:.0} MB/s",
            p.disk_64kib_mb_per_sec, p.disk_1mib_mb_per_sec, p.quic_mb_per_sec
        );
        Some((p, dir))
    } else {
        None
    };
    let broker_pid = local.as_ref().map(|b| b.child.id());
    let metrics_addr = local.as_ref().map(|b| b.http_addr).or(args.broker_http);
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(&plan, &target, broker_pid, metrics_addr) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    if let Some(proxy) = &wan_proxy {
        eprintln!("directmq-bench: WAN proxy: {}", proxy.stats());
    }
    // Stop the client tasks before the broker goes away, so nothing reconnects meanwhile.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let mut report = match outcome {
        Ok(report) => report,
        Err(e) => {
            if let Some(b) = &local {
                let problems = b.log_problems(10);
                if !problems.is_empty() {
                    eprintln!("the broker logged:\n{problems}");
                }
            }
            return Err(e);
        }
    };
    if let Some(b) = &local {
        report.broker_peak_rss_mb = b.peak_rss_mb();
    }
    let mut broker_label = if local.is_some() {
        format!("local child {broker_addr}")
    } else {
        broker_addr.clone()
    };
    if let Some(rtt_ms) = args.wan_rtt_ms {
        broker_label.push_str(&format!(" via the WAN proxy ({rtt_ms} ms round trip)"));
    }
    let probe_ref = probe.as_ref().map(|(p, dir)| (p, dir.as_path()));
    print_summary(&plan, &report, &broker_label, probe_ref);
    if let Some(path) = &args.json {
        let mut value = report.to_json();
        value["config"] = plan.config_json(&broker_label);
        value["config"]["wan_rtt_ms"] = json!(args.wan_rtt_ms);
        if let Some(proxy) = &wan_proxy {
            let s = proxy.stats();
            value["wan"] = json!({
                "seed": proxy.seed(),
                "up": {"datagrams": s.up.sent_packets, "bytes": s.up.sent_bytes},
                "down": {"datagrams": s.down.sent_packets, "bytes": s.down.sent_bytes},
            });
        }
        if let Some((p, dir)) = probe_ref {
            value["probe"] = probe_json(p, dir, &report);
        }
        value["series"] = report.series.to_json(report.message_size);
        value["notes"] = json!(plan.notes);
        let text = serde_json::to_string_pretty(&value).expect("JSON values serialize");
        std::fs::write(path, text + "\n")
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    if let Some(path) = &args.report {
        let html = report::html(&report::Page {
            title: report_title(&plan),
            summary: summary_rows(&plan, &report, probe_ref.map(|(p, _)| p)),
            config: config_rows(&plan, &broker_label),
            notes: &plan.notes,
            series: &report.series,
        });
        std::fs::write(path, html)
            .with_context(|| format!("could not write {}", path.display()))?;
        eprintln!("directmq-bench: wrote the report to {}", path.display());
    }
    Ok(())
}

/// Where the clients connect.
struct Target {
    addr: String,
    /// The TLS name to verify when `addr` is not the broker's own (the WAN proxy).
    server_name: Option<String>,
    certs: PathBuf,
}

/// Starts the WAN proxy in front of `target` (a plain delay of half `rtt_ms` each way) and
/// points `target` at it; the TLS name stays the broker's.
async fn start_wan(target: &mut Target, rtt_ms: f64) -> Result<Proxy> {
    let one_way = Duration::try_from_secs_f64(rtt_ms / 2e3)
        .map_err(|_| anyhow!("--wan-rtt-ms must be 0 or more milliseconds, not {rtt_ms}"))?;
    let upstream = target
        .addr
        .to_socket_addrs()
        .with_context(|| format!("could not resolve the broker address {}", target.addr))?
        .next()
        .ok_or_else(|| anyhow!("the broker address {} resolves to nothing", target.addr))?;
    let listen = if upstream.is_ipv4() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    } else {
        SocketAddr::from((Ipv6Addr::LOCALHOST, 0))
    };
    let proxy = Proxy::start(wan::Config::new(listen, upstream).both(Impairment::delay(one_way)))
        .await
        .context("could not start the WAN proxy")?;
    let host = match target.addr.rsplit_once(':') {
        Some((host, _)) => host,
        None => &target.addr,
    };
    target.server_name = Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    );
    target.addr = proxy.local_addr().to_string();
    Ok(proxy)
}

// ---------------------------------------------------------------------------------------
// The child broker

/// A `directmq serve` child on a temporary data directory; killed when dropped.
struct LocalBroker {
    child: Child,
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    certs: PathBuf,
    log: PathBuf,
    // Removed after the child is killed (fields drop after `Drop::drop` runs).
    dir: tempfile::TempDir,
}

impl LocalBroker {
    fn start(bin: Option<&Path>, durability: Option<Durability>) -> Result<LocalBroker> {
        let bin = match bin {
            Some(bin) => bin.to_owned(),
            None => {
                let exe = std::env::current_exe()
                    .context("could not find this program's own path to look for the broker")?;
                exe.parent()
                    .map(|d| d.join("directmq"))
                    .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?
            }
        };
        if !bin.is_file() {
            bail!(
                "the broker binary {} is missing; build it with `cargo build --release -p directmq-broker` \
                 (or pass --broker ADDR --certs DIR to use a running broker)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("directmq-bench-")
            .tempdir()
            .context("could not create a temporary data directory")?;
        let data = dir.path().join("data");
        let log = dir.path().join("broker.log");
        let (quic_addr, http_addr) = free_ports()?;
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("could not create {}", log.display()))?;
        let mut command = Command::new(&bin);
        if let Some(d) = durability {
            command.env("DIRECTMQ_DURABILITY", d.as_str());
        }
        let child = command
            .arg("serve")
            .arg("--data")
            .arg(&data)
            .arg("--listen")
            .arg(quic_addr.to_string())
            .arg("--http")
            .arg(http_addr.to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .context("could not share the log file")?,
            )
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("could not start {}", bin.display()))?;
        let mut broker = LocalBroker {
            child,
            quic_addr,
            http_addr,
            certs: data.join("certs"),
            log,
            dir,
        };
        broker.wait_healthy(http_addr)?;
        eprintln!(
            "directmq-bench: started {} serving QUIC on {quic_addr} (data in {})",
            bin.display(),
            data.display()
        );
        Ok(broker)
    }

    /// The temporary folder holding the data directory (same filesystem).
    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn wait_healthy(&mut self, http: SocketAddr) -> Result<()> {
        for _ in 0..HEALTH_ATTEMPTS {
            if let Some(status) = self
                .child
                .try_wait()
                .context("could not check the broker")?
            {
                bail!(
                    "the broker exited during start-up ({status}); its log:\n{}",
                    self.log_tail(20)
                );
            }
            if health_ok(http) {
                return Ok(());
            }
            std::thread::sleep(HEALTH_PAUSE);
        }
        bail!(
            "the broker did not answer GET http://{http}/health with 200 within {:?}; its log:\n{}",
            HEALTH_PAUSE * HEALTH_ATTEMPTS,
            self.log_tail(20)
        )
    }

    /// The last `lines` lines of the broker's log, without colour codes.
    fn log_tail(&self, lines: usize) -> String {
        let text = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The broker's warnings and errors (the last `lines` of them).
    fn log_problems(&self, lines: usize) -> String {
        let text = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
        let all: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The child's peak resident memory so far (VmHWM), in MB.
    fn peak_rss_mb(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024.0 / 1e6)
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` without ANSI colour sequences (ESC `[` ... `m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A free UDP port for QUIC and a free TCP port for HTTP on 127.0.0.1. `--listen
/// 127.0.0.1:0` would not tell us the port, so the sockets are bound, read and closed.
fn free_ports() -> Result<(SocketAddr, SocketAddr)> {
    let udp = UdpSocket::bind("127.0.0.1:0").context("could not find a free UDP port")?;
    let tcp = TcpListener::bind("127.0.0.1:0").context("could not find a free TCP port")?;
    Ok((udp.local_addr()?, tcp.local_addr()?))
}

/// `GET path` over a plain TCP connection; the status line and body, or `None`.
fn http_get(addr: SocketAddr, path: &str) -> Option<(String, String)> {
    let attempt = || -> std::io::Result<(String, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        // The broker answers one request and closes; 16 MiB bounds a misbehaving peer.
        stream.take(16 * 1024 * 1024).read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or("").to_owned();
        Ok((status, body.to_owned()))
    };
    attempt().ok()
}

fn health_ok(addr: SocketAddr) -> bool {
    http_get(addr, "/health")
        .is_some_and(|(status, _)| status.split_whitespace().nth(1) == Some("200"))
}

/// The broker's storage counters from /metrics (Prometheus text format).
#[derive(Clone, Copy, Default)]
struct StorageCounters {
    fsyncs: f64,
    bytes: f64,
    fsync_seconds: f64,
    groups: f64,
    group_appends: f64,
}

fn storage_counters(addr: SocketAddr) -> Option<StorageCounters> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    let value = |name: &str| -> f64 {
        body.lines()
            .filter_map(|line| line.split_once(' '))
            .find(|(key, _)| *key == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Some(StorageCounters {
        fsyncs: value("directmq_storage_fsyncs_total"),
        bytes: value("directmq_storage_bytes_written_total"),
        fsync_seconds: value("directmq_storage_fsync_seconds_sum"),
        groups: value("directmq_storage_group_appends_count"),
        group_appends: value("directmq_storage_group_appends_sum"),
    })
}

/// What the broker's log writer did between two scrapes.
struct StorageReport {
    fsyncs_per_sec: f64,
    mb_per_fsync: f64,
    fsync_ms_mean: f64,
    appends_per_group: f64,
    mb_written_per_sec: f64,
}

impl StorageReport {
    fn between(a: StorageCounters, b: StorageCounters, seconds: f64) -> StorageReport {
        let fsyncs = (b.fsyncs - a.fsyncs).max(0.0);
        let bytes = (b.bytes - a.bytes).max(0.0);
        let groups = (b.groups - a.groups).max(0.0);
        let per = |x: f64, n: f64| if n > 0.0 { x / n } else { 0.0 };
        StorageReport {
            fsyncs_per_sec: fsyncs / seconds,
            mb_per_fsync: per(bytes, fsyncs) / 1e6,
            fsync_ms_mean: per(b.fsync_seconds - a.fsync_seconds, fsyncs) * 1000.0,
            appends_per_group: per(b.group_appends - a.group_appends, groups),
            mb_written_per_sec: bytes / seconds / 1e6,
        }
    }
}

/// The machine's CPU time counters from the first line of /proc/stat (user, nice, system,
/// idle, iowait, irq, softirq, steal), in clock ticks.
fn host_cpu() -> Option<[u64; 8]> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let mut out = [0u64; 8];
    let mut fields = line.split_whitespace();
    for slot in &mut out {
        *slot = fields.next()?.parse().ok()?;
    }
    Some(out)
}

/// How the whole machine's CPU time went between two [`host_cpu`] readings: on a shared VM
/// a slow run with much steal (time the hypervisor gave to other guests) says more about
/// the host than about the broker.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HostShare {
    /// Idle or waiting for I/O, percent of all CPU time.
    idle_percent: f64,
    /// Stolen by the hypervisor, percent of all CPU time.
    steal_percent: f64,
}

fn host_share(a: [u64; 8], b: [u64; 8]) -> Option<HostShare> {
    let d: Vec<u64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| y.saturating_sub(*x))
        .collect();
    let total: u64 = d.iter().sum();
    if total == 0 {
        return None;
    }
    let percent = |ticks: u64| 100.0 * ticks as f64 / total as f64;
    Some(HostShare {
        idle_percent: percent(d[3] + d[4]),
        steal_percent: percent(d[7]),
    })
}

/// CPU seconds (user + system) used so far by process `pid` ("self" for this one), from
/// /proc (USER_HZ is 100).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized command name: state is the first, utime the 12th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

// ---------------------------------------------------------------------------------------
// The run

/// The shared time base: `Instant`s for durations, and the same instants as microseconds
/// since the Unix epoch for the send time carried in payloads.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    start_epoch_us: u64,
    warmup_end: Instant,
}

impl Clock {
    fn new(warmup: Duration) -> Clock {
        let start = Instant::now();
        let start_epoch_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Clock {
            start,
            start_epoch_us,
            warmup_end: start + warmup,
        }
    }

    fn epoch_us(&self, t: Instant) -> u64 {
        self.start_epoch_us + t.saturating_duration_since(self.start).as_micros() as u64
    }
}

/// Live counters for the progress line.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    consumed: AtomicU64,
}

/// What every producer and consumer task shares.
struct Ctx {
    clock: Clock,
    message_size: usize,
    messages: Option<u64>,
    /// No message is scheduled at or after this instant (duration mode).
    send_end: Option<Instant>,
    /// Publishing must be over by then (message-count mode).
    deadline: Option<Instant>,
    /// Per producer, with --rate.
    interval_s: Option<f64>,
    in_flight: usize,
    idle_commit: bool,
    counters: Counters,
    /// Acknowledged messages per channel, warm-up included: what consumers must receive.
    channel_acked: Vec<AtomicU64>,
    failed: AtomicBool,
    /// Catch-up mode: publishing goes on past `send_end` while this is set (until drained).
    hold: AtomicBool,
    /// Producers stop at once (catch-up at full speed once the backlog is built, or a
    /// drain that ran out of time).
    stop: AtomicBool,
    /// Consumers read only once this is true (catch-up mode: once the backlog is built).
    gate: watch::Receiver<bool>,
    /// PHASE_RUN, PHASE_BUILD or PHASE_DRAIN.
    phase: std::sync::atomic::AtomicU8,
    consumers: u64,
    /// publish→ack and publish→delivery latencies, µs: one recorder each for the whole run
    /// (not one per channel task: 10,000 channels would mean gigabytes of histograms).
    ack: Mutex<Recorder>,
    e2e: Mutex<Recorder>,
    /// With --rate: how late each measured message left after its scheduled time, µs.
    schedule_lag: Mutex<Histogram<u64>>,
    /// Filled once a second by the progress task.
    series: Mutex<Series>,
    /// Payload templates (`None`: generated per producer).
    payload: Option<Arc<Vec<Vec<u8>>>>,
}

impl Ctx {
    /// Acknowledged messages not yet received, summed over consumers.
    fn backlog(&self) -> u64 {
        let acked = self.counters.acked.load(Ordering::Relaxed);
        let consumed = self.counters.consumed.load(Ordering::Relaxed);
        (acked * self.consumers).saturating_sub(consumed)
    }
}

/// A latency histogram for the measured part of the run, and one for the current second
/// (the per-second series).
struct Recorder {
    measured: Histogram<u64>,
    second: Histogram<u64>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            measured: histogram(),
            second: histogram(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records one latency (µs); `measured`: also in the run's result (sent after the warm-up).
fn record(r: &Mutex<Recorder>, us: u64, measured: bool) {
    let mut r = lock(r);
    r.second.saturating_record(us);
    if measured {
        r.measured.saturating_record(us);
    }
}

/// p50 and p99 (ms) of the current second, which then starts afresh.
fn take_second(r: &Mutex<Recorder>) -> (Option<f64>, Option<f64>) {
    let mut r = lock(r);
    let h = &mut r.second;
    if h.is_empty() {
        return (None, None);
    }
    let out = (
        Some(ms(h.value_at_quantile(0.50))),
        Some(ms(h.value_at_quantile(0.99))),
    );
    h.reset();
    out
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds")
}

/// How much earlier than a paced message's time the producer asks the timer to wake it
/// (tokio's timer resolution).
const TIMER_SLACK: Duration = Duration::from_millis(1);

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// What the publishing side measured.
/// (Latencies go to `Ctx::ack`, not here: these exist per channel.)
struct PublishStats {
    measured: u64,
    acked: u64,
    /// Acks that called a fresh message a duplicate.
    duplicates: u64,
    errors: u64,
    first_error: Option<String>,
    last_measured_ack: Option<Instant>,
}

impl PublishStats {
    fn new() -> PublishStats {
        PublishStats {
            measured: 0,
            acked: 0,
            duplicates: 0,
            errors: 0,
            first_error: None,
            last_measured_ack: None,
        }
    }

    fn merge(&mut self, other: PublishStats) {
        self.measured += other.measured;
        self.acked += other.acked;
        self.duplicates += other.duplicates;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.last_measured_ack = self.last_measured_ack.max(other.last_measured_ack);
    }
}

/// What the consuming side measured.
/// (Latencies go to `Ctx::e2e`, not here: these exist per consumer and channel.)
struct ConsumeStats {
    measured: u64,
    received: u64,
    last_measured: Option<Instant>,
    last_received: Option<Instant>,
}

impl ConsumeStats {
    fn new() -> ConsumeStats {
        ConsumeStats {
            measured: 0,
            received: 0,
            last_measured: None,
            last_received: None,
        }
    }

    fn merge(&mut self, other: ConsumeStats) {
        self.measured += other.measured;
        self.received += other.received;
        self.last_measured = self.last_measured.max(other.last_measured);
        self.last_received = self.last_received.max(other.last_received);
    }
}

/// Everything the run measured.
struct Report {
    message_size: u64,
    publish: PublishStats,
    /// publish→ack latency of measured messages, µs.
    publish_latency: Histogram<u64>,
    /// With --rate: how late measured messages left after their scheduled time, µs.
    schedule_lag: Histogram<u64>,
    /// publish→delivery latency of measured messages, µs.
    e2e_latency: Histogram<u64>,
    publish_seconds: f64,
    consume: Option<(ConsumeStats, f64)>,
    broker_cpu_cores: Option<f64>,
    bench_cpu_cores: Option<f64>,
    /// The whole machine over the same span: idle and stolen time.
    host: Option<HostShare>,
    broker_peak_rss_mb: Option<f64>,
    /// The broker's log writer while publishing (when its /metrics was reachable).
    storage: Option<StorageReport>,
    series: Series,
    catch_up: Option<CatchUp>,
}

/// What the catch-up mode measured.
#[derive(Debug, Clone, Default)]
struct CatchUp {
    target_msgs: u64,
    empty_msgs: u64,
    /// From the start until the backlog was built.
    build_seconds: f64,
    /// Summed over consumers, when they started.
    backlog_at_drain_start: u64,
    drain_seconds: f64,
    /// Messages consumers received while draining.
    drained_msgs: u64,
    /// Messages acknowledged while draining.
    published_during_drain: u64,
    backlog_at_drain_end: u64,
    /// Whether the backlog came down to `empty_msgs` within --timeout.
    drained: bool,
}

impl CatchUp {
    fn drain_msgs_per_sec(&self) -> f64 {
        self.drained_msgs as f64 / self.drain_seconds.max(1e-6)
    }

    fn net_drain_msgs_per_sec(&self) -> f64 {
        (self.backlog_at_drain_start as f64 - self.backlog_at_drain_end as f64)
            / self.drain_seconds.max(1e-6)
    }

    fn publish_msgs_per_sec(&self) -> f64 {
        self.published_during_drain as f64 / self.drain_seconds.max(1e-6)
    }
}

/// A channel's name for this run: unique, so a rerun against a running broker starts empty.
fn channel_name(run_id: &str, index: usize) -> String {
    format!("bench/{run_id}/c{index}")
}

/// The channels producer `p` publishes to.
fn channels_of(p: usize, producers: usize, channels: usize) -> Vec<usize> {
    if channels >= producers {
        (p..channels).step_by(producers).collect()
    } else {
        vec![p % channels]
    }
}

async fn connect(target: &Target, name: &str) -> Result<Client> {
    let mut config =
        ClientConfig::from_certs_dir(&target.addr, &target.certs).with_context(|| {
            format!(
                "could not load client certificates from {}",
                target.certs.display()
            )
        })?;
    config.client_name = format!("directmq-bench/{name}");
    config.server_name.clone_from(&target.server_name);
    // A dead broker fails the run instead of being retried forever.
    config.reconnect_for = Some(Duration::from_secs(10));
    Client::connect(config)
        .await
        .with_context(|| format!("could not connect to the broker at {}", target.addr))
}

async fn run(
    plan: &Plan,
    target: &Target,
    broker_pid: Option<u32>,
    metrics_addr: Option<SocketAddr>,
) -> Result<Report> {
    let producers = plan.producers as usize;
    let channels = plan.channels as usize;
    let run_id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let names: Arc<Vec<String>> =
        Arc::new((0..channels).map(|i| channel_name(&run_id, i)).collect());

    // Set-up: connections, publish streams (which create the channels), then consumers.
    let control = connect(target, "control").await?;
    let options = plan.producer_options();
    let mut producer_sets = Vec::new();
    for p in 0..producers {
        let client = connect(target, &format!("p{p}")).await?;
        if plan.shared {
            // Created up front, so consumers can subscribe before the first message; in one
            // pipelined call, whose creations share the broker's group commits.
            let chans = channels_of(p, producers, channels);
            let mine: Vec<&str> = chans.iter().map(|&ch| names[ch].as_str()).collect();
            let created = control
                .create_channels(&mine)
                .await
                .with_context(|| format!("producer p{p}'s channels could not be created"))?;
            for (name, result) in mine.iter().zip(created) {
                match result {
                    Err(e) if e.code() != Some(ErrorCode::CHANNEL_EXISTS) => {
                        return Err(e).with_context(|| format!("could not create channel {name}"))
                    }
                    _ => {}
                }
            }
            let multi = client
                .multi_producer(&format!("p{p}"), options.clone())
                .await
                .with_context(|| format!("producer p{p} could not open its shared stream"))?;
            // Registered in one pipelined call, not a round trip per channel.
            let answers = multi
                .open_channels(&mine)
                .await
                .with_context(|| format!("producer p{p} could not open its channels"))?;
            for (name, answer) in mine.iter().zip(answers) {
                answer.with_context(|| format!("producer p{p} could not open channel {name}"))?;
            }
            producer_sets.push((client, Publisher::Shared(multi, chans)));
            continue;
        }
        let mut opening = JoinSet::new();
        for ch in channels_of(p, producers, channels) {
            let client = client.clone();
            let names = names.clone();
            let options = options.clone();
            opening.spawn(async move {
                let producer = client
                    .producer_with(&names[ch], &format!("p{p}"), options)
                    .await;
                (ch, producer)
            });
        }
        let mut handles = Vec::new();
        while let Some(joined) = opening.join_next().await {
            let (ch, producer) = joined.context("a producer set-up task panicked")?;
            let producer = producer
                .with_context(|| format!("producer p{p} could not open channel {}", names[ch]))?;
            handles.push((ch, producer));
        }
        handles.sort_by_key(|(ch, _)| *ch);
        producer_sets.push((client, Publisher::PerChannel(handles)));
    }
    let mut consumer_sessions = Vec::new();
    for c in 0..plan.consumers as usize {
        let client = connect(target, &format!("c{c}")).await?;
        let mut opening = JoinSet::new();
        for ch in 0..channels {
            let client = client.clone();
            let names = names.clone();
            opening.spawn(async move {
                let name = format!("bench-c{c}");
                // The broker answers a publish stream that creates a channel before the
                // creation is durable, and refuses subscriptions until it is: retry a while.
                let mut attempt = 0;
                let consumer = loop {
                    attempt += 1;
                    match client
                        .consumer(&names[ch], &name, StartPosition::Earliest)
                        .await
                    {
                        Err(e)
                            if e.code() == Some(ErrorCode::CHANNEL_NOT_FOUND)
                                && attempt < SUBSCRIBE_ATTEMPTS =>
                        {
                            tokio::time::sleep(SUBSCRIBE_PAUSE).await;
                        }
                        other => break other,
                    }
                };
                (ch, consumer)
            });
        }
        while let Some(joined) = opening.join_next().await {
            let (ch, consumer) = joined.context("a consumer set-up task panicked")?;
            let consumer = consumer.with_context(|| {
                format!("consumer bench-c{c} could not subscribe to {}", names[ch])
            })?;
            consumer_sessions.push((c, ch, consumer));
        }
        // The client lives on in its consumers' tasks.
        drop(client);
    }

    let clock = Clock::new(Duration::from_secs_f64(plan.warmup));
    // Consumers are subscribed; in catch-up mode they stay paused until the backlog is built.
    let (gate_tx, gate_rx) = watch::channel(plan.backlog.is_none());
    let ctx = Arc::new(Ctx {
        clock,
        message_size: plan.message_size as usize,
        messages: plan.messages,
        send_end: plan
            .messages
            .is_none()
            .then(|| clock.warmup_end + Duration::from_secs_f64(plan.duration)),
        deadline: plan
            .messages
            .map(|_| clock.start + Duration::from_secs_f64(plan.warmup + plan.timeout)),
        interval_s: (plan.rate > 0.0).then(|| producers as f64 / plan.rate),
        in_flight: plan.in_flight,
        idle_commit: plan.idle_commit,
        counters: Counters::default(),
        channel_acked: (0..channels).map(|_| AtomicU64::new(0)).collect(),
        failed: AtomicBool::new(false),
        hold: AtomicBool::new(plan.backlog.is_some()),
        stop: AtomicBool::new(false),
        gate: gate_rx,
        phase: std::sync::atomic::AtomicU8::new(if plan.backlog.is_some() {
            PHASE_BUILD
        } else {
            PHASE_RUN
        }),
        consumers: u64::from(plan.consumers),
        ack: Mutex::new(Recorder::new()),
        e2e: Mutex::new(Recorder::new()),
        schedule_lag: Mutex::new(histogram()),
        series: Mutex::new(Series::default()),
        payload: plan.payload.clone(),
    });
    let scrape = move || async move {
        match metrics_addr {
            Some(addr) => tokio::task::spawn_blocking(move || storage_counters(addr))
                .await
                .ok()
                .flatten(),
            None => None,
        }
    };
    let storage_start = scrape().await;
    let broker_cpu = || broker_pid.and_then(|pid| cpu_seconds(&pid.to_string()));
    let cpu_start = (
        broker_cpu(),
        cpu_seconds("self"),
        Instant::now(),
        host_cpu(),
    );

    let (progress_done, progress_done_rx) = tokio::sync::oneshot::channel();
    let progress = tokio::spawn(progress(ctx.clone(), plan.consumers > 0, progress_done_rx));
    // Every task that must not outlive a failed run.
    let stop_all = |progress: &tokio::task::JoinHandle<()>| {
        ctx.failed.store(true, Ordering::Relaxed);
        ctx.stop.store(true, Ordering::Relaxed);
        progress.abort();
    };

    let targets: Vec<watch::Sender<Option<u64>>> =
        (0..channels).map(|_| watch::channel(None).0).collect();
    let mut consumers = JoinSet::new();
    for (c, ch, consumer) in consumer_sessions {
        consumers.spawn(consume(
            consumer,
            c,
            ch,
            targets[ch].subscribe(),
            ctx.clone(),
        ));
    }
    let mut controller = JoinSet::new();
    if let Some(backlog) = plan.backlog {
        controller.spawn(catch_up(
            ctx.clone(),
            gate_tx,
            backlog,
            plan.rate == 0.0,
            Duration::from_secs_f64(plan.timeout),
        ));
    } else {
        drop(gate_tx);
    }
    let mut publishing = JoinSet::new();
    for (p, (client, handles)) in producer_sets.into_iter().enumerate() {
        publishing.spawn(produce(p, client, handles, names.clone(), ctx.clone()));
    }

    let mut publish = PublishStats::new();
    let mut consume_stats = ConsumeStats::new();
    let mut catch_up_result: Option<CatchUp> = None;
    // Until every producer is done; a failing consumer or controller stops the run at once.
    let failure = loop {
        tokio::select! {
            joined = publishing.join_next() => match joined {
                None => break None,
                Some(Ok(Ok(stats))) => publish.merge(stats),
                Some(Ok(Err(e))) => break Some(e),
                Some(Err(e)) => break Some(anyhow!("a producer task failed: {e}")),
            },
            Some(joined) = consumers.join_next() => match joined {
                Ok(Ok(stats)) => consume_stats.merge(stats),
                Ok(Err(e)) => break Some(e),
                Err(e) => break Some(anyhow!("a consumer task failed: {e}")),
            },
            Some(joined) = controller.join_next() => match joined {
                Ok(Ok(result)) => catch_up_result = Some(result),
                Ok(Err(e)) => break Some(e),
                Err(e) => break Some(anyhow!("the catch-up controller failed: {e}")),
            },
        }
    };
    if let Some(e) = failure {
        stop_all(&progress);
        publishing.abort_all();
        consumers.abort_all();
        controller.abort_all();
        return Err(e);
    }
    let cpu_end = (
        broker_cpu(),
        cpu_seconds("self"),
        Instant::now(),
        host_cpu(),
    );
    let storage_end = scrape().await;
    if publish.errors > 0 {
        stop_all(&progress);
        consumers.abort_all();
        controller.abort_all();
        bail!(
            "{} of {} publishes failed; the first error: {}",
            publish.errors,
            publish.errors + publish.acked,
            publish.first_error.as_deref().unwrap_or("unknown")
        );
    }
    if publish.duplicates > 0 {
        stop_all(&progress);
        consumers.abort_all();
        controller.abort_all();
        bail!(
            "the broker answered {} freshly sequenced messages as duplicates: they were not stored",
            publish.duplicates
        );
    }
    // Every acknowledged message must be in its channel: the channels are new, so a channel's
    // head must be at least the number of messages acknowledged on it.
    let prefix = format!("bench/{run_id}/");
    let heads = control
        .list_channels(&prefix)
        .await
        .context("could not list the benchmark's channels to check them")?;
    for (ch, tx) in targets.iter().enumerate() {
        let acked = ctx.channel_acked[ch].load(Ordering::Relaxed);
        let head = heads
            .iter()
            .find(|info| info.name == names[ch])
            .map_or(0, |info| info.head);
        if head < acked {
            stop_all(&progress);
            consumers.abort_all();
            controller.abort_all();
            bail!(
                "the broker acknowledged {acked} messages on {} but holds only {head}: {} acknowledged messages are missing",
                names[ch],
                acked - head
            );
        }
        tx.send_replace(Some(acked));
    }
    // Consumers now receive up to what was acknowledged; bounded by --timeout overall (and
    // each fails by itself after STALL_LIMIT without progress).
    let finish_by = tokio::time::Instant::now() + Duration::from_secs_f64(plan.timeout);
    loop {
        match tokio::time::timeout_at(finish_by, consumers.join_next()).await {
            Ok(None) => break,
            Ok(Some(joined)) => match joined.context("a consumer task panicked")? {
                Ok(stats) => consume_stats.merge(stats),
                Err(e) => {
                    stop_all(&progress);
                    consumers.abort_all();
                    controller.abort_all();
                    return Err(e);
                }
            },
            Err(_) => {
                stop_all(&progress);
                consumers.abort_all();
                controller.abort_all();
                bail!(
                    "consumers had not received every acknowledged message {} s after publishing ended (--timeout)",
                    plan.timeout
                );
            }
        }
    }
    // The controller notices the end of the drain within CATCH_UP_POLL once consumers are
    // done (the backlog is 0 then).
    if let Ok(Some(joined)) =
        tokio::time::timeout(Duration::from_secs(2), controller.join_next()).await
    {
        match joined {
            Ok(Ok(result)) => catch_up_result = Some(result),
            Ok(Err(e)) => {
                progress.abort();
                return Err(e);
            }
            Err(e) => {
                progress.abort();
                bail!("the catch-up controller failed: {e}");
            }
        }
    }
    controller.abort_all();
    if plan.backlog.is_some() && catch_up_result.is_none() {
        progress.abort();
        bail!("the catch-up controller did not report the drain");
    }
    // The last, partial second, then the series is complete.
    let _ = progress_done.send(());
    let abort = progress.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), progress)
        .await
        .is_err()
    {
        abort.abort();
    }
    let series = std::mem::take(
        &mut *ctx
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), control.close()).await;

    if publish.measured == 0 {
        bail!(
            "no message was measured: the run ended within the {} s warm-up; raise --messages or lower --warmup",
            plan.warmup
        );
    }
    let publish_seconds = publish
        .last_measured_ack
        .map_or(0.0, |t| {
            t.saturating_duration_since(clock.warmup_end).as_secs_f64()
        })
        .max(1e-6);
    let consume = (plan.consumers > 0).then(|| {
        let seconds = consume_stats
            .last_measured
            .map_or(0.0, |t| {
                t.saturating_duration_since(clock.warmup_end).as_secs_f64()
            })
            .max(1e-6);
        (consume_stats, seconds)
    });
    let wall = cpu_end
        .2
        .duration_since(cpu_start.2)
        .as_secs_f64()
        .max(1e-6);
    let cores = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / wall);
    let take = |m: &Mutex<Histogram<u64>>| std::mem::replace(&mut *lock(m), histogram());
    let publish_latency = std::mem::replace(&mut lock(&ctx.ack).measured, histogram());
    let e2e_latency = std::mem::replace(&mut lock(&ctx.e2e).measured, histogram());
    let schedule_lag = take(&ctx.schedule_lag);
    Ok(Report {
        message_size: u64::from(plan.message_size),
        publish_latency,
        e2e_latency,
        schedule_lag,
        publish,
        publish_seconds,
        consume,
        broker_cpu_cores: cores(cpu_start.0, cpu_end.0),
        bench_cpu_cores: cores(cpu_start.1, cpu_end.1),
        host: cpu_start
            .3
            .zip(cpu_end.3)
            .and_then(|(a, b)| host_share(a, b)),
        broker_peak_rss_mb: None,
        storage: storage_start
            .zip(storage_end)
            .map(|(a, b)| StorageReport::between(a, b, wall)),
        series,
        catch_up: catch_up_result,
    })
}

/// The catch-up mode: waits until producers built the backlog, lets consumers start, and
/// measures until the backlog is drained (then lets producers end once --duration is over).
/// Bounded: each phase may last `limit`.
async fn catch_up(
    ctx: Arc<Ctx>,
    gate: watch::Sender<bool>,
    plan: BacklogPlan,
    full_speed: bool,
    limit: Duration,
) -> Result<CatchUp> {
    let mut result = CatchUp {
        target_msgs: plan.target_msgs,
        empty_msgs: plan.empty_msgs,
        ..CatchUp::default()
    };
    let polls = (limit.as_secs_f64() / CATCH_UP_POLL.as_secs_f64()).ceil() as u64 + 1;
    // Build.
    let start = ctx.clock.start;
    let mut built = false;
    for _ in 0..polls {
        if ctx.backlog() >= plan.target_msgs {
            built = true;
            break;
        }
        if start.elapsed() > limit {
            break;
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
    if !built {
        bail!(
            "the backlog of {} messages ({:.2} GB) was not built within {} s (--timeout): {} messages acknowledged",
            plan.target_msgs,
            plan.gb,
            limit.as_secs_f64(),
            ctx.counters.acked.load(Ordering::Relaxed)
        );
    }
    let drain_start = Instant::now();
    result.build_seconds = drain_start.duration_since(start).as_secs_f64();
    result.backlog_at_drain_start = ctx.backlog();
    let consumed_at_start = ctx.counters.consumed.load(Ordering::Relaxed);
    let acked_at_start = ctx.counters.acked.load(Ordering::Relaxed);
    if full_speed {
        ctx.stop.store(true, Ordering::Relaxed);
    }
    ctx.phase.store(PHASE_DRAIN, Ordering::Relaxed);
    gate.send_replace(true);
    eprintln!(
        "directmq-bench: backlog of {} messages built in {:.1} s; consumers start{}",
        thousands(result.backlog_at_drain_start),
        result.build_seconds,
        if full_speed {
            " and producers stop"
        } else {
            ""
        }
    );
    // Drain.
    let mut drained = false;
    for _ in 0..polls {
        if ctx.backlog() <= plan.empty_msgs {
            drained = true;
            break;
        }
        if drain_start.elapsed() > limit {
            break;
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
    let end = Instant::now();
    result.drain_seconds = end.duration_since(drain_start).as_secs_f64();
    result.drained_msgs = ctx.counters.consumed.load(Ordering::Relaxed) - consumed_at_start;
    result.published_during_drain = ctx.counters.acked.load(Ordering::Relaxed) - acked_at_start;
    result.backlog_at_drain_end = ctx.backlog();
    result.drained = drained;
    ctx.phase.store(PHASE_RUN, Ordering::Relaxed);
    if drained {
        eprintln!(
            "directmq-bench: backlog drained in {:.1} s ({} msg/s consumed)",
            result.drain_seconds,
            thousands(result.drain_msgs_per_sec().round() as u64)
        );
    } else {
        eprintln!(
            "directmq-bench: the backlog was not drained within {} s (--timeout); {} messages left",
            limit.as_secs_f64(),
            thousands(result.backlog_at_drain_end)
        );
        ctx.stop.store(true, Ordering::Relaxed);
    }
    ctx.hold.store(false, Ordering::Relaxed);
    Ok(result)
}

/// A message waiting for its ack.
/// What one producer publishes with (`--streams`).
enum Publisher {
    /// A Producer (publish stream) per channel.
    PerChannel(Vec<(usize, Producer)>),
    /// One multi-channel stream for all of the producer's channels.
    Shared(MultiProducer, Vec<usize>),
}

impl Publisher {
    fn len(&self) -> usize {
        match self {
            Publisher::PerChannel(handles) => handles.len(),
            Publisher::Shared(_, channels) => channels.len(),
        }
    }

    fn channel(&self, k: usize) -> usize {
        match self {
            Publisher::PerChannel(handles) => handles[k].0,
            Publisher::Shared(_, channels) => channels[k],
        }
    }

    async fn enqueue(
        &self,
        k: usize,
        names: &[String],
        payload: bytes::Bytes,
    ) -> Result<PendingAck, directmq_client::Error> {
        match self {
            Publisher::PerChannel(handles) => handles[k].1.enqueue(payload).await,
            Publisher::Shared(multi, channels) => multi.enqueue(&names[channels[k]], payload).await,
        }
    }
}

struct Pending {
    /// The channel's index.
    ch: usize,
    /// When it was sent (scheduled send time with --rate).
    sent: Instant,
    ack: PendingAck,
    permit: OwnedSemaphorePermit,
}

/// Payloads carved out of large shared buffers: one allocation per MiB, not per message.
struct Payloads {
    /// Used in turn.
    templates: Arc<Vec<Vec<u8>>>,
    next: usize,
    buf: BytesMut,
}

impl Payloads {
    /// `shared` templates (a workload's payload file or randomized pool), or one generated
    /// from `seed` of `size` bytes.
    fn new(shared: Option<Arc<Vec<Vec<u8>>>>, size: usize, seed: u64) -> Payloads {
        let templates = shared.unwrap_or_else(|| {
            // xorshift: incompressible bytes without a dependency.
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let template = (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            Arc::new(vec![template])
        });
        Payloads {
            // Producers start at different templates of a pool.
            next: seed as usize % templates.len().max(1),
            templates,
            buf: BytesMut::new(),
        }
    }

    /// A payload whose first 8 bytes are `send_us` (little endian).
    fn next(&mut self, send_us: u64) -> Bytes {
        let template = &self.templates[self.next];
        self.next = (self.next + 1) % self.templates.len();
        let size = template.len();
        if self.buf.capacity() < size {
            self.buf.reserve(size.max(1024 * 1024));
        }
        self.buf.extend_from_slice(template);
        self.buf[..8].copy_from_slice(&send_us.to_le_bytes());
        self.buf.split().freeze()
    }
}

async fn produce(
    p: usize,
    client: Client,
    handles: Publisher,
    names: Arc<Vec<String>>,
    ctx: Arc<Ctx>,
) -> Result<PublishStats> {
    let permits = Arc::new(Semaphore::new(ctx.in_flight));
    let mut senders = Vec::new();
    let mut collectors = Vec::new();
    // Acks come in order per stream: a collector per stream awaits them in that order.
    let streams = match &handles {
        Publisher::PerChannel(h) => h.len(),
        Publisher::Shared(..) => 1,
    };
    for _ in 0..streams {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        collectors.push(tokio::spawn(collect_acks(rx, ctx.clone())));
    }
    let mut stats = PublishStats::new();
    let mut payloads = Payloads::new(ctx.payload.clone(), ctx.message_size, p as u64 + 1);
    let limit = ctx.messages.unwrap_or(u64::MAX);
    // One per producer, merged into `Ctx::schedule_lag` at the end.
    let mut schedule_lag = histogram();
    let mut i = 0u64;
    while i < limit {
        let now = Instant::now();
        let scheduled = match ctx.interval_s {
            Some(interval) => ctx.clock.start + Duration::from_secs_f64(interval * i as f64),
            None => now,
        };
        if ctx.send_end.is_some_and(|end| scheduled >= end) && !ctx.hold.load(Ordering::Relaxed) {
            break;
        }
        if ctx.deadline.is_some_and(|deadline| now >= deadline) {
            bail!("producer p{p} had published {i} of {limit} messages when --timeout ran out");
        }
        if ctx.failed.load(Ordering::Relaxed) || ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        if scheduled > now + TIMER_SLACK {
            // tokio's timer fires on a 1 ms tick at or after its deadline, so waking at
            // the scheduled time itself would make every paced message up to 1 ms late,
            // and that lateness of the tool would count as latency. Wake a tick early;
            // a message sent before its time is measured from when it was sent (below).
            tokio::time::sleep_until((scheduled - TIMER_SLACK).into()).await;
        }
        // A free permit is taken without arming a timer (a clock read and a timer entry per
        // message otherwise); only a producer that must wait waits with a limit.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                match tokio::time::timeout(STALL_LIMIT, permits.clone().acquire_owned()).await {
                    Ok(permit) => permit.expect("the semaphore is never closed"),
                    Err(_) => bail!(
                        "producer p{p}: no message was acknowledged for {} s; is the broker alive?",
                        STALL_LIMIT.as_secs()
                    ),
                }
            }
        };
        let now = Instant::now();
        // Paced runs measure from the scheduled time when the message goes out late
        // (coordinated omission: a stalled broker cannot hide the backlog it caused) and
        // from the actual send when it goes out early: never less than the real latency.
        let sent = if ctx.interval_s.is_some() {
            scheduled.min(now)
        } else {
            now
        };
        let k = (i % handles.len() as u64) as usize;
        let ch = handles.channel(k);
        let ack = handles
            .enqueue(k, &names, payloads.next(ctx.clock.epoch_us(sent)))
            .await
            .with_context(|| format!("producer p{p} could not publish to channel #{ch}"))?;
        if ctx.interval_s.is_some() && sent >= ctx.clock.warmup_end {
            schedule_lag.saturating_record(micros(now.saturating_duration_since(scheduled)));
        }
        if senders[k % streams]
            .send(Pending {
                ch,
                sent,
                ack,
                permit,
            })
            .is_err()
        {
            bail!("producer p{p}: the ack collector stopped");
        }
        ctx.counters.sent.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    drop(senders);
    lock(&ctx.schedule_lag)
        .add(&schedule_lag)
        .expect("same bounds");
    let drained_by = tokio::time::Instant::now() + STALL_LIMIT;
    for collector in collectors {
        let abort = collector.abort_handle();
        match tokio::time::timeout_at(drained_by, collector).await {
            Ok(joined) => stats.merge(joined.context("an ack collector panicked")?),
            Err(_) => {
                abort.abort();
                bail!(
                    "producer p{p}: acks were still outstanding {} s after the last send",
                    STALL_LIMIT.as_secs()
                );
            }
        }
    }
    drop(handles);
    drop(client);
    Ok(stats)
}

/// Awaits the acks of one producer handle in order and records their latency.
async fn collect_acks(
    mut pending: mpsc::UnboundedReceiver<Pending>,
    ctx: Arc<Ctx>,
) -> PublishStats {
    let mut stats = PublishStats::new();
    while let Some(Pending {
        ch,
        sent,
        ack,
        permit,
    }) = pending.recv().await
    {
        let result = ack.await;
        let now = Instant::now();
        drop(permit);
        match result {
            Ok(receipt) => {
                stats.acked += 1;
                ctx.counters.acked.fetch_add(1, Ordering::Relaxed);
                if receipt.duplicate {
                    // Every message has a fresh sequence: the broker should never say this.
                    stats.duplicates += 1;
                } else {
                    ctx.channel_acked[ch].fetch_add(1, Ordering::Relaxed);
                }
                let measured = sent >= ctx.clock.warmup_end;
                record(
                    &ctx.ack,
                    micros(now.saturating_duration_since(sent)),
                    measured,
                );
                if measured {
                    stats.measured += 1;
                    stats.last_measured_ack = Some(now);
                }
            }
            Err(e) => {
                stats.errors += 1;
                stats.first_error.get_or_insert_with(|| e.to_string());
                ctx.failed.store(true, Ordering::Relaxed);
            }
        }
    }
    stats
}

/// Receives one channel for one durable consumer until it holds every acknowledged message.
async fn consume(
    mut consumer: Consumer,
    c: usize,
    ch: usize,
    mut target: watch::Receiver<Option<u64>>,
    ctx: Arc<Ctx>,
) -> Result<ConsumeStats> {
    let mut stats = ConsumeStats::new();
    let warmup_end_us = ctx.clock.epoch_us(ctx.clock.warmup_end);
    let mut next = consumer.start_offset();
    let mut last_commit = next;
    // Once publishing ended and the goal is known, the consumer must keep making progress:
    // each message received pushes this back.
    let mut deadline: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    // Catch-up mode: subscribed, but paused until the backlog is built (the controller opens
    // the gate, or fails the run, within --timeout).
    let mut gate = ctx.gate.clone();
    while !*gate.borrow_and_update() {
        if gate.changed().await.is_err() {
            bail!("the run was stopped");
        }
    }
    loop {
        let goal = *target.borrow_and_update();
        if let Some(goal) = goal {
            if next >= goal {
                break;
            }
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + STALL_LIMIT);
        }
        tokio::select! {
            biased;
            message = consumer.next() => match message {
                Some(Ok(m)) => {
                    let now = Instant::now();
                    if deadline.is_some() {
                        deadline = Some(tokio::time::Instant::from_std(now) + STALL_LIMIT);
                    }
                    stats.received += 1;
                    stats.last_received = Some(now);
                    ctx.counters.consumed.fetch_add(1, Ordering::Relaxed);
                    let mut stamp = [0u8; 8];
                    if m.payload.len() >= 8 {
                        stamp.copy_from_slice(&m.payload[..8]);
                    }
                    let sent_us = u64::from_le_bytes(stamp);
                    let measured = sent_us >= warmup_end_us;
                    record(&ctx.e2e, ctx.clock.epoch_us(now).saturating_sub(sent_us), measured);
                    if measured {
                        stats.measured += 1;
                        stats.last_measured = Some(now);
                    }
                    next = m.offset + 1;
                    if next - last_commit >= COMMIT_EVERY {
                        consumer.commit_nowait(next);
                        last_commit = next;
                    }
                }
                Some(Err(e)) => {
                    return Err(e).with_context(|| format!("consumer bench-c{c} failed on channel #{ch}"));
                }
                None => bail!("consumer bench-c{c} on channel #{ch} was closed"),
            },
            // Caught up with what has arrived: commit it. (This also wakes a broker session
            // that waits for a frame from the client before it delivers more.)
            () = std::future::ready(()), if ctx.idle_commit && next > last_commit => {
                consumer.commit_nowait(next);
                last_commit = next;
            }
            changed = target.changed(), if goal.is_none() => {
                if changed.is_err() {
                    bail!("the run was stopped");
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                bail!(
                    "consumer bench-c{c} received nothing on channel #{ch} for {} s after publishing ended \
                     (it had {next} of {} messages)",
                    STALL_LIMIT.as_secs(),
                    goal.unwrap_or(0),
                );
            }
        }
    }
    // Leave the durable consumer at the head (bounded: the run is over either way).
    match tokio::time::timeout(Duration::from_secs(5), consumer.commit(next)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(e)
                .with_context(|| format!("consumer bench-c{c} could not commit on channel #{ch}"))
        }
        Err(_) => bail!("consumer bench-c{c}: its final commit on channel #{ch} took over 5 s"),
    }
    Ok(stats)
}

/// Prints one line a second to stderr and records the per-second series, until `done`
/// (then it records the last, partial interval) or aborted (and at most for a week).
async fn progress(ctx: Arc<Ctx>, consumers: bool, mut done: tokio::sync::oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0u64, 0u64, 0u64);
    let mut last_t = ctx.clock.start;
    let mb = ctx.message_size as f64 / 1e6;
    for _ in 0..7 * 86_400 {
        let last_round = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut done => true,
        };
        let c = &ctx.counters;
        let now = (
            c.sent.load(Ordering::Relaxed),
            c.acked.load(Ordering::Relaxed),
            c.consumed.load(Ordering::Relaxed),
        );
        let t = Instant::now();
        let dt = t.duration_since(last_t).as_secs_f64().max(1e-3);
        if last_round && dt < 0.2 {
            // Too short to be a rate worth plotting.
            return;
        }
        let elapsed = t.duration_since(ctx.clock.start).as_secs_f64();
        let phase = match ctx.phase.load(Ordering::Relaxed) {
            PHASE_BUILD => "build",
            PHASE_DRAIN => "drain",
            // The second as a whole: by its middle.
            _ if last_t + t.duration_since(last_t) / 2 < ctx.clock.warmup_end => "warmup",
            _ => "run",
        };
        let label = match phase {
            "build" => " (building the backlog)",
            "drain" => " (catching up)",
            "warmup" => " (warm-up)",
            _ => "",
        };
        let per_sec = |a: u64, b: u64| (a - b) as f64 / dt;
        let sent = per_sec(now.0, last.0);
        let acked = per_sec(now.1, last.1);
        let consumed = per_sec(now.2, last.2);
        let (ack_p50, ack_p99) = take_second(&ctx.ack);
        let (e2e_p50, e2e_p99) = take_second(&ctx.e2e);
        let backlog = ctx.backlog();
        {
            let mut s = ctx
                .series
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.t_s.push(elapsed);
            s.sent_msgs_per_sec.push(sent);
            s.publish_msgs_per_sec.push(acked);
            s.consume_msgs_per_sec.push(consumed);
            s.ack_p50_ms.push(ack_p50);
            s.ack_p99_ms.push(ack_p99);
            s.e2e_p50_ms.push(e2e_p50);
            s.e2e_p99_ms.push(e2e_p99);
            s.backlog_msgs.push(backlog);
            s.phase.push(phase);
        }
        let mut line = format!(
            "[{elapsed:6.1}s] sent {:>9}/s  acked {:>9}/s ({:7.1} MB/s)  in flight {:>7}  ack p99 {:>7} ms",
            thousands(sent.round() as u64),
            thousands(acked.round() as u64),
            acked * mb,
            thousands(now.0.saturating_sub(now.1)),
            ack_p99.map_or("-".to_owned(), |v| format!("{v:.2}")),
        );
        if consumers {
            line += &format!(
                "  consumed {:>9}/s  backlog {:>9}",
                thousands(consumed.round() as u64),
                thousands(backlog)
            );
        }
        eprintln!("{line}{label}");
        if last_round {
            return;
        }
        last = now;
        last_t = t;
    }
}

// ---------------------------------------------------------------------------------------
// Reporting

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
    }
    out
}

const PERCENTILES: [(&str, f64); 6] = [
    ("p50", 0.50),
    ("p75", 0.75),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p999", 0.999),
    ("p9999", 0.9999),
];

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn latency_json(h: &Histogram<u64>) -> Value {
    let mut out = serde_json::Map::new();
    for (name, q) in PERCENTILES {
        out.insert(name.into(), json!(ms(h.value_at_quantile(q))));
    }
    out.insert("max".into(), json!(ms(h.max())));
    out.insert("mean".into(), json!(h.mean() / 1000.0));
    out.insert("count".into(), json!(h.len()));
    Value::Object(out)
}

fn latency_line(h: &Histogram<u64>) -> String {
    let mut parts: Vec<String> = PERCENTILES
        .iter()
        .map(|(name, q)| format!("{name} {:.3}", ms(h.value_at_quantile(*q))))
        .collect();
    parts.push(format!("max {:.3}", ms(h.max())));
    parts.join("  ")
}

impl Report {
    fn rates(&self, messages: u64, seconds: f64) -> (f64, f64) {
        let msgs = messages as f64 / seconds;
        (msgs, msgs * self.message_size as f64 / 1e6)
    }

    fn to_json(&self) -> Value {
        let (pub_msgs, pub_mb) = self.rates(self.publish.measured, self.publish_seconds);
        let mut value = json!({
            "publish": {
                "msgs_per_sec": pub_msgs,
                "mb_per_sec": pub_mb,
                "messages": self.publish.measured,
                "seconds": self.publish_seconds,
                "latency_ms": latency_json(&self.publish_latency),
            },
            "end_to_end": { "latency_ms": Value::Null },
            "consume": { "msgs_per_sec": Value::Null, "mb_per_sec": Value::Null },
            "broker": {
                "peak_rss_mb": self.broker_peak_rss_mb,
                "cpu_cores": self.broker_cpu_cores,
            },
            "bench_cpu_cores": self.bench_cpu_cores,
            "host": self.host.map(|h| json!({
                "idle_percent": h.idle_percent,
                "steal_percent": h.steal_percent,
            })),
        });
        if let Some(st) = &self.storage {
            value["broker"]["storage"] = json!({
                "fsyncs_per_sec": st.fsyncs_per_sec,
                "mb_per_fsync": st.mb_per_fsync,
                "fsync_ms_mean": st.fsync_ms_mean,
                "appends_per_group": st.appends_per_group,
                "mb_written_per_sec": st.mb_written_per_sec,
            });
        }
        if !self.schedule_lag.is_empty() {
            value["publish"]["schedule_lag_ms"] = latency_json(&self.schedule_lag);
        }
        if let Some((stats, seconds)) = &self.consume {
            let (msgs, mb) = self.rates(stats.measured, *seconds);
            value["end_to_end"]["latency_ms"] = latency_json(&self.e2e_latency);
            value["consume"] = json!({
                "msgs_per_sec": msgs,
                "mb_per_sec": mb,
                "messages": stats.measured,
                "seconds": seconds,
                "max_backlog_msgs": self.series.backlog_msgs.iter().max().copied().unwrap_or(0),
            });
        }
        if let Some(cu) = &self.catch_up {
            let mb = self.message_size as f64 / 1e6;
            value["catch_up"] = json!({
                "target_backlog_msgs": cu.target_msgs,
                "empty_backlog_msgs": cu.empty_msgs,
                "build_seconds": cu.build_seconds,
                "backlog_at_drain_start_msgs": cu.backlog_at_drain_start,
                "backlog_at_drain_start_mb": cu.backlog_at_drain_start as f64 * mb,
                "drain_seconds": cu.drain_seconds,
                "drained_msgs": cu.drained_msgs,
                "drain_msgs_per_sec": cu.drain_msgs_per_sec(),
                "drain_mb_per_sec": cu.drain_msgs_per_sec() * mb,
                "net_drain_msgs_per_sec": cu.net_drain_msgs_per_sec(),
                "publish_msgs_per_sec_while_draining": cu.publish_msgs_per_sec(),
                "backlog_at_drain_end_msgs": cu.backlog_at_drain_end,
                "drained": cu.drained,
            });
        }
        value
    }
}

fn print_summary(plan: &Plan, report: &Report, broker: &str, probe: Option<(&Probe, &Path)>) {
    let length = match plan.messages {
        Some(n) => format!("{n} messages per producer"),
        None => format!("{} s", plan.duration),
    };
    let rate = if plan.rate > 0.0 {
        format!("{} msg/s target", plan.rate)
    } else {
        "max rate".to_owned()
    };
    println!(
        "directmq-bench: {} producer(s), {} channel(s), {} consumer(s), {} B messages, {rate}, {length} after a {} s warm-up; batch ≤ {} msgs; {} streams; durability {}; broker {broker}",
        plan.producers,
        plan.channels,
        plan.consumers,
        plan.message_size,
        plan.warmup,
        plan.producer_options().max_batch_messages,
        if plan.shared { "shared" } else { "per-channel" },
        plan.durability_label(),
    );
    if let Some(m) = &plan.workload {
        println!(
            "workload     {} ({})",
            m.workload.name.as_deref().unwrap_or("unnamed"),
            m.path.display()
        );
    }
    let (msgs, mb) = report.rates(report.publish.measured, report.publish_seconds);
    println!(
        "publish      {:>12} msg/s  {:9.1} MB/s  ({} messages in {:.2} s)",
        thousands(msgs.round() as u64),
        mb,
        thousands(report.publish.measured),
        report.publish_seconds
    );
    println!("ack latency  ms: {}", latency_line(&report.publish_latency));
    if !report.schedule_lag.is_empty() {
        println!(
            "send lag     ms: {}  (how late sends left their schedule)",
            latency_line(&report.schedule_lag)
        );
    }
    if let Some((stats, seconds)) = &report.consume {
        let (msgs, mb) = report.rates(stats.measured, *seconds);
        println!(
            "consume      {:>12} msg/s  {:9.1} MB/s  ({} messages in {:.2} s, all consumers)",
            thousands(msgs.round() as u64),
            mb,
            thousands(stats.measured),
            seconds
        );
        println!("end-to-end   ms: {}", latency_line(&report.e2e_latency));
    }
    if let Some(cu) = &report.catch_up {
        let mb = report.message_size as f64 / 1e6;
        println!(
            "catch-up     backlog {} msgs ({:.1} MB) built in {:.1} s; drained {} msgs in {:.2} s{}",
            thousands(cu.backlog_at_drain_start),
            cu.backlog_at_drain_start as f64 * mb,
            cu.build_seconds,
            thousands(cu.drained_msgs),
            cu.drain_seconds,
            if cu.drained {
                String::new()
            } else {
                format!(
                    " — NOT drained within --timeout, {} msgs left",
                    thousands(cu.backlog_at_drain_end)
                )
            }
        );
        println!(
            "drain rate   {:>12} msg/s  {:9.1} MB/s  consumed while catching up (net backlog reduction {} msg/s; producers {} msg/s meanwhile)",
            thousands(cu.drain_msgs_per_sec().round() as u64),
            cu.drain_msgs_per_sec() * mb,
            thousands(cu.net_drain_msgs_per_sec().max(0.0).round() as u64),
            thousands(cu.publish_msgs_per_sec().round() as u64),
        );
    }
    let mut machine = Vec::new();
    if let Some(c) = report.broker_cpu_cores {
        machine.push(format!("broker CPU {c:.2} cores"));
    }
    if let Some(c) = report.bench_cpu_cores {
        machine.push(format!("bench CPU {c:.2} cores"));
    }
    if let Some(m) = report.broker_peak_rss_mb {
        machine.push(format!("broker peak RSS {m:.0} MB"));
    }
    if let Some(h) = report.host {
        machine.push(format!(
            "host idle {:.0}%, steal {:.1}%",
            h.idle_percent, h.steal_percent
        ));
    }
    if !machine.is_empty() {
        println!("machine      {}", machine.join(", "));
    }
    if let Some(st) = &report.storage {
        println!(
            "broker log   {:.0} fsyncs/s, {:.3} MB per fsync (mean {:.2} ms), {:.1} appends per group, {:.1} MB/s written",
            st.fsyncs_per_sec, st.mb_per_fsync, st.fsync_ms_mean, st.appends_per_group, st.mb_written_per_sec
        );
    }
    if let Some((p, dir)) = probe {
        println!(
            "probe        disk fdatasync'd appends: 64 KiB {:.0} MB/s, 1 MiB {:.0} MB/s (in {}); QUIC one stream on loopback {:.0} MB/s",
            p.disk_64kib_mb_per_sec,
            p.disk_1mib_mb_per_sec,
            dir.display(),
            p.quic_mb_per_sec
        );
        for (what, value, limit) in fractions(p, report) {
            println!(
                "of limit     {what} {value:.1} MB/s = {:.0}% of {limit}",
                value / limit_value(p, limit) * 100.0
            );
        }
    }
    for note in &plan.notes {
        println!("note         {note}");
    }
}

/// The limits a figure is compared with.
#[derive(Clone, Copy)]
enum Limit {
    Disk1MiB,
    Disk64KiB,
    Quic,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Disk1MiB => "disk fdatasync 1 MiB",
            Limit::Disk64KiB => "disk fdatasync 64 KiB",
            Limit::Quic => "QUIC",
        })
    }
}

fn limit_value(p: &Probe, limit: Limit) -> f64 {
    match limit {
        Limit::Disk1MiB => p.disk_1mib_mb_per_sec,
        Limit::Disk64KiB => p.disk_64kib_mb_per_sec,
        Limit::Quic => p.quic_mb_per_sec,
    }
    .max(1e-9)
}

/// (figure, MB/s, limit) for each DirectMQ figure worth comparing with the probe.
fn fractions(_p: &Probe, report: &Report) -> Vec<(&'static str, f64, Limit)> {
    let (_, publish_mb) = report.rates(report.publish.measured, report.publish_seconds);
    let mut out = vec![
        ("publish", publish_mb, Limit::Disk1MiB),
        ("publish", publish_mb, Limit::Disk64KiB),
        ("publish", publish_mb, Limit::Quic),
    ];
    if let Some((stats, seconds)) = &report.consume {
        let (_, mb) = report.rates(stats.measured, *seconds);
        out.push(("consume", mb, Limit::Quic));
    }
    if let Some(cu) = &report.catch_up {
        out.push((
            "drain",
            cu.drain_msgs_per_sec() * report.message_size as f64 / 1e6,
            Limit::Quic,
        ));
    }
    out
}

fn probe_json(p: &Probe, dir: &Path, report: &Report) -> Value {
    let mut fraction = serde_json::Map::new();
    for (what, value, limit) in fractions(p, report) {
        let key = match limit {
            Limit::Disk1MiB => format!("{what}_of_disk_fdatasync_1mib"),
            Limit::Disk64KiB => format!("{what}_of_disk_fdatasync_64kib"),
            Limit::Quic => format!("{what}_of_quic"),
        };
        fraction.insert(key, json!(value / limit_value(p, limit)));
    }
    json!({
        "disk_fdatasync_64kib_mb_per_sec": p.disk_64kib_mb_per_sec,
        "disk_fdatasync_1mib_mb_per_sec": p.disk_1mib_mb_per_sec,
        "quic_mb_per_sec": p.quic_mb_per_sec,
        "dir": dir.display().to_string(),
        "fraction": fraction,
    })
}

fn report_title(plan: &Plan) -> String {
    match &plan.workload {
        Some(m) => format!(
            "directmq-bench: {}",
            m.workload
                .name
                .clone()
                .unwrap_or_else(|| m.path.display().to_string())
        ),
        None => format!(
            "directmq-bench: {} producer(s), {} channel(s), {} consumer(s), {} B, {}",
            plan.producers,
            plan.channels,
            plan.consumers,
            plan.message_size,
            if plan.rate > 0.0 {
                format!("{} msg/s", plan.rate)
            } else {
                "max rate".to_owned()
            }
        ),
    }
}

fn latency_summary(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} · p99 {:.2} · p99.9 {:.2} · max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

fn summary_rows(plan: &Plan, report: &Report, probe: Option<&Probe>) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let (msgs, mb) = report.rates(report.publish.measured, report.publish_seconds);
    rows.push((
        "publish".to_owned(),
        format!("{} msg/s, {mb:.1} MB/s", thousands(msgs.round() as u64)),
    ));
    rows.push((
        "publish → ack".to_owned(),
        latency_summary(&report.publish_latency),
    ));
    if let Some((stats, seconds)) = &report.consume {
        let (msgs, mb) = report.rates(stats.measured, *seconds);
        rows.push((
            "consume".to_owned(),
            format!("{} msg/s, {mb:.1} MB/s", thousands(msgs.round() as u64)),
        ));
        rows.push((
            "end to end".to_owned(),
            latency_summary(&report.e2e_latency),
        ));
    }
    if let Some(cu) = &report.catch_up {
        let size = report.message_size as f64 / 1e6;
        rows.push((
            "backlog built".to_owned(),
            format!(
                "{} msgs ({:.0} MB) in {:.1} s",
                thousands(cu.backlog_at_drain_start),
                cu.backlog_at_drain_start as f64 * size,
                cu.build_seconds
            ),
        ));
        rows.push((
            "drain rate".to_owned(),
            format!(
                "{} msg/s, {:.1} MB/s over {:.2} s{}",
                thousands(cu.drain_msgs_per_sec().round() as u64),
                cu.drain_msgs_per_sec() * size,
                cu.drain_seconds,
                if cu.drained { "" } else { " (not drained)" }
            ),
        ));
    }
    if let Some(c) = report.broker_cpu_cores {
        rows.push(("broker CPU".to_owned(), format!("{c:.2} cores")));
    }
    if let Some(c) = report.bench_cpu_cores {
        rows.push(("bench CPU".to_owned(), format!("{c:.2} cores")));
    }
    if let Some(m) = report.broker_peak_rss_mb {
        rows.push(("broker peak RSS".to_owned(), format!("{m:.0} MB")));
    }
    if let Some(h) = report.host {
        rows.push((
            "host CPU".to_owned(),
            format!("idle {:.0}%, steal {:.1}%", h.idle_percent, h.steal_percent),
        ));
    }
    if let Some(st) = &report.storage {
        rows.push((
            "broker log".to_owned(),
            format!(
                "{:.0} fsyncs/s, {:.3} MB per fsync",
                st.fsyncs_per_sec, st.mb_per_fsync
            ),
        ));
    }
    if let Some(p) = probe {
        rows.push((
            "probe: disk".to_owned(),
            format!(
                "fdatasync'd 64 KiB {:.0} MB/s, 1 MiB {:.0} MB/s",
                p.disk_64kib_mb_per_sec, p.disk_1mib_mb_per_sec
            ),
        ));
        rows.push((
            "probe: QUIC".to_owned(),
            format!("{:.0} MB/s", p.quic_mb_per_sec),
        ));
        for (what, value, limit) in fractions(p, report) {
            rows.push((
                format!("{what} ÷ {limit}"),
                format!("{:.0}%", value / limit_value(p, limit) * 100.0),
            ));
        }
    }
    let _ = plan;
    rows
}

fn config_rows(plan: &Plan, broker: &str) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    if let Some(m) = &plan.workload {
        rows.push(("workload".to_owned(), m.path.display().to_string()));
    }
    rows.push(("producers".to_owned(), plan.producers.to_string()));
    rows.push(("channels".to_owned(), plan.channels.to_string()));
    rows.push(("consumers".to_owned(), plan.consumers.to_string()));
    rows.push((
        "message size".to_owned(),
        format!("{} B", plan.message_size),
    ));
    rows.push(("payload".to_owned(), plan.payload_what.clone()));
    rows.push((
        "rate".to_owned(),
        if plan.rate > 0.0 {
            format!("{} msg/s", plan.rate)
        } else {
            "as fast as possible".to_owned()
        },
    ));
    rows.push((
        "length".to_owned(),
        match plan.messages {
            Some(n) => format!("{n} messages per producer"),
            None => format!("{} s after a {} s warm-up", plan.duration, plan.warmup),
        },
    ));
    rows.push((
        "batch / in flight".to_owned(),
        format!(
            "≤ {} msgs per batch, ≤ {} msgs unacknowledged per producer",
            plan.producer_options().max_batch_messages,
            plan.in_flight
        ),
    ));
    rows.push(("durability".to_owned(), plan.durability_label()));
    if let Some(b) = &plan.backlog {
        rows.push((
            "catch-up".to_owned(),
            format!(
                "backlog {} GB ({} msgs), drained at ≤ {} msgs",
                b.gb,
                thousands(b.target_msgs),
                thousands(b.empty_msgs)
            ),
        ));
    }
    rows.push(("broker".to_owned(), broker.to_owned()));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_share_splits_idle_and_stolen_time() {
        let a = [100, 0, 50, 1000, 10, 0, 5, 20];
        // +60 user, +20 system, +15 idle, +5 iowait, +0 softirq, +20 steal: 120 ticks.
        let b = [160, 0, 70, 1015, 15, 0, 5, 40];
        let h = host_share(a, b).unwrap();
        assert!(
            (h.idle_percent - 100.0 * 20.0 / 120.0).abs() < 1e-9,
            "{h:?}"
        );
        assert!(
            (h.steal_percent - 100.0 * 20.0 / 120.0).abs() < 1e-9,
            "{h:?}"
        );
        assert_eq!(host_share(a, a), None);
        assert!(host_cpu().is_some(), "this machine has /proc/stat");
    }

    #[test]
    fn a_backlog_of_few_large_messages_is_drained_only_when_read() {
        // 0.5 GB of 64 MiB messages: all 8 must be read.
        assert_eq!(drained_below(8, 0), 0);
        // 1 GB of 1 KiB messages: OMB's floor of 1,000 messages.
        assert_eq!(drained_below(1 << 20, 0), MIN_BACKLOG_MSGS);
        // 50,000 messages: at most 1% (500) may be left.
        assert_eq!(drained_below(50_000, 0), 500);
        // A drain ratio leaving more wins.
        assert_eq!(drained_below(1 << 20, 10_000), 10_000);
    }
}
