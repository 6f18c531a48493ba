//! Metric names and the Prometheus recorder. Every name lives here (docs/metrics.md);
//! labels carry only bounded values such as error codes, never channel or client names.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram buckets for latencies (seconds): 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];
/// Histogram buckets for counts per batch or group.
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];

pub const CONNECTIONS: &str = "directmq_connections";
pub const PUBLISHED_MESSAGES: &str = "directmq_published_messages_total";
pub const PUBLISHED_BYTES: &str = "directmq_published_bytes_total";
pub const DUPLICATES: &str = "directmq_duplicate_messages_total";
pub const DELIVERED_MESSAGES: &str = "directmq_delivered_messages_total";
pub const DELIVERED_BYTES: &str = "directmq_delivered_bytes_total";
/// Refused operations, labelled `op` (connect, request, publish, consume, commit) and
/// `code` (the stable error code name).
pub const REFUSED: &str = "directmq_refused_total";
/// Messages per publish batch (a multi-channel frame counts once).
pub const BATCH_MESSAGES: &str = "directmq_publish_batch_messages";
/// From a batch read off the stream to its ack being sent (after the fsync).
pub const ACK_SECONDS: &str = "directmq_publish_ack_seconds";
/// Consumer sessions waiting as standbys for an active one to end.
pub const STANDBYS: &str = "directmq_consumer_standbys";
/// Watch streams open.
pub const WATCHERS: &str = "directmq_watchers";
/// Log bytes on disk (segments).
pub const STORAGE_BYTES: &str = "directmq_storage_bytes";
/// Messages dropped by a `drop-oldest` retention bound.
pub const DROPPED_MESSAGES: &str = "directmq_dropped_messages_total";
/// Per durable consumer name, across its channels: the largest and the summed lag in
/// messages, and the largest lag in seconds. Consumer names are few (one per target
/// datacenter), so the label is bounded.
pub const CONSUMER_LAG_MESSAGES_MAX: &str = "directmq_consumer_lag_messages_max";
pub const CONSUMER_LAG_MESSAGES_SUM: &str = "directmq_consumer_lag_messages_sum";
pub const CONSUMER_LAG_SECONDS_MAX: &str = "directmq_consumer_lag_seconds_max";
/// Consumers flagged stalled (lag above zero, no commit progress for `stalled_after_ms`).
pub const CONSUMERS_STALLED: &str = "directmq_consumers_stalled";
pub const PROTOCOL_ERRORS: &str = "directmq_protocol_errors_total";
pub const CHANNELS: &str = "directmq_channels";

/// How often histogram samples are folded into their buckets. The recorder holds every
/// sample until then or until `/metrics` is scraped: without this a broker nobody scraped
/// grew by 8 bytes per ack and per fsync, about 1 GB a day at 1,000 frames per second.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    install_with_upkeep(UPKEEP_EVERY)
}

/// [`install`], folding histogram samples every `every` (on a thread of its own, so that
/// neither a runtime nor a scrape is needed). Only the first call in a process installs.
pub fn install_with_upkeep(every: Duration) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_messages".into()), COUNT_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(directmq_storage::metric::GROUP_APPENDS.into()),
                        COUNT_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program's); then
            // this handle renders nothing, which is the embedder's choice.
            let _ = metrics::set_global_recorder(recorder);
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("directmq-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(every);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no metrics upkeep thread: histogram samples are folded only when /metrics is scraped");
            }
            handle
        })
        .clone()
}

/// Registers every unlabelled metric at zero, so `/metrics` lists each documented one from
/// the start (a counter that never moved is still worth seeing).
pub fn register_all() {
    use directmq_storage::metric as storage;
    for name in [
        PUBLISHED_MESSAGES,
        PUBLISHED_BYTES,
        DUPLICATES,
        DELIVERED_MESSAGES,
        DELIVERED_BYTES,
        DROPPED_MESSAGES,
        storage::FSYNCS,
        storage::BYTES_WRITTEN,
        storage::CORRUPT_RECORDS,
        storage::TORN_TAIL_BYTES,
        storage::SEGMENTS_DELETED,
        storage::WRITE_ERRORS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        CONNECTIONS,
        CHANNELS,
        WATCHERS,
        STANDBYS,
        STORAGE_BYTES,
        CONSUMERS_STALLED,
        storage::SEGMENTS,
    ] {
        metrics::gauge!(name).increment(0.0);
    }
}
