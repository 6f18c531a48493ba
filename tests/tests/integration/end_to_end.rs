//! Scenarios 1 and 2 of issue 2: many channels, concurrent producers, mixed payload sizes;
//! a graceful restart and a SIGKILL in the middle.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use directmq_client::{Client, PendingAck, StartPosition};
use directmq_tests::{client, payload, test_config, ChildBroker};
use tokio::sync::watch;

const CHANNELS: u32 = 16;
const PRODUCERS: u32 = 4;
const PER_CHANNEL: u64 = 10_000;

fn channel_name(c: u32) -> String {
    format!("dc-a/db1/s{c:02}")
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// What a producer learned from its acks: offset → (producer, sequence, payload length).
type Receipts = HashMap<(u32, u64), (u32, u64, usize)>;

/// Publishes `per_channel / PRODUCERS` messages to every channel, round-robin, pipelined.
async fn produce(
    client: Client,
    producer: u32,
    per_channel: u64,
    size: impl Fn(u32, u32, u64) -> usize,
    acked: watch::Sender<u64>,
) -> Result<Receipts> {
    let mut handles = Vec::new();
    for c in 0..CHANNELS {
        handles.push(
            client
                .producer(&channel_name(c), &format!("agent-{producer}"))
                .await?,
        );
    }
    let mut receipts = Receipts::new();
    let mut pending: std::collections::VecDeque<(u32, u64, usize, PendingAck)> = Default::default();
    for seq in 0..per_channel / u64::from(PRODUCERS) {
        for c in 0..CHANNELS {
            let len = size(c, producer, seq);
            let ack = handles[c as usize]
                .enqueue(payload(c, producer, seq, len))
                .await?;
            pending.push_back((c, seq, len, ack));
            if pending.len() >= 4096 {
                settle(
                    producer,
                    pending.pop_front().expect("non-empty"),
                    &mut receipts,
                )
                .await?;
                acked.send_modify(|n| *n += 1);
            }
        }
    }
    while let Some(item) = pending.pop_front() {
        settle(producer, item, &mut receipts).await?;
        acked.send_modify(|n| *n += 1);
    }
    Ok(receipts)
}

async fn settle(
    producer: u32,
    item: (u32, u64, usize, PendingAck),
    receipts: &mut Receipts,
) -> Result<()> {
    let (c, seq, len, ack) = item;
    let receipt = ack
        .await
        .with_context(|| format!("ack of producer {producer} channel {c} seq {seq}"))?;
    ensure!(receipt.sequence == seq, "receipt for the wrong sequence");
    let offset = receipt
        .offset
        .context("the broker forgot a retried sequence")?;
    let previous = receipts.insert((c, offset), (producer, seq, len));
    ensure!(
        previous.is_none(),
        "offset {offset} of channel {c} acked twice"
    );
    Ok(())
}

static CONSUMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads `per_channel` messages of one channel as durable consumer `name`; checks order and
/// density; returns offset → (length, hash).
async fn consume(
    client: Client,
    c: u32,
    name: &str,
    per_channel: u64,
) -> Result<Vec<(usize, u64)>> {
    let mut consumer = client
        .consumer(&channel_name(c), name, StartPosition::Earliest)
        .await?;
    let mut got = Vec::with_capacity(per_channel as usize);
    while (got.len() as u64) < per_channel {
        let m = consumer.next().await.context("consumer closed")??;
        ensure!(
            m.offset == got.len() as u64,
            "channel {c}, consumer {name}: expected offset {}, got {}",
            got.len(),
            m.offset
        );
        got.push((m.payload.len(), hash(&m.payload)));
        CONSUMED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if got.len() % 500 == 0 {
            consumer.commit_nowait(m.offset + 1);
        }
    }
    consumer.commit(per_channel).await?;
    Ok(got)
}

/// What each consumer read: (channel, messages in offset order).
type Consumed = Vec<(u32, Vec<(usize, u64)>)>;

fn verify(receipts: &Receipts, consumed: &Consumed, per_channel: u64) -> Result<()> {
    ensure!(
        receipts.len() as u64 == per_channel * u64::from(CHANNELS),
        "acks: {}",
        receipts.len()
    );
    for (c, messages) in consumed {
        let c = *c;
        ensure!(
            messages.len() as u64 == per_channel,
            "channel {c}: {} messages",
            messages.len()
        );
        let mut last_seq = HashMap::new();
        for (offset, &(len, h)) in messages.iter().enumerate() {
            let &(producer, seq, want_len) =
                receipts.get(&(c, offset as u64)).with_context(|| {
                    format!("channel {c} offset {offset} delivered but never acked")
                })?;
            ensure!(
                len == want_len,
                "channel {c} offset {offset}: {len} bytes, expected {want_len}"
            );
            ensure!(
                h == hash(&payload(c, producer, seq, want_len)),
                "channel {c} offset {offset}: payload differs from what producer {producer} sent as {seq}"
            );
            // Each producer's messages keep their publish order.
            if let Some(prev) = last_seq.insert(producer, seq) {
                ensure!(
                    seq > prev,
                    "channel {c}: producer {producer} reordered ({prev} then {seq})"
                );
            }
        }
    }
    Ok(())
}

/// The shape of a run: messages per channel and the durable consumers reading every
/// channel.
#[derive(Clone, Copy)]
struct Load {
    per_channel: u64,
    consumers: &'static [&'static str],
}

const SCENARIO: Load = Load {
    per_channel: PER_CHANNEL,
    consumers: &["dc-b"],
};

async fn run_all(
    addr: SocketAddr,
    data: &Path,
    load: Load,
    size: impl Fn(u32, u32, u64) -> usize + Copy + Send + 'static,
    acked: watch::Sender<u64>,
) -> Result<(Receipts, Consumed)> {
    let admin = client(addr, data).await?;
    for c in 0..CHANNELS {
        admin.create_channel(&channel_name(c)).await?;
    }
    let mut consumers = Vec::new();
    for name in load.consumers {
        // One connection per consumer (target datacenter), as agents have.
        let reader = client(addr, data).await?;
        for c in 0..CHANNELS {
            let reader = reader.clone();
            consumers.push(tokio::spawn(async move {
                Ok::<_, anyhow::Error>((c, consume(reader, c, name, load.per_channel).await?))
            }));
        }
    }
    // Every connection is made before the first message is acked: crash tests kill the
    // broker at ack counts, and a kill during a connection attempt would fail the set-up
    // (an initial connect is not retried), not test the crash.
    let mut clients = Vec::new();
    for _ in 0..PRODUCERS {
        clients.push(client(addr, data).await?);
    }
    let mut producers = Vec::new();
    for (p, client) in (0..PRODUCERS).zip(clients) {
        let acked = acked.clone();
        producers.push(tokio::spawn(async move {
            produce(client, p, load.per_channel, size, acked).await
        }));
    }
    if std::env::var_os("DIRECTMQ_TEST_PROGRESS").is_some() {
        let acked = acked.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "progress: acked {} consumed {}",
                    *acked.borrow(),
                    CONSUMED.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        });
    }
    let mut receipts = Receipts::new();
    for p in producers {
        receipts.extend(p.await??);
    }
    let mut consumed = Vec::new();
    for c in consumers {
        consumed.push(c.await??);
    }
    Ok((receipts, consumed))
}

/// Sizes for scenario 1: empty, 1 KiB, 100 KiB, 1 MiB, and one 64 MiB message.
fn mixed(c: u32, p: u32, seq: u64) -> usize {
    match seq {
        _ if c == 0 && p == 0 && seq == 2000 => 64 * 1024 * 1024,
        1249 => 1024 * 1024,
        s if s % 500 == 499 => 100 * 1024,
        s if s % 3 == 0 => 0,
        _ => 1024,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_consumer_gets_its_channel_in_order_and_byte_identical() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let (acked, _) = watch::channel(0);
    let (receipts, consumed) = tokio::time::timeout(
        Duration::from_secs(300),
        run_all(running.quic_addr, dir.path(), SCENARIO, mixed, acked),
    )
    .await
    .context("timed out")??;
    verify(&receipts, &consumed, PER_CHANNEL)?;
    running.shutdown().await;
    Ok(())
}

/// Smaller payloads: the point here is the restarts.
fn small(_c: u32, _p: u32, seq: u64) -> usize {
    match seq {
        s if s % 500 == 7 => 100 * 1024,
        s if s % 4 == 0 => 0,
        _ => 1024,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_messages_survive_a_graceful_restart_and_a_sigkill_exactly_once() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_owned();
    let broker = ChildBroker::start(&crate::directmq_bin(), &data, None)?;
    let addr = broker.quic;
    let broker = Arc::new(std::sync::Mutex::new(broker));
    let (acked, mut progress) = watch::channel(0u64);
    let total = PER_CHANNEL * u64::from(CHANNELS);
    let work = tokio::spawn({
        let data = data.clone();
        async move { run_all(addr, &data, SCENARIO, small, acked).await }
    });
    // A graceful restart a third of the way in...
    progress.wait_for(|n| *n >= total / 3).await?;
    let b = broker.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut b = b.lock().expect("lock");
        ensure!(b.terminate()?, "graceful shutdown exited with an error");
        *b = ChildBroker::start(&crate::directmq_bin(), &b.data.clone(), Some(addr))?;
        Ok(())
    })
    .await??;
    // ...and a SIGKILL two thirds of the way in, while producers are publishing.
    progress.wait_for(|n| *n >= 2 * total / 3).await?;
    let b = broker.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut b = b.lock().expect("lock");
        b.kill();
        *b = ChildBroker::start(&crate::directmq_bin(), &b.data.clone(), Some(addr))?;
        Ok(())
    })
    .await??;
    let (receipts, consumed) = tokio::time::timeout(Duration::from_secs(300), work)
        .await
        .context("timed out")???;
    verify(&receipts, &consumed, PER_CHANNEL)?;
    // No duplicates in the log: every head is exactly what was published.
    let admin = client(addr, &data).await?;
    for info in admin.list_channels("dc-a/").await? {
        ensure!(
            info.head == PER_CHANNEL,
            "{} has head {}: retries duplicated messages",
            info.name,
            info.head
        );
    }
    Ok(())
}

/// SplitMix64: a seeded, dependency-free generator for the kill schedule.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Issue 4, scenario 1: twenty SIGKILLs at seeded random moments while 4 producers publish
/// to 16 channels and 2 durable consumers read them all. `DIRECTMQ_CRASH_SEED` replays a
/// schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_messages_survive_twenty_sigkills_exactly_once_and_in_order() -> Result<()> {
    const KILLS: usize = 20;
    const LOAD: Load = Load {
        per_channel: 1_000,
        consumers: &["dc-b", "dc-c"],
    };
    directmq_tests::init_logging();
    let seed = match std::env::var("DIRECTMQ_CRASH_SEED") {
        Ok(s) => s.parse().context("DIRECTMQ_CRASH_SEED")?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    eprintln!("crash loop seed {seed} (replay with DIRECTMQ_CRASH_SEED={seed})");
    let mut rng = seed;
    let total = LOAD.per_channel * u64::from(CHANNELS);
    // Kill points: acked-message counts spread over the first 80% of the run, plus a
    // random delay of up to 20 ms so kills land mid-batch and mid-fsync.
    let mut points: Vec<(u64, u64)> = (0..KILLS)
        .map(|_| {
            (
                splitmix(&mut rng) % (total * 9 / 10),
                splitmix(&mut rng) % 20,
            )
        })
        .collect();
    points.sort_unstable();

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // A client whose connection died while the broker restarted twice within milliseconds
    // may be left mid-handshake with a process that is gone; it notices when the
    // connection has been silent this long.
    let config = dir.path().join("directmq.toml");
    std::fs::write(&config, "idle_timeout_ms = 3000\n")?;
    let config = config.to_string_lossy().into_owned();
    let serve_args = ["--config", config.as_str()];
    let broker = ChildBroker::start_args(&crate::directmq_bin(), &data, None, &serve_args)?;
    let addr = broker.quic;
    let broker = Arc::new(std::sync::Mutex::new(broker));
    let (acked, mut progress) = watch::channel(0u64);
    let work = tokio::spawn({
        let data = data.clone();
        async move { run_all(addr, &data, LOAD, small, acked).await }
    });
    let mut at_last_restart = 0;
    for (i, (point, delay_ms)) in points.into_iter().enumerate() {
        // At least a little progress between kills, so each lands on a working broker.
        let point = point.max(at_last_restart + 100).min(total * 9 / 10);
        let reached =
            tokio::time::timeout(Duration::from_secs(120), progress.wait_for(|n| *n >= point))
                .await
                .with_context(|| format!("kill {i}: acks stalled before {point}"))?;
        let ended = reached.is_err();
        drop(reached);
        if ended {
            // The work ended before this kill point: only an error does that.
            work.await??;
            anyhow::bail!("kill {i}: the run ended before {point} acks");
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let b = broker.clone();
        let restart = tokio::time::Instant::now();
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut b = b.lock().expect("lock");
            b.kill();
            let args = ["--config", config.as_str()];
            *b = ChildBroker::start_args(
                &crate::directmq_bin(),
                &b.data.clone(),
                Some(addr),
                &args,
            )?;
            Ok(())
        })
        .await??;
        at_last_restart = *progress.borrow();
        tracing::info!(
            "kill {i} at {} acks: restarted in {:?}",
            *progress.borrow(),
            restart.elapsed()
        );
    }
    let (receipts, consumed) = tokio::time::timeout(Duration::from_secs(600), work)
        .await
        .context("timed out after the last restart")???;
    // Every ack present once, payloads identical, each producer's order kept, offsets
    // dense, and each consumer read every channel gap-free in order (the client yields
    // a redelivered offset only once).
    ensure!(consumed.len() == LOAD.consumers.len() * CHANNELS as usize);
    verify(&receipts, &consumed, LOAD.per_channel)?;
    // No duplicates in the log: every head is exactly what was published.
    let admin = client(addr, &data).await?;
    for info in admin.list_channels("dc-a/").await? {
        ensure!(
            info.head == LOAD.per_channel,
            "{} has head {}: retries duplicated messages (seed {seed})",
            info.name,
            info.head
        );
    }
    admin.close().await;
    Ok(())
}

/// A broker that stops answering (here: frozen with SIGSTOP; in production, killed and
/// restarted, or cut off) is given up after a few seconds of silence, not after the idle
/// timeout, and the client carries on once the broker answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_broker_is_given_up_long_before_the_idle_timeout() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let broker = ChildBroker::start(&crate::directmq_bin(), dir.path(), None)?;
    let mut config = directmq_tests::client_config(broker.quic, dir.path())?;
    // The broker's idle timeout is 30 s; this client's is longer still, so only the
    // client's silence check can end the connection within the bound below.
    config.net.idle_timeout = Duration::from_secs(120);
    config.connect_timeout = Duration::from_secs(1);
    config.reconnect_for = Some(Duration::from_secs(1));
    let c = Client::connect(config).await?;
    let producer = c.producer("frozen/a", "p").await?;
    producer.send("before").await?;

    broker.signal("STOP")?;
    let asked = tokio::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(20), c.list_channels("frozen/")).await;
    broker.signal("CONT")?;
    let err = match answer {
        Ok(Err(e)) => e,
        Ok(Ok(list)) => anyhow::bail!("a frozen broker answered {list:?}"),
        Err(_) => anyhow::bail!("the client waited 20 s on a silent broker"),
    };
    ensure!(err.is_transient(), "{err}");
    // ~3 s of silence, then the reconnect's 1 s; the idle timeouts are 30 s and 120 s.
    let waited = asked.elapsed();
    ensure!(
        waited < Duration::from_secs(10),
        "gave up only after {waited:?}: {err}"
    );

    // Once it answers again, the client reconnects and nothing was lost.
    producer.send("after").await?;
    let list = c.list_channels("frozen/").await?;
    ensure!(
        list.len() == 1 && list[0].head == 2,
        "expected both messages stored once: {list:?}"
    );
    c.close().await;
    Ok(())
}
