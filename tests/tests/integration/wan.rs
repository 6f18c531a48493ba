//! Issue 4: a channel keeps flowing across an emulated WAN link between datacenters — 50 ms
//! round trip, 2% loss, reordering — and recovers by itself after the link is cut for 5 s.
//!
//! The clients reach the broker through `directmq_benches::wan::Proxy`. The cut (5 s) is
//! shorter than the QUIC idle timeout (30 s, keep-alives every 10 s: `NetOptions`), so the
//! connections survive it and QUIC's retransmissions carry on once the link is back; its
//! probe timeout has backed off exponentially during the silence, so recovery takes up to
//! a few seconds more (the test prints how long).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use bytes::Bytes;
use directmq_benches::wan::{Config, Impairment, Proxy};
use directmq_client::{Consumer, PendingAck, Producer, StartPosition};
use directmq_tests::{client, payload, test_config};
use tokio::sync::watch;

const CHANNEL: &str = "dc-a/db1/wan";
const MESSAGES: u64 = 2_000;
/// Publishing is paced at this many messages per tick, so that it lasts ~10 s and the cut
/// falls in the middle of it.
const PER_TICK: u64 = 20;
const TICK: Duration = Duration::from_millis(100);
/// Most messages published and not yet acknowledged.
const MAX_PENDING: usize = 256;
/// The link is cut once this many messages are acknowledged.
const CUT_AT: u64 = MESSAGES / 3;
const CUT: Duration = Duration::from_secs(5);
/// Publishing and consuming must each resume within this after the link is back.
const RECOVERY: Duration = Duration::from_secs(30);
/// The whole scenario.
const LIMIT: Duration = Duration::from_secs(90);

fn size(seq: u64) -> usize {
    64 + (seq % 7) as usize * 50
}

fn message(seq: u64) -> Bytes {
    payload(0, 0, seq, size(seq))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_and_consuming_across_a_lossy_wan_resume_by_themselves_after_a_cut() -> Result<()>
{
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let link = Impairment {
        delay: Duration::from_millis(25),
        jitter: Duration::from_millis(2),
        loss: 0.02,
        reorder: 0.02,
        reorder_delay: Duration::from_millis(5),
        ..Impairment::default()
    };
    let mut config = Config::new("127.0.0.1:0".parse()?, running.quic_addr).both(link.clone());
    if let Some(seed) = std::env::var("DIRECTMQ_WAN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        config.seed = Some(seed);
    }
    let proxy = Proxy::start(config).await?;
    eprintln!(
        "wan proxy {} → broker {}, each way: {link}; seed {} (DIRECTMQ_WAN_SEED={} repeats it)",
        proxy.local_addr(),
        running.quic_addr,
        proxy.seed(),
        proxy.seed()
    );
    let (acked_tx, acked) = watch::channel(0u64);
    let (consumed_tx, consumed) = watch::channel(0u64);
    let outcome = tokio::time::timeout(
        LIMIT,
        scenario(&proxy, running.quic_addr, dir.path(), acked_tx, consumed_tx),
    )
    .await;
    let stats = proxy.stats();
    let result = match outcome {
        Ok(r) => r.with_context(|| format!("seed {}; proxy: {stats}", proxy.seed())),
        Err(_) => Err(anyhow!(
            "the scenario did not finish within {LIMIT:?}: {} of {MESSAGES} messages acknowledged, \
             {} consumed; seed {}; proxy: {stats}",
            *acked.borrow(),
            *consumed.borrow(),
            proxy.seed()
        )),
    };
    eprintln!("wan proxy: {stats}");
    drop(proxy);
    running.shutdown().await;
    result
}

async fn scenario(
    proxy: &Proxy,
    direct: SocketAddr,
    data: &Path,
    acked_tx: watch::Sender<u64>,
    consumed_tx: watch::Sender<u64>,
) -> Result<()> {
    let via = proxy.local_addr();
    let mut acked = acked_tx.subscribe();
    let mut consumed = consumed_tx.subscribe();
    let producer_client = client(via, data)
        .await
        .context("connecting the producer through the proxy")?;
    producer_client.create_channel(CHANNEL).await?;
    let producer = producer_client.producer(CHANNEL, "agent-1").await?;
    let consumer_client = client(via, data)
        .await
        .context("connecting the consumer through the proxy")?;
    let consumer = consumer_client
        .consumer(CHANNEL, "dc-b", StartPosition::Earliest)
        .await?;
    let publishing = tokio::spawn(produce(producer, acked_tx));
    let consuming = tokio::spawn(consume(consumer, consumed_tx));

    // Cut the link in the middle of the stream.
    acked
        .wait_for(|n| *n >= CUT_AT)
        .await
        .context("the producer stopped before the cut")?;
    proxy.set_cut(true);
    let before = (*acked.borrow(), *consumed.borrow());
    tokio::time::sleep(CUT).await; // the outage itself
    proxy.set_cut(false);
    let back = Instant::now();
    let during = (*acked.borrow(), *consumed.borrow());
    ensure!(
        during.0 < MESSAGES,
        "publishing finished during the cut; the pacing no longer puts the cut in the middle"
    );
    let cut_dropped = proxy.stats().up.cut_dropped + proxy.stats().down.cut_dropped;
    ensure!(
        cut_dropped > 0,
        "nothing was dropped while the link was cut"
    );

    // Both sides carry on by themselves.
    tokio::time::timeout(RECOVERY, acked.wait_for(|n| *n > during.0))
        .await
        .with_context(|| {
            format!("publishing did not resume within {RECOVERY:?} after the link came back")
        })?
        .context("the producer stopped")?;
    let acks_back = back.elapsed();
    tokio::time::timeout(RECOVERY, consumed.wait_for(|n| *n > during.1))
        .await
        .with_context(|| {
            format!("consuming did not resume within {RECOVERY:?} after the link came back")
        })?
        .context("the consumer stopped")?;
    let deliveries_back = back.elapsed();
    eprintln!(
        "cut at {} acked / {} consumed; {} / {} when the link came back; acks resumed {:.2} s \
         and deliveries {:.2} s after; {cut_dropped} datagrams dropped by the cut",
        before.0,
        before.1,
        during.0,
        during.1,
        acks_back.as_secs_f64(),
        deliveries_back.as_secs_f64()
    );

    publishing
        .await
        .context("the producer task panicked")?
        .context("publishing failed")?;
    consuming
        .await
        .context("the consumer task panicked")?
        .context("consuming failed")?;
    let stats = proxy.stats();
    ensure!(
        stats.up.lost > 0 && stats.down.lost > 0 && stats.up.reordered + stats.down.reordered > 0,
        "the link was not lossy and reordering as configured: {stats}"
    );

    // Directly at the broker: every acknowledged message exactly once, dense, in order.
    let check = client(direct, data).await?;
    let status = check.status(CHANNEL).await?;
    let channel = status.first().context("the channel is gone")?;
    ensure!(
        channel.channel.head == MESSAGES,
        "the channel holds {} messages, {MESSAGES} were acknowledged",
        channel.channel.head
    );
    let dc_b = channel
        .consumers
        .iter()
        .find(|c| c.name == "dc-b")
        .context("consumer dc-b is unknown to the broker")?;
    ensure!(
        dc_b.committed == MESSAGES,
        "dc-b committed {}",
        dc_b.committed
    );
    let mut reader = check
        .consumer(CHANNEL, "verify", StartPosition::Earliest)
        .await?;
    for want in 0..MESSAGES {
        let m = reader
            .next()
            .await
            .context("the verifying consumer closed")??;
        ensure!(
            m.offset == want,
            "stored offsets are not dense: expected {want}, got {}",
            m.offset
        );
        ensure!(
            m.payload == message(want),
            "offset {want} does not hold sequence {want}"
        );
    }
    Ok(())
}

/// Publishes `MESSAGES` paced messages with at most `MAX_PENDING` unacknowledged; each
/// must be stored at the offset equal to its sequence (one producer: dense and in order).
async fn produce(producer: Producer, acked: watch::Sender<u64>) -> Result<()> {
    let mut pending: VecDeque<(u64, PendingAck)> = VecDeque::with_capacity(MAX_PENDING + 1);
    let mut tick = tokio::time::interval(TICK);
    for seq in 0..MESSAGES {
        if seq % PER_TICK == 0 {
            tick.tick().await;
        }
        let ack = producer
            .enqueue(message(seq))
            .await
            .with_context(|| format!("enqueueing sequence {seq}"))?;
        pending.push_back((seq, ack));
        if pending.len() > MAX_PENDING {
            settle(pending.pop_front().expect("non-empty"), &acked).await?;
        }
    }
    while let Some(item) = pending.pop_front() {
        settle(item, &acked).await?;
    }
    Ok(())
}

async fn settle((seq, ack): (u64, PendingAck), acked: &watch::Sender<u64>) -> Result<()> {
    let receipt = ack
        .await
        .with_context(|| format!("the ack of sequence {seq}"))?;
    ensure!(
        receipt.sequence == seq,
        "sequence {seq} was answered for {}",
        receipt.sequence
    );
    let offset = receipt
        .offset
        .with_context(|| format!("the broker forgot the offset of retried sequence {seq}"))?;
    ensure!(
        offset == seq,
        "sequence {seq} was stored at offset {offset} (a gap, a duplicate or reordering)"
    );
    acked.send_replace(seq + 1);
    Ok(())
}

/// Consumes every message, checking that the stream is gap-free and in order, and commits.
async fn consume(mut consumer: Consumer, consumed: watch::Sender<u64>) -> Result<()> {
    for want in 0..MESSAGES {
        let m = consumer
            .next()
            .await
            .context("the consumer closed")?
            .with_context(|| format!("consuming offset {want}"))?;
        ensure!(
            m.offset == want,
            "the consumer expected offset {want} and got {}",
            m.offset
        );
        ensure!(
            m.payload == message(want),
            "offset {want} delivered a different payload"
        );
        consumed.send_replace(want + 1);
        if (want + 1) % 100 == 0 {
            consumer.commit_nowait(want + 1);
        }
    }
    consumer
        .commit(MESSAGES)
        .await
        .context("the final commit")?;
    Ok(())
}
