//! `directmq`: the broker and its command-line tools (SPEC §4).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use directmq_broker::config::{Config, Overrides};
use directmq_client::{Client, ClientConfig, StartPosition};

#[derive(Parser)]
#[command(
    name = "directmq",
    version,
    about = "DirectMQ: a persistent QUIC message broker for database replication between datacenters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// Data directory (default ./directmq-data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// QUIC address (default 127.0.0.1:7070).
        #[arg(long)]
        listen: Option<String>,
        /// HTTP address for /health and /metrics (default 127.0.0.1:7071).
        #[arg(long)]
        http: Option<String>,
        /// TOML config file (see docs/directmq.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// ACL file (default <data>/acl.toml).
        #[arg(long)]
        acl: Option<PathBuf>,
    },
    /// Publish each line of stdin as one message.
    Publish {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        channel: String,
        /// Stable producer id; its sequence resumes where the broker has it.
        #[arg(long, default_value = "directmq-cli")]
        producer_id: String,
        /// Print one JSON line per ack: {"offset":N,"sequence":N}.
        #[arg(long)]
        json: bool,
    },
    /// Print messages in order, committing as it goes.
    Consume {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        channel: String,
        /// Durable consumer name.
        #[arg(long)]
        consumer: String,
        /// Where a new consumer starts: earliest, latest, an offset, or a time (RFC 3339 or @ms).
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON line per message.
        #[arg(long)]
        json: bool,
        /// If another session holds the consumer, wait as its standby and take over when
        /// it ends, instead of failing.
        #[arg(long)]
        standby: bool,
    },
    /// List channels; with --watch, then report each one created or deleted.
    Channels {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long)]
        json: bool,
        /// Keep running and print every channel created or deleted under the prefix.
        #[arg(long)]
        watch: bool,
    },
    /// Show every channel's consumers and their lag (messages, bytes, seconds, stalled).
    Status {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only this durable consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// One JSON document: {"channels":[{"name","head_offset",...,"consumers":[...]}]}.
        #[arg(long)]
        json: bool,
        /// Refresh in place this often (e.g. 2s) until interrupted.
        #[arg(long, value_parser = parse_duration, num_args = 0..=1, default_missing_value = "2s")]
        watch: Option<Duration>,
    },
    /// Wait until a consumer has committed, on every channel under a prefix, the head each
    /// channel had when the command started (the switchover barrier).
    WaitInSync {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        consumer: String,
        #[arg(long, default_value = "")]
        prefix: String,
        /// Give up after this long, e.g. 30s, 2m, 1h.
        #[arg(long, value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Create or delete a channel.
    Channel {
        #[command(subcommand)]
        action: ChannelAction,
    },
    /// Administer durable consumers.
    Consumer {
        #[command(subcommand)]
        action: ConsumerAction,
    },
    /// Issue certificates (PEM files).
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Issue, renew and revoke tokens (for agents without a client certificate).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Print a signed token for IDENTITY with rights on prefixes (needs admin on each).
    Issue {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        identity: String,
        /// A prefix it may publish under (repeatable).
        #[arg(long)]
        publish: Vec<String>,
        /// A prefix it may consume under (repeatable).
        #[arg(long)]
        consume: Vec<String>,
        /// A prefix it may administer (repeatable).
        #[arg(long)]
        admin: Vec<String>,
        /// Lifetime, e.g. 6h, 30m.
        #[arg(long, value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Print a new token with the same id and rights, valid for TTL from now.
    Renew {
        #[command(flatten)]
        conn: Conn,
        token: String,
        #[arg(long, value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Revoke a token and its renewals, by the token or its id (survives restarts).
    Revoke {
        #[command(flatten)]
        conn: Conn,
        token_or_id: String,
    },
}

#[derive(Subcommand)]
enum ChannelAction {
    Create {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
    Delete {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
}

#[derive(Subcommand)]
enum ConsumerAction {
    /// Move a consumer to earliest, latest, an offset or a time (it must not be connected).
    Reset {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        channel: String,
        #[arg(long)]
        consumer: String,
        /// earliest, latest, an offset, or a time (RFC 3339, e.g. 2026-11-27T10:00:00Z, or @ms).
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Create a CA: ca.pem and ca.key.
    Ca {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "DirectMQ CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue server.pem and server.key for the given host names and addresses.
    Server {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Issue client.pem and client.key for an identity (plus a copy of ca.pem).
    Client {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

#[derive(Args, Clone)]
struct Conn {
    /// Broker address.
    #[arg(long, env = "DIRECTMQ_BROKER", default_value = "127.0.0.1:7070")]
    broker: String,
    /// Folder with ca.pem, client.pem and client.key.
    #[arg(long, env = "DIRECTMQ_CERTS", default_value = "./directmq-data/certs")]
    certs: PathBuf,
    /// Authenticate with this token instead of client.pem (ca.pem still verifies the
    /// broker).
    #[arg(long, env = "DIRECTMQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Conn {
    async fn connect(&self) -> Result<Client> {
        let mut config = match &self.token {
            Some(token) => {
                ClientConfig::with_token(&self.broker, &self.certs.join("ca.pem"), token)?
            }
            None => ClientConfig::from_certs_dir(&self.broker, &self.certs)?,
        };
        config.reconnect_for = Some(Duration::from_secs(60));
        Ok(Client::connect(config).await?)
    }
}

/// jemalloc, not glibc's malloc. With 10,000 channels every message is its own batch,
/// record and index entry, and glibc's malloc and free were a sixth of the broker's CPU
/// samples; with jemalloc's thread caches the broker takes about a fifth more messages a
/// second there (docs/benchmarks.md, "seventh builds"). It keeps what it frees for reuse and
/// gives it back after a delay ([`MALLOC_CONF`]), so multi-MiB blocks (a closed segment's
/// index file, a checkpoint) leave no holes in the heap and a freed read buffer is mostly
/// reused, not faulted in anew: what glibc needed its mmap and trim thresholds pinned for.
/// Building and draining a 1 GB backlog (~1.7 million messages) costs the broker ~50,000
/// page faults in all, at the same CPU as glibc with its thresholds pinned (~10,000 faults
/// in the same run; glibc's defaults had cost ~160,000 per million messages drained).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (the `_RJEM_MALLOC_CONF` environment variable
/// still overrides them). Freed pages go back to the system after about a second instead
/// of jemalloc's default ten: with 10,000 channels the broker's peak resident memory over
/// the benchmark was 145-163 MB instead of 164-201 MB, at the same throughput, and a 1 GB
/// catch-up drained as fast (page faults 18,000-24,000 -> 48,000-50,000, CPU unchanged).
/// jemalloc runs no background thread here: an idle broker gives the pages back when it
/// next allocates or frees.
#[cfg(feature = "jemalloc")]
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
// SAFETY: jemalloc reads this symbol as `const char *malloc_conf` (a weak definition of
// its own that this one replaces): a pointer to a NUL-terminated string that lives forever.
pub static MALLOC_CONF: &[u8; 20] = b"dirty_decay_ms:1000\0";

fn main() {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if serving { "info" } else { "warn" })
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(cli.command)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve {
            data,
            listen,
            http,
            config,
            acl,
        } => {
            serve(
                config,
                Overrides {
                    data,
                    listen,
                    http,
                    acl,
                },
            )
            .await
        }
        Command::Publish {
            conn,
            channel,
            producer_id,
            json,
        } => publish(conn, channel, producer_id, json).await,
        Command::Consume {
            conn,
            channel,
            consumer,
            from,
            count,
            json,
            standby,
        } => {
            let from = parse_position(&from)?;
            consume(conn, channel, consumer, from, count, json, standby).await
        }
        Command::Channels {
            conn,
            prefix,
            json,
            watch: false,
        } => channels(conn, prefix, json).await,
        Command::Channels {
            conn,
            prefix,
            json,
            watch: true,
        } => watch_channels(conn, prefix, json).await,
        Command::Status {
            conn,
            prefix,
            consumer,
            json,
            watch,
        } => {
            let args = StatusArgs {
                prefix,
                consumer,
                json,
                watch,
            };
            status(conn, args).await
        }
        Command::WaitInSync {
            conn,
            consumer,
            prefix,
            timeout,
        } => wait_in_sync(conn, consumer, prefix, timeout).await,
        Command::Channel { action } => match action {
            ChannelAction::Create { conn, name } => {
                conn.connect().await?.create_channel(&name).await?;
                eprintln!("created channel {name}");
                Ok(())
            }
            ChannelAction::Delete { conn, name } => {
                conn.connect().await?.delete_channel(&name).await?;
                eprintln!("deleted channel {name}");
                Ok(())
            }
        },
        Command::Consumer {
            action:
                ConsumerAction::Reset {
                    conn,
                    channel,
                    consumer,
                    to,
                },
        } => {
            conn.connect()
                .await?
                .reset_consumer(&channel, &consumer, parse_position(&to)?)
                .await?;
            eprintln!("consumer {consumer} on {channel} reset to {to}");
            Ok(())
        }
        Command::Certs { action } => certs(action),
        Command::Token { action } => token(action).await,
    }
}

/// Durations as written everywhere on the command line: `500ms`, `30s`, `2m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write it like 30s, 2m or 500ms"))?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{text:?} has no known unit; use ms, s, m or h")),
    };
    Ok(Duration::from_millis(n.saturating_mul(unit_ms)))
}

/// `earliest`, `latest`, an offset, or a time: RFC 3339 (`2026-11-27T10:00:00Z`) or
/// `@` and milliseconds since the Unix epoch.
fn parse_position(text: &str) -> Result<StartPosition> {
    let hint = "use earliest, latest, an offset, an RFC 3339 time such as 2026-11-27T10:00:00Z, or @ and milliseconds since the Unix epoch";
    Ok(match text {
        "earliest" => StartPosition::Earliest,
        "latest" => StartPosition::Latest,
        t if t.starts_with('@') => StartPosition::Timestamp(
            t[1..]
                .parse()
                .with_context(|| format!("{t:?} is not a position; {hint}"))?,
        ),
        t if t.contains('T') => {
            let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("{t:?} is not a position; {hint}"))?;
            let ms = at.unix_timestamp_nanos() / 1_000_000;
            StartPosition::Timestamp(u64::try_from(ms).unwrap_or(0))
        }
        n => StartPosition::Offset(
            n.parse()
                .with_context(|| format!("{n:?} is not a position; {hint}"))?,
        ),
    })
}

async fn serve(config_file: Option<PathBuf>, overrides: Overrides) -> Result<()> {
    let config = Config::load(
        config_file.as_deref(),
        |k| std::env::var(k).ok(),
        &overrides,
    )?;
    let mut running = directmq_broker::start(config.clone()).await?;
    // Handlers first: a supervisor may send SIGTERM as soon as it reads the banner.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    if running.created_dev_certs {
        eprintln!(
            "created a development CA, a server certificate and an `admin` client certificate in {}\n\
             and an ACL granting `admin` everything in {}",
            config.certs_dir().display(),
            config.acl_path().display()
        );
    }
    eprintln!(
        "directmq serving QUIC on {} and HTTP on {} (data in {}); clients use --certs {}",
        running.quic_addr,
        running.http_addr,
        config.data.display(),
        config.certs_dir().display()
    );
    tracing::info!(quic = %running.quic_addr, http = %running.http_addr, data = %config.data.display(), "serving");
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = term.recv() => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading certificates, CA set and ACL");
                let broker = running.broker.clone();
                let report = tokio::task::spawn_blocking(move || broker.reload()).await?;
                if report.is_ok() {
                    eprintln!("reloaded certificates, CA set and ACL");
                }
            }
            () = running.wait() => bail!("the broker stopped unexpectedly"),
        }
    }
    eprintln!("shutting down: finishing in-flight writes and acks");
    running.shutdown().await;
    Ok(())
}

async fn publish(conn: Conn, channel: String, producer_id: String, json: bool) -> Result<()> {
    let client = conn.connect().await?;
    let producer = client.producer(&channel, &producer_id).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<
        Result<directmq_client::PendingAck, directmq_client::Error>,
    >(65_536);
    // Acks are printed in order while stdin is still being read.
    let printer = tokio::spawn(async move {
        let mut out = std::io::stdout();
        let mut count = 0u64;
        while let Some(ack) = rx.recv().await {
            let receipt = match ack {
                Ok(pending) => pending.await,
                Err(e) => Err(e),
            };
            let receipt: directmq_client::Receipt = receipt?;
            count += 1;
            if json {
                let offset = receipt
                    .offset
                    .map_or(serde_json::Value::Null, serde_json::Value::from);
                let line = serde_json::json!({"offset": offset, "sequence": receipt.sequence});
                writeln!(out, "{line}")?;
            }
        }
        out.flush()?;
        Ok::<u64, anyhow::Error>(count)
    });
    // Lines are published as they arrive (so `tail -f ... | directmq publish` works), in
    // order: sequences are assigned at enqueue and survive reconnects.
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<String>>(1024);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if lines_tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let pending = producer.enqueue(line?).await;
        if tx.send(pending).await.is_err() {
            break;
        }
    }
    drop(tx);
    let count = printer.await??;
    drop(producer);
    client.close().await;
    if !json {
        eprintln!("published {count} messages to {channel}");
    }
    Ok(())
}

async fn consume(
    conn: Conn,
    channel: String,
    name: String,
    from: StartPosition,
    count: Option<u64>,
    json: bool,
    standby: bool,
) -> Result<()> {
    let client = conn.connect().await?;
    let mut consumer = if standby {
        eprintln!("subscribing as {name} on {channel}; if another session holds it, waiting as its standby");
        client.standby_consumer(&channel, &name, from).await?
    } else {
        client.consumer(&channel, &name, from).await?
    };
    let mut seen = 0u64;
    let mut last = None;
    let mut out = std::io::stdout();
    while count.is_none_or(|c| seen < c) {
        let message = tokio::select! {
            m = consumer.next() => m,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(message) = message else { break };
        let message = message?;
        if json {
            let mut line = serde_json::json!({
                "channel": &*message.channel,
                "offset": message.offset,
                "timestamp_ms": message.timestamp_ms,
            });
            match std::str::from_utf8(&message.payload) {
                Ok(text) => line["payload"] = text.into(),
                Err(_) => {
                    line["payload"] = base64::engine::general_purpose::STANDARD
                        .encode(&message.payload)
                        .into();
                    line["encoding"] = "base64".into();
                }
            }
            writeln!(out, "{line}")?;
        } else {
            out.write_all(&message.payload)?;
            out.write_all(b"\n")?;
        }
        seen += 1;
        last = Some(message.offset);
        consumer.commit_nowait(message.offset + 1);
    }
    out.flush()?;
    if let Some(offset) = last {
        consumer.commit(offset + 1).await?;
    }
    drop(consumer);
    client.close().await;
    Ok(())
}

async fn channels(conn: Conn, prefix: String, json: bool) -> Result<()> {
    let list = conn.connect().await?.list_channels(&prefix).await?;
    if json {
        for c in list {
            println!(
                "{}",
                serde_json::json!({"name": c.name, "head": c.head, "first": c.first, "bytes": c.bytes, "created_ms": c.created_ms})
            );
        }
    } else {
        println!(
            "{:<40} {:>12} {:>12} {:>14}",
            "CHANNEL", "HEAD", "FIRST", "BYTES"
        );
        for c in list {
            println!(
                "{:<40} {:>12} {:>12} {:>14}",
                c.name, c.head, c.first, c.bytes
            );
        }
    }
    Ok(())
}

async fn watch_channels(conn: Conn, prefix: String, json: bool) -> Result<()> {
    use directmq_client::ChannelChange;
    use std::io::Write;
    let client = conn.connect().await?;
    let mut watcher = client.watch(&prefix).await?;
    loop {
        let change = tokio::select! {
            change = watcher.next() => change,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(change) = change else {
            return Ok(());
        };
        let (event, name) = match change? {
            ChannelChange::Created(name) => ("created", name),
            ChannelChange::Deleted(name) => ("deleted", name),
        };
        if json {
            println!("{}", serde_json::json!({"event": event, "channel": name}));
        } else {
            println!("{event} {name}");
        }
        std::io::stdout().flush()?;
    }
}

#[derive(Clone)]
struct StatusArgs {
    prefix: String,
    consumer: Option<String>,
    json: bool,
    watch: Option<Duration>,
}

async fn status(conn: Conn, args: StatusArgs) -> Result<()> {
    let client = conn.connect().await?;
    loop {
        let mut list = client.status(&args.prefix).await?;
        if let Some(name) = &args.consumer {
            for s in &mut list {
                s.consumers.retain(|c| &c.name == name);
            }
            list.retain(|s| !s.consumers.is_empty());
        }
        let text = if args.json {
            status_json(&list).to_string()
        } else {
            status_table(&list)
        };
        match args.watch {
            None => {
                println!("{text}");
                return Ok(());
            }
            Some(every) => {
                if args.json {
                    println!("{text}");
                } else {
                    // Clear the screen and start at the top: refresh in place.
                    print!("\x1b[2J\x1b[H{text}\n(every {every:?}; Ctrl-C to stop)\n");
                }
                use std::io::Write;
                std::io::stdout().flush()?;
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
    }
}

fn status_json(list: &[directmq_client::ChannelStatus]) -> serde_json::Value {
    let channels: Vec<_> = list
        .iter()
        .map(|s| {
            let consumers: Vec<_> = s
                .consumers
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "name": c.name,
                        "next_offset": c.committed,
                        "lag_messages": c.lag_messages,
                        "lag_bytes": c.lag_bytes,
                        "lag_seconds": c.lag_ms as f64 / 1000.0,
                        "stalled": c.stalled,
                        "active": c.active,
                    })
                })
                .collect();
            serde_json::json!({
                "name": s.channel.name,
                "head_offset": s.channel.head,
                "first_offset": s.channel.first,
                "bytes": s.channel.bytes,
                "created_ms": s.channel.created_ms,
                "last_append_ms": s.last_append_ms,
                "consumers": consumers,
            })
        })
        .collect();
    serde_json::json!({ "channels": channels })
}

/// Channels grouped by prefix (the name up to its last `/`), each group and each channel
/// in it worst lag first, then one line of totals per consumer.
fn status_table(list: &[directmq_client::ChannelStatus]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let worst = |s: &directmq_client::ChannelStatus| {
        s.consumers
            .iter()
            .map(|c| c.lag_messages)
            .max()
            .unwrap_or(0)
    };
    let mut groups: BTreeMap<&str, Vec<&directmq_client::ChannelStatus>> = BTreeMap::new();
    for s in list {
        let name = s.channel.name.as_str();
        let group = name.rfind('/').map_or("", |i| &name[..=i]);
        groups.entry(group).or_default().push(s);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    for (_, channels) in &mut groups {
        channels.sort_by(|a, b| {
            worst(b)
                .cmp(&worst(a))
                .then(a.channel.name.cmp(&b.channel.name))
        });
    }
    groups.sort_by(|a, b| {
        let wa = a.1.first().map_or(0, |s| worst(s));
        let wb = b.1.first().map_or(0, |s| worst(s));
        wb.cmp(&wa).then(a.0.cmp(b.0))
    });
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:<16} {:>10} {:>10} {:>10} {:>12} {:>8}  STATE",
        "CHANNEL", "CONSUMER", "HEAD", "NEXT", "LAG MSGS", "LAG BYTES", "LAG S"
    );
    // consumer -> (channels, lag messages, lag bytes, max lag seconds, stalled)
    let mut totals: BTreeMap<&str, (u64, u64, u64, f64, u64)> = BTreeMap::new();
    for (group, channels) in &groups {
        let _ = writeln!(
            out,
            "{}",
            if group.is_empty() {
                "(no prefix)"
            } else {
                group
            }
        );
        for s in channels {
            let name = &s.channel.name;
            if s.consumers.is_empty() {
                let _ = writeln!(out, "  {name:<38} {:<16} {:>10}", "-", s.channel.head);
            }
            let mut consumers: Vec<_> = s.consumers.iter().collect();
            consumers.sort_by_key(|c| std::cmp::Reverse(c.lag_messages));
            for c in consumers {
                let lag_s = c.lag_ms as f64 / 1000.0;
                let state = match (c.stalled, c.active) {
                    (true, _) => "STALLED",
                    (false, true) => "active",
                    (false, false) => "idle",
                };
                let _ = writeln!(
                    out,
                    "  {name:<38} {:<16} {:>10} {:>10} {:>10} {:>12} {:>8.1}  {state}",
                    c.name, s.channel.head, c.committed, c.lag_messages, c.lag_bytes, lag_s
                );
                let t = totals.entry(&c.name).or_default();
                t.0 += 1;
                t.1 += c.lag_messages;
                t.2 += c.lag_bytes;
                t.3 = t.3.max(lag_s);
                t.4 += u64::from(c.stalled);
            }
        }
    }
    if !totals.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<16} {:>9} {:>12} {:>14} {:>10} {:>8}",
            "CONSUMER", "CHANNELS", "LAG MSGS", "LAG BYTES", "MAX LAG S", "STALLED"
        );
        for (name, (channels, msgs, bytes, secs, stalled)) in totals {
            let _ = writeln!(
                out,
                "{name:<16} {channels:>9} {msgs:>12} {bytes:>14} {secs:>10.1} {stalled:>8}"
            );
        }
    }
    out.trim_end().to_owned()
}

async fn wait_in_sync(
    conn: Conn,
    consumer: String,
    prefix: String,
    timeout: Duration,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    let client = conn.connect().await?;
    // The barrier: every head that exists now.
    let targets: Vec<(String, u64)> = client
        .status(&prefix)
        .await?
        .into_iter()
        .map(|s| (s.channel.name, s.channel.head))
        .collect();
    eprintln!(
        "waiting for consumer {consumer} to commit the current head of {} channel(s) under {prefix:?}",
        targets.len()
    );
    let mut last_report = tokio::time::Instant::now();
    loop {
        let now: std::collections::HashMap<String, u64> = client
            .status(&prefix)
            .await?
            .into_iter()
            .map(|s| {
                let committed = s
                    .consumers
                    .iter()
                    .find(|c| c.name == consumer)
                    .map_or(0, |c| c.committed);
                (s.channel.name, committed)
            })
            .collect();
        let behind: Vec<(&str, u64)> = targets
            .iter()
            // A channel deleted meanwhile has nothing left to replicate.
            .filter_map(|(name, head)| {
                now.get(name)
                    .map(|c| (name.as_str(), head.saturating_sub(*c)))
            })
            .filter(|(_, lag)| *lag > 0)
            .collect();
        let remaining: u64 = behind.iter().map(|(_, lag)| lag).sum();
        if behind.is_empty() {
            eprintln!(
                "consumer {consumer} is in sync on {} channel(s)",
                targets.len()
            );
            client.close().await;
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let worst = behind
                .iter()
                .max_by_key(|(_, lag)| *lag)
                .map_or("", |(n, _)| n);
            bail!(
                "timed out after {timeout:?}: consumer {consumer} is still {remaining} messages behind on {} channel(s) (most on {worst})",
                behind.len()
            );
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!("{remaining} messages to go on {} channel(s)", behind.len());
            last_report = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn token(action: TokenAction) -> Result<()> {
    let show = |t: directmq_client::TokenIssued| {
        println!("{}", t.token);
        let expires =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.expires_ms) * 1_000_000)
                .ok()
                .and_then(|d| {
                    d.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| format!("{} ms since the epoch", t.expires_ms));
        eprintln!("token id {} expires {expires}", t.id);
    };
    match action {
        TokenAction::Issue {
            conn,
            identity,
            publish,
            consume,
            admin,
            ttl,
        } => {
            let client = conn.connect().await?;
            show(
                client
                    .issue_token(&identity, publish, consume, admin, ttl)
                    .await?,
            );
            client.close().await;
        }
        TokenAction::Renew { conn, token, ttl } => {
            let client = conn.connect().await?;
            show(client.renew_token(&token, ttl).await?);
            client.close().await;
        }
        TokenAction::Revoke { conn, token_or_id } => {
            let client = conn.connect().await?;
            client.revoke_token(&token_or_id).await?;
            eprintln!("revoked");
            client.close().await;
        }
    }
    Ok(())
}

fn certs(action: CertsAction) -> Result<()> {
    use directmq_broker::tls;
    match action {
        CertsAction::Ca { out, name, days } => {
            if out.join("ca.pem").exists() {
                bail!(
                    "{} already holds a ca.pem; choose another --out",
                    out.display()
                );
            }
            tls::create_ca(&out, &name, days)?;
            eprintln!("wrote {0}/ca.pem and {0}/ca.key", out.display());
        }
        CertsAction::Server {
            ca_dir,
            names,
            out,
            days,
        } => {
            tls::issue_server(&ca_dir, &out, &names, days)?;
            eprintln!("wrote {0}/server.pem and {0}/server.key", out.display());
        }
        CertsAction::Client {
            ca_dir,
            name,
            out,
            days,
        } => {
            directmq_protocol::validate_identifier(&name)
                .map_err(|e| anyhow::anyhow!("invalid identity {name:?}: {e}"))?;
            tls::issue_client(&ca_dir, &out, &name, days)?;
            eprintln!(
                "wrote {0}/client.pem, {0}/client.key and {0}/ca.pem",
                out.display()
            );
        }
    }
    Ok(())
}
