//! Storage micro-benchmarks, in a temporary directory on the machine's disk:
//!
//! - `append/1-in-flight`: one batch of 100 × 1 KiB, queued and waited for (one fdatasync per
//!   batch — the latency-bound case);
//! - `append/16-in-flight`: 16 such batches queued before waiting, so the writer's group
//!   commit covers several with one fdatasync (the throughput case);
//! - `read/1000x1KiB`: reading 1,000 messages back from a pre-filled channel (page cache);
//! - `many-channels/10000x1-message-batches`: what a multi-channel producer on 10,000 shards
//!   sends (docs/benchmarks.md): frames of 1,000 one-message batches, each for the next
//!   channel in turn, 32 frames queued at a time. Here every message is a batch of its own,
//!   so the per-batch costs (record, index entry, state) dominate, and the batch index
//!   grows by one entry per message; the process's resident memory before and after is
//!   printed, since it grows with the index (docs/benchmarks.md).
//!
//! Throughput counts payload bytes. Durability is the default: every append completes only
//! after `fdatasync`.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use directmq_storage::{
    Batch, LogState, ProducerStamp, Record, Sequences, StorageError, Store, StoreOptions,
    StoredMessage,
};

const MESSAGE_BYTES: usize = 1024;
const BATCH_MESSAGES: usize = 100;
/// Messages written before the read benchmark starts.
const PREFILL_MESSAGES: u64 = 20_000;
const READ_MESSAGES: usize = 1000;

/// A channel in a store and the producer state needed to append to it.
struct Channel {
    id: u64,
    next_sequence: u64,
    payload: Bytes,
}

fn create_channel(store: &Store, name: &str) -> Channel {
    let mut txn = store.begin();
    let id = txn.state().create_pending(name, 1);
    drop(txn);
    store
        .append_blocking(vec![Record::ChannelCreated {
            channel_id: id,
            name: name.into(),
            created_ms: 1,
        }])
        .expect("create channel");
    Channel {
        id,
        next_sequence: 1,
        payload: Bytes::from(
            (0..MESSAGE_BYTES)
                .map(|i| (i * 7) as u8)
                .collect::<Vec<u8>>(),
        ),
    }
}

/// Plans a batch of `count` messages for `channel` as the broker does (offsets reserved,
/// sequence noted) and answers its record.
fn batch(state: &mut LogState, channel: &mut Channel, count: usize) -> Record {
    let base = state
        .reserve(channel.id, count as u64)
        .expect("channel exists");
    let first = channel.next_sequence;
    channel.next_sequence += count as u64;
    state.note_pending_sequence(channel.id, "bench", first + count as u64 - 1);
    Record::Batch(Batch {
        channel_id: channel.id,
        base_offset: base,
        timestamp_ms: 1_700_000_000_000,
        producer: Some(ProducerStamp {
            producer_id: "bench".into(),
            sequences: Sequences::Dense {
                first,
                count: count as u32,
            },
        }),
        messages: (0..count)
            .map(|_| StoredMessage {
                headers: Vec::new(),
                payload: channel.payload.clone(),
            })
            .collect(),
    })
}

/// Queues `batches` batches of [`BATCH_MESSAGES`] messages, then waits until all are durable.
fn append(store: &Store, channel: &mut Channel, batches: usize) {
    let (tx, rx) = mpsc::channel();
    for _ in 0..batches {
        let mut txn = store.begin();
        let record = batch(txn.state(), channel, BATCH_MESSAGES);
        let tx = tx.clone();
        txn.append(vec![record], Box::new(move |r| drop(tx.send(r))))
            .expect("queue append");
    }
    drop(tx);
    for _ in 0..batches {
        rx.recv().expect("writer alive").expect("append durable");
    }
}

/// Channels, batches per frame and frames queued at once of `many-channels`.
const MANY_CHANNELS: usize = 10_000;
const FRAME_BATCHES: usize = 1_000;
const FRAMES_QUEUED: usize = 32;

/// Creates `count` channels in one append (one group commit).
fn create_channels(store: &Store, count: usize) -> Vec<Channel> {
    let mut txn = store.begin();
    let mut records = Vec::with_capacity(count);
    let mut channels = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("many-{i}");
        let id = txn.state().create_pending(&name, 1);
        records.push(Record::ChannelCreated {
            channel_id: id,
            name,
            created_ms: 1,
        });
        channels.push(Channel {
            id,
            next_sequence: 1,
            payload: Bytes::from(vec![7u8; MESSAGE_BYTES]),
        });
    }
    let (tx, rx) = mpsc::channel();
    txn.append(records, Box::new(move |r| drop(tx.send(r))))
        .expect("queue creations");
    drop(txn);
    rx.recv().expect("writer alive").expect("channels durable");
    channels
}

/// Appends `frames` frames of [`FRAME_BATCHES`] one-message batches, the channels taken in
/// turn from `next`, with up to [`FRAMES_QUEUED`] frames queued; waits for all.
fn append_frames(store: &Store, channels: &mut [Channel], next: &mut usize, frames: u64) {
    let (tx, rx) = mpsc::channel::<Result<(), Arc<StorageError>>>();
    let mut queued = 0usize;
    for _ in 0..frames {
        if queued == FRAMES_QUEUED {
            rx.recv().expect("writer alive").expect("append durable");
            queued -= 1;
        }
        let mut txn = store.begin();
        let records = (0..FRAME_BATCHES)
            .map(|_| {
                let k = *next;
                *next = (k + 1) % channels.len();
                batch(txn.state(), &mut channels[k], 1)
            })
            .collect();
        let tx = tx.clone();
        txn.append(records, Box::new(move |r| drop(tx.send(r))))
            .expect("queue append");
        queued += 1;
    }
    for _ in 0..queued {
        rx.recv().expect("writer alive").expect("append durable");
    }
}

/// This process's resident memory in MiB, where /proc tells it.
fn resident_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn storage(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("open store");

    let mut group = c.benchmark_group("storage/append");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for in_flight in [1usize, 16] {
        let mut channel = create_channel(&store, &format!("append-{in_flight}"));
        group.throughput(Throughput::Bytes(
            (in_flight * BATCH_MESSAGES * MESSAGE_BYTES) as u64,
        ));
        group.bench_function(format!("{in_flight}-in-flight"), |b| {
            b.iter(|| append(&store, &mut channel, in_flight))
        });
    }
    group.finish();

    let mut channel = create_channel(&store, "read");
    append(
        &store,
        &mut channel,
        (PREFILL_MESSAGES / BATCH_MESSAGES as u64) as usize,
    );
    let mut group = c.benchmark_group("storage/read");
    group
        .throughput(Throughput::Bytes((READ_MESSAGES * MESSAGE_BYTES) as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("1000x1KiB", |b| {
        let mut from = 0u64;
        b.iter(|| {
            let messages = store
                .read(channel.id, from, READ_MESSAGES, u64::MAX)
                .expect("read");
            assert_eq!(messages.len(), READ_MESSAGES);
            // Start at a different offset each time, not aligned to batches.
            from = (from + 7_919) % (PREFILL_MESSAGES - READ_MESSAGES as u64);
            black_box(messages)
        })
    });
    group.finish();

    // A store of its own: the index and state above would otherwise count here.
    drop(store);
    drop(dir);
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("open store");
    let mut channels = create_channels(&store, MANY_CHANNELS);
    let before = resident_mib();
    let mut next = 0usize;
    let mut frames = 0u64;
    let mut group = c.benchmark_group("storage/many-channels");
    group
        .throughput(Throughput::Elements(FRAME_BATCHES as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function(format!("{MANY_CHANNELS}x1-message-batches"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            append_frames(&store, &mut channels, &mut next, iters);
            frames += iters;
            start.elapsed()
        })
    });
    group.finish();
    if let (Some(before), Some(after)) = (before, resident_mib()) {
        println!(
            "storage/many-channels: resident memory {before} MiB with {MANY_CHANNELS} channels, \
             {after} MiB after {} one-message batches",
            frames * FRAME_BATCHES as u64
        );
    }
}

criterion_group!(benches, storage);
criterion_main!(benches);
