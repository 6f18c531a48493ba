//! Issue 4, retention with no silent loss: bounds refuse publishes with STORAGE_FULL (the
//! client backs off, or surfaces it when told to), and the disk budget holds while ten
//! times as much flows through, the space really given back to the filesystem.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use directmq_broker::config::ChannelOverride;
use directmq_client::{ProducerOptions, StartPosition};
use directmq_protocol::ErrorCode;
use directmq_tests::{client, test_config};

/// Bytes of the segment files, as the filesystem reports them.
fn log_bytes(data: &Path) -> u64 {
    std::fs::read_dir(data.join("log"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_use_stays_under_max_disk_bytes_while_ten_times_as_much_flows_through() -> Result<()> {
    const BUDGET: u64 = 8 * 1024 * 1024;
    const MESSAGE: usize = 64 * 1024;
    const MESSAGES: u64 = 10 * BUDGET / MESSAGE as u64;
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_owned();
    let config = directmq_broker::Config {
        segment_bytes: 1024 * 1024,
        max_disk_bytes: BUDGET,
        retention_interval_ms: 20,
        ..test_config(&data)
    };
    let running = directmq_broker::start(config).await?;
    let c = client(running.quic_addr, &data).await?;
    c.create_channel("budget/a").await?;
    // The consumer exists first, so retention waits for it.
    c.reset_consumer("budget/a", "dc-b", StartPosition::Earliest)
        .await?;

    // Sample what the filesystem holds while everything flows.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = std::thread::spawn({
        let (done, peak, data) = (done.clone(), peak.clone(), data.clone());
        move || {
            while !done.load(Ordering::Acquire) {
                peak.fetch_max(log_bytes(&data), Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    let consumer = tokio::spawn({
        let c = c.clone();
        async move {
            let mut consumer = c
                .consumer("budget/a", "dc-b", StartPosition::Earliest)
                .await?;
            for want in 0..MESSAGES {
                let m = consumer.next().await.context("closed")??;
                ensure!(m.offset == want && m.payload.len() == MESSAGE, "{m:?}");
                ensure!(m.payload[0] == (want % 251) as u8, "payload of {want}");
                consumer.commit_nowait(m.offset + 1);
            }
            consumer.commit(MESSAGES).await?;
            Ok::<_, anyhow::Error>(())
        }
    });
    let producer = c.producer("budget/a", "p").await?;
    let mut acks = Vec::new();
    for i in 0..MESSAGES {
        acks.push(producer.enqueue(vec![(i % 251) as u8; MESSAGE]).await?);
        if acks.len() >= 32 {
            acks.remove(0).await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    tokio::time::timeout(Duration::from_secs(120), consumer)
        .await
        .context("the consumer did not finish")???;
    done.store(true, Ordering::Release);
    sampler.join().expect("sampler");
    let peak = peak.load(Ordering::Acquire);
    eprintln!(
        "{} MiB through a {} MiB budget; the log peaked at {:.1} MiB on disk",
        MESSAGES * MESSAGE as u64 / (1 << 20),
        BUDGET >> 20,
        peak as f64 / f64::from(1 << 20)
    );
    ensure!(
        peak <= BUDGET,
        "the log reached {peak} bytes, over {BUDGET}"
    );
    ensure!(peak > 0, "the sampler saw nothing");
    c.close().await;
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_over_its_bounds_refuses_publishes_until_its_consumer_catches_up() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let config = directmq_broker::Config {
        retention_interval_ms: 20,
        channels: vec![
            ChannelOverride {
                prefix: "bytes/".into(),
                durability: None,
                max_message_bytes: None,
                max_age_ms: None,
                max_bytes: Some(100_000),
                on_full: None,
            },
            ChannelOverride {
                prefix: "age/".into(),
                durability: None,
                max_message_bytes: None,
                max_age_ms: Some(200),
                max_bytes: None,
                on_full: None,
            },
        ],
        ..test_config(dir.path())
    };
    let running = directmq_broker::start(config).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let surfacing = ProducerOptions {
        storage_full_timeout: Some(Duration::from_millis(500)),
        ..ProducerOptions::default()
    };

    // max_bytes: 120 KB not yet consumed by dc-b is over 100 KB.
    c.create_channel("bytes/a").await?;
    c.reset_consumer("bytes/a", "dc-b", StartPosition::Earliest)
        .await?;
    let producer = c.producer_with("bytes/a", "p", surfacing.clone()).await?;
    producer.send(vec![1u8; 60_000]).await?;
    producer.send(vec![2u8; 60_000]).await?;
    let err = refused_within(&producer, Duration::from_secs(10)).await?;
    ensure!(err.to_string().contains("max_bytes"), "{err}");
    // Other channels are not affected.
    c.producer("other", "p").await?.send("fine").await?;
    // A multi-channel stream is refused for the full channel too, and not for the others.
    let multi = c.multi_producer("m", surfacing.clone()).await?;
    multi.send("other", "fine").await?;
    let err = multi
        .send("bytes/a", vec![3u8; 1000])
        .await
        .err()
        .context("a multi-channel frame was stored in a channel over its max_bytes")?;
    ensure!(err.code() == Some(ErrorCode::STORAGE_FULL), "{err}");
    ensure!(err.to_string().contains("max_bytes"), "{err}");
    multi.send("other", "still fine").await?;
    // The consumer catches up: publishing works again, nothing was lost.
    let read = catch_up(&c, "bytes/a").await?;
    ensure!(read >= 2, "only {read} messages were there to read");
    accepted_within(&producer, Duration::from_secs(10)).await?;

    // max_age_ms: a message waiting 200 ms for dc-b blocks the channel.
    c.create_channel("age/a").await?;
    c.reset_consumer("age/a", "dc-b", StartPosition::Earliest)
        .await?;
    let producer = c.producer_with("age/a", "p", surfacing).await?;
    producer.send("old").await?;
    let err = refused_within(&producer, Duration::from_secs(10)).await?;
    ensure!(err.to_string().contains("max_age_ms"), "{err}");
    catch_up(&c, "age/a").await?;
    accepted_within(&producer, Duration::from_secs(10)).await?;
    c.close().await;
    running.shutdown().await;
    Ok(())
}

/// Publishes until the broker refuses with STORAGE_FULL (the bounds are checked every
/// retention interval), and returns that error.
async fn refused_within(
    producer: &directmq_client::Producer,
    limit: Duration,
) -> Result<directmq_client::Error> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match producer.send(vec![0u8; 1000]).await {
            Err(e) => {
                ensure!(e.code() == Some(ErrorCode::STORAGE_FULL), "{e}");
                return Ok(e);
            }
            Ok(_) => {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "never refused over the bound"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// dc-b reads everything stored on `channel`, in order, and commits it; returns how many.
async fn catch_up(c: &directmq_client::Client, channel: &str) -> Result<u64> {
    let head = c
        .list_channels(channel)
        .await?
        .into_iter()
        .find(|i| i.name == channel)
        .context("channel")?
        .head;
    let mut consumer = c.consumer(channel, "dc-b", StartPosition::Earliest).await?;
    for want in consumer.start_offset()..head {
        ensure!(consumer.next().await.context("closed")??.offset == want);
    }
    consumer.commit(head).await?;
    Ok(head)
}

/// Publishes until the broker accepts again.
async fn accepted_within(producer: &directmq_client::Producer, limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match producer.send("again").await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(ErrorCode::STORAGE_FULL) => {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "still refused after catching up: {e}"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_oldest_channel_moves_its_consumers_on_and_counts_what_it_dropped() -> Result<()> {
    const MESSAGE: usize = 128 * 1024;
    const MESSAGES: u64 = 160; // 20 MiB, ten times the channel's 2 MiB bound
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let config = directmq_broker::Config {
        segment_bytes: 1024 * 1024,
        retention_interval_ms: 20,
        channels: vec![ChannelOverride {
            prefix: "lossy/".into(),
            durability: None,
            max_message_bytes: None,
            max_age_ms: None,
            max_bytes: Some(2 * 1024 * 1024),
            on_full: Some(directmq_broker::config::OnFull::DropOldest),
        }],
        ..test_config(dir.path())
    };
    let running = directmq_broker::start(config).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    c.create_channel("lossy/a").await?;
    // A live session that takes one message, then stops reading for a while.
    let mut consumer = c
        .consumer("lossy/a", "dc-b", StartPosition::Earliest)
        .await?;
    // Publishing is never refused on a drop-oldest channel.
    let producer = c.producer("lossy/a", "p").await?;
    let mut acks = Vec::new();
    for i in 0..MESSAGES {
        acks.push(producer.enqueue(vec![(i % 251) as u8; MESSAGE]).await?);
    }
    for ack in acks {
        ack.await?;
    }
    ensure!(consumer.next().await.context("closed")??.offset == 0);
    // The broker moves dc-b past what exceeds 2 MiB, and retention deletes whole segments
    // below that. A segment may hold several batches, so how far deletion reaches depends
    // on batching: keep publishing (a bounded amount) until the segments past the 128
    // messages (16 MiB of credit) the session may already hold are gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut head = MESSAGES;
    loop {
        let info = c.list_channels("lossy/").await?;
        let status = c.status("lossy/").await?;
        let committed = status[0].consumers[0].committed;
        if committed > 130 && info[0].first > 130 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline && head < 4 * MESSAGES,
            "not dropped: committed {committed}, first retained {}",
            info[0].first
        );
        for _ in 0..8 {
            producer.send(vec![(head % 251) as u8; MESSAGE]).await?;
            head += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The session reads on: what it had received, then a jump past the dropped messages,
    // then every message to the head, in order.
    let mut last = 0;
    let mut jumped = false;
    while last + 1 < head {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .context("the consumer stalled after the drop")?
            .context("closed")??;
        ensure!(m.offset > last, "offset {} after {last}", m.offset);
        jumped |= m.offset > last + 1;
        ensure!(
            m.payload[0] == (m.offset % 251) as u8,
            "payload of {}",
            m.offset
        );
        last = m.offset;
    }
    ensure!(jumped, "no offsets were skipped");
    ensure!(
        consumer.dropped() > 0,
        "the consumer did not count the skip"
    );
    eprintln!(
        "drop-oldest: the live consumer skipped {} offsets",
        consumer.dropped()
    );
    drop(consumer);
    c.close().await;
    running.shutdown().await;
    Ok(())
}
