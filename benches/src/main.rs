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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use directmq_client::{Client, ClientConfig, Consumer, PendingAck, Producer, StartPosition};
use directmq_protocol::ErrorCode;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

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

#[derive(Parser, Debug, Clone)]
#[command(
    name = "directmq-bench",
    version,
    about = "Load benchmark for DirectMQ: publish and consume throughput, ack and end-to-end latency percentiles"
)]
struct Args {
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
    /// Seconds of measured publishing after the warm-up [default: 10].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of publishing at the start that are not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Target publish rate in messages per second across all producers (0: as fast as
    /// possible). Latency is then measured from each message's scheduled send time.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Most unacknowledged messages per producer (also capped at 256 MiB of payload).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
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
    /// With --messages: fail if publishing takes longer than this many seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
}

impl Args {
    fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: f64, zero_ok: bool| -> Result<()> {
            if !v.is_finite() || v < 0.0 || (!zero_ok && v == 0.0) {
                bail!("--{name} must be a positive number of seconds, not {v}");
            }
            Ok(())
        };
        positive("duration", self.duration(), false)?;
        positive("warmup", self.warmup, true)?;
        positive("timeout", self.timeout, false)?;
        if !self.rate.is_finite() || self.rate < 0.0 {
            bail!("--rate must be 0 (as fast as possible) or a positive number of messages per second");
        }
        Ok(())
    }

    fn duration(&self) -> f64 {
        self.duration.unwrap_or(10.0)
    }

    /// Most unacknowledged messages per producer.
    fn in_flight(&self) -> usize {
        let by_bytes = (MAX_IN_FLIGHT_BYTES / u64::from(self.message_size)).max(1);
        (u64::from(self.in_flight).min(by_bytes)) as usize
    }

    fn config_json(&self, broker: &str) -> Value {
        json!({
            "producers": self.producers,
            "channels": self.channels,
            "consumers": self.consumers,
            "message_size": self.message_size,
            "messages": self.messages,
            "duration_s": if self.messages.is_some() { Value::Null } else { json!(self.duration()) },
            "warmup_s": self.warmup,
            "rate": self.rate,
            "in_flight": self.in_flight(),
            "idle_commit": !self.no_idle_commit,
            "broker": broker,
            "durability": if self.broker.is_some() { "as configured on the broker" } else { "fsync (broker default)" },
        })
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = real_main(&args) {
        eprintln!("directmq-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(args: &Args) -> Result<()> {
    args.validate()?;
    // Dropped (killed) on every way out of this function, errors included.
    let local = match &args.broker {
        Some(_) => None,
        None => Some(LocalBroker::start(args.broker_bin.as_deref())?),
    };
    let target = match (&local, &args.broker, &args.certs) {
        (Some(b), _, _) => Target {
            addr: b.quic_addr.to_string(),
            certs: b.certs.clone(),
        },
        (None, Some(addr), Some(certs)) => Target {
            addr: addr.clone(),
            certs: certs.clone(),
        },
        _ => unreachable!("clap requires --certs with --broker"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let broker_pid = local.as_ref().map(|b| b.child.id());
    let metrics_addr = local.as_ref().map(|b| b.http_addr).or(args.broker_http);
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(args, &target, broker_pid, metrics_addr) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
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
    let broker_label = if local.is_some() {
        format!("local child {}", target.addr)
    } else {
        target.addr.clone()
    };
    print_summary(args, &report, &broker_label);
    if let Some(path) = &args.json {
        let mut value = report.to_json();
        value["config"] = args.config_json(&broker_label);
        let text = serde_json::to_string_pretty(&value).expect("JSON values serialize");
        std::fs::write(path, text + "\n")
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    Ok(())
}

/// Where the clients connect.
struct Target {
    addr: String,
    certs: PathBuf,
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
    _dir: tempfile::TempDir,
}

impl LocalBroker {
    fn start(bin: Option<&Path>) -> Result<LocalBroker> {
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
        let child = Command::new(&bin)
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
            _dir: dir,
        };
        broker.wait_healthy(http_addr)?;
        eprintln!(
            "directmq-bench: started {} serving QUIC on {quic_addr} (data in {})",
            bin.display(),
            data.display()
        );
        Ok(broker)
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
    deadline: Instant,
    /// Per producer, with --rate.
    interval_s: Option<f64>,
    in_flight: usize,
    idle_commit: bool,
    counters: Counters,
    /// Acknowledged messages per channel, warm-up included: what consumers must receive.
    channel_acked: Vec<AtomicU64>,
    failed: AtomicBool,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// What the publishing side measured.
struct PublishStats {
    /// publish→ack latency of measured messages, µs.
    latency: Histogram<u64>,
    /// With --rate: how late each message left after its scheduled time, µs.
    schedule_lag: Histogram<u64>,
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
            latency: histogram(),
            schedule_lag: histogram(),
            measured: 0,
            acked: 0,
            duplicates: 0,
            errors: 0,
            first_error: None,
            last_measured_ack: None,
        }
    }

    fn merge(&mut self, other: PublishStats) {
        self.latency.add(&other.latency).expect("same bounds");
        self.schedule_lag
            .add(&other.schedule_lag)
            .expect("same bounds");
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
struct ConsumeStats {
    /// publish→delivery latency of measured messages, µs.
    latency: Histogram<u64>,
    measured: u64,
    received: u64,
    last_measured: Option<Instant>,
}

impl ConsumeStats {
    fn new() -> ConsumeStats {
        ConsumeStats {
            latency: histogram(),
            measured: 0,
            received: 0,
            last_measured: None,
        }
    }

    fn merge(&mut self, other: ConsumeStats) {
        self.latency.add(&other.latency).expect("same bounds");
        self.measured += other.measured;
        self.received += other.received;
        self.last_measured = self.last_measured.max(other.last_measured);
    }
}

/// Everything the run measured.
struct Report {
    message_size: u64,
    publish: PublishStats,
    publish_seconds: f64,
    consume: Option<(ConsumeStats, f64)>,
    broker_cpu_cores: Option<f64>,
    bench_cpu_cores: Option<f64>,
    broker_peak_rss_mb: Option<f64>,
    /// The broker's log writer while publishing (when its /metrics was reachable).
    storage: Option<StorageReport>,
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
    // A dead broker fails the run instead of being retried forever.
    config.reconnect_for = Some(Duration::from_secs(10));
    Client::connect(config)
        .await
        .with_context(|| format!("could not connect to the broker at {}", target.addr))
}

async fn run(
    args: &Args,
    target: &Target,
    broker_pid: Option<u32>,
    metrics_addr: Option<SocketAddr>,
) -> Result<Report> {
    let producers = args.producers as usize;
    let channels = args.channels as usize;
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
    let mut producer_sets = Vec::new();
    for p in 0..producers {
        let client = connect(target, &format!("p{p}")).await?;
        let mut opening = JoinSet::new();
        for ch in channels_of(p, producers, channels) {
            let client = client.clone();
            let names = names.clone();
            opening.spawn(async move {
                let producer = client.producer(&names[ch], &format!("p{p}")).await;
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
        producer_sets.push((client, handles));
    }
    let mut consumer_sessions = Vec::new();
    for c in 0..args.consumers as usize {
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

    let clock = Clock::new(Duration::from_secs_f64(args.warmup));
    let ctx = Arc::new(Ctx {
        clock,
        message_size: args.message_size as usize,
        messages: args.messages,
        send_end: args
            .messages
            .is_none()
            .then(|| clock.warmup_end + Duration::from_secs_f64(args.duration())),
        deadline: clock.start + Duration::from_secs_f64(args.warmup.max(0.0) + args.timeout),
        interval_s: (args.rate > 0.0).then(|| producers as f64 / args.rate),
        in_flight: args.in_flight(),
        idle_commit: !args.no_idle_commit,
        counters: Counters::default(),
        channel_acked: (0..channels).map(|_| AtomicU64::new(0)).collect(),
        failed: AtomicBool::new(false),
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
    let cpu_start = (broker_cpu(), cpu_seconds("self"), Instant::now());

    let progress = tokio::spawn(progress(ctx.clone(), args.consumers > 0));

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
    let mut publishing = JoinSet::new();
    for (p, (client, handles)) in producer_sets.into_iter().enumerate() {
        publishing.spawn(produce(p, client, handles, ctx.clone()));
    }

    let mut publish = PublishStats::new();
    let mut consume_stats = ConsumeStats::new();
    // Until every producer is done; a failing consumer stops the run at once.
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
        }
    };
    if let Some(e) = failure {
        ctx.failed.store(true, Ordering::Relaxed);
        publishing.abort_all();
        consumers.abort_all();
        progress.abort();
        return Err(e);
    }
    let cpu_end = (broker_cpu(), cpu_seconds("self"), Instant::now());
    let storage_end = scrape().await;
    if publish.errors > 0 {
        consumers.abort_all();
        progress.abort();
        bail!(
            "{} of {} publishes failed; the first error: {}",
            publish.errors,
            publish.errors + publish.acked,
            publish.first_error.as_deref().unwrap_or("unknown")
        );
    }
    if publish.duplicates > 0 {
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
            consumers.abort_all();
            progress.abort();
            bail!(
                "the broker acknowledged {acked} messages on {} but holds only {head}: {} acknowledged messages are missing",
                names[ch],
                acked - head
            );
        }
        tx.send_replace(Some(acked));
    }
    while let Some(joined) = consumers.join_next().await {
        match joined.context("a consumer task panicked")? {
            Ok(stats) => consume_stats.merge(stats),
            Err(e) => {
                consumers.abort_all();
                progress.abort();
                return Err(e);
            }
        }
    }
    progress.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), control.close()).await;

    if publish.measured == 0 {
        bail!(
            "no message was measured: the run ended within the {} s warm-up; raise --messages or lower --warmup",
            args.warmup
        );
    }
    let publish_seconds = publish
        .last_measured_ack
        .map_or(0.0, |t| {
            t.saturating_duration_since(clock.warmup_end).as_secs_f64()
        })
        .max(1e-6);
    let consume = (args.consumers > 0).then(|| {
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
    Ok(Report {
        message_size: u64::from(args.message_size),
        publish,
        publish_seconds,
        consume,
        broker_cpu_cores: cores(cpu_start.0, cpu_end.0),
        bench_cpu_cores: cores(cpu_start.1, cpu_end.1),
        broker_peak_rss_mb: None,
        storage: storage_start
            .zip(storage_end)
            .map(|(a, b)| StorageReport::between(a, b, wall)),
    })
}

/// A message waiting for its ack.
struct Pending {
    /// When it was sent (scheduled send time with --rate).
    sent: Instant,
    ack: PendingAck,
    permit: OwnedSemaphorePermit,
}

/// Payloads carved out of large shared buffers: one allocation per MiB, not per message.
struct Payloads {
    template: Vec<u8>,
    buf: BytesMut,
}

impl Payloads {
    fn new(size: usize, seed: u64) -> Payloads {
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
        Payloads {
            template,
            buf: BytesMut::new(),
        }
    }

    /// A payload whose first 8 bytes are `send_us` (little endian).
    fn next(&mut self, send_us: u64) -> Bytes {
        let size = self.template.len();
        if self.buf.capacity() < size {
            self.buf.reserve(size.max(1024 * 1024));
        }
        self.buf.extend_from_slice(&self.template);
        self.buf[..8].copy_from_slice(&send_us.to_le_bytes());
        self.buf.split().freeze()
    }
}

async fn produce(
    p: usize,
    client: Client,
    handles: Vec<(usize, Producer)>,
    ctx: Arc<Ctx>,
) -> Result<PublishStats> {
    let permits = Arc::new(Semaphore::new(ctx.in_flight));
    let mut senders = Vec::new();
    let mut collectors = Vec::new();
    for (ch, _) in &handles {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        collectors.push(tokio::spawn(collect_acks(rx, *ch, ctx.clone())));
    }
    let mut stats = PublishStats::new();
    let mut payloads = Payloads::new(ctx.message_size, p as u64 + 1);
    let limit = ctx.messages.unwrap_or(u64::MAX);
    let mut i = 0u64;
    while i < limit {
        let now = Instant::now();
        let scheduled = match ctx.interval_s {
            Some(interval) => ctx.clock.start + Duration::from_secs_f64(interval * i as f64),
            None => now,
        };
        if ctx.send_end.is_some_and(|end| scheduled >= end) {
            break;
        }
        if now >= ctx.deadline {
            bail!("producer p{p} had published {i} of {limit} messages when --timeout ran out");
        }
        if ctx.failed.load(Ordering::Relaxed) {
            break;
        }
        if scheduled > now {
            tokio::time::sleep_until(scheduled.into()).await;
        }
        let permit = match tokio::time::timeout(STALL_LIMIT, permits.clone().acquire_owned()).await
        {
            Ok(permit) => permit.expect("the semaphore is never closed"),
            Err(_) => bail!(
                "producer p{p}: no message was acknowledged for {} s; is the broker alive?",
                STALL_LIMIT.as_secs()
            ),
        };
        let now = Instant::now();
        let sent = if ctx.interval_s.is_some() {
            scheduled
        } else {
            now
        };
        let k = (i % handles.len() as u64) as usize;
        let (ch, producer) = &handles[k];
        let ack = producer
            .enqueue(payloads.next(ctx.clock.epoch_us(sent)))
            .await
            .with_context(|| format!("producer p{p} could not publish to channel #{ch}"))?;
        if ctx.interval_s.is_some() && sent >= ctx.clock.warmup_end {
            stats
                .schedule_lag
                .saturating_record(micros(now.saturating_duration_since(scheduled)));
        }
        if senders[k].send(Pending { sent, ack, permit }).is_err() {
            bail!("producer p{p}: the ack collector stopped");
        }
        ctx.counters.sent.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    drop(senders);
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
    ch: usize,
    ctx: Arc<Ctx>,
) -> PublishStats {
    let mut stats = PublishStats::new();
    while let Some(Pending { sent, ack, permit }) = pending.recv().await {
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
                if sent >= ctx.clock.warmup_end {
                    stats.measured += 1;
                    stats
                        .latency
                        .saturating_record(micros(now.saturating_duration_since(sent)));
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
                    ctx.counters.consumed.fetch_add(1, Ordering::Relaxed);
                    let mut stamp = [0u8; 8];
                    if m.payload.len() >= 8 {
                        stamp.copy_from_slice(&m.payload[..8]);
                    }
                    let sent_us = u64::from_le_bytes(stamp);
                    if sent_us >= warmup_end_us {
                        stats.measured += 1;
                        stats
                            .latency
                            .saturating_record(ctx.clock.epoch_us(now).saturating_sub(sent_us));
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

/// Prints one line a second to stderr until aborted (and at most for a day).
async fn progress(ctx: Arc<Ctx>, consumers: bool) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0u64, 0u64, 0u64);
    let mb = ctx.message_size as f64 / 1e6;
    for _ in 0..86_400 {
        tick.tick().await;
        let c = &ctx.counters;
        let now = (
            c.sent.load(Ordering::Relaxed),
            c.acked.load(Ordering::Relaxed),
            c.consumed.load(Ordering::Relaxed),
        );
        let elapsed = ctx.clock.start.elapsed().as_secs_f64();
        let phase = if Instant::now() < ctx.clock.warmup_end {
            " (warm-up)"
        } else {
            ""
        };
        let acked = now.1 - last.1;
        let mut line = format!(
            "[{elapsed:6.1}s] sent {:>9}/s  acked {:>9}/s ({:7.1} MB/s)  in flight {:>7}",
            thousands(now.0 - last.0),
            thousands(acked),
            acked as f64 * mb,
            thousands(now.0.saturating_sub(now.1)),
        );
        if consumers {
            line += &format!("  consumed {:>9}/s", thousands(now.2 - last.2));
        }
        eprintln!("{line}{phase}");
        last = now;
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
                "latency_ms": latency_json(&self.publish.latency),
            },
            "end_to_end": { "latency_ms": Value::Null },
            "consume": { "msgs_per_sec": Value::Null, "mb_per_sec": Value::Null },
            "broker": {
                "peak_rss_mb": self.broker_peak_rss_mb,
                "cpu_cores": self.broker_cpu_cores,
            },
            "bench_cpu_cores": self.bench_cpu_cores,
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
        if !self.publish.schedule_lag.is_empty() {
            value["publish"]["schedule_lag_ms"] = latency_json(&self.publish.schedule_lag);
        }
        if let Some((stats, seconds)) = &self.consume {
            let (msgs, mb) = self.rates(stats.measured, *seconds);
            value["end_to_end"]["latency_ms"] = latency_json(&stats.latency);
            value["consume"] = json!({
                "msgs_per_sec": msgs,
                "mb_per_sec": mb,
                "messages": stats.measured,
                "seconds": seconds,
            });
        }
        value
    }
}

fn print_summary(args: &Args, report: &Report, broker: &str) {
    let length = match args.messages {
        Some(n) => format!("{n} messages per producer"),
        None => format!("{} s", args.duration()),
    };
    let rate = if args.rate > 0.0 {
        format!("{} msg/s target", args.rate)
    } else {
        "max rate".to_owned()
    };
    println!(
        "directmq-bench: {} producer(s), {} channel(s), {} consumer(s), {} B messages, {rate}, {length} after a {} s warm-up; broker {broker}",
        args.producers, args.channels, args.consumers, args.message_size, args.warmup
    );
    let (msgs, mb) = report.rates(report.publish.measured, report.publish_seconds);
    println!(
        "publish      {:>12} msg/s  {:9.1} MB/s  ({} messages in {:.2} s)",
        thousands(msgs.round() as u64),
        mb,
        thousands(report.publish.measured),
        report.publish_seconds
    );
    println!("ack latency  ms: {}", latency_line(&report.publish.latency));
    if !report.publish.schedule_lag.is_empty() {
        println!(
            "send lag     ms: {}  (how late sends left their schedule)",
            latency_line(&report.publish.schedule_lag)
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
        println!("end-to-end   ms: {}", latency_line(&stats.latency));
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
    if !machine.is_empty() {
        println!("machine      {}", machine.join(", "));
    }
    if let Some(st) = &report.storage {
        println!(
            "broker log   {:.0} fsyncs/s, {:.3} MB per fsync (mean {:.2} ms), {:.1} appends per group, {:.1} MB/s written",
            st.fsyncs_per_sec, st.mb_per_fsync, st.fsync_ms_mean, st.appends_per_group, st.mb_written_per_sec
        );
    }
}
