//! Codec micro-benchmarks: encoding and decoding a `PublishBatch` of many small messages and
//! of one large message. Throughput counts payload bytes.
//!
//! `encode` copies every payload into the caller's buffer; `encode_chunks` copies only
//! payloads below 16 KiB and hands larger ones over as their own `Bytes` (§2), so the 1 MiB
//! case shows the zero-copy path. `decode` slices payloads out of the frame without copying.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use directmq_protocol::{
    decode, encode, encode_chunks, max_frame_bytes, Frame, PublishBatch, PublishMessage,
    DEFAULT_MAX_MESSAGE_BYTES,
};

/// A batch of `count` messages of `size` bytes each, with distinct payload bytes.
fn batch(count: usize, size: usize) -> Frame {
    let messages = (0..count)
        .map(|i| PublishMessage {
            sequence: i as u64 + 1,
            headers: Vec::new(),
            payload: Bytes::from(
                (0..size)
                    .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                    .collect::<Vec<u8>>(),
            ),
        })
        .collect();
    Frame::PublishBatch(PublishBatch {
        batch_id: 7,
        messages,
    })
}

fn bench_case(c: &mut Criterion, name: &str, count: usize, size: usize) {
    let frame = batch(count, size);
    let payload_bytes = (count * size) as u64;
    let mut encoded = BytesMut::new();
    encode(&frame, &mut encoded);
    let encoded = encoded.freeze();
    let max = max_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES);

    let mut group = c.benchmark_group(format!("codec/{name}"));
    group
        .throughput(Throughput::Bytes(payload_bytes))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    group.bench_function("encode", |b| {
        let mut dst = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            dst.clear();
            encode(black_box(&frame), &mut dst);
            black_box(dst.len())
        })
    });

    group.bench_function("encode_chunks", |b| {
        let mut chunks = Vec::new();
        b.iter(|| {
            chunks.clear();
            encode_chunks(black_box(&frame), &mut chunks);
            black_box(chunks.len())
        })
    });

    // The copy into a fresh receive buffer is setup, not decoding: it is left out of the time.
    group.bench_function("decode", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&encoded[..]),
            |buf| {
                let frame = decode(buf, max).expect("valid frame").expect("whole frame");
                black_box(frame)
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();

    // Sanity: what was measured round-trips.
    let mut buf = BytesMut::from(&encoded[..]);
    assert_eq!(decode(&mut buf, max).unwrap().unwrap(), frame);
}

fn codec(c: &mut Criterion) {
    bench_case(c, "1000x1KiB", 1000, 1024);
    bench_case(c, "1x1MiB", 1, 1024 * 1024);
}

criterion_group!(benches, codec);
criterion_main!(benches);
