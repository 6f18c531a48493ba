//! Storage micro-benchmarks, in a temporary directory on the machine's disk:
//!
//! - `append/1-in-flight`: one batch of 100 × 1 KiB, queued and waited for (one fdatasync per
//!   batch — the latency-bound case);
//! - `append/16-in-flight`: 16 such batches queued before waiting, so the writer's group
//!   commit covers several with one fdatasync (the throughput case);
//! - `read/1000x1KiB`: reading 1,000 messages back from a pre-filled channel (page cache).
//!
//! Throughput counts payload bytes. Durability is the default: every append completes only
//! after `fdatasync`.

use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use directmq_storage::{
    Batch, ProducerStamp, Record, Sequences, Store, StoreOptions, StoredMessage,
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

/// Queues `batches` batches of [`BATCH_MESSAGES`] messages, then waits until all are durable.
fn append(store: &Store, channel: &mut Channel, batches: usize) {
    let (tx, rx) = mpsc::channel();
    for _ in 0..batches {
        let mut txn = store.begin();
        let count = BATCH_MESSAGES as u64;
        let base = txn
            .state()
            .reserve(channel.id, count)
            .expect("channel exists");
        let first = channel.next_sequence;
        channel.next_sequence += count;
        txn.state()
            .note_pending_sequence(channel.id, "bench", first + count - 1);
        let tx = tx.clone();
        txn.append(
            vec![Record::Batch(Batch {
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
                messages: (0..BATCH_MESSAGES)
                    .map(|_| StoredMessage {
                        headers: Vec::new(),
                        payload: channel.payload.clone(),
                    })
                    .collect(),
            })],
            Box::new(move |r| drop(tx.send(r))),
        )
        .expect("queue append");
    }
    drop(tx);
    for _ in 0..batches {
        rx.recv().expect("writer alive").expect("append durable");
    }
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
}

criterion_group!(benches, storage);
criterion_main!(benches);
