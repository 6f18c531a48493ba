//! DirectMQ storage: the durable log (docs/storage.md).
//!
//! Message data, consumer commits, producer sequences and channel creation and deletion all
//! live in append-only **segment files** of CRC-checked records, shared by every channel. One
//! writer thread does **group commit**: every append waiting at a moment, from every channel,
//! shares one `fdatasync`, and every caller's completion runs after it. The segment files are
//! the only source of truth; what can be rebuilt from them is kept beside them: the batch
//! index (an index file per closed segment, the active segment's entries in memory) and the
//! checkpoint.
//!
//! This layer knows nothing of the wire protocol or the network: no tokio, no quinn. The
//! broker decides what to append ([`LogState`] is its view of the log), this crate makes it
//! durable and gives it back.

#![forbid(unsafe_code)]

mod index;
mod record;
mod segment;
mod state;
mod store;

pub use index::{IndexEntry, SegmentSummary, Span};
pub use record::{
    Batch, BatchMeta, Encoded, Headers, ProducerStamp, Record, RecordError, RecordMeta, Sequences,
    StoredMessage,
};
pub use state::{
    Channel, ChannelSnapshot, LogState, Producer, ProducerState, SequenceCheck, StateSnapshot,
    MAX_RUNS_PER_PRODUCER,
};
pub use store::{Done, Durability, ReadMessage, RetentionReport, Store, StoreOptions, Txn};

use std::path::{Path, PathBuf};

/// Metric names emitted by storage (documented in docs/metrics.md).
pub mod metric {
    pub const FSYNCS: &str = "directmq_storage_fsyncs_total";
    pub const BYTES_WRITTEN: &str = "directmq_storage_bytes_written_total";
    pub const GROUP_APPENDS: &str = "directmq_storage_group_appends";
    pub const FSYNC_SECONDS: &str = "directmq_storage_fsync_seconds";
    pub const CORRUPT_RECORDS: &str = "directmq_storage_corrupt_records_total";
    pub const TORN_TAIL_BYTES: &str = "directmq_storage_torn_tail_bytes_total";
    pub const SEGMENTS: &str = "directmq_storage_segments";
    pub const SEGMENTS_DELETED: &str = "directmq_storage_segments_deleted_total";
    pub const WRITE_ERRORS: &str = "directmq_storage_write_errors_total";
}

/// What went wrong in storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("could not {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the disk is full: {source}")]
    Full { source: std::io::Error },
    #[error("corrupt record in segment {segment} at byte {position}: {reason}")]
    Corrupt {
        segment: u64,
        position: u64,
        reason: String,
    },
    #[error("storage stopped accepting writes after an fsync failure; restart the broker")]
    Poisoned,
    #[error("storage is closed")]
    Closed,
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> StorageError {
        if source.raw_os_error() == Some(libc_enospc()) {
            return StorageError::Full { source };
        }
        StorageError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// Whether retrying later may succeed (a full disk), as opposed to a broken log.
    pub fn is_full(&self) -> bool {
        matches!(self, StorageError::Full { .. })
    }
}

/// ENOSPC on Linux and the BSDs.
const fn libc_enospc() -> i32 {
    28
}
