//! Issue 6: what the operator sees. Lag in messages, bytes and seconds with the stalled
//! flag (through the client and `directmq status --json`), every documented metric present
//! and moving under load, discovery by watching a prefix, channel overrides, a bad config
//! refused at start, JSON logs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use directmq_client::{ChannelChange, Client, ConsumerStatus, StartPosition};
use directmq_protocol::ErrorCode;
use directmq_tests::{client, test_config, ChildBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::directmq_bin;

async fn consumer_status(c: &Client, channel: &str, consumer: &str) -> Result<ConsumerStatus> {
    let status = c.status(channel).await?;
    status
        .into_iter()
        .find(|s| s.channel.name == channel)
        .and_then(|s| s.consumers.into_iter().find(|x| x.name == consumer))
        .with_context(|| format!("no consumer {consumer} on {channel}"))
}

/// `directmq status --json` against the broker at `addr`, parsed.
async fn status_json(addr: SocketAddr, data: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let mut command = Command::new(directmq_bin());
    command
        .arg("status")
        .arg("--json")
        .args(args)
        .arg("--broker")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(data.join("certs"));
    let out = tokio::task::spawn_blocking(move || command.output()).await??;
    ensure!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_exact_lag_in_messages_bytes_and_seconds_and_flags_a_stalled_consumer(
) -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let config = directmq_broker::Config {
        // A consumer with lag counts as stalled as soon as its commit is 1 ms old.
        stalled_after_ms: 1,
        ..test_config(dir.path())
    };
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;
    let c = client(addr, dir.path()).await?;
    let producer = c.producer("ops/a", "p").await?;
    for i in 0..10u8 {
        producer.send(vec![i; 100]).await?;
    }
    let mut consumer = c.consumer("ops/a", "dc-b", StartPosition::Earliest).await?;
    for want in 0..4 {
        ensure!(consumer.next().await.context("closed")??.offset == want);
    }
    consumer.commit(4).await?;
    drop(consumer);

    // Exact lag: six messages of 100 bytes; the age of message 4.
    let first = consumer_status(&c, "ops/a", "dc-b").await?;
    ensure!(
        first.committed == 4 && first.lag_messages == 6 && first.lag_bytes == 600,
        "{first:?}"
    );
    // The seconds-lag grows while the consumer is stopped.
    let mut polls = 0;
    let later = loop {
        let now = consumer_status(&c, "ops/a", "dc-b").await?;
        if now.lag_ms > first.lag_ms && now.stalled {
            break now;
        }
        polls += 1;
        ensure!(polls < 500, "lag stayed at {now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    ensure!(later.lag_messages == 6, "{later:?}");

    // The command line reports the same, in the documented shape.
    let json = status_json(addr, dir.path(), &["--prefix", "ops/"]).await?;
    let channel = &json["channels"][0];
    ensure!(
        channel["name"] == "ops/a"
            && channel["head_offset"] == 10
            && channel["first_offset"] == 0
            && channel["bytes"] == 1000,
        "{json}"
    );
    let dc_b = &channel["consumers"][0];
    ensure!(
        dc_b["name"] == "dc-b"
            && dc_b["next_offset"] == 4
            && dc_b["lag_messages"] == 6
            && dc_b["lag_bytes"] == 600
            && dc_b["stalled"] == true
            && dc_b["lag_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{json}"
    );
    // --consumer filters: another name leaves nothing.
    let json = status_json(addr, dir.path(), &["--consumer", "dc-x"]).await?;
    ensure!(
        json["channels"].as_array().is_some_and(|a| a.is_empty()),
        "{json}"
    );

    // Catching up brings every lag to 0 and clears the flag.
    let mut consumer = c.consumer("ops/a", "dc-b", StartPosition::Earliest).await?;
    for want in 4..10 {
        ensure!(consumer.next().await.context("closed")??.offset == want);
    }
    consumer.commit(10).await?;
    let caught_up = consumer_status(&c, "ops/a", "dc-b").await?;
    ensure!(
        caught_up.lag_messages == 0
            && caught_up.lag_bytes == 0
            && caught_up.lag_ms == 0
            && !caught_up.stalled,
        "{caught_up:?}"
    );
    drop(consumer);
    c.close().await;
    running.shutdown().await;

    // With the default threshold (60 s), a consumer that lags but just committed is not
    // stalled.
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let producer = c.producer("ops/b", "p").await?;
    for i in 0..3u8 {
        producer.send(vec![i; 10]).await?;
    }
    c.reset_consumer("ops/b", "dc-b", StartPosition::Offset(1))
        .await?;
    let s = consumer_status(&c, "ops/b", "dc-b").await?;
    ensure!(s.lag_messages == 2 && !s.stalled, "{s:?}");
    c.close().await;
    running.shutdown().await;
    Ok(())
}

/// One `GET /metrics`, as name (with labels) → value.
pub(crate) async fn scrape(http: SocketAddr) -> Result<HashMap<String, f64>> {
    let mut stream = tokio::net::TcpStream::connect(http).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    ensure!(body.starts_with("HTTP/1.1 200"), "{body}");
    let mut out = HashMap::new();
    for line in body.lines().filter(|l| l.starts_with("directmq_")) {
        let (name, value) = line.rsplit_once(' ').context("metric line")?;
        out.insert(name.to_owned(), value.parse()?);
    }
    Ok(out)
}

/// The metric names documented in docs/metrics.md (first column, labels stripped).
fn documented_metrics() -> Result<Vec<String>> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"))?;
    let names: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|n| n.split('{').next().unwrap_or(n).to_owned())
        .collect();
    ensure!(names.len() >= 20, "too few documented metrics: {names:?}");
    Ok(names)
}

/// Sum of every series of `name` (all label sets; for a histogram, its `_count`).
fn total(m: &HashMap<String, f64>, name: &str) -> Option<f64> {
    let series: Vec<f64> = m
        .iter()
        .filter(|(k, _)| {
            let base = k.split('{').next().unwrap_or(k);
            base == name || base == format!("{name}_count")
        })
        .map(|(_, v)| *v)
        .collect();
    (!series.is_empty()).then(|| series.iter().sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported_and_moves_under_load() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let config = directmq_broker::Config {
        segment_bytes: 1024 * 1024,
        retention_interval_ms: 50,
        ..test_config(dir.path())
    };
    let running = directmq_broker::start(config).await?;
    let before = scrape(running.http_addr).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let mut watcher = c.watch("metrics/").await?;

    // Load: 4 MiB over two channels, a lagging consumer, a refused publish.
    for channel in ["metrics/a", "metrics/b"] {
        let producer = c.producer(channel, "p").await?;
        let mut acks = Vec::new();
        for i in 0..64u64 {
            acks.push(
                producer
                    .enqueue(directmq_tests::payload(1, 1, i, 32 * 1024))
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
    }
    // A producer that restarts and re-sends its first message: a duplicate, not stored.
    let again = c.producer("metrics/a", "p").await?;
    let first = again.last_sequence().context("sequences were appended")? - 63;
    let dup = again
        .enqueue_with(
            first,
            Vec::new(),
            directmq_tests::payload(1, 1, 0, 32 * 1024),
        )
        .await?
        .await?;
    ensure!(dup.duplicate && dup.offset == Some(0), "{dup:?}");
    let mut consumer = c
        .consumer("metrics/a", "dc-b", StartPosition::Earliest)
        .await?;
    for want in 0..64 {
        ensure!(consumer.next().await.context("closed")??.offset == want);
    }
    consumer.commit(64).await?;
    c.reset_consumer("metrics/b", "dc-b", StartPosition::Offset(10))
        .await?;
    let err = c
        .producer("metrics/bad name", "p")
        .await
        .expect_err("invalid name");
    ensure!(err.code() == Some(ErrorCode::INVALID_CHANNEL_NAME), "{err}");
    // A malformed frame: a stream whose header declares an unknown kind.
    let raw = crate::bad_input::raw_connection(running.quic_addr, dir.path()).await?;
    let (_w, _r, reply) =
        crate::bad_input::hello(&raw, directmq_protocol::PROTOCOL_VERSION).await?;
    ensure!(matches!(reply, Some(directmq_protocol::Frame::HelloOk(_))));
    let bad = [0, 0, 0, 0, 0xEE, 0, 0, 0, 0];
    let e = crate::bad_input::error_for(&raw, &bad).await?;
    ensure!(e.code == ErrorCode::UNKNOWN_FRAME_KIND, "{e:?}");
    raw.close(0u32.into(), b"done");
    ensure!(matches!(
        watcher.next().await.context("watch ended")??,
        ChannelChange::Created(_)
    ));
    // dc-b lags by 54 on metrics/b now.
    let lagging = scrape(running.http_addr).await?;
    ensure!(
        lagging.get("directmq_consumer_lag_messages_sum{consumer=\"dc-b\"}") == Some(&54.0),
        "{:?}",
        lagging
            .iter()
            .filter(|(k, _)| k.contains("lag"))
            .collect::<Vec<_>>()
    );
    // Retention deletes whole segments below every channel's floor; metrics/b's consumer
    // holds its messages back, so deleting that channel frees the first segments.
    c.delete_channel("metrics/b").await?;
    let mut polls = 0;
    let after = loop {
        let after = scrape(running.http_addr).await?;
        let deleted = total(&after, "directmq_storage_segments_deleted_total").unwrap_or(0.0);
        if deleted > total(&before, "directmq_storage_segments_deleted_total").unwrap_or(0.0) {
            break after;
        }
        polls += 1;
        ensure!(polls < 500, "retention deleted no segment");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Present: every documented metric. Those that count only disk faults (corrupt
    // records, torn tails, write errors) or drop-oldest drops (moved in retention.rs) are
    // checked for presence only: this test causes none of those.
    let fault_only = [
        "directmq_storage_corrupt_records_total",
        "directmq_storage_torn_tail_bytes_total",
        "directmq_storage_write_errors_total",
        "directmq_dropped_messages_total",
    ];
    for name in documented_metrics()? {
        ensure!(
            total(&after, &name).is_some(),
            "{name} is documented but not exported"
        );
        // Gauges that may legitimately read the same before and after, or be 0 here.
        let level = [
            "directmq_connections",
            "directmq_watchers",
            "directmq_consumer_standbys",
            "directmq_storage_segments",
            "directmq_consumers_stalled",
            "directmq_consumer_lag_seconds_max",
        ];
        if fault_only.contains(&name.as_str()) || level.contains(&name.as_str()) {
            continue;
        }
        let was = total(&before, &name).unwrap_or(0.0);
        // Lag rose while dc-b lagged and fell back once its channel was deleted.
        let now = total(&after, &name)
            .unwrap_or(0.0)
            .max(total(&lagging, &name).unwrap_or(0.0));
        ensure!(now > was, "{name} did not move: {was} -> {now}");
    }
    // The level gauges read what is true now.
    ensure!(total(&after, "directmq_connections").unwrap_or(0.0) >= 1.0);
    ensure!(total(&after, "directmq_watchers").unwrap_or(0.0) >= 1.0);
    ensure!(
        after.get("directmq_refused_total{op=\"publish\",code=\"INVALID_CHANNEL_NAME\"}")
            >= Some(&1.0),
        "{:?}",
        after
            .keys()
            .filter(|k| k.contains("refused"))
            .collect::<Vec<_>>()
    );
    drop(consumer);
    drop(watcher);
    c.close().await;
    running.shutdown().await;
    Ok(())
}

async fn next(w: &mut directmq_client::Watcher, within: Duration) -> Result<ChannelChange> {
    match tokio::time::timeout(within, w.next()).await {
        Ok(Some(change)) => Ok(change?),
        Ok(None) => bail!("the watch ended"),
        Err(_) => bail!("no change within {within:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_a_channel_created_by_a_publish_and_its_deletion() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    c.create_channel("dc-a/s0").await?;
    c.create_channel("dc-b/s0").await?;
    let mut watcher = c.watch("dc-a/").await?;
    let within = Duration::from_secs(10);
    // First what exists under the prefix, and only that.
    ensure!(next(&mut watcher, within).await? == ChannelChange::Created("dc-a/s0".into()));

    let producer = c.producer("dc-a/s1", "p").await?;
    producer.send("first").await?;
    ensure!(next(&mut watcher, within).await? == ChannelChange::Created("dc-a/s1".into()));
    // Outside the prefix: not reported. Inside: reported, in order.
    c.create_channel("dc-b/s1").await?;
    c.delete_channel("dc-a/s1").await?;
    ensure!(next(&mut watcher, within).await? == ChannelChange::Deleted("dc-a/s1".into()));

    // The CLI shows it live: existing channels first, then changes.
    let mut child = tokio::process::Command::new(directmq_bin())
        .args(["channels", "--watch", "--json", "--prefix", "dc-a/"])
        .arg("--broker")
        .arg(running.quic_addr.to_string())
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::time::timeout(within, lines.read_line(&mut line)).await??;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(
        v["event"] == "created" && v["channel"] == "dc-a/s0",
        "{line}"
    );
    c.create_channel("dc-a/s2").await?;
    line.clear();
    tokio::time::timeout(within, lines.read_line(&mut line)).await??;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(
        v["event"] == "created" && v["channel"] == "dc-a/s2",
        "{line}"
    );
    child.kill().await?;

    // A prefix that cannot start a channel name is refused with a clear error.
    let err = c.watch("dc-a//").await.expect_err("invalid prefix");
    ensure!(err.code() == Some(ErrorCode::INVALID_CHANNEL_NAME), "{err}");
    drop(watcher);
    c.close().await;
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_reports_what_changed_while_the_broker_was_restarting() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let mut broker = ChildBroker::start(&directmq_bin(), dir.path(), None)?;
    let c = client(broker.quic, dir.path()).await?;
    c.create_channel("w/a").await?;
    c.create_channel("w/b").await?;
    let mut watcher = c.watch("w/").await?;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(watcher.next().await.context("ended")??);
    }
    ensure!(
        seen == [
            ChannelChange::Created("w/a".into()),
            ChannelChange::Created("w/b".into())
        ],
        "{seen:?}"
    );
    // While the watcher is disconnected, one channel goes and one comes.
    ensure!(broker.terminate()?, "graceful stop");
    let mut broker = ChildBroker::start(&directmq_bin(), dir.path(), Some(broker.quic))?;
    let admin = client(broker.quic, dir.path()).await?;
    admin.delete_channel("w/a").await?;
    admin.create_channel("w/c").await?;
    let mut changes = Vec::new();
    for _ in 0..2 {
        let change = tokio::time::timeout(Duration::from_secs(30), watcher.next())
            .await
            .context("no change after the restart")?
            .context("ended")??;
        changes.push(change);
    }
    changes.sort_by_key(|c| format!("{c:?}"));
    // Reported once each, whether seen live or found by comparing after the reconnect.
    ensure!(
        changes
            == [
                ChannelChange::Created("w/c".into()),
                ChannelChange::Deleted("w/a".into())
            ],
        "{changes:?}"
    );
    drop(watcher);
    c.close().await;
    admin.close().await;
    ensure!(broker.terminate()?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_overrides_apply_by_the_longest_prefix() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let config = directmq_broker::Config {
        channels: vec![
            directmq_broker::config::ChannelOverride {
                prefix: "small/".into(),
                durability: Some(directmq_broker::config::DurabilityMode::Interval),
                max_message_bytes: Some(1000),
                max_age_ms: None,
                max_bytes: None,
                on_full: None,
            },
            directmq_broker::config::ChannelOverride {
                prefix: "small/big/".into(),
                durability: None,
                max_message_bytes: Some(5000),
                max_age_ms: None,
                max_bytes: None,
                on_full: None,
            },
        ],
        ..test_config(dir.path())
    };
    let running = directmq_broker::start(config).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let small = c.producer("small/x", "p").await?;
    small.send(vec![0u8; 1000]).await?;
    let err = small.send(vec![0u8; 1001]).await.expect_err("over 1000");
    ensure!(err.code() == Some(ErrorCode::MESSAGE_TOO_LARGE), "{err}");
    ensure!(err.to_string().contains("1000"), "{err}");
    let big = c.producer("small/big/x", "p").await?;
    big.send(vec![0u8; 5000]).await?;
    // Elsewhere the broker-wide limit (64 MiB) holds.
    let other = c.producer("other", "p").await?;
    other.send(vec![0u8; 100_000]).await?;
    // The interval-durability channel's messages are readable like any other.
    let mut consumer = c.consumer("small/x", "r", StartPosition::Earliest).await?;
    ensure!(consumer.next().await.context("closed")??.payload.len() == 1000);
    drop(consumer);
    c.close().await;
    running.shutdown().await;
    Ok(())
}

#[test]
fn a_bad_config_names_the_key_and_the_broker_does_not_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("listn = \"127.0.0.1:0\"\n", "listn"),
        ("listen = \"not-an-address\"\n", "listen"),
        ("max_message_bytes = -5\n", "max_message_bytes"),
        ("segment_bytes = 10\n", "segment_bytes"),
        (
            "[[channel]]\nprefix = \"a/\"\nmax_message_bytes = 0\n",
            "channel.max_message_bytes",
        ),
    ];
    for (text, key) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text)?;
        let out = Command::new(directmq_bin())
            .arg("serve")
            .arg("--config")
            .arg(&file)
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "started with {text:?}");
        ensure!(stderr.contains(key), "{text:?}: {stderr}");
        ensure!(
            stderr.trim().lines().count() <= 3,
            "not one clear error: {stderr}"
        );
        // Refused before anything was created.
        ensure!(!dir.path().join("data").exists(), "{text:?}");
    }
    Ok(())
}

#[test]
fn log_format_json_writes_one_json_object_per_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = ChildBroker::start_with(
        &directmq_bin(),
        dir.path(),
        &["--log-format", "json"],
        &[],
        &[("RUST_LOG", "info")],
    )?;
    ensure!(broker.terminate()?, "graceful stop");
    let lines = broker.log_lines();
    let json: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    ensure!(
        json.iter().any(|v| v["fields"]["message"] == "serving"
            && v["level"] == "INFO"
            && v["fields"]["quic"].is_string()),
        "{lines:?}"
    );
    // Every tracing line is JSON; only the human banner lines are not.
    for line in &lines {
        ensure!(
            serde_json::from_str::<serde_json::Value>(line).is_ok()
                || line.starts_with("directmq serving")
                || line.starts_with("created a development")
                || line.starts_with("and an ACL")
                || line.starts_with("shutting down"),
            "not JSON: {line}"
        );
    }
    Ok(())
}
