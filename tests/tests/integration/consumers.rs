//! Scenario 3 of issue 2: resuming after a commit; one session per consumer.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use directmq_client::StartPosition;
use directmq_protocol::ErrorCode;
use directmq_tests::{client, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_right_after_its_commit_and_a_second_session_is_refused() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let addr = running.quic_addr;
    let producer_client = client(addr, dir.path()).await?;
    let producer = producer_client.producer("t", "p").await?;
    for i in 0..10 {
        producer.send(format!("m{i}")).await?;
    }

    let first = client(addr, dir.path()).await?;
    let mut session = first.consumer("t", "dc-b", StartPosition::Earliest).await?;
    for want in 0..4 {
        let m = session.next().await.context("closed")??;
        ensure!(m.offset == want && m.payload == format!("m{want}").as_bytes());
    }
    session.commit(4).await?;
    // Lag is exact: six messages of two bytes each, and the session is active.
    let status = producer_client.status("t").await?;
    let dc_b = &status[0].consumers[0];
    ensure!(
        dc_b.name == "dc-b" && dc_b.committed == 4 && dc_b.active,
        "{dc_b:?}"
    );
    ensure!(dc_b.lag_messages == 6 && dc_b.lag_bytes == 12, "{dc_b:?}");

    // While the first session is connected, a second one is refused with a clear error.
    let second = client(addr, dir.path()).await?;
    let err = second
        .consumer("t", "dc-b", StartPosition::Earliest)
        .await
        .expect_err("a second session must be refused");
    ensure!(err.code() == Some(ErrorCode::CONSUMER_BUSY), "{err}");
    ensure!(
        err.to_string().contains("already has an active session"),
        "{err}"
    );
    // Another consumer name is independent.
    let mut other = second
        .consumer("t", "dc-c", StartPosition::Earliest)
        .await?;
    ensure!(other.next().await.context("closed")??.offset == 0);

    // The first session disconnects; the next one resumes right after the commit.
    drop(session);
    first.close().await;
    let mut attempts = 0;
    let mut resumed = loop {
        // The broker releases the lease when it sees the connection close; an agent
        // retries like a standby until then.
        match second.consumer("t", "dc-b", StartPosition::Earliest).await {
            Ok(c) => break c,
            Err(e) if e.code() == Some(ErrorCode::CONSUMER_BUSY) && attempts < 200 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    ensure!(resumed.start_offset() == 4);
    let m = resumed.next().await.context("closed")??;
    ensure!(
        m.offset == 4 && m.payload == "m4".as_bytes(),
        "resumed at {}",
        m.offset
    );

    // A commit beyond the head is refused; the session goes on.
    let err = resumed.commit(99).await.expect_err("beyond the head");
    ensure!(err.code() == Some(ErrorCode::OFFSET_OUT_OF_RANGE), "{err}");
    let m = resumed.next().await.context("closed")??;
    ensure!(m.offset == 5);
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_channel_ends_its_sessions_and_a_new_one_starts_at_zero() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let producer = c.producer("dc-a/s9", "p").await?;
    producer.send("one").await?;
    let mut consumer = c
        .consumer("dc-a/s9", "dc-b", StartPosition::Earliest)
        .await?;
    ensure!(consumer.next().await.context("closed")??.offset == 0);

    c.delete_channel("dc-a/s9").await?;
    // The waiting consumer session is told, not left hanging.
    let err = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .context("the consumer was not told of the deletion")?
        .context("closed without an error")?
        .expect_err("the channel is gone");
    ensure!(err.code() == Some(ErrorCode::CHANNEL_NOT_FOUND), "{err}");
    // The producer's stream refuses further messages.
    let err = producer.send("two").await.expect_err("deleted");
    ensure!(err.code() == Some(ErrorCode::CHANNEL_NOT_FOUND), "{err}");
    ensure!(c.list_channels("dc-a/").await?.is_empty());
    let err = c.delete_channel("dc-a/s9").await.expect_err("already gone");
    ensure!(err.code() == Some(ErrorCode::CHANNEL_NOT_FOUND), "{err}");

    // A channel of the same name is a new channel.
    let again = c.producer("dc-a/s9", "p").await?;
    ensure!(again.last_sequence().is_none());
    ensure!(again.send("fresh").await?.offset == Some(0));
    let mut consumer = c
        .consumer("dc-a/s9", "dc-b", StartPosition::Earliest)
        .await?;
    let m = consumer.next().await.context("closed")??;
    ensure!(m.offset == 0 && m.payload == "fresh".as_bytes());
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resets_to_a_time_through_the_api_and_the_command_line() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let producer = c.producer("times", "p").await?;
    for i in 0..3 {
        producer.send(format!("old{i}")).await?;
    }
    // Read the broker's time of the last old message, then let the clock pass it.
    let mut reader = c
        .consumer("times", "probe", StartPosition::Earliest)
        .await?;
    let mut old_time = 0;
    for _ in 0..3 {
        old_time = reader.next().await.context("closed")??.timestamp_ms;
    }
    drop(reader);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    while now_ms() <= old_time {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for i in 0..2 {
        producer.send(format!("new{i}")).await?;
    }

    // A new consumer subscribing from a time starts at the first message at or after it.
    let mut from_time = c
        .consumer("times", "dc-b", StartPosition::Timestamp(old_time + 1))
        .await?;
    let m = from_time.next().await.context("closed")??;
    ensure!(m.offset == 3 && m.payload == "new0".as_bytes(), "{m:?}");
    drop(from_time);

    // The command line: `consumer reset --to @ms` and an RFC 3339 time.
    let run = |to: String| {
        let out = std::process::Command::new(crate::directmq_bin())
            .args([
                "consumer",
                "reset",
                "--channel",
                "times",
                "--consumer",
                "dc-c",
            ])
            .arg("--to")
            .arg(to)
            .arg("--broker")
            .arg(running.quic_addr.to_string())
            .arg("--certs")
            .arg(dir.path().join("certs"))
            .output();
        async move {
            let out = out?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    run(format!("@{old_time}")).await?;
    let s = c.status("times").await?;
    let dc_c = s[0]
        .consumers
        .iter()
        .find(|x| x.name == "dc-c")
        .context("dc-c")?;
    // Every old message shares a millisecond or precedes it: the first at that time.
    ensure!(dc_c.committed <= 2 && dc_c.lag_messages >= 3, "{dc_c:?}");
    run("2000-01-01T00:00:00Z".into()).await?;
    let s = c.status("times").await?;
    let dc_c = s[0]
        .consumers
        .iter()
        .find(|x| x.name == "dc-c")
        .context("dc-c")?;
    ensure!(dc_c.committed == 0, "{dc_c:?}");
    run("2999-01-01T00:00:00Z".into()).await?;
    let s = c.status("times").await?;
    let dc_c = s[0]
        .consumers
        .iter()
        .find(|x| x.name == "dc-c")
        .context("dc-c")?;
    ensure!(dc_c.committed == 5 && dc_c.lag_messages == 0, "{dc_c:?}");
    let err = run("yesterday".into()).await.expect_err("not a time");
    ensure!(err.to_string().contains("RFC 3339"), "{err}");
    c.close().await;
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_consumer_process_is_killed() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let config = directmq_broker::Config {
        // A killed process sends nothing more: the broker learns it is gone when the
        // connection has been silent this long.
        idle_timeout_ms: 2_000,
        ..test_config(dir.path())
    };
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;
    let c = client(addr, dir.path()).await?;
    let producer = c.producer("ha/a", "p").await?;
    for i in 0..100 {
        producer.send(format!("m{i}")).await?;
    }

    // The active consumer: `directmq consume` in its own process, committing as it goes.
    let mut active = tokio::process::Command::new(crate::directmq_bin())
        .args([
            "consume",
            "--channel",
            "ha/a",
            "--consumer",
            "dc-b",
            "--json",
        ])
        .arg("--broker")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(active.stdout.take().context("stdout")?).lines();
    let mut last_printed = 0;
    while last_printed < 49 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the active consumer printed nothing")??
            .context("the active consumer ended")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        last_printed = v["offset"].as_u64().context("offset")?;
    }

    // The standby waits while the active session lives...
    let standby_client = client(addr, dir.path()).await?;
    let standby = tokio::spawn({
        let standby_client = standby_client.clone();
        async move {
            standby_client
                .standby_consumer("ha/a", "dc-b", StartPosition::Earliest)
                .await
        }
    });
    // ...which the broker shows as active, with a standby waiting.
    let status = c.status("ha/a").await?;
    ensure!(status[0].consumers[0].active, "{status:?}");
    ensure!(
        !standby.is_finished(),
        "the standby took over from a live session"
    );

    // Kill -9 the active consumer's process; it may have printed more before dying.
    active.start_kill()?;
    active.wait().await?;
    while let Ok(Some(line)) = lines.next_line().await {
        let v: serde_json::Value = serde_json::from_str(&line)?;
        last_printed = v["offset"].as_u64().context("offset")?;
    }
    let killed = tokio::time::Instant::now();
    // Bound: the 2 s idle timeout plus the handshake of nothing new: 15 s is generous.
    let mut standby = tokio::time::timeout(Duration::from_secs(15), standby)
        .await
        .context("the standby did not take over within 15 s of the kill")???;
    let took = killed.elapsed();
    eprintln!("standby took over {took:?} after the kill");
    // No message skipped: it starts at or before the first one the dead process did not
    // print (at-least-once: what was printed but not committed comes again).
    let first = standby.start_offset();
    ensure!(
        first <= last_printed + 1,
        "skipped from {last_printed} to {first}"
    );
    for want in first..100 {
        let m = standby.next().await.context("closed")??;
        ensure!(
            m.offset == want && m.payload == format!("m{want}").as_bytes(),
            "{m:?}"
        );
    }
    standby.commit(100).await?;
    let status = c.status("ha/a").await?;
    ensure!(
        status[0].consumers[0].committed == 100 && status[0].consumers[0].active,
        "{status:?}"
    );
    drop(standby);
    standby_client.close().await;
    c.close().await;
    running.shutdown().await;
    Ok(())
}

/// A batch larger than the consumer's credit goes out over several frames: each frame at
/// most the credit, every message once and in order, including the rest of a batch the
/// broker carried between frames instead of reading it again; a channel deleted while some
/// of a batch is carried ends the session without delivering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_credit_is_delivered_in_steps_exactly_once() -> Result<()> {
    use anyhow::bail;
    use bytes::Bytes;
    use directmq_client::{FrameReader, FrameWriter};
    use directmq_protocol::{self as proto, Frame};

    use crate::bad_input::{hello, raw_connection};

    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let conn = raw_connection(running.quic_addr, dir.path()).await?;
    let (_control_w, _control_r, reply) = hello(&conn, proto::PROTOCOL_VERSION).await?;
    ensure!(matches!(reply, Some(Frame::HelloOk(_))), "{reply:?}");
    // Two batches of 40 messages each, one frame apiece.
    publish_raw(&conn, "steps", &[0..40, 40..80]).await?;
    let subscribe = |consumer: &str, credit: u32| {
        Frame::Subscribe(proto::Subscribe {
            channel: "steps".into(),
            consumer: consumer.into(),
            start: StartPosition::Earliest,
            credit_messages: credit,
            credit_bytes: 1 << 20,
            standby: false,
        })
    };
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv, 1 << 30));
    w.write(&subscribe("stepper", 7)).await?;
    ensure!(
        matches!(next_within(&mut r).await?, Some(Frame::Subscribed(_))),
        "subscribed"
    );
    let mut delivered: Vec<(u64, Bytes)> = Vec::new();
    while delivered.len() < 80 {
        match next_within(&mut r).await? {
            Some(Frame::Deliver(d)) => {
                ensure!(
                    !d.messages.is_empty() && d.messages.len() <= 7,
                    "a frame of {} messages with a credit of 7",
                    d.messages.len()
                );
                let n = d.messages.len() as u32;
                delivered.extend(d.messages.into_iter().map(|m| (m.offset, m.payload)));
                w.write(&Frame::Credit(proto::Credit {
                    messages: n,
                    bytes: 1 << 20,
                }))
                .await?;
            }
            other => bail!("expected Deliver, got {other:?}"),
        }
    }
    let expected: Vec<(u64, Bytes)> = (0..80u64)
        .map(|i| (i, Bytes::from(format!("m{i}"))))
        .collect();
    ensure!(delivered == expected, "{delivered:?}");

    // A second consumer takes 7 of the first batch's 40; the rest is carried. The channel is
    // deleted, then credit comes: nothing more is delivered, the session ends.
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv, 1 << 30));
    w.write(&subscribe("deleted", 7)).await?;
    ensure!(
        matches!(next_within(&mut r).await?, Some(Frame::Subscribed(_))),
        "subscribed"
    );
    match next_within(&mut r).await? {
        Some(Frame::Deliver(d)) => ensure!(d.messages.len() == 7, "{}", d.messages.len()),
        other => bail!("expected Deliver, got {other:?}"),
    }
    c.delete_channel("steps").await?;
    // Sent after the deletion is durable: whatever the session does next sees it.
    let _ = w
        .write(&Frame::Credit(proto::Credit {
            messages: 7,
            bytes: 1 << 20,
        }))
        .await;
    match next_within(&mut r).await? {
        Some(Frame::Error(e)) => ensure!(e.code == ErrorCode::CHANNEL_NOT_FOUND, "{e:?}"),
        Some(Frame::Deliver(d)) => {
            bail!(
                "{} messages of a deleted channel were delivered",
                d.messages.len()
            )
        }
        other => bail!("expected CHANNEL_NOT_FOUND, got {other:?}"),
    }
    c.close().await;
    running.shutdown().await;
    Ok(())
}

/// The next frame on `reader`, failing after 30 s instead of waiting forever.
/// Publishes one `PublishBatch` per range on a new stream to `channel` (created), message
/// `i` with sequence `i` and payload `m{i}`, each acknowledged whole before the next.
async fn publish_raw(
    conn: &quinn::Connection,
    channel: &str,
    batches: &[std::ops::Range<u64>],
) -> Result<()> {
    use directmq_client::{FrameReader, FrameWriter};
    use directmq_protocol::{self as proto, Frame};

    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv, 1 << 30));
    w.write(&Frame::OpenPublish(proto::OpenPublish {
        channel: channel.into(),
        producer_id: "p".into(),
        create: true,
    }))
    .await?;
    ensure!(
        matches!(next_within(&mut r).await?, Some(Frame::PublishOpened(_))),
        "opened"
    );
    for (batch_id, range) in batches.iter().enumerate() {
        w.write(&Frame::PublishBatch(proto::PublishBatch {
            batch_id: batch_id as u64,
            messages: range
                .clone()
                .map(|i| proto::PublishMessage {
                    sequence: i,
                    headers: vec![],
                    payload: bytes::Bytes::from(format!("m{i}")),
                })
                .collect(),
        }))
        .await?;
        match next_within(&mut r).await? {
            Some(Frame::PublishAck(a)) => {
                ensure!(u64::from(a.appended) == range.end - range.start, "{a:?}")
            }
            other => anyhow::bail!("expected PublishAck, got {other:?}"),
        }
    }
    Ok(())
}

/// A consumer far behind, with credit for all of it, gets frames read one ahead of those
/// sent while most of a batch is still carried (batches of 1,500 against frames of at most
/// 1,024): every offset exactly once, in order, in the raw frames (the client library
/// would hide a redelivered offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_read_ahead_delivers_every_offset_once_and_in_order() -> Result<()> {
    use anyhow::bail;
    use bytes::Bytes;
    use directmq_client::{FrameReader, FrameWriter};
    use directmq_protocol::{self as proto, Frame};

    use crate::bad_input::{hello, raw_connection};

    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let conn = raw_connection(running.quic_addr, dir.path()).await?;
    let (_control_w, _control_r, reply) = hello(&conn, proto::PROTOCOL_VERSION).await?;
    ensure!(matches!(reply, Some(Frame::HelloOk(_))), "{reply:?}");
    publish_raw(&conn, "behind", &[0..1500, 1500..3000, 3000..4500]).await?;
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv, 1 << 30));
    w.write(&Frame::Subscribe(proto::Subscribe {
        channel: "behind".into(),
        consumer: "dc-b".into(),
        start: StartPosition::Earliest,
        credit_messages: 10_000,
        credit_bytes: 1 << 30,
        standby: false,
    }))
    .await?;
    ensure!(
        matches!(next_within(&mut r).await?, Some(Frame::Subscribed(_))),
        "subscribed"
    );
    let mut delivered: Vec<(u64, Bytes)> = Vec::new();
    while delivered.len() < 4500 {
        match next_within(&mut r).await? {
            Some(Frame::Deliver(d)) => {
                delivered.extend(d.messages.into_iter().map(|m| (m.offset, m.payload)))
            }
            other => bail!("expected Deliver, got {other:?}"),
        }
    }
    let expected: Vec<(u64, Bytes)> = (0..4500u64)
        .map(|i| (i, Bytes::from(format!("m{i}"))))
        .collect();
    if let Some(i) = (0..expected.len()).find(|&i| delivered.get(i) != expected.get(i)) {
        bail!(
            "delivery {i} was {:?}, expected {:?}",
            delivered.get(i),
            expected[i]
        );
    }
    ensure!(delivered.len() == 4500, "{} delivered", delivered.len());
    running.shutdown().await;
    Ok(())
}

async fn next_within(
    reader: &mut directmq_client::FrameReader,
) -> Result<Option<directmq_protocol::Frame>> {
    tokio::time::timeout(Duration::from_secs(30), reader.next())
        .await
        .context("no frame within 30 s")?
        .map_err(Into::into)
}
