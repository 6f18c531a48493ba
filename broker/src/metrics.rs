//! Metric names and the Prometheus recorder. Every name lives here (docs/metrics.md);
//! labels carry only bounded values such as error codes, never channel or client names.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "directmq_connections";
pub const PUBLISHED_MESSAGES: &str = "directmq_published_messages_total";
pub const PUBLISHED_BYTES: &str = "directmq_published_bytes_total";
pub const DUPLICATES: &str = "directmq_duplicate_messages_total";
pub const DELIVERED_MESSAGES: &str = "directmq_delivered_messages_total";
pub const DELIVERED_BYTES: &str = "directmq_delivered_bytes_total";
pub const PUBLISH_ERRORS: &str = "directmq_publish_errors_total";
pub const PROTOCOL_ERRORS: &str = "directmq_protocol_errors_total";
pub const CHANNELS: &str = "directmq_channels";

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program's); then
            // this handle renders nothing, which is the embedder's choice.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
