//! The store: recovery, the group-commit writer thread, reads and retention
//! (docs/storage.md §5–§7).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::index::{Index, IndexEntry, SegmentSummary};
use crate::record::{BatchMeta, Encoded, Headers, Record, RecordMeta};
use crate::segment::{self, ScanEnd};
use crate::state::LogState;
use crate::{metric, StorageError};

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After `fdatasync` (the default): nothing acknowledged is lost on power failure.
    Fsync,
    /// After `write`; `fdatasync` runs at most this far apart. A power failure may lose the
    /// last interval; a process crash loses nothing.
    Interval(Duration),
}

/// Tuning of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    pub durability: Durability,
    /// A checkpoint is written at least this often while the log grows...
    pub checkpoint_interval: Duration,
    /// ...and after this many bytes of log.
    pub checkpoint_bytes: u64,
    /// Bytes behind the write position kept in the OS page cache; older log pages are
    /// dropped once fsync'd. Writing into fresh page-cache pages costs several times the
    /// CPU of reusing dropped ones (measured: 2.75 vs 0.47 CPU-s per 768 MB of fsync'd 1 MiB
    /// appends), and tailing consumers only need the recent window.
    pub page_cache_window_bytes: u64,
    /// Reads of log data older than the page cache window go past the page cache
    /// (`O_DIRECT`, where the file system has it): see [`segment::read_at_direct`].
    pub direct_reads: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_bytes: 256 * 1024 * 1024,
            durability: Durability::Fsync,
            checkpoint_interval: Duration::from_secs(30),
            checkpoint_bytes: 256 * 1024 * 1024,
            page_cache_window_bytes: 64 * 1024 * 1024,
            direct_reads: true,
        }
    }
}

/// Called once an append is durable (or failed), on the writer thread: keep it short.
pub type Done = Box<dyn FnOnce(Result<(), Arc<StorageError>>) + Send>;

enum Job {
    Append {
        records: Vec<(RecordMeta, Encoded)>,
        done: Done,
        durability: Durability,
    },
    Snapshot {
        done: Done,
    },
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    closed: bool,
}

struct Shared {
    log_dir: PathBuf,
    options: StoreOptions,
    state: Mutex<LogState>,
    queue: Mutex<Queue>,
    wake: Condvar,
    index: Index,
    summaries: Mutex<BTreeMap<u64, SegmentSummary>>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// Segments opened for direct reads; see [`StoreOptions::direct_reads`].
    direct_files: Mutex<HashMap<u64, Arc<File>>>,
    /// Cleared when the file system refuses direct reads.
    direct_reads: AtomicBool,
    /// Reads answered past the page cache (for tests and tuning).
    direct_reads_done: AtomicU64,
    /// Tests: direct reads fail as on a file system that refuses them.
    #[cfg(test)]
    refuse_direct_in_test: AtomicBool,
    poisoned: AtomicBool,
    active_segment: AtomicU64,
    /// The active segment's page cache is dropped below this position (a copy of the
    /// writer's, read by readers to tell data that is no longer cached).
    cache_dropped_to: AtomicU64,
    corrupt_reads: AtomicU64,
    /// Held by retention from deleting segment files until the index and the channels'
    /// first offsets no longer point into them; a read that found a file gone waits here.
    deleting: Mutex<()>,
    /// Threads writing closed segments' index files (joined on close).
    sealers: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Waits for the threads writing closed segments' index files.
    fn join_sealers(&self) {
        let sealers = std::mem::take(&mut *self.sealers.lock().expect("sealers lock"));
        for handle in sealers {
            let _ = handle.join();
        }
    }
}

/// The durable log.
pub struct Store {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("log_dir", &self.shared.log_dir)
            .finish_non_exhaustive()
    }
}

/// A message read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMessage {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub headers: Headers,
    pub payload: Bytes,
}

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub bytes_freed: u64,
    /// Live batches of slow channels copied forward out of deleted segments.
    pub batches_copied: usize,
    pub bytes_copied: u64,
}

/// Exclusive access to the state for deciding and queueing appends; see [`Store::begin`].
pub struct Txn<'a> {
    state: MutexGuard<'a, LogState>,
    shared: &'a Shared,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn").finish_non_exhaustive()
    }
}

impl Txn<'_> {
    pub fn state(&mut self) -> &mut LogState {
        &mut self.state
    }

    /// Queues records behind the next group commit; `done` runs once they are durable. An
    /// empty list is a barrier: `done` runs once everything queued before it is durable.
    pub fn append(&mut self, records: Vec<Record>, done: Done) -> Result<(), StorageError> {
        let durability = self.shared.options.durability;
        self.append_with(records, durability, done)
    }

    /// [`Txn::append`] with a durability of its own instead of the store's (a channel that
    /// overrides it): with [`Durability::Fsync`] `done` runs after the fdatasync that covers
    /// the records, with [`Durability::Interval`] after the write, and an fdatasync follows
    /// within the interval.
    pub fn append_with(
        &mut self,
        records: Vec<Record>,
        durability: Durability,
        done: Done,
    ) -> Result<(), StorageError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned);
        }
        let records = records
            .into_iter()
            .map(|record| {
                let bytes = record.encode_parts();
                let meta = match record {
                    Record::Batch(b) => RecordMeta::Batch(BatchMeta {
                        channel_id: b.channel_id,
                        base_offset: b.base_offset,
                        timestamp_ms: b.timestamp_ms,
                        producer: b.producer,
                        entries: b
                            .messages
                            .into_iter()
                            .map(|m| (m.headers, m.payload.len() as u32))
                            .collect(),
                    }),
                    other => RecordMeta::Other(other),
                };
                (meta, bytes)
            })
            .collect();
        let mut queue = self.shared.queue.lock().expect("queue lock");
        if queue.closed {
            return Err(StorageError::Closed);
        }
        queue.jobs.push(Job::Append {
            records,
            done,
            durability,
        });
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Store {
    /// Opens the store in `dir`, recovering the log: a torn tail is cut off, the index and
    /// state are rebuilt from the last checkpoint on (or from scratch when there is none).
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StorageError> {
        let log_dir = dir.join("log");
        let index_dir = dir.join("index");
        std::fs::create_dir_all(&log_dir).map_err(|e| StorageError::io("create", &log_dir, e))?;
        let index = Index::open(&index_dir, &log_dir)?;
        let (state, summaries, active, active_len) = recover(&log_dir, &index)?;
        let (file, len) = match active {
            Some(id) => {
                let (file, len) = segment::open_for_append(&log_dir, id)?;
                debug_assert_eq!(len, active_len);
                (file, len)
            }
            None => (
                segment::create_segment(&log_dir, 0)?,
                segment::SEGMENT_HEADER_LEN,
            ),
        };
        let active_id = active.unwrap_or(0);
        let mut summaries = summaries;
        for (&id, summary) in summaries.range_mut(..active_id) {
            summary.spans.close();
            // Closed segments without a summary file (recovered from a format-3 checkpoint,
            // or summarized again): written now, so that checkpoints leave them out.
            if !index.has_summary_file(id) {
                if let Err(error) = index.write_summary(id, summary) {
                    tracing::warn!(%error, segment = id, "could not write a closed segment's summary file; checkpoints carry its summary");
                }
            }
        }
        summaries.entry(active_id).or_default().size = len;
        metrics::gauge!(metric::SEGMENTS).set(summaries.len() as f64);
        let shared = Arc::new(Shared {
            log_dir,
            direct_reads: AtomicBool::new(options.direct_reads),
            options,
            state: Mutex::new(state),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            index,
            summaries: Mutex::new(summaries),
            files: Mutex::new(HashMap::new()),
            direct_files: Mutex::new(HashMap::new()),
            direct_reads_done: AtomicU64::new(0),
            #[cfg(test)]
            refuse_direct_in_test: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            active_segment: AtomicU64::new(active_id),
            cache_dropped_to: AtomicU64::new(0),
            corrupt_reads: AtomicU64::new(0),
            deleting: Mutex::new(()),
            sealers: Mutex::new(Vec::new()),
        });
        let mut writer = Writer {
            shared: shared.clone(),
            file,
            id: active_id,
            len,
            unsynced: false,
            sync_requested: false,
            sync_by: None,
            last_checkpoint: Instant::now(),
            since_checkpoint: 0,
            index_failed: false,
            cache_dropped_to: 0,
            synced_to: len,
            old_tail: None,
        };
        writer.checkpoint()?;
        let handle = std::thread::Builder::new()
            .name("directmq-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StorageError::io("spawn writer thread", Path::new("-"), e))?;
        Ok(Store {
            shared,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Locks the state to decide and queue appends atomically: offsets handed out under one
    /// `Txn` are written in the order they were handed out.
    pub fn begin(&self) -> Txn<'_> {
        Txn {
            state: self.shared.state.lock().expect("state lock"),
            shared: &self.shared,
        }
    }

    /// Runs `f` on the state (read-only use).
    pub fn with_state<R>(&self, f: impl FnOnce(&LogState) -> R) -> R {
        f(&self.shared.state.lock().expect("state lock"))
    }

    /// Appends and waits for durability; for tools and tests (the broker uses [`Txn`]).
    pub fn append_blocking(&self, records: Vec<Record>) -> Result<(), Arc<StorageError>> {
        let (tx, rx) = mpsc::channel();
        self.begin()
            .append(records, Box::new(move |r| drop(tx.send(r))))
            .map_err(Arc::new)?;
        rx.recv()
            .unwrap_or_else(|_| Err(Arc::new(StorageError::Closed)))
    }

    /// Whether an fsync failure stopped the store.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Batches read whose checksum failed since start.
    pub fn corrupt_reads(&self) -> u64 {
        self.shared.corrupt_reads.load(Ordering::Relaxed)
    }

    /// Reads (of runs of batches) answered past the page cache since the store opened.
    pub fn direct_reads(&self) -> u64 {
        self.shared.direct_reads_done.load(Ordering::Relaxed)
    }

    /// Reads of data no longer cached go past the page cache: on unless turned off
    /// ([`StoreOptions::direct_reads`]) or refused by the file system.
    pub fn reads_past_cache(&self) -> bool {
        self.shared.direct_reads.load(Ordering::Relaxed)
    }

    /// Reads durable messages of a channel from `from` on: at most `max_messages`, and
    /// stopping once `max_bytes` of payload are collected (at least one message is returned
    /// when one exists). Starts at the first retained offset if `from` is below it.
    pub fn read(
        &self,
        channel_id: u64,
        from: u64,
        max_messages: usize,
        max_bytes: u64,
    ) -> Result<Vec<ReadMessage>, StorageError> {
        self.read_retrying(channel_id, from, max_messages, max_bytes, false)
            .map(|(messages, _)| messages)
    }

    /// [`Store::read`] that does not stop inside a batch (the batch that reaches
    /// `max_messages` or `max_bytes` is answered whole) and also answers the batches' read
    /// buffers, of which the payloads are slices: the payloads of one batch lie side by side
    /// in its buffer, so a sender can pass them on as one slice instead of copying each. A
    /// reader that delivers in steps smaller than the batches keeps the rest for its next
    /// step instead of reading (and checksumming) the batch again from the disk.
    pub fn read_whole_batches(
        &self,
        channel_id: u64,
        from: u64,
        max_messages: usize,
        max_bytes: u64,
    ) -> Result<(Vec<ReadMessage>, Vec<Bytes>), StorageError> {
        self.read_retrying(channel_id, from, max_messages, max_bytes, true)
    }

    fn read_retrying(
        &self,
        channel_id: u64,
        from: u64,
        max_messages: usize,
        max_bytes: u64,
        whole_batches: bool,
    ) -> Result<(Vec<ReadMessage>, Vec<Bytes>), StorageError> {
        match self.read_once(channel_id, from, max_messages, max_bytes, whole_batches) {
            Err(StorageError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                // Retention deleted a segment between the index lookup and the open. Once
                // its pass is over the index no longer points there: read again (what was
                // deleted now reads as starting later, which the caller sees).
                drop(self.shared.deleting.lock().expect("deleting lock"));
                self.read_once(channel_id, from, max_messages, max_bytes, whole_batches)
            }
            other => other,
        }
    }

    fn read_once(
        &self,
        channel_id: u64,
        from: u64,
        max_messages: usize,
        max_bytes: u64,
        whole_batches: bool,
    ) -> Result<(Vec<ReadMessage>, Vec<Bytes>), StorageError> {
        let mut buffers = Vec::new();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let Some(first) = self.shared.index.find(channel_id, from)? else {
            return Ok((out, buffers));
        };
        let mut expected = first.base_offset.max(from);
        // The first batch and those after it, so that a run read past the page cache can
        // start with the first.
        let mut entries = vec![first];
        entries.extend(self.shared.index.scan(channel_id, first.end_offset(), 15)?);
        let mut run: Option<Run> = None;
        'outer: loop {
            for (i, entry) in entries.iter().enumerate() {
                if entry.base_offset > expected {
                    self.shared.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                    return Err(StorageError::Corrupt {
                        segment: entry.segment,
                        position: entry.position,
                        reason: format!(
                            "channel {channel_id} has no batch for offsets {expected}..{}",
                            entry.base_offset
                        ),
                    });
                }
                let record = match run.as_ref().and_then(|run| run.record(entry)) {
                    Some(record) => record,
                    None => {
                        let budget = max_bytes.saturating_sub(bytes).max(u64::from(entry.len));
                        let (record, next_run) = self.read_run(&entries[i..], budget)?;
                        run = next_run;
                        record
                    }
                };
                let batch = self.decode_batch(entry, record.clone())?;
                buffers.push(record);
                let mut full = false;
                for (i, m) in batch.messages.into_iter().enumerate() {
                    let offset = batch.base_offset + i as u64;
                    if offset < expected {
                        continue;
                    }
                    bytes += m.payload.len() as u64;
                    out.push(ReadMessage {
                        offset,
                        timestamp_ms: batch.timestamp_ms,
                        headers: m.headers,
                        payload: m.payload,
                    });
                    expected = offset + 1;
                    full = full || out.len() >= max_messages || bytes >= max_bytes;
                    if full && !whole_batches {
                        break 'outer;
                    }
                }
                if full {
                    break 'outer;
                }
            }
            entries = self.shared.index.scan(channel_id, expected, 16)?;
            if entries.is_empty() {
                break;
            }
        }
        Ok((out, buffers))
    }

    /// The batch `entry` points at, and the buffer it was read into (its payloads are
    /// slices of it).
    fn read_batch(&self, entry: &IndexEntry) -> Result<(crate::Batch, Bytes), StorageError> {
        let bytes = self.read_record(entry.segment, entry.position, entry.len as usize)?;
        Ok((self.decode_batch(entry, bytes.clone())?, bytes))
    }

    /// The batch that `entry` points at, from its record's bytes.
    fn decode_batch(&self, entry: &IndexEntry, bytes: Bytes) -> Result<crate::Batch, StorageError> {
        let corrupt = |reason: String| {
            self.shared.corrupt_reads.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::CORRUPT_RECORDS).increment(1);
            tracing::error!(segment = entry.segment, position = entry.position, %reason, "corrupt batch refused");
            StorageError::Corrupt {
                segment: entry.segment,
                position: entry.position,
                reason,
            }
        };
        match Record::decode(bytes) {
            Ok(Record::Batch(batch))
                if batch.channel_id == entry.channel_id
                    && batch.base_offset == entry.base_offset =>
            {
                Ok(batch)
            }
            Ok(_) => Err(corrupt("the index points at another record".into())),
            Err(e) => Err(corrupt(e.to_string())),
        }
    }

    /// The `len` bytes at `position` of segment `id`, through the page cache.
    fn read_record(&self, id: u64, position: u64, len: usize) -> Result<Bytes, StorageError> {
        let file = self.file(id)?;
        segment::read_at(&file, position, len).map_err(|e| {
            StorageError::io("read", &segment::segment_path(&self.shared.log_dir, id), e)
        })
    }

    /// The record of `entries[0]`, and with it the run of records that follow it in the
    /// same segment, up to `budget` bytes, when they are read together past the page cache.
    ///
    /// Records no longer in the page cache are read past it ([`StoreOptions::direct_reads`]),
    /// as many side by side as the caller will take in one read: one disk read per MiB
    /// instead of one per batch, which with no kernel read-ahead past the cache is what
    /// keeps a catch-up from waiting on the disk. A run under [`DIRECT_READ_MIN`] is read
    /// through the cache, where the kernel's read-ahead serves small batches better.
    fn read_run(
        &self,
        entries: &[IndexEntry],
        budget: u64,
    ) -> Result<(Bytes, Option<Run>), StorageError> {
        let first = &entries[0];
        if self.shared.direct_reads.load(Ordering::Relaxed) {
            let mut len = u64::from(first.len);
            for (prev, next) in entries.iter().zip(&entries[1..]) {
                let contiguous = next.segment == first.segment
                    && next.position == prev.position + u64::from(prev.len);
                if !contiguous || len + u64::from(next.len) > budget {
                    break;
                }
                len += u64::from(next.len);
            }
            let active = self.shared.active_segment.load(Ordering::Acquire);
            let dropped = self.shared.cache_dropped_to.load(Ordering::Acquire);
            let cold = first.segment < active
                || (first.segment == active && first.position + len <= dropped);
            if cold && len >= DIRECT_READ_MIN {
                if let Some(bytes) =
                    self.read_direct(first.segment, first.position, len as usize)?
                {
                    self.shared
                        .direct_reads_done
                        .fetch_add(1, Ordering::Relaxed);
                    let run = Run {
                        segment: first.segment,
                        position: first.position,
                        bytes,
                    };
                    let record = run
                        .record(first)
                        .expect("the run starts with its first record");
                    return Ok((record, Some(run)));
                }
            }
        }
        let record = self.read_record(first.segment, first.position, first.len as usize)?;
        Ok((record, None))
    }

    /// [`segment::read_at_direct`], or `None` where the file system refuses direct reads
    /// (they stop for good then).
    fn read_direct(
        &self,
        id: u64,
        position: u64,
        len: usize,
    ) -> Result<Option<Bytes>, StorageError> {
        let path = || segment::segment_path(&self.shared.log_dir, id);
        let Some(file) = self.direct_file(id)? else {
            return Ok(None);
        };
        let read = segment::read_at_direct(&file, position, len);
        #[cfg(test)]
        let read = match self.shared.refuse_direct_in_test.load(Ordering::Relaxed) {
            true => Err(rustix::io::Errno::INVAL.into()),
            false => read,
        };
        match read {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if segment::refuses_direct(&e) => {
                self.refuse_direct(&path(), &e);
                Ok(None)
            }
            Err(e) => Err(StorageError::io("read", &path(), e)),
        }
    }

    /// Stops direct reads for good: the file system does not take them.
    fn refuse_direct(&self, path: &Path, error: &std::io::Error) {
        if self.shared.direct_reads.swap(false, Ordering::Relaxed) {
            tracing::info!(path = %path.display(), %error, "reads past the page cache refused; reading through it");
        }
    }

    /// Segment `id` opened for direct reads, or `None` where the file system refuses them.
    fn direct_file(&self, id: u64) -> Result<Option<Arc<File>>, StorageError> {
        match self.cached_file(&self.shared.direct_files, id, segment::open_direct) {
            Ok(file) => Ok(Some(file)),
            Err((path, e)) if segment::refuses_direct(&e) => {
                self.refuse_direct(&path, &e);
                Ok(None)
            }
            Err((path, e)) => Err(StorageError::io("open", &path, e)),
        }
    }

    fn file(&self, id: u64) -> Result<Arc<File>, StorageError> {
        self.cached_file(&self.shared.files, id, |path| File::open(path))
            .map_err(|(path, e)| StorageError::io("open", &path, e))
    }

    /// Segment `id` from `cache`, opened with `open` the first time it is asked for.
    fn cached_file(
        &self,
        cache: &Mutex<HashMap<u64, Arc<File>>>,
        id: u64,
        open: impl FnOnce(&Path) -> std::io::Result<File>,
    ) -> Result<Arc<File>, (PathBuf, std::io::Error)> {
        let mut files = cache.lock().expect("files lock");
        if let Some(f) = files.get(&id) {
            return Ok(f.clone());
        }
        let path = segment::segment_path(&self.shared.log_dir, id);
        let file = Arc::new(open(&path).map_err(|e| (path, e))?);
        files.insert(id, file.clone());
        Ok(file)
    }

    /// Payload bytes of a channel's messages at offsets `[from, ..)`, and the broker time of
    /// the message at `from` (the oldest not consumed), for lag reporting. Exact: a batch
    /// that `from` splits is read to subtract the messages before it.
    pub fn backlog(&self, channel_id: u64, from: u64) -> Result<(u64, Option<u64>), StorageError> {
        let Some(first) = self.shared.index.find(channel_id, from)? else {
            return Ok((0, None));
        };
        let mut bytes = first.bytes;
        if first.base_offset < from {
            let (batch, _) = self.read_batch(&first)?;
            let consumed = (from - first.base_offset) as usize;
            bytes -= batch.messages[..consumed.min(batch.messages.len())]
                .iter()
                .map(|m| m.payload.len() as u64)
                .sum::<u64>();
        }
        let mut next = first.end_offset();
        loop {
            let entries = self.shared.index.scan(channel_id, next, 256)?;
            let Some(last) = entries.last() else { break };
            next = last.end_offset();
            bytes += entries.iter().map(|e| e.bytes).sum::<u64>();
        }
        Ok((bytes, Some(first.timestamp_ms)))
    }

    /// Broker time of the message at `offset` (the first one from `offset` on that is still
    /// stored), `None` when there is none: the age of the oldest message a consumer that
    /// committed up to `offset` has not yet committed.
    pub fn timestamp_at(&self, channel_id: u64, offset: u64) -> Result<Option<u64>, StorageError> {
        Ok(self
            .shared
            .index
            .find(channel_id, offset)?
            .map(|e| e.timestamp_ms))
    }

    /// The first offset in `[from, to)` whose batch was appended at or after `timestamp_ms`,
    /// `to` when there is none. Batch times are assigned in offset order, so this is a binary
    /// search over the index: O(log n) lookups.
    pub fn offset_at_time(
        &self,
        channel_id: u64,
        from: u64,
        to: u64,
        timestamp_ms: u64,
    ) -> Result<u64, StorageError> {
        // The predicate "the first stored message at or after x was appended at or after
        // the time" is monotone in x; find the smallest x where it holds.
        let (mut lo, mut hi) = (from, to);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.shared.index.find(channel_id, mid)? {
                // Every message of a batch shares its time, so the whole rest of it is
                // older too.
                Some(e) if e.timestamp_ms < timestamp_ms => lo = e.end_offset().max(mid + 1),
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// The first batch boundary at or after `from` from which at most `max_bytes` of
    /// payload remain to the head (whole batches are kept or dropped): where a consumer
    /// must move to keep a channel's backlog under `max_bytes`.
    pub fn offset_keeping_bytes(
        &self,
        channel_id: u64,
        from: u64,
        max_bytes: u64,
    ) -> Result<u64, StorageError> {
        let mut batches: Vec<(u64, u64, u64)> = Vec::new();
        let mut next = from;
        loop {
            let entries = self.shared.index.scan(channel_id, next, 1024)?;
            let Some(last) = entries.last() else { break };
            next = last.end_offset();
            batches.extend(
                entries
                    .iter()
                    .map(|e| (e.base_offset, e.end_offset(), e.bytes)),
            );
        }
        let mut remaining: u64 = batches.iter().map(|b| b.2).sum();
        for &(base, end, bytes) in &batches {
            if remaining <= max_bytes {
                return Ok(base.max(from));
            }
            remaining -= bytes;
            next = end;
        }
        Ok(next.max(from))
    }

    /// Deletes every closed segment that holds only messages below their channel's floor.
    /// `floor(state, channel)` is the offset below which a channel's messages may go; a
    /// channel missing from the state (deleted) may lose everything. Before deleting, a
    /// snapshot of the durable state is written, so no last copy of a channel, cursor or
    /// producer state is ever deleted.
    pub fn retain(
        &self,
        floor: impl Fn(&LogState, u64) -> u64,
    ) -> Result<RetentionReport, StorageError> {
        let active = self.shared.active_segment.load(Ordering::Acquire);
        // Only the oldest segments go, in order: deleting one in the middle would leave a
        // hole in the channels it shares with a segment that must stay. A segment that is
        // mostly dead but pinned by a slow channel's few live batches is compacted: those
        // batches are copied forward into the active segment first.
        let mut candidates: Vec<(u64, u64)> = Vec::new();
        // (segment, channel, first offset, end of its span, floor)
        let mut to_copy: Vec<(u64, u64, u64, u64, u64)> = Vec::new();
        {
            let state = self.shared.state.lock().expect("state lock");
            let summaries = self.shared.summaries.lock().expect("summaries lock");
            for (id, summary) in summaries.iter() {
                if *id >= active {
                    break;
                }
                let live: Vec<(u64, crate::Span, u64)> = summary
                    .spans
                    .iter()
                    .filter(|(channel, _)| state.channel(*channel).is_some())
                    .map(|(channel, span)| (channel, span, floor(&state, channel)))
                    .filter(|(_, span, floor)| span.end_offset > *floor)
                    .collect();
                let live_bytes: u64 = live.iter().map(|(_, span, _)| span.bytes).sum();
                if !live.is_empty() && live_bytes * 2 > summary.size {
                    break;
                }
                to_copy.extend(live.into_iter().map(|(channel, span, floor)| {
                    (
                        *id,
                        channel,
                        span.first_offset.max(floor),
                        span.end_offset,
                        floor,
                    )
                }));
                candidates.push((*id, summary.size));
            }
        }
        if candidates.is_empty() {
            return Ok(RetentionReport::default());
        }
        let mut report = RetentionReport::default();
        for (segment, channel, first, end, floor) in to_copy {
            let (batches, bytes) = self.copy_forward(segment, channel, first, end, floor)?;
            report.batches_copied += batches;
            report.bytes_copied += bytes;
        }
        let (tx, rx) = mpsc::channel();
        {
            let _state = self.shared.state.lock().expect("state lock");
            let mut queue = self.shared.queue.lock().expect("queue lock");
            if queue.closed {
                return Err(StorageError::Closed);
            }
            queue.jobs.push(Job::Snapshot {
                done: Box::new(move |r| drop(tx.send(r))),
            });
        }
        self.shared.wake.notify_one();
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(StorageError::Io {
                    op: "write snapshot",
                    path: self.shared.log_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
            Err(_) => return Err(StorageError::Closed),
        }
        let mut touched = HashSet::new();
        let deleting = self.shared.deleting.lock().expect("deleting lock");
        for (id, size) in &candidates {
            let path = segment::segment_path(&self.shared.log_dir, *id);
            std::fs::remove_file(&path).map_err(|e| StorageError::io("delete", &path, e))?;
            self.shared.files.lock().expect("files lock").remove(id);
            self.shared
                .direct_files
                .lock()
                .expect("direct files lock")
                .remove(id);
            if let Err(error) = self.shared.index.drop_segment(*id) {
                // The segment is gone; its index file goes at the next start.
                tracing::warn!(%error, segment = id, "could not delete a segment's index file");
            }
            if let Some(summary) = self
                .shared
                .summaries
                .lock()
                .expect("summaries lock")
                .remove(id)
            {
                touched.extend(summary.spans.iter().map(|(channel, _)| channel));
            }
            report.segments_deleted += 1;
            report.bytes_freed += size;
        }
        segment::sync_dir(&self.shared.log_dir)?;
        {
            let mut state = self.shared.state.lock().expect("state lock");
            let summaries = self.shared.summaries.lock().expect("summaries lock");
            for channel_id in touched {
                let (first, bytes) = retained(&summaries, channel_id);
                match state.channel_mut(channel_id) {
                    Some(channel) => {
                        let first = first.unwrap_or(channel.next_offset);
                        self.shared.index.remove_range(channel_id, 0, first)?;
                        channel.first_offset = first;
                        channel.retained_bytes = bytes;
                    }
                    None => {
                        self.shared.index.remove_range(channel_id, 0, u64::MAX)?;
                    }
                }
            }
            metrics::gauge!(metric::SEGMENTS).set(summaries.len() as f64);
        }
        drop(deleting);
        metrics::counter!(metric::SEGMENTS_DELETED).increment(report.segments_deleted as u64);
        tracing::info!(
            segments = report.segments_deleted,
            bytes = report.bytes_freed,
            "retention deleted segments"
        );
        Ok(report)
    }

    /// Copies the batches of `channel` stored in `segment` that end above `floor` to the
    /// end of the log, durably; the index then answers from the copies. Replay ignores the
    /// copies for the state (their offsets are below the head) and indexes them.
    fn copy_forward(
        &self,
        segment: u64,
        channel: u64,
        first: u64,
        end: u64,
        floor: u64,
    ) -> Result<(usize, u64), StorageError> {
        const CHUNK_BYTES: u64 = 16 * 1024 * 1024;
        let mut copied = (0usize, 0u64);
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0u64;
        let flush = |chunk: &mut Vec<Record>, chunk_bytes: &mut u64| -> Result<(), StorageError> {
            if chunk.is_empty() {
                return Ok(());
            }
            self.append_blocking(std::mem::take(chunk))
                .map_err(|e| StorageError::Io {
                    op: "copy live batches forward",
                    path: self.shared.log_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            *chunk_bytes = 0;
            Ok(())
        };
        let mut from = self
            .shared
            .index
            .find(channel, first)?
            .map_or(first, |e| e.base_offset);
        // The segment's batches of the channel lie below `end` (its span's end): no need to
        // scan on to the channel's head.
        while from < end {
            let entries = self.shared.index.scan(channel, from, 256)?;
            let Some(last) = entries.last() else { break };
            from = last.base_offset + 1;
            for entry in entries
                .iter()
                .filter(|e| e.segment == segment && e.end_offset() > floor)
            {
                let (batch, _) = self.read_batch(entry)?;
                copied.0 += 1;
                copied.1 += u64::from(entry.len);
                chunk_bytes += u64::from(entry.len);
                chunk.push(Record::Batch(batch));
                if chunk_bytes >= CHUNK_BYTES {
                    flush(&mut chunk, &mut chunk_bytes)?;
                }
            }
        }
        flush(&mut chunk, &mut chunk_bytes)?;
        Ok(copied)
    }

    /// Bytes of all segment files and their index and summary files.
    pub fn disk_bytes(&self) -> u64 {
        let segments: u64 = self
            .shared
            .summaries
            .lock()
            .expect("summaries lock")
            .values()
            .map(|s| s.size)
            .sum();
        segments + self.shared.index.file_bytes()
    }

    /// Stops accepting appends, finishes every queued one (their completions run), writes a
    /// final checkpoint and joins the writer thread.
    pub fn close(&self) {
        self.shared.queue.lock().expect("queue lock").closed = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.writer.lock().expect("writer lock").take() {
            let _ = handle.join();
        }
        self.shared.join_sealers();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn retained(summaries: &BTreeMap<u64, SegmentSummary>, channel_id: u64) -> (Option<u64>, u64) {
    let mut first: Option<u64> = None;
    let mut bytes = 0;
    for summary in summaries.values() {
        if let Some(span) = summary.spans.get(channel_id) {
            first = Some(first.map_or(span.first_offset, |f| f.min(span.first_offset)));
            bytes += span.bytes;
        }
    }
    (first, bytes)
}

type Recovered = (LogState, BTreeMap<u64, SegmentSummary>, Option<u64>, u64);

fn recover(log_dir: &Path, index: &Index) -> Result<Recovered, StorageError> {
    let ids = segment::list_segments(log_dir)?;
    let mut summaries: BTreeMap<u64, SegmentSummary> = BTreeMap::new();
    let mut state = LogState::default();
    let checkpoint = index.load_checkpoint()?.filter(|c| {
        let path = segment::segment_path(log_dir, c.segment);
        let valid = ids.contains(&c.segment)
            && std::fs::metadata(&path)
                .map(|m| m.len() >= c.position)
                .unwrap_or(false);
        if !valid {
            tracing::warn!("the index checkpoint is ahead of the log; rebuilding the index");
        }
        valid
    });
    // Where replay indexes from, where it adds to the segment summaries from, and where it
    // applies records to the state from.
    let (start, summarize_from, apply_from) = match &checkpoint {
        Some(c) => {
            state.load(&c.state);
            summaries.extend(
                c.summaries
                    .iter()
                    .filter(|(id, _)| ids.contains(id))
                    .cloned(),
            );
            (
                c.index_from,
                (c.segment, c.position),
                (c.segment, c.position),
            )
        }
        None => {
            index.clear()?;
            (
                (0, 0),
                (0, 0),
                last_snapshot(log_dir, &ids)?.unwrap_or((0, 0)),
            )
        }
    };
    if let Err(error) = index.remove_stray_files(&ids) {
        tracing::warn!(%error, "could not delete stray index files");
    }
    // Segments closed before the checkpoint whose summaries it leaves out: from their
    // summary files, or summarized again from the segment where a file is missing or
    // damaged.
    let mut resummarize = BTreeSet::new();
    if let Some(c) = &checkpoint {
        for &id in ids.iter().filter(|&&id| id < c.segment) {
            if summaries.contains_key(&id) {
                continue;
            }
            match index.load_summary(id) {
                Some(summary) => {
                    summaries.insert(id, summary);
                }
                None => {
                    resummarize.insert(id);
                }
            }
        }
    }
    tracing::info!(
        segments = ids.len(),
        from_checkpoint = checkpoint.is_some(),
        "recovering the log"
    );
    let mut active_len = segment::SEGMENT_HEADER_LEN;
    for (i, &id) in ids.iter().enumerate() {
        if id < start.0 {
            // Indexed before the checkpoint: its index file, or the segment scanned again.
            if !index.load_sealed(id) {
                index_segment(log_dir, id, index)?;
                seal_or_keep(index, id);
            }
            if resummarize.contains(&id) {
                let (summary, whole) = summarize_segment(log_dir, id)?;
                if !whole {
                    // Its index file may list batches past the bad record, which the
                    // summary does not hold (retention could then delete them while a
                    // consumer needs them): indexed again from the records, both skip the
                    // same ones.
                    index.drop_segment(id)?;
                    index_segment(log_dir, id, index)?;
                    seal_or_keep(index, id);
                }
                summaries.insert(id, summary);
            }
            continue;
        }
        let last = i + 1 == ids.len();
        let summary = summaries.entry(id).or_default();
        let end = segment::scan(log_dir, id, |position, len, meta| {
            if id == start.0 && position < start.1 {
                return Ok(());
            }
            if let RecordMeta::Batch(b) = &meta {
                index.insert(&IndexEntry::of(b, id, position, len))?;
                if (id, position) >= summarize_from || resummarize.contains(&id) {
                    summary.add_batch(b);
                }
            }
            if (id, position) >= apply_from {
                state.apply(&meta);
            }
            Ok(())
        })?;
        match end {
            ScanEnd::Clean { len } => {
                summary.size = len;
                active_len = len;
            }
            ScanEnd::Bad {
                position,
                file_len,
                reason,
            } if last => {
                tracing::warn!(segment = id, position, cut = file_len - position, %reason, "cutting off the torn tail of the log");
                metrics::counter!(metric::TORN_TAIL_BYTES).increment(file_len - position);
                let path = segment::segment_path(log_dir, id);
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| StorageError::io("open", &path, e))?;
                let keep = position.max(segment::SEGMENT_HEADER_LEN);
                if position < segment::SEGMENT_HEADER_LEN {
                    // A segment whose header never became durable: rewrite it.
                    drop(file);
                    std::fs::remove_file(&path)
                        .map_err(|e| StorageError::io("remove", &path, e))?;
                    segment::create_segment(log_dir, id)?;
                } else {
                    file.set_len(keep)
                        .and_then(|_| file.sync_all())
                        .map_err(|e| StorageError::io("truncate", &path, e))?;
                }
                summary.size = keep;
                active_len = keep;
            }
            ScanEnd::Bad {
                position, reason, ..
            } => {
                metrics::counter!(metric::CORRUPT_RECORDS).increment(1);
                tracing::error!(segment = id, position, %reason, "CORRUPT RECORD in a closed segment: the records after it in this segment are skipped");
                summary.size = std::fs::metadata(segment::segment_path(log_dir, id))
                    .map(|m| m.len())
                    .unwrap_or(0);
            }
        }
        if !last {
            seal_or_keep(index, id);
        }
    }
    // Entries past a channel's head point at data the log no longer has.
    let heads: Vec<(u64, u64)> = state.channels().map(|c| (c.id, c.next_offset)).collect();
    for (channel_id, head) in heads {
        index.remove_range(channel_id, head, u64::MAX)?;
        let (first, bytes) = retained(&summaries, channel_id);
        if let Some(channel) = state.channel_mut(channel_id) {
            channel.first_offset = first.unwrap_or(head);
            channel.retained_bytes = bytes;
        }
    }
    let active = ids.last().copied();
    Ok((state, summaries, active, active_len))
}

/// Writes a closed segment's index file; if that fails (a full disk), its entries stay in
/// memory: the files are a cache, and a broker must start on a full disk.
fn seal_or_keep(index: &Index, id: u64) {
    if let Err(error) = index.seal(id) {
        tracing::warn!(%error, segment = id, "could not write an index file; the segment's entries stay in memory");
    }
}

/// What a closed segment holds (its summary file was missing or damaged).
/// Answers whether every record verified: a corrupt one ends the scan.
fn summarize_segment(log_dir: &Path, id: u64) -> Result<(SegmentSummary, bool), StorageError> {
    let mut summary = SegmentSummary::default();
    let end = segment::scan(log_dir, id, |_, _, meta| {
        if let RecordMeta::Batch(b) = &meta {
            summary.add_batch(b);
        }
        Ok(())
    })?;
    let whole = matches!(end, ScanEnd::Clean { .. });
    // A corrupt record ends the scan (the caller indexes the segment again, which logs and
    // counts it); the segment's size is its file's, as for a segment scanned in full.
    let path = segment::segment_path(log_dir, id);
    summary.size = std::fs::metadata(&path)
        .map_err(|e| StorageError::io("stat", &path, e))?
        .len();
    summary.spans.close();
    Ok((summary, whole))
}

/// Indexes every batch of a closed segment (its index file was missing or damaged).
fn index_segment(log_dir: &Path, id: u64, index: &Index) -> Result<(), StorageError> {
    let end = segment::scan(log_dir, id, |position, len, meta| {
        if let RecordMeta::Batch(b) = &meta {
            index.insert(&IndexEntry::of(b, id, position, len))?;
        }
        Ok(())
    })?;
    if let ScanEnd::Bad {
        position, reason, ..
    } = end
    {
        metrics::counter!(metric::CORRUPT_RECORDS).increment(1);
        tracing::error!(segment = id, position, %reason, "CORRUPT RECORD in a closed segment: the records after it in this segment are skipped");
    }
    Ok(())
}

/// Position of the last snapshot record in the log, if any.
fn last_snapshot(log_dir: &Path, ids: &[u64]) -> Result<Option<(u64, u64)>, StorageError> {
    let mut found = None;
    for &id in ids {
        segment::scan(log_dir, id, |position, _, meta| {
            if matches!(meta, RecordMeta::Other(Record::Snapshot(_))) {
                found = Some((id, position));
            }
            Ok(())
        })?;
    }
    Ok(found)
}

/// Runs of records at least this large that are no longer in the page cache are read past
/// it; see [`Store::read_run`].
const DIRECT_READ_MIN: u64 = 256 * 1024;

/// Records of one segment read side by side in one buffer.
struct Run {
    segment: u64,
    position: u64,
    bytes: Bytes,
}

impl Run {
    /// The record `entry` points at, when it lies in the run.
    fn record(&self, entry: &IndexEntry) -> Option<Bytes> {
        let from = entry.position.checked_sub(self.position)? as usize;
        let to = from + entry.len as usize;
        (entry.segment == self.segment && to <= self.bytes.len())
            .then(|| self.bytes.slice(from..to))
    }
}

/// Page cache dropped per step (one step per fdatasync): ~1.3 ms of `fadvise` on this
/// machine kind.
const CACHE_DROP_STEP: u64 = 8 * 1024 * 1024;

struct Writer {
    shared: Arc<Shared>,
    file: File,
    id: u64,
    len: u64,
    unsynced: bool,
    /// A group that needs its fdatasync before its completions run was taken.
    sync_requested: bool,
    /// Written data of [`Durability::Interval`] appends must be synced by then.
    sync_by: Option<Instant>,
    last_checkpoint: Instant,
    since_checkpoint: u64,
    /// An index insert failed: checkpoints stop, so the next start indexes from the last.
    index_failed: bool,
    /// The active segment's page cache is dropped below this position.
    cache_dropped_to: u64,
    /// The active segment's length at its last fdatasync.
    synced_to: u64,
    /// The previous segment's cached tail, `(file, from, to)`, dropped a step per sync after
    /// a roll: all at once it stalled every ack behind the roll for 8-11 ms.
    old_tail: Option<(File, u64, u64)>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let (jobs, closed) = {
                let mut queue = self.shared.queue.lock().expect("queue lock");
                while queue.jobs.is_empty() && !queue.closed {
                    let wait = match self.sync_by {
                        Some(by) if self.unsynced => by.saturating_duration_since(Instant::now()),
                        _ => self.shared.options.checkpoint_interval,
                    };
                    let (q, timeout) = self
                        .shared
                        .wake
                        .wait_timeout(queue, wait)
                        .expect("queue lock");
                    queue = q;
                    if timeout.timed_out() {
                        break;
                    }
                }
                (std::mem::take(&mut queue.jobs), queue.closed)
            };
            if jobs.is_empty() && !closed {
                self.idle();
                continue;
            }
            self.process(jobs);
            if closed
                && self
                    .shared
                    .queue
                    .lock()
                    .expect("queue lock")
                    .jobs
                    .is_empty()
            {
                break;
            }
        }
        // Index files being written are finished first, so that the final checkpoint counts
        // them and the next start need not scan those segments again.
        self.shared.join_sealers();
        if let Err(e) = self.sync().and_then(|_| self.checkpoint()) {
            tracing::error!(error = %e, "final checkpoint failed; the next start replays more of the log");
        }
    }

    fn idle(&mut self) {
        if self.unsynced {
            if let Err(e) = self.sync() {
                let _ = self.fail(e, Vec::new());
            }
        }
        if self.since_checkpoint > 0 {
            if let Err(e) = self.checkpoint() {
                tracing::warn!(error = %e, "checkpoint failed");
            }
        }
    }

    fn process(&mut self, jobs: Vec<Job>) {
        let mut group = Vec::new();
        let mut jobs = jobs.into_iter();
        let mut failed = None;
        for job in jobs.by_ref() {
            match job {
                Job::Append {
                    records,
                    done,
                    durability,
                } => {
                    match durability {
                        Durability::Fsync => self.sync_requested = true,
                        Durability::Interval(d) => {
                            let by = Instant::now() + d;
                            self.sync_by = Some(self.sync_by.map_or(by, |t| t.min(by)));
                        }
                    }
                    group.push((records, done));
                }
                Job::Snapshot { done } => {
                    failed = self.write_group(std::mem::take(&mut group)).err();
                    match &failed {
                        None => {
                            let snapshot = self.shared.state.lock().expect("state lock").snapshot();
                            let record = Record::Snapshot(Box::new(snapshot));
                            let bytes = Encoded::from(record.encode());
                            failed = self
                                .write_group(vec![(vec![(RecordMeta::Other(record), bytes)], done)])
                                .err();
                        }
                        Some(error) => done(Err(error.clone())),
                    }
                    if failed.is_none() {
                        if let Err(e) = self.sync() {
                            failed = Some(self.fail(e, Vec::new()));
                        }
                    }
                    if failed.is_some() {
                        break;
                    }
                }
            }
        }
        match &failed {
            None => failed = self.write_group(group).err(),
            Some(error) => {
                for (_, done) in group {
                    done(Err(error.clone()));
                }
            }
        }
        if let Some(error) = failed {
            // Everything taken with the failed group was decided against pending state the
            // failure made untrue: none of it may be written.
            for job in jobs {
                match job {
                    Job::Append { done, .. } | Job::Snapshot { done } => done(Err(error.clone())),
                }
            }
            return;
        }
        let due = self.since_checkpoint >= self.shared.options.checkpoint_bytes
            || (self.since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.shared.options.checkpoint_interval);
        if due {
            if let Err(e) = self.sync().and_then(|_| self.checkpoint()) {
                tracing::warn!(error = %e, "checkpoint failed");
            }
        }
        if self.len >= self.shared.options.segment_bytes {
            if let Err(e) = self.roll() {
                tracing::error!(error = %e, "could not start a new segment");
            }
        }
    }

    fn write_group(
        &mut self,
        group: Vec<(Vec<(RecordMeta, Encoded)>, Done)>,
    ) -> Result<(), Arc<StorageError>> {
        if group.is_empty() {
            return Ok(());
        }
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(self.fail(StorageError::Poisoned, group));
        }
        let start = self.len;
        let total: u64 = group
            .iter()
            .flat_map(|(r, _)| r.iter())
            .map(|(_, b)| b.len() as u64)
            .sum();
        let path = segment::segment_path(&self.shared.log_dir, self.id);
        if let Err(e) = write_all_vectored(&mut self.file, &group) {
            metrics::counter!(metric::WRITE_ERRORS).increment(1);
            let error = StorageError::io("append to", &path, e);
            // Take back whatever part of the group reached the file.
            if let Err(t) = self.file.set_len(start) {
                tracing::error!(error = %t, "could not cut a failed write back; stopping writes");
                self.shared.poisoned.store(true, Ordering::Release);
            }
            return Err(self.fail(error, group));
        }
        self.len += total;
        self.unsynced = true;
        metrics::counter!(metric::BYTES_WRITTEN).increment(total);
        metrics::histogram!(metric::GROUP_APPENDS).record(group.len() as f64);
        let sync_now = self.sync_requested || self.sync_by.is_some_and(|by| Instant::now() >= by);
        if sync_now {
            if let Err(e) = self.sync() {
                return Err(self.fail(e, group));
            }
        }
        self.since_checkpoint += total;
        // Durable: apply in log order, then complete.
        // Indexed first, outside the state lock: whoever sees the state's new heads (a
        // session opening, a consumer told by a completion) must find the batches in the
        // index, and publishes planning their offsets need the lock meanwhile.
        let mut position = start;
        let mut entries = Vec::new();
        for (records, _) in &group {
            for (meta, bytes) in records {
                if let RecordMeta::Batch(b) = meta {
                    entries.push(IndexEntry::of(b, self.id, position, bytes.len() as u32));
                }
                position += bytes.len() as u64;
            }
        }
        if let Err(e) = self.shared.index.insert_all(&entries) {
            // No checkpoint may follow: it would let the next start skip indexing these.
            self.index_failed = true;
            tracing::error!(error = %e, "index insert failed; no more checkpoints, the next start indexes from the last one");
        }
        {
            let mut state = self.shared.state.lock().expect("state lock");
            let mut summaries = self.shared.summaries.lock().expect("summaries lock");
            let summary = summaries.entry(self.id).or_default();
            for (records, _) in &group {
                for (meta, _) in records {
                    if let RecordMeta::Batch(b) = meta {
                        summary.add_batch(b);
                    }
                    // A snapshot restates what the state already holds; applying it would
                    // also reset the pending offsets of appends queued behind it.
                    if !matches!(meta, RecordMeta::Other(Record::Snapshot(_))) {
                        state.apply(meta);
                    }
                }
            }
            summary.size = self.len;
        }
        for (_, done) in group {
            done(Ok(()));
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        if !self.unsynced {
            return Ok(());
        }
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages; nothing
            // written since the last good fsync can be trusted, so stop writing.
            self.shared.poisoned.store(true, Ordering::Release);
            let path = segment::segment_path(&self.shared.log_dir, self.id);
            tracing::error!(error = %e, "fdatasync failed; the log stops accepting writes");
            return Err(StorageError::io("fdatasync", &path, e));
        }
        metrics::counter!(metric::FSYNCS).increment(1);
        metrics::histogram!(metric::FSYNC_SECONDS).record(started.elapsed().as_secs_f64());
        self.unsynced = false;
        self.sync_requested = false;
        self.sync_by = None;
        let written = self.len.saturating_sub(self.synced_to);
        self.synced_to = self.len;
        self.drop_cache(written);
        Ok(())
    }

    /// Drops clean pages of the active segment older than the cache window, in steps of at
    /// least [`CACHE_DROP_STEP`], and a step of the previous segment's tail as large as what
    /// this sync covered (so the tail goes faster than new data comes). Only advice:
    /// failures are ignored.
    fn drop_cache(&mut self, written: u64) {
        if let Some((file, from, to)) = &mut self.old_tail {
            let step = (*to - *from).min(CACHE_DROP_STEP.max(written));
            let _ = rustix::fs::fadvise(
                &*file,
                *from,
                std::num::NonZeroU64::new(step),
                rustix::fs::Advice::DontNeed,
            );
            *from += step;
            if *from >= *to {
                self.old_tail = None;
            }
        }
        let window = self.shared.options.page_cache_window_bytes;
        let upto = self.len.saturating_sub(window);
        if upto < self.cache_dropped_to + CACHE_DROP_STEP {
            return;
        }
        let len = std::num::NonZeroU64::new(upto - self.cache_dropped_to);
        let _ = rustix::fs::fadvise(
            &self.file,
            self.cache_dropped_to,
            len,
            rustix::fs::Advice::DontNeed,
        );
        self.cache_dropped_to = upto;
        self.shared.cache_dropped_to.store(upto, Ordering::Release);
    }

    /// Fails `group` and everything queued behind it: they were decided against pending
    /// state that the failed write makes untrue.
    fn fail(
        &mut self,
        error: StorageError,
        group: Vec<(Vec<(RecordMeta, Encoded)>, Done)>,
    ) -> Arc<StorageError> {
        tracing::error!(%error, "append failed");
        let error = Arc::new(error);
        let queued = {
            let mut state = self.shared.state.lock().expect("state lock");
            state.reset_pending();
            std::mem::take(&mut self.shared.queue.lock().expect("queue lock").jobs)
        };
        for (_, done) in group {
            done(Err(error.clone()));
        }
        for job in queued {
            match job {
                Job::Append { done, .. } | Job::Snapshot { done } => done(Err(error.clone())),
            }
        }
        error
    }

    fn checkpoint(&mut self) -> Result<(), StorageError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            // Bytes of the failed group may sit in the file unapplied; a checkpoint past
            // them would hide them from the next recovery's replay.
            return Err(StorageError::Poisoned);
        }
        if self.index_failed {
            return Ok(());
        }
        let started = Instant::now();
        let state = self.shared.state.lock().expect("state lock").snapshot();
        let bytes = self.shared.index.encode_checkpoint(
            self.id,
            self.len,
            &state,
            &self.shared.summaries.lock().expect("summaries lock"),
        );
        drop(state);
        self.shared.index.write_checkpoint(&bytes)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        tracing::debug!(
            millis = started.elapsed().as_secs_f64() * 1e3,
            "checkpoint written"
        );
        Ok(())
    }

    fn roll(&mut self) -> Result<(), StorageError> {
        self.sync()?;
        let next = self.id + 1;
        let file = segment::create_segment(&self.shared.log_dir, next)?;
        let old = std::mem::replace(&mut self.file, file);
        if self.len > self.cache_dropped_to {
            // Replaces the tail of an earlier roll if that one is not gone yet: what is left
            // of it is left to the kernel.
            self.old_tail = Some((old, self.cache_dropped_to, self.len));
        }
        self.cache_dropped_to = 0;
        self.shared.cache_dropped_to.store(0, Ordering::Release);
        self.synced_to = segment::SEGMENT_HEADER_LEN;
        self.id = next;
        self.len = segment::SEGMENT_HEADER_LEN;
        self.shared.active_segment.store(next, Ordering::Release);
        {
            let mut summaries = self.shared.summaries.lock().expect("summaries lock");
            if let Some(closed) = summaries.get_mut(&(next - 1)) {
                closed.spans.close();
            }
            summaries.entry(next).or_default().size = self.len;
            metrics::gauge!(metric::SEGMENTS).set(summaries.len() as f64);
        }
        // The closed segment's index file is written off this thread (~10 MB for a segment
        // of 1 KiB batches); its entries answer from memory until then. Its summary file
        // too: checkpoints carry its summary until then.
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("directmq-index-seal".into())
            .spawn(move || {
                // Every closed segment still in memory (an earlier failure is retried), and
                // the one just closed even if it holds no batch.
                if let Err(error) = shared
                    .index
                    .seal_closed(next)
                    .and_then(|()| shared.index.seal(next - 1))
                {
                    tracing::warn!(%error, "could not write a closed segment's index file; its entries stay in memory");
                }
                // Every closed segment without a summary file: the one just closed, and any
                // whose file could not be written before (a full disk).
                let unfiled: Vec<(u64, SegmentSummary)> = shared
                    .summaries
                    .lock()
                    .expect("summaries lock")
                    .range(..next)
                    .filter(|(id, _)| !shared.index.has_summary_file(**id))
                    .map(|(id, summary)| (*id, summary.clone()))
                    .collect();
                for (id, summary) in unfiled {
                    if let Err(error) = shared.index.write_summary(id, &summary) {
                        tracing::warn!(%error, segment = id, "could not write a closed segment's summary file; checkpoints carry its summary");
                    }
                }
            });
        match spawned {
            Ok(handle) => {
                let mut sealers = self.shared.sealers.lock().expect("sealers lock");
                sealers.retain(|h| !h.is_finished());
                sealers.push(handle);
            }
            Err(error) => {
                tracing::warn!(%error, "could not start a thread to write an index file")
            }
        }
        Ok(())
    }
}

fn write_all_vectored(
    file: &mut File,
    group: &[(Vec<(RecordMeta, Encoded)>, Done)],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = group
        .iter()
        .flat_map(|(r, _)| r.iter())
        .flat_map(|(_, encoded)| encoded.parts())
        .map(|part| IoSlice::new(part))
        .collect();
    // IOV_MAX is 1024 on Linux.
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let take = rest.len().min(1024);
        let n = file.write_vectored(&rest[..take])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
