//! The batch index and the checkpoint (docs/storage.md §4).
//!
//! A closed segment's batch entries live in an index file beside it, written once when the
//! segment closes; the open segments' entries live in memory; the checkpoint is a file of its
//! own. Nothing here is the only copy of anything: every entry can be rebuilt from the
//! segment files, and is, when an index file or the checkpoint is missing or damaged.

use std::collections::{BTreeMap, VecDeque};

use foldhash::{HashMap, HashMapExt, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::state::StateSnapshot;
use crate::StorageError;

/// Where a batch is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub channel_id: u64,
    pub base_offset: u64,
    pub segment: u64,
    pub position: u64,
    pub len: u32,
    pub count: u32,
    pub timestamp_ms: u64,
    pub bytes: u64,
}

impl IndexEntry {
    /// Where the batch record `meta`, `len` bytes at `position` of `segment`, is stored.
    pub fn of(meta: &crate::record::BatchMeta, segment: u64, position: u64, len: u32) -> Self {
        IndexEntry {
            channel_id: meta.channel_id,
            base_offset: meta.base_offset,
            segment,
            position,
            len,
            count: meta.entries.len() as u32,
            timestamp_ms: meta.timestamp_ms,
            bytes: meta.payload_bytes(),
        }
    }

    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
}

/// Which part of one segment a channel occupies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub first_offset: u64,
    pub end_offset: u64,
    pub bytes: u64,
}

/// What one segment holds, per channel; retention decides from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    pub size: u64,
    pub spans: Spans,
}

impl SegmentSummary {
    pub fn add(&mut self, channel_id: u64, first: u64, end: u64, bytes: u64) {
        self.spans.add(channel_id, first, end, bytes);
    }

    /// Adds a batch stored in the segment.
    pub fn add_batch(&mut self, batch: &crate::record::BatchMeta) {
        self.add(
            batch.channel_id,
            batch.base_offset,
            batch.end_offset(),
            batch.payload_bytes(),
        );
    }
}

/// A segment's spans by channel. While the segment is written to they are a hash map (a
/// linear search per appended batch cost the writer a tenth of its time with thousands of
/// channels, a tree a few percent); once it is closed, a list sorted by channel, 32 bytes a
/// channel, a third less than the tree's ~47: a log of many segments of many channels keeps
/// one per pair in memory.
///
/// Serialized as the number of pairs and then the pairs, sorted by channel: exactly as
/// bincode wrote the map and, before it, the list of pairs, so checkpoints stay readable.
#[derive(Debug, Clone, Default)]
pub struct Spans {
    open: HashMap<u64, Span>,
    /// By channel id; used when `open` is empty.
    closed: Vec<(u64, Span)>,
}

impl Spans {
    pub fn add(&mut self, channel_id: u64, first: u64, end: u64, bytes: u64) {
        let widen = |span: &mut Span| {
            span.first_offset = span.first_offset.min(first);
            span.end_offset = span.end_offset.max(end);
            span.bytes += bytes;
        };
        if self.open.is_empty() {
            if let Ok(i) = self.closed.binary_search_by_key(&channel_id, |(id, _)| *id) {
                widen(&mut self.closed[i].1);
                return;
            }
            // A closed segment does not grow; a recovered active one does.
            self.open = std::mem::take(&mut self.closed).into_iter().collect();
        }
        self.open
            .entry(channel_id)
            .and_modify(widen)
            .or_insert(Span {
                first_offset: first,
                end_offset: end,
                bytes,
            });
    }

    /// Turns the map into the sorted list: the segment is closed.
    pub fn close(&mut self) {
        if self.open.is_empty() {
            return;
        }
        // The list is empty while the map is used.
        self.closed = std::mem::take(&mut self.open).into_iter().collect();
        self.closed.sort_unstable_by_key(|(id, _)| *id);
    }

    pub fn get(&self, channel_id: u64) -> Option<&Span> {
        if self.open.is_empty() {
            self.closed
                .binary_search_by_key(&channel_id, |(id, _)| *id)
                .ok()
                .map(|i| &self.closed[i].1)
        } else {
            self.open.get(&channel_id)
        }
    }

    /// Every channel's span, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Span)> + '_ {
        let closed = self.closed.iter().map(|(id, span)| (*id, *span));
        let open = self.open.iter().map(|(id, span)| (*id, *span));
        closed.chain(open)
    }

    pub fn len(&self) -> usize {
        self.closed.len() + self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the spans are the sorted list (or empty).
    #[cfg(test)]
    pub fn is_closed(&self) -> bool {
        self.open.is_empty()
    }
}

impl PartialEq for Spans {
    fn eq(&self, other: &Spans) -> bool {
        let sorted = |s: &Spans| {
            let mut v: Vec<(u64, Span)> = s.iter().collect();
            v.sort_unstable_by_key(|(id, _)| *id);
            v
        };
        sorted(self) == sorted(other)
    }
}

impl Eq for Spans {}

impl Serialize for Spans {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.open.is_empty() {
            serializer.collect_seq(self.closed.iter())
        } else {
            // The active segment: sorted here, so that the bytes do not depend on a hash.
            let mut pairs: Vec<(u64, Span)> = self.iter().collect();
            pairs.sort_unstable_by_key(|(id, _)| *id);
            serializer.collect_seq(pairs.iter())
        }
    }
}

impl<'de> Deserialize<'de> for Spans {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Spans, D::Error> {
        let mut closed = Vec::<(u64, Span)>::deserialize(deserializer)?;
        closed.sort_by_key(|(id, _)| *id);
        if closed.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(serde::de::Error::custom(
                "a channel twice in a segment summary",
            ));
        }
        closed.shrink_to_fit();
        Ok(Spans {
            open: HashMap::new(),
            closed,
        })
    }
}

/// A consistent point of the log: everything before `(segment, position)` is reflected in
/// `state` and in the summaries, and every segment before `index_from` had its index file
/// written (recovery scans again from there: the entries of segments without one were only
/// in memory).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: u32,
    pub segment: u64,
    pub position: u64,
    pub state: StateSnapshot,
    /// The summaries of the segments without a summary file (the active one, and closed
    /// ones whose file is not written yet).
    pub summaries: Vec<(u64, SegmentSummary)>,
    /// Set by [`Index::save_checkpoint`].
    pub index_from: (u64, u64),
}

/// Format 4: closed segments' summaries in files of their own, and only the others in the
/// checkpoint. Format 3 held every summary, so it is read as well; a broker that knows only
/// format 3 ignores a format-4 checkpoint and indexes the log again, rather than take the
/// missing summaries for empty segments. Formats 1 and 2 kept the batch index and the
/// checkpoint in a sled database. A checkpoint of another format is ignored, so the log is
/// indexed again.
const CHECKPOINT_FORMAT: u32 = 4;
/// The earlier format this one reads.
const CHECKPOINT_FORMAT_READ: u32 = 3;
/// The checkpoint: bincode, then a crc32c of it.
const CHECKPOINT_FILE: &str = "checkpoint";
/// What a sled database of formats 1 and 2 left in the directory.
const SLED_FILES: [&str; 3] = ["conf", "db", "blobs"];

/// An index file: this header, the fence (one [`FENCE_BYTES`] row per channel, by channel
/// id), every entry ([`SLOT_BYTES`] each, by channel then base offset), then a crc32c of
/// everything before it.
const FILE_MAGIC: &[u8; 8] = b"DMQIDX\0\x01";
/// Magic, segment id, segment length covered, channels, entries.
const FILE_HEADER: usize = 40;
/// Channel id, first entry, entries, first base offset, last base offset.
const FENCE_BYTES: usize = 40;
/// Base offset, position, length, count, timestamp, payload bytes.
const SLOT_BYTES: usize = 40;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
}

/// Where the index file of segment `id` lives: beside it.
pub fn index_path(log_dir: &Path, id: u64) -> PathBuf {
    log_dir.join(format!("{id:020}.idx"))
}

/// Where the summary file of closed segment `id` lives: beside it. Magic, segment id, the
/// bincode of its [`SegmentSummary`], then a crc32c of everything before it.
pub fn summary_path(log_dir: &Path, id: u64) -> PathBuf {
    log_dir.join(format!("{id:020}.sum"))
}

const SUMMARY_MAGIC: &[u8; 8] = b"DMQSUM\0\x01";

/// Writes `bytes` to `tmp`, `fdatasync`s it and renames it over `path` (the rename is not made
/// durable here). A temporary file that could not be written is deleted.
fn write_synced(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let write = || -> std::io::Result<()> {
        let mut file = File::create(tmp)?;
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_data()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(tmp);
        return Err(StorageError::io("write", tmp, e));
    }
    std::fs::rename(tmp, path).map_err(|e| StorageError::io("rename", tmp, e))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// An entry without what its place already says (channel and segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    base_offset: u64,
    position: u64,
    len: u32,
    count: u32,
    timestamp_ms: u64,
    bytes: u64,
}

impl Slot {
    fn of(e: &IndexEntry) -> Slot {
        Slot {
            base_offset: e.base_offset,
            position: e.position,
            len: e.len,
            count: e.count,
            timestamp_ms: e.timestamp_ms,
            bytes: e.bytes,
        }
    }

    fn entry(&self, channel_id: u64, segment: u64) -> IndexEntry {
        IndexEntry {
            channel_id,
            base_offset: self.base_offset,
            segment,
            position: self.position,
            len: self.len,
            count: self.count,
            timestamp_ms: self.timestamp_ms,
            bytes: self.bytes,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.base_offset.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Slot {
        Slot {
            base_offset: u64_at(b, 0),
            position: u64_at(b, 8),
            len: u32_at(b, 16),
            count: u32_at(b, 20),
            timestamp_ms: u64_at(b, 24),
            bytes: u64_at(b, 32),
        }
    }
}

/// Upserts `slot` into a list sorted by base offset.
fn upsert_sorted(slots: &mut Vec<Slot>, slot: Slot) {
    match slots.binary_search_by_key(&slot.base_offset, |s| s.base_offset) {
        Ok(i) => slots[i] = slot,
        Err(i) => slots.insert(i, slot),
    }
}

/// One open segment's entries, per channel, sorted by base offset. Shared with a thread
/// writing the segment's index file; a change meanwhile copies it (and the file is not used).
type Channels = HashMap<u64, Vec<Slot>>;

/// Where a channel's entries are in an index file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fence {
    /// In a `u32`, as `count`: a fence row is kept in memory per channel per closed
    /// segment, and a segment holds fewer than 2^32 entries (the file says so, or is not
    /// used).
    start: u32,
    count: u32,
    first_base: u64,
    last_base: u64,
}

/// A closed segment's index file, read with `pread`: only its fence is in memory. It is
/// opened for each lookup, not held open: a long log would otherwise hold a descriptor per
/// segment.
#[derive(Debug)]
struct IndexFile {
    path: PathBuf,
    /// The file's size.
    bytes: u64,
    /// Where the entries start in the file.
    entries_at: u64,
    /// By channel id (a sorted list: 32 bytes a channel, half a hash map's).
    fence: Vec<(u64, Fence)>,
}

impl IndexFile {
    fn fence(&self, channel_id: u64) -> Option<&Fence> {
        self.fence
            .binary_search_by_key(&channel_id, |(id, _)| *id)
            .ok()
            .map(|i| &self.fence[i].1)
    }

    fn slots(&self, file: &File, first: u64, n: u64) -> std::io::Result<Vec<Slot>> {
        let mut buf = vec![0u8; n as usize * SLOT_BYTES];
        file.read_exact_at(&mut buf, self.entries_at + first * SLOT_BYTES as u64)?;
        Ok(buf.chunks_exact(SLOT_BYTES).map(Slot::decode).collect())
    }

    fn base(&self, file: &File, i: u64) -> std::io::Result<u64> {
        let mut buf = [0u8; 8];
        file.read_exact_at(&mut buf, self.entries_at + i * SLOT_BYTES as u64)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// How many of the channel's entries have a base offset at most `x`.
    fn count_up_to(&self, file: &File, fence: &Fence, x: u64) -> std::io::Result<u64> {
        if fence.first_base > x {
            return Ok(0);
        }
        if fence.last_base <= x {
            return Ok(u64::from(fence.count));
        }
        let (mut lo, mut hi) = (0, u64::from(fence.count));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.base(file, u64::from(fence.start) + mid)? <= x {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The channel's visible entries (outside `hidden`) from the last one at or below `at`
    /// (or the first one, if none is) on, at most `max`.
    fn read(
        &self,
        segment: u64,
        channel_id: u64,
        fence: &Fence,
        hidden: &[(u64, u64)],
        at: u64,
        max: usize,
    ) -> std::io::Result<Vec<IndexEntry>> {
        let file = File::open(&self.path)?;
        let visible = |base: u64| !hidden.iter().any(|&(f, t)| base >= f && base < t);
        // If the last entry at or below `at` is hidden, so is any use of one before it: a
        // visible batch before a hidden one ends at or below the hidden one's base.
        let start = self.count_up_to(&file, fence, at)?.saturating_sub(1);
        let mut out = Vec::new();
        let mut i = start;
        let count = u64::from(fence.count);
        while i < count && out.len() < max {
            let n = (count - i).min((max - out.len()).max(16) as u64);
            for slot in self.slots(&file, u64::from(fence.start) + i, n)? {
                if visible(slot.base_offset) && out.len() < max {
                    out.push(slot.entry(channel_id, segment));
                }
            }
            i += n;
        }
        Ok(out)
    }
}

/// A closed segment's entries: its file, and ranges of channels' entries removed since it
/// was written (a deleted channel, a tail cut off), by channel: `[from, to)`.
#[derive(Debug)]
struct Sealed {
    file: Arc<IndexFile>,
    hidden: Vec<(u64, u64, u64)>,
}

#[derive(Debug, Default)]
struct Segments {
    open: BTreeMap<u64, Arc<Channels>>,
    sealed: BTreeMap<u64, Sealed>,
    /// Segments whose file a thread is writing.
    sealing: HashSet<u64>,
    /// Which closed segments hold each channel's entries, so that a lookup reads a few
    /// fences, not one per segment of the log (a day's backlog is thousands of segments).
    by_channel: HashMap<u64, ChannelSegments>,
}

/// The closed segments holding a channel's entries.
#[derive(Debug, Default)]
struct ChannelSegments {
    /// Segments whose ranges of base offsets overlap no other's here: (first base offset,
    /// segment), sorted. Nearly all are: a channel's offsets grow with the log, so a closed
    /// segment joins at the end and retention takes from the front. A pair per channel per
    /// closed segment is kept, so 16 bytes, not a tree's ~48 (the last base offset is in
    /// the segment's fence).
    regular: VecDeque<(u64, u64)>,
    /// Segments whose range overlaps another's (compaction copies) or with entries hidden:
    /// always read.
    special: Vec<u64>,
}

impl ChannelSegments {
    /// Where a regular segment whose first base offset is `first` goes.
    fn regular_at(&self, first: u64) -> usize {
        self.regular.partition_point(|(f, _)| *f < first)
    }

    /// Takes `segment` off the regular ones, if it is one, starting at `first`.
    fn remove_regular(&mut self, first: u64, segment: u64) {
        let i = self.regular_at(first);
        if self.regular.get(i) == Some(&(first, segment)) {
            self.regular.remove(i);
        }
    }
}

impl Segments {
    /// Registers a closed segment's file and its channels.
    fn add_sealed(&mut self, segment: u64, file: IndexFile) {
        for (channel, fence) in &file.fence {
            let cs = self.by_channel.entry(*channel).or_default();
            let i = cs.regular_at(fence.first_base);
            // The one before starts below this one: does it end below too? (A regular
            // segment is sealed with a fence for the channel; without one, assume it
            // overlaps: a special segment is only read more often.)
            let before = i.checked_sub(1).map(|b| cs.regular[b].1);
            let overlaps = before.is_some_and(|b| {
                self.sealed
                    .get(&b)
                    .and_then(|s| s.file.fence(*channel))
                    .is_none_or(|f| f.last_base >= fence.first_base)
            }) || cs
                .regular
                .get(i)
                .is_some_and(|(first, _)| *first <= fence.last_base);
            if overlaps {
                cs.special.push(segment);
            } else {
                cs.regular.insert(i, (fence.first_base, segment));
            }
        }
        self.sealed.insert(
            segment,
            Sealed {
                file: Arc::new(file),
                hidden: Vec::new(),
            },
        );
    }

    /// Forgets a closed segment's file and its channels.
    fn remove_sealed(&mut self, segment: u64) {
        let Some(sealed) = self.sealed.remove(&segment) else {
            return;
        };
        for (channel, fence) in &sealed.file.fence {
            let Some(cs) = self.by_channel.get_mut(channel) else {
                continue;
            };
            cs.remove_regular(fence.first_base, segment);
            cs.special.retain(|s| *s != segment);
            if cs.regular.is_empty() && cs.special.is_empty() {
                self.by_channel.remove(channel);
            }
        }
    }

    /// The closed segments a lookup of `channel` at `at` for `max` entries must read: the
    /// regular one holding (or last before) `at`, the next `max` regular ones, and every
    /// special one.
    fn sealed_for(&self, channel: u64, at: u64, max: usize) -> Vec<u64> {
        let Some(cs) = self.by_channel.get(&channel) else {
            return Vec::new();
        };
        let mut ids: Vec<u64> = cs.special.clone();
        // The first starting above `at`.
        let above = cs.regular.partition_point(|(first, _)| *first <= at);
        if let Some(b) = above.checked_sub(1) {
            ids.push(cs.regular[b].1);
        }
        ids.extend(
            cs.regular
                .range(above..)
                .take(max)
                .map(|(_, segment)| *segment),
        );
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The batch index (per closed segment an index file, the open segments in memory) and
/// the checkpoint.
///
/// Memory no longer follows the log's batches: per closed segment, a 32-byte fence row and a
/// 16-byte entry in the channel's list of segments per channel in it; the active segment's
/// entries (at most one per record it holds).
#[derive(Debug)]
pub struct Index {
    /// Where the checkpoint file is.
    dir: PathBuf,
    log_dir: PathBuf,
    segments: Mutex<Segments>,
    /// Closed segments whose summary is in a file of its own, and the file's size: the
    /// checkpoint leaves them out.
    summary_files: Mutex<BTreeMap<u64, u64>>,
}

/// Where a reader looks for a channel's entries.
enum Source {
    Memory(Vec<IndexEntry>),
    File {
        segment: u64,
        file: Arc<IndexFile>,
        fence: Fence,
        hidden: Vec<(u64, u64)>,
    },
}

impl Index {
    /// Opens the index: the checkpoint lives in `dir`, index files in `log_dir`. The sled
    /// database of an earlier format found in `dir` is deleted: the log gives back all it held.
    pub fn open(dir: &Path, log_dir: &Path) -> Result<Index, StorageError> {
        if SLED_FILES.iter().any(|f| dir.join(f).exists()) {
            tracing::info!(dir = %dir.display(), "deleting the index of an earlier format; indexing the log again");
            std::fs::remove_dir_all(dir).map_err(|e| StorageError::io("remove", dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io("create", dir, e))?;
        Ok(Index {
            dir: dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            segments: Mutex::new(Segments::default()),
            summary_files: Mutex::new(BTreeMap::new()),
        })
    }

    fn segments(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().expect("index lock")
    }

    pub fn insert(&self, entry: &IndexEntry) -> Result<(), StorageError> {
        self.insert_all(std::slice::from_ref(entry))
    }

    /// Indexes batches; one already indexed (same segment, channel and base offset) is
    /// replaced. An entry of a segment whose file is written is already in it (recovery
    /// scanning a segment again).
    pub fn insert_all(&self, entries: &[IndexEntry]) -> Result<(), StorageError> {
        let mut segments = self.segments();
        let segments = &mut *segments;
        // Entries come in runs of one segment (a write group): its map is found once a run.
        for run in entries.chunk_by(|a, b| a.segment == b.segment) {
            let segment = run[0].segment;
            if segments.sealed.contains_key(&segment) {
                continue;
            }
            let channels = Arc::make_mut(segments.open.entry(segment).or_default());
            for e in run {
                let slots = channels.entry(e.channel_id).or_default();
                let slot = Slot::of(e);
                match slots.last() {
                    Some(last) if last.base_offset >= slot.base_offset => {
                        upsert_sorted(slots, slot)
                    }
                    _ => slots.push(slot),
                }
            }
        }
        Ok(())
    }

    /// The channel's entries starting with the last one whose base offset is at most `at`
    /// (or the first one, if none is), at most `max`. Where two segments hold a batch (a
    /// compaction copy and its original), the newer one's entry is answered.
    fn collect(
        &self,
        channel_id: u64,
        at: u64,
        max: usize,
    ) -> Result<Vec<IndexEntry>, StorageError> {
        // (first base, last base, source)
        let mut sources: Vec<(u64, u64, Source)> = Vec::new();
        {
            let segments = self.segments();
            for (&segment, channels) in &segments.open {
                let Some(slots) = channels.get(&channel_id) else {
                    continue;
                };
                let (Some(first), Some(last)) = (slots.first(), slots.last()) else {
                    continue;
                };
                let start = slots
                    .partition_point(|s| s.base_offset <= at)
                    .saturating_sub(1);
                let entries = slots[start..]
                    .iter()
                    .take(max)
                    .map(|s| s.entry(channel_id, segment))
                    .collect();
                sources.push((first.base_offset, last.base_offset, Source::Memory(entries)));
            }
            for segment in segments.sealed_for(channel_id, at, max) {
                let Some(sealed) = segments.sealed.get(&segment) else {
                    continue;
                };
                let Some(fence) = sealed.file.fence(channel_id) else {
                    continue;
                };
                let hidden = sealed
                    .hidden
                    .iter()
                    .filter(|h| h.0 == channel_id)
                    .map(|h| (h.1, h.2))
                    .collect();
                sources.push((
                    fence.first_base,
                    fence.last_base,
                    Source::File {
                        segment,
                        file: sealed.file.clone(),
                        fence: *fence,
                        hidden,
                    },
                ));
            }
        }
        // A source wholly at or below `at` can only give its last entry, so of those only
        // the one reaching highest is read (and those with hidden ranges, whose last
        // visible entry is not known without reading).
        let hidden_in = |s: &Source| matches!(s, Source::File { hidden, .. } if !hidden.is_empty());
        let best_below = sources
            .iter()
            .filter(|s| s.1 <= at && !hidden_in(&s.2))
            .map(|s| s.1)
            .max();
        sources.retain(|s| s.1 > at || hidden_in(&s.2) || Some(s.1) == best_below);
        sources.sort_by_key(|s| s.0);
        let mut out: Vec<IndexEntry> = Vec::new();
        for (first, _, source) in sources {
            let k = out
                .partition_point(|e| e.base_offset <= at)
                .saturating_sub(1);
            if out.len() >= k + max && first > at.max(out[k + max - 1].base_offset) {
                // Sources are in order of their first entry: this one and the rest come
                // after the `max` entries found.
                break;
            }
            match source {
                Source::Memory(entries) => out.extend(entries),
                Source::File {
                    segment,
                    file,
                    fence,
                    hidden,
                } => {
                    let path = index_path(&self.log_dir, segment);
                    out.extend(
                        file.read(segment, channel_id, &fence, &hidden, at, max)
                            .map_err(|e| StorageError::io("read", &path, e))?,
                    );
                }
            }
            out.sort_by(|a, b| {
                a.base_offset
                    .cmp(&b.base_offset)
                    .then(b.segment.cmp(&a.segment))
            });
            out.dedup_by_key(|e| e.base_offset);
        }
        let k = out
            .partition_point(|e| e.base_offset <= at)
            .saturating_sub(1);
        out.drain(..k);
        out.truncate(max);
        Ok(out)
    }

    /// The batch holding `offset`, or the first one after it.
    pub fn find(&self, channel_id: u64, offset: u64) -> Result<Option<IndexEntry>, StorageError> {
        Ok(self
            .collect(channel_id, offset, 2)?
            .into_iter()
            .find(|e| e.end_offset() > offset))
    }

    /// Batches of a channel from `from` (base offset) on, at most `limit`.
    pub fn scan(
        &self,
        channel_id: u64,
        from: u64,
        limit: usize,
    ) -> Result<Vec<IndexEntry>, StorageError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut out = self.collect(channel_id, from, limit + 1)?;
        out.retain(|e| e.base_offset >= from);
        out.truncate(limit);
        Ok(out)
    }

    /// Removes a channel's entries whose base offset lies in `[from, to)`.
    pub fn remove_range(&self, channel_id: u64, from: u64, to: u64) -> Result<(), StorageError> {
        if from >= to {
            return Ok(());
        }
        let mut segments = self.segments();
        for channels in segments.open.values_mut() {
            let Some(slots) = channels.get(&channel_id) else {
                continue;
            };
            let lo = slots.partition_point(|s| s.base_offset < from);
            let hi = slots.partition_point(|s| s.base_offset < to);
            if lo < hi {
                // Copies the map only if a thread is writing it to a file.
                let channels = Arc::make_mut(channels);
                let slots = channels.get_mut(&channel_id).expect("present above");
                slots.drain(lo..hi);
                if slots.is_empty() {
                    channels.remove(&channel_id);
                }
            }
        }
        let segments = &mut *segments;
        // Only the closed segments holding the channel (not every segment of the log).
        let holding: Vec<u64> = segments
            .by_channel
            .get(&channel_id)
            .map(|cs| {
                cs.regular
                    .iter()
                    .map(|(_, segment)| *segment)
                    .chain(cs.special.iter().copied())
                    .collect()
            })
            .unwrap_or_default();
        for segment in &holding {
            let Some(sealed) = segments.sealed.get_mut(segment) else {
                continue;
            };
            if let Some(f) = sealed.file.fence(channel_id) {
                if f.first_base < to && f.last_base >= from {
                    let range = (channel_id, from, to);
                    if !sealed.hidden.contains(&range) {
                        sealed.hidden.push(range);
                    }
                    // Its range no longer says where its visible entries are: read it
                    // always.
                    let cs = segments.by_channel.entry(channel_id).or_default();
                    cs.remove_regular(f.first_base, *segment);
                    if !cs.special.contains(segment) {
                        cs.special.push(*segment);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the index file of every open segment before `active` (closed segments) and
    /// answers their entries from it from then on.
    pub fn seal_closed(&self, active: u64) -> Result<(), StorageError> {
        let closed: Vec<u64> = self
            .segments()
            .open
            .range(..active)
            .map(|(id, _)| *id)
            .collect();
        for id in closed {
            self.seal(id)?;
        }
        Ok(())
    }

    /// Writes a closed segment's index file and drops its entries from memory. Not
    /// fsync'd: a file that a crash damaged or lost fails its checks on the next open and is
    /// written again from the segment. If the entries change meanwhile (a removal, the
    /// segment deleted), the file is discarded and the entries stay in memory.
    pub fn seal(&self, segment: u64) -> Result<(), StorageError> {
        // `None`: a segment without batches (its file is written too, empty, so recovery
        // need not scan it again).
        let channels = {
            let mut segments = self.segments();
            if segments.sealed.contains_key(&segment) {
                return Ok(());
            }
            let channels = segments.open.get(&segment).cloned();
            if !segments.sealing.insert(segment) {
                return Ok(());
            }
            channels
        };
        let written = self.write_file(segment, channels.as_deref().unwrap_or(&Channels::new()));
        let mut segments = self.segments();
        segments.sealing.remove(&segment);
        let file = written?;
        let unchanged = match (segments.open.get(&segment), &channels) {
            (Some(now), Some(then)) => Arc::ptr_eq(now, then),
            // A segment without batches: unless retention deleted it meanwhile (it deletes
            // the segment file before telling the index, which waits for this lock).
            (None, None) => {
                !segments.sealed.contains_key(&segment)
                    && crate::segment::segment_path(&self.log_dir, segment).exists()
            }
            _ => false,
        };
        if unchanged {
            segments.open.remove(&segment);
            segments.add_sealed(segment, file);
        } else {
            match std::fs::remove_file(&file.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(error = %e, path = %file.path.display(), "could not remove a stale index file");
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn write_file(&self, segment: u64, channels: &Channels) -> Result<IndexFile, StorageError> {
        let seg_path = crate::segment::segment_path(&self.log_dir, segment);
        let segment_len = std::fs::metadata(&seg_path)
            .map_err(|e| StorageError::io("stat", &seg_path, e))?
            .len();
        let mut ids: Vec<u64> = channels
            .iter()
            .filter(|(_, slots)| !slots.is_empty())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let total: usize = ids.iter().map(|id| channels[id].len()).sum();
        if u32::try_from(total).is_err() {
            return Err(StorageError::io(
                "index",
                &seg_path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a segment of 2^32 batches or more",
                ),
            ));
        }
        let entries_at = FILE_HEADER + ids.len() * FENCE_BYTES;
        let mut buf = Vec::with_capacity(entries_at + total * SLOT_BYTES + 4);
        buf.extend_from_slice(FILE_MAGIC);
        for v in [segment, segment_len, ids.len() as u64, total as u64] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let mut fence = Vec::with_capacity(ids.len());
        // Below 2^32: `total` is.
        let mut start = 0u32;
        for id in &ids {
            let slots = &channels[id];
            let f = Fence {
                start,
                count: slots.len() as u32,
                first_base: slots[0].base_offset,
                last_base: slots[slots.len() - 1].base_offset,
            };
            let (at, count) = (u64::from(f.start), u64::from(f.count));
            for v in [*id, at, count, f.first_base, f.last_base] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            fence.push((*id, f));
            start += f.count;
        }
        for id in &ids {
            for slot in &channels[id] {
                slot.encode(&mut buf);
            }
        }
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        let path = index_path(&self.log_dir, segment);
        let tmp = path.with_extension("idx.tmp");
        std::fs::write(&tmp, &buf).map_err(|e| StorageError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::io("rename", &tmp, e))?;
        Ok(IndexFile {
            path,
            bytes: buf.len() as u64,
            entries_at: entries_at as u64,
            fence,
        })
    }

    /// Uses a closed segment's index file from an earlier run if it is whole and matches
    /// the segment; answers whether it did. A damaged or mismatched one is deleted.
    pub fn load_sealed(&self, segment: u64) -> bool {
        let path = index_path(&self.log_dir, segment);
        match self.read_file(segment, &path) {
            Ok(file) => {
                self.segments().add_sealed(segment, file);
                true
            }
            Err(reason) => {
                if path.exists() {
                    tracing::warn!(segment, %reason, "index file unusable; indexing the segment again");
                    let _ = std::fs::remove_file(&path);
                }
                false
            }
        }
    }

    fn read_file(&self, segment: u64, path: &Path) -> Result<IndexFile, String> {
        let seg_path = crate::segment::segment_path(&self.log_dir, segment);
        let segment_len = std::fs::metadata(&seg_path)
            .map_err(|e| e.to_string())?
            .len();
        let buf = std::fs::read(path).map_err(|e| e.to_string())?;
        if buf.len() < FILE_HEADER + 4 || &buf[..8] != FILE_MAGIC {
            return Err("not an index file".into());
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32c::crc32c(body) != u32_at(crc, 0) {
            return Err("checksum mismatch".into());
        }
        let (id, covered, channels, entries) = (
            u64_at(body, 8),
            u64_at(body, 16),
            u64_at(body, 24),
            u64_at(body, 32),
        );
        if id != segment || covered != segment_len {
            return Err(format!(
                "written for segment {id} of {covered} bytes, not {segment} of {segment_len}"
            ));
        }
        let entries_at = channels
            .checked_mul(FENCE_BYTES as u64)
            .and_then(|f| f.checked_add(FILE_HEADER as u64));
        let end = entries
            .checked_mul(SLOT_BYTES as u64)
            .zip(entries_at)
            .and_then(|(e, at)| e.checked_add(at));
        let (Some(entries_at), Some(end)) = (entries_at, end) else {
            return Err("counts out of range".into());
        };
        if end != body.len() as u64 {
            return Err("length does not match its counts".into());
        }
        if u32::try_from(entries).is_err() {
            return Err("2^32 entries or more".into());
        }
        let mut fence: Vec<(u64, Fence)> = Vec::with_capacity(channels as usize);
        for row in body[FILE_HEADER..entries_at as usize].chunks_exact(FENCE_BYTES) {
            let (start, count) = (u64_at(row, 8), u64_at(row, 16));
            let (first_base, last_base) = (u64_at(row, 24), u64_at(row, 32));
            // `entries` is below 2^32, so `start` and `count` are too once checked here.
            if count == 0
                || first_base > last_base
                || start.checked_add(count).is_none_or(|e| e > entries)
            {
                return Err("fence out of range".into());
            }
            let f = Fence {
                start: start as u32,
                count: count as u32,
                first_base,
                last_base,
            };
            let id = u64_at(row, 0);
            if fence.last().is_some_and(|(last, _)| *last >= id) {
                return Err("fence not sorted by channel".into());
            }
            fence.push((id, f));
        }
        Ok(IndexFile {
            path: path.to_path_buf(),
            bytes: buf.len() as u64,
            entries_at,
            fence,
        })
    }

    /// Segments whose entries are held in memory, and how many entries that is.
    #[cfg(test)]
    pub fn in_memory(&self) -> (usize, usize) {
        let segments = self.segments();
        let entries = segments
            .open
            .values()
            .flat_map(|channels| channels.values())
            .map(Vec::len)
            .sum();
        (segments.open.len(), entries)
    }

    /// Bytes of the index and summary files in use.
    pub fn file_bytes(&self) -> u64 {
        let index: u64 = self.segments().sealed.values().map(|s| s.file.bytes).sum();
        let summaries: u64 = self
            .summary_files
            .lock()
            .expect("summary files lock")
            .values()
            .sum();
        index + summaries
    }

    /// Forgets a deleted segment's entries and deletes its index and summary files.
    pub fn drop_segment(&self, segment: u64) -> Result<(), StorageError> {
        let mut segments = self.segments();
        segments.open.remove(&segment);
        segments.remove_sealed(segment);
        self.summary_files
            .lock()
            .expect("summary files lock")
            .remove(&segment);
        let mut result = Ok(());
        for path in [
            index_path(&self.log_dir, segment),
            summary_path(&self.log_dir, segment),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    if result.is_ok() {
                        result = Err(StorageError::io("delete", &path, e));
                    }
                }
            }
        }
        result
    }

    /// Writes a closed segment's summary into a file beside it; checkpoints leave it out
    /// from then on. Made durable (file and directory, once per segment, off the writer
    /// thread): a checkpoint relies on it. One that is lost or damaged all the same fails its
    /// checks on the next start, and the segment is summarized again.
    pub fn write_summary(
        &self,
        segment: u64,
        summary: &SegmentSummary,
    ) -> Result<(), StorageError> {
        let mut buf = SUMMARY_MAGIC.to_vec();
        buf.extend_from_slice(&segment.to_le_bytes());
        options()
            .serialize_into(&mut buf, summary)
            .expect("bincode serialization into memory cannot fail");
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        let path = summary_path(&self.log_dir, segment);
        write_synced(&path.with_extension("sum.tmp"), &path, &buf)?;
        crate::segment::sync_dir(&self.log_dir)?;
        let mut filed = self.summary_files.lock().expect("summary files lock");
        // Retention may have deleted the segment meanwhile (it deletes the segment file
        // before its other files): then this file goes too (or at the next start).
        if !crate::segment::segment_path(&self.log_dir, segment).exists() {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        filed.insert(segment, buf.len() as u64);
        Ok(())
    }

    /// Whether segment `id`'s summary is in a file of its own.
    pub fn has_summary_file(&self, id: u64) -> bool {
        self.summary_files
            .lock()
            .expect("summary files lock")
            .contains_key(&id)
    }

    /// A closed segment's summary from its file, if whole and written for this segment at
    /// its present length; checkpoints leave it out from then on. A damaged or mismatched
    /// file is deleted.
    pub fn load_summary(&self, segment: u64) -> Option<SegmentSummary> {
        let path = summary_path(&self.log_dir, segment);
        let seg_path = crate::segment::segment_path(&self.log_dir, segment);
        let read = || -> Result<(SegmentSummary, u64), String> {
            let buf = std::fs::read(&path).map_err(|e| e.to_string())?;
            let body = buf
                .len()
                .checked_sub(4)
                .filter(|&n| n >= 16 && &buf[..8] == SUMMARY_MAGIC)
                .map(|n| &buf[..n])
                .ok_or("not a summary file")?;
            if crc32c::crc32c(body) != u32_at(&buf, body.len()) {
                return Err("checksum mismatch".into());
            }
            if u64_at(body, 8) != segment {
                return Err(format!("written for segment {}", u64_at(body, 8)));
            }
            let summary: SegmentSummary = options()
                .deserialize(&body[16..])
                .map_err(|e| e.to_string())?;
            let len = std::fs::metadata(&seg_path)
                .map_err(|e| e.to_string())?
                .len();
            if summary.size != len {
                return Err(format!("written for {} bytes, not {len}", summary.size));
            }
            Ok((summary, buf.len() as u64))
        };
        match read() {
            Ok((summary, bytes)) => {
                self.summary_files
                    .lock()
                    .expect("summary files lock")
                    .insert(segment, bytes);
                Some(summary)
            }
            Err(reason) => {
                if path.exists() {
                    tracing::warn!(segment, %reason, "summary file unusable; summarizing the segment again");
                    let _ = std::fs::remove_file(&path);
                }
                None
            }
        }
    }

    /// Deletes index and summary files of segments not in `ids` (their segment was deleted
    /// before the file was) and unfinished ones.
    pub fn remove_stray_files(&self, ids: &[u64]) -> Result<(), StorageError> {
        let dir = &self.log_dir;
        for entry in std::fs::read_dir(dir).map_err(|e| StorageError::io("list", dir, e))? {
            let entry = entry.map_err(|e| StorageError::io("list", dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stray = if name.ends_with(".idx.tmp") || name.ends_with(".sum.tmp") {
                true
            } else if let Some(stem) = name
                .strip_suffix(".idx")
                .or_else(|| name.strip_suffix(".sum"))
            {
                stem.parse::<u64>().is_ok_and(|id| !ids.contains(&id))
            } else {
                false
            };
            if stray {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| StorageError::io("delete", &path, e))?;
            }
        }
        Ok(())
    }

    /// Forgets every entry and the checkpoint, and deletes every index file.
    pub fn clear(&self) -> Result<(), StorageError> {
        {
            let mut segments = self.segments();
            segments.open.clear();
            segments.sealed.clear();
            segments.by_channel.clear();
        }
        self.summary_files
            .lock()
            .expect("summary files lock")
            .clear();
        self.remove_stray_files(&[])?;
        let path = self.dir.join(CHECKPOINT_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StorageError::io("delete", &path, e))
            }
            _ => Ok(()),
        }
    }

    /// The last checkpoint saved, if there is a whole one of this format.
    pub fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StorageError> {
        let path = self.dir.join(CHECKPOINT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "ignoring an unreadable checkpoint");
                return Ok(None);
            }
        };
        let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
            tracing::warn!("ignoring a truncated checkpoint");
            return Ok(None);
        };
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            tracing::warn!("ignoring a checkpoint whose checksum fails");
            return Ok(None);
        }
        match options().deserialize::<Checkpoint>(body) {
            Ok(c) if c.format == CHECKPOINT_FORMAT || c.format == CHECKPOINT_FORMAT_READ => {
                Ok(Some(c))
            }
            Ok(c) => {
                tracing::warn!(format = c.format, "ignoring a checkpoint of another format");
                Ok(None)
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable checkpoint");
                Ok(None)
            }
        }
    }

    /// Encodes a checkpoint of the log at `(segment, position)` for [`Index::write_checkpoint`],
    /// from borrowed parts (the writer holds the summaries' lock meanwhile: no copy of
    /// thousands of summaries is made). Its `index_from` is the first segment still indexed
    /// only in memory: recovery scans from there, and uses (after checking) the index files
    /// before.
    pub fn encode_checkpoint(
        &self,
        segment: u64,
        position: u64,
        state: &StateSnapshot,
        summaries: &BTreeMap<u64, SegmentSummary>,
    ) -> Vec<u8> {
        let first_open = self.segments().open.keys().next().copied();
        let from = first_open.map_or(segment, |id| id.min(segment));
        // Serializes exactly as `Checkpoint`: bincode writes a map as its length and then
        // its pairs, as it writes the list of pairs.
        #[derive(Serialize)]
        struct CheckpointRef<'a> {
            format: u32,
            segment: u64,
            position: u64,
            state: &'a StateSnapshot,
            summaries: Unfiled<'a>,
            index_from: (u64, u64),
        }
        /// The summaries without a file. With thousands of channels every closed segment's
        /// summary is hundreds of kilobytes: written into every checkpoint, they made it
        /// 18 MB and 110–133 ms of the writer's time per segment after 50 segments.
        struct Unfiled<'a>(&'a BTreeMap<u64, SegmentSummary>, &'a BTreeMap<u64, u64>);
        impl Serialize for Unfiled<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let unfiled = || self.0.iter().filter(|(id, _)| !self.1.contains_key(id));
                let mut map = serializer.serialize_map(Some(unfiled().count()))?;
                for (id, summary) in unfiled() {
                    map.serialize_entry(id, summary)?;
                }
                map.end()
            }
        }
        let filed = self.summary_files.lock().expect("summary files lock");
        let summaries = Unfiled(summaries, &filed);
        let mut bytes = options()
            .serialize(&CheckpointRef {
                format: CHECKPOINT_FORMAT,
                segment,
                position,
                state,
                summaries,
                index_from: (from, 0),
            })
            .expect("bincode serialization into memory cannot fail");
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Stores an encoded checkpoint: written to a temporary file, `fdatasync`'d and renamed
    /// over the last one. The rename is not made durable: a power failure may bring back the
    /// previous checkpoint, from which recovery replays more.
    pub fn write_checkpoint(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.dir.join(CHECKPOINT_FILE);
        write_synced(&path.with_extension("tmp"), &path, bytes)
    }

    /// Stores `checkpoint` as it is, its format included (tests of earlier formats).
    #[cfg(test)]
    pub fn save_checkpoint_verbatim(&self, checkpoint: &Checkpoint) -> Result<(), StorageError> {
        let mut bytes = options().serialize(checkpoint).expect("serializes");
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        self.write_checkpoint(&bytes)
    }

    /// [`Index::encode_checkpoint`] and [`Index::write_checkpoint`] of an owned checkpoint.
    #[cfg(test)]
    pub fn save_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), StorageError> {
        let summaries = checkpoint.summaries.into_iter().collect();
        let bytes = self.encode_checkpoint(
            checkpoint.segment,
            checkpoint.position,
            &checkpoint.state,
            &summaries,
        );
        self.write_checkpoint(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(channel_id: u64, base_offset: u64, count: u32) -> IndexEntry {
        IndexEntry {
            channel_id,
            base_offset,
            segment: 1,
            position: base_offset * 10,
            len: 10,
            count,
            timestamp_ms: 5,
            bytes: 7,
        }
    }

    /// An index over a log directory holding empty segments `0..segments`.
    fn index_with_segments(dir: &Path, segments: u64) -> Index {
        let log = dir.join("log");
        std::fs::create_dir_all(&log).unwrap();
        for id in 0..segments {
            if !crate::segment::segment_path(&log, id).exists() {
                crate::segment::create_segment(&log, id).unwrap();
            }
        }
        Index::open(&dir.join("index"), &log).unwrap()
    }

    #[test]
    fn a_summary_reads_the_list_of_pairs_earlier_checkpoints_wrote() {
        #[derive(Serialize)]
        struct Before {
            size: u64,
            spans: Vec<(u64, Span)>,
        }
        let span = |first_offset, end_offset, bytes| Span {
            first_offset,
            end_offset,
            bytes,
        };
        let before = Before {
            size: 99,
            spans: vec![(7, span(0, 4, 40)), (3, span(10, 12, 20))],
        };
        let bytes = options().serialize(&before).unwrap();
        let now: SegmentSummary = options().deserialize(&bytes).unwrap();
        assert_eq!(now.size, 99);
        assert_eq!(now.spans.len(), 2);
        assert_eq!(*now.spans.get(7).unwrap(), span(0, 4, 40));
        assert_eq!(*now.spans.get(3).unwrap(), span(10, 12, 20));
    }

    #[test]
    fn spans_answer_alike_open_and_closed_and_write_the_bytes_the_map_wrote() {
        let mut spans = Spans::default();
        let mut model: BTreeMap<u64, Span> = BTreeMap::new();
        let mut x = 7u64;
        for step in 0..3000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let channel = (x >> 33) % 97;
            let first = (x >> 20) % 1000;
            let (end, bytes) = (first + 1 + (x >> 50) % 9, x % 5000);
            spans.add(channel, first, end, bytes);
            model
                .entry(channel)
                .and_modify(|s| {
                    s.first_offset = s.first_offset.min(first);
                    s.end_offset = s.end_offset.max(end);
                    s.bytes += bytes;
                })
                .or_insert(Span {
                    first_offset: first,
                    end_offset: end,
                    bytes,
                });
            // Closed now and then, and added to after (a recovered active segment).
            if step % 401 == 0 {
                spans.close();
                assert!(spans.open.is_empty(), "closed");
            }
            if step % 97 == 0 || step == 2999 {
                assert_eq!(spans.len(), model.len());
                for c in 0..100 {
                    assert_eq!(spans.get(c), model.get(&c), "channel {c} at step {step}");
                }
                let mut all: Vec<(u64, Span)> = spans.iter().collect();
                all.sort_unstable_by_key(|(c, _)| *c);
                assert_eq!(all, model.iter().map(|(c, s)| (*c, *s)).collect::<Vec<_>>());
                // Open or closed, the bytes of the map; they read back alike.
                let bytes = options().serialize(&spans).unwrap();
                assert_eq!(bytes, options().serialize(&model).unwrap());
                let back: Spans = options().deserialize(&bytes).unwrap();
                assert_eq!(back, spans);
                assert!(back.open.is_empty(), "read back closed");
            }
        }
        // A channel twice is refused, not merged.
        let span = model[&0];
        let twice = options()
            .serialize(&vec![(3u64, span), (3u64, span)])
            .unwrap();
        assert!(options().deserialize::<Spans>(&twice).is_err());
    }

    #[test]
    fn finds_the_batch_holding_an_offset_in_memory_and_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_with_segments(dir.path(), 3);
        let e = |channel, base, count, segment| IndexEntry {
            segment,
            ..entry(channel, base, count)
        };
        index.insert(&e(1, 0, 10, 1)).unwrap();
        index.insert(&e(2, 0, 3, 1)).unwrap();
        index.insert(&e(1, 10, 5, 2)).unwrap();
        for sealed in [false, true] {
            assert_eq!(index.find(1, 0).unwrap(), Some(e(1, 0, 10, 1)), "{sealed}");
            assert_eq!(index.find(1, 9).unwrap(), Some(e(1, 0, 10, 1)));
            assert_eq!(index.find(1, 12).unwrap(), Some(e(1, 10, 5, 2)));
            assert_eq!(index.find(1, 15).unwrap(), None);
            assert_eq!(index.find(2, 2).unwrap(), Some(e(2, 0, 3, 1)));
            assert_eq!(index.find(3, 0).unwrap(), None);
            assert_eq!(index.scan(1, 0, 10).unwrap().len(), 2);
            assert_eq!(index.scan(1, 1, 10).unwrap(), vec![e(1, 10, 5, 2)]);
            index.seal_closed(2).unwrap();
            assert!(index_path(&dir.path().join("log"), 1).exists());
        }
        index.remove_range(1, 0, 10).unwrap();
        // An offset below the first retained batch finds the next one.
        assert_eq!(index.find(1, 3).unwrap(), Some(e(1, 10, 5, 2)));
        assert_eq!(index.find(2, 0).unwrap(), Some(e(2, 0, 3, 1)));
        // Removing the same range again (retention passes over a deleted channel) hides it
        // once.
        index.remove_range(2, 0, u64::MAX).unwrap();
        index.remove_range(2, 0, u64::MAX).unwrap();
        assert_eq!(index.find(2, 0).unwrap(), None);
        let segments = index.segments();
        assert_eq!(segments.sealed.len(), 1);
        assert_eq!(
            segments.sealed[&1].hidden,
            vec![(1, 0, 10), (2, 0, u64::MAX)]
        );
    }

    #[test]
    fn checkpoint_round_trips_and_starts_indexing_at_the_first_segment_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_with_segments(dir.path(), 4);
        assert!(index.load_checkpoint().unwrap().is_none());
        let mut summary = SegmentSummary::default();
        summary.add(3, 0, 5, 100);
        summary.add(3, 5, 9, 10);
        for segment in 1..4 {
            index
                .insert(&IndexEntry {
                    segment,
                    ..entry(3, segment, 1)
                })
                .unwrap();
        }
        index.seal(1).unwrap();
        let checkpoint = Checkpoint {
            segment: 3,
            position: 99,
            summaries: vec![(2, summary.clone())],
            ..Checkpoint::default()
        };
        index.save_checkpoint(checkpoint.clone()).unwrap();
        let loaded = index.load_checkpoint().unwrap().unwrap();
        assert_eq!((loaded.segment, loaded.position), (3, 99));
        assert_eq!(loaded.summaries[0].1.spans.get(3).unwrap().end_offset, 9);
        assert_eq!(loaded.summaries[0].1.spans.get(3).unwrap().bytes, 110);
        // Segment 2 has no file yet.
        assert_eq!(loaded.index_from, (2, 0));
        index.seal_closed(3).unwrap();
        index.save_checkpoint(checkpoint).unwrap();
        assert_eq!(index.load_checkpoint().unwrap().unwrap().index_from, (3, 0));
    }

    #[test]
    fn an_index_file_is_used_again_only_if_whole_and_for_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let entries: Vec<IndexEntry> = (0..300)
            .map(|i| IndexEntry {
                segment: 1,
                ..entry(i % 7, i * 3, 2)
            })
            .collect();
        {
            let index = index_with_segments(dir.path(), 2);
            index.insert_all(&entries).unwrap();
            index.seal(1).unwrap();
        }
        let reopen = || {
            let index = index_with_segments(dir.path(), 2);
            let loaded = index.load_sealed(1);
            (index, loaded)
        };
        let (index, loaded) = reopen();
        assert!(loaded);
        for e in &entries {
            assert_eq!(
                index.find(e.channel_id, e.base_offset + 1).unwrap(),
                Some(*e)
            );
        }
        assert_eq!(
            index.scan(3, 0, 1000).unwrap(),
            entries
                .iter()
                .filter(|e| e.channel_id == 3)
                .copied()
                .collect::<Vec<_>>()
        );
        drop(index);
        // A flipped byte: the checksum fails, the file is deleted.
        let path = index_path(&log, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let good = bytes.clone();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (index, loaded) = reopen();
        assert!(!loaded);
        assert!(!path.exists());
        assert_eq!(index.find(3, 0).unwrap(), None);
        drop(index);
        // A segment that grew since (not the file it was written for): not used.
        std::fs::write(&path, &good).unwrap();
        let segment = crate::segment::segment_path(&log, 1);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .unwrap();
        file.set_len(file.metadata().unwrap().len() + 10).unwrap();
        let (_, loaded) = reopen();
        assert!(!loaded);
        // Cut short: not used.
        let len = std::fs::metadata(&segment).unwrap().len();
        file.set_len(len - 10).unwrap();
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        let (_, loaded) = reopen();
        assert!(!loaded);
    }

    #[test]
    fn stray_index_files_are_removed_and_deleted_segments_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let index = index_with_segments(dir.path(), 3);
        for segment in 0..3 {
            index
                .insert(&IndexEntry {
                    segment,
                    ..entry(1, segment * 10, 10)
                })
                .unwrap();
        }
        index.seal_closed(2).unwrap();
        assert!(index_path(&log, 0).exists() && index_path(&log, 1).exists());
        index.drop_segment(0).unwrap();
        assert!(!index_path(&log, 0).exists());
        assert_eq!(index.find(1, 0).unwrap().unwrap().base_offset, 10);
        std::fs::write(log.join("00000000000000000005.idx.tmp"), b"x").unwrap();
        index.remove_stray_files(&[0, 2]).unwrap();
        assert!(!index_path(&log, 1).exists());
        assert!(!log.join("00000000000000000005.idx.tmp").exists());
        // A segment deleted (file, then index) is not sealed afterwards.
        std::fs::remove_file(crate::segment::segment_path(&log, 2)).unwrap();
        index.drop_segment(2).unwrap();
        assert!(index.seal(2).is_err());
        assert!(!index_path(&log, 2).exists());
        // A segment without batches gets an empty file: recovery need not scan it again.
        crate::segment::create_segment(&log, 3).unwrap();
        index.seal(3).unwrap();
        drop(index);
        let index = index_with_segments(dir.path(), 4);
        assert!(index.load_sealed(3));
        assert_eq!(index.find(1, 0).unwrap(), None);
    }

    #[test]
    fn a_lookup_reads_only_the_segments_near_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_with_segments(dir.path(), 201);
        // Channel 1 has 10 batches in each of segments 0..200; channel 2 only in 7.
        for segment in 0..200u64 {
            for i in 0..10 {
                index
                    .insert(&IndexEntry {
                        segment,
                        ..entry(1, segment * 10 + i, 1)
                    })
                    .unwrap();
            }
        }
        index
            .insert(&IndexEntry {
                segment: 7,
                ..entry(2, 0, 1)
            })
            .unwrap();
        index.seal_closed(200).unwrap();
        let segments = index.segments();
        assert_eq!(segments.sealed_for(1, 1_234, 2), vec![123, 124, 125]);
        assert_eq!(segments.sealed_for(1, 0, 1), vec![0, 1]);
        assert_eq!(segments.sealed_for(1, 5_000, 2), vec![199]);
        assert_eq!(segments.sealed_for(2, 0, 17), vec![7]);
        drop(segments);
        assert_eq!(index.find(1, 1_234).unwrap().unwrap().segment, 123);
        assert_eq!(index.scan(1, 1_995, 100).unwrap().len(), 5);
    }

    /// A tiny deterministic generator for the model test (no dependency needed).
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// What the index must answer, from a plain sorted map.
    fn model_find(
        model: &BTreeMap<(u64, u64), IndexEntry>,
        channel: u64,
        offset: u64,
    ) -> Option<IndexEntry> {
        if let Some((_, e)) = model.range((channel, 0)..=(channel, offset)).next_back() {
            if e.end_offset() > offset {
                return Some(*e);
            }
        }
        model
            .range((channel, offset)..=(channel, u64::MAX))
            .next()
            .map(|(_, e)| *e)
    }

    fn check_against(
        index: &Index,
        model: &BTreeMap<(u64, u64), IndexEntry>,
        channels: u64,
        max_offset: u64,
    ) {
        for channel in 0..channels {
            for offset in 0..max_offset {
                assert_eq!(
                    index.find(channel, offset).unwrap(),
                    model_find(model, channel, offset),
                    "find({channel}, {offset})"
                );
                for limit in [1, 5] {
                    let want: Vec<IndexEntry> = model
                        .range((channel, offset)..=(channel, u64::MAX))
                        .take(limit)
                        .map(|(_, e)| *e)
                        .collect();
                    assert_eq!(
                        index.scan(channel, offset, limit).unwrap(),
                        want,
                        "scan({channel}, {offset}, {limit})"
                    );
                }
            }
        }
    }

    #[test]
    fn entries_in_memory_and_in_files_answer_like_a_sorted_map_through_every_change() {
        let dir = tempfile::tempdir().unwrap();
        // Segments 1..=40 take the appends and some compaction copies, 999 the others.
        let index = index_with_segments(dir.path(), 41);
        crate::segment::create_segment(&dir.path().join("log"), 999).unwrap();
        let mut model = BTreeMap::new();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let channels = 4;
        let mut heads = vec![0u64; channels as usize];
        let mut dropped = 0;
        for step in 0..2_000u64 {
            let segment = 1 + step / 50;
            // A new segment: the ones before it get their files.
            index.seal_closed(segment).unwrap();
            let channel = rng.below(channels);
            let head = &mut heads[channel as usize];
            match rng.below(20) {
                // Mostly appends of batches of 1-3 messages.
                0..=14 => {
                    let count = 1 + rng.below(3) as u32;
                    let e = IndexEntry {
                        segment,
                        position: step,
                        ..entry(channel, *head, count)
                    };
                    *head += u64::from(count);
                    index.insert(&e).unwrap();
                    model.insert((channel, e.base_offset), e);
                }
                // A compaction copy: an existing batch is copied to a newer segment (the
                // current one, whose range then overlaps older ones', or one never closed).
                15 | 16 => {
                    let picked = model
                        .range((channel, 0)..=(channel, u64::MAX))
                        .nth(rng.below(40) as usize)
                        .map(|(_, e)| *e);
                    if let Some(e) = picked {
                        let moved = IndexEntry {
                            segment: if step % 2 == 0 { 999 } else { segment },
                            position: step,
                            ..e
                        };
                        index.insert(&moved).unwrap();
                        // A batch stored twice is answered from the newer segment (in the
                        // log, copies always go to the newest).
                        if moved.segment >= e.segment {
                            model.insert((channel, e.base_offset), moved);
                        }
                    }
                }
                // Retention: a prefix goes.
                17 => {
                    let to = rng.below(*head + 1);
                    index.remove_range(channel, 0, to).unwrap();
                    model.retain(|&(c, base), _| c != channel || base >= to);
                }
                // A tail cut off (or a channel's entries removed): appends continue lower.
                _ => {
                    let from = head.saturating_sub(rng.below(6));
                    index.remove_range(channel, from, u64::MAX).unwrap();
                    model.retain(|&(c, base), _| c != channel || base < from);
                    *head = model
                        .range((channel, 0)..=(channel, u64::MAX))
                        .next_back()
                        .map_or(from, |(_, e)| e.end_offset().max(from));
                }
            }
            // Retention by segment: the oldest closed one goes, from the front of every
            // channel's list of segments.
            if step % 150 == 149 {
                let oldest = index.segments().sealed.keys().next().copied();
                if let Some(id) = oldest {
                    index.drop_segment(id).unwrap();
                    model.retain(|_, e| e.segment != id);
                    dropped += 1;
                }
            }
            if step % 397 == 0 || step % 150 == 149 {
                let max = heads.iter().max().copied().unwrap() + 2;
                check_against(&index, &model, channels, max);
            }
        }
        assert!(dropped >= 10, "{dropped} segments dropped");
        let segments = index.segments();
        assert!(
            segments.sealed.len() + dropped >= 39,
            "{:?}",
            segments.sealed.keys()
        );
        assert!(segments.sealed.values().any(|s| !s.hidden.is_empty()));
        // Both kinds of closed segments were met: in order, and overlapping others.
        assert!(segments.by_channel.values().any(|c| c.regular.len() > 3));
        assert!(segments.by_channel.values().any(|c| !c.special.is_empty()));
        drop(segments);
        let max = heads.iter().max().copied().unwrap() + 2;
        check_against(&index, &model, channels, max);
    }

    #[test]
    fn a_checkpoint_encoded_from_borrowed_parts_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_with_segments(dir.path(), 1);
        let mut summaries = BTreeMap::new();
        for segment in [2u64, 9] {
            let mut summary = SegmentSummary::default();
            summary.add(3, segment, segment + 5, 100);
            summary.add(4, 0, 9, 10);
            summary.size = segment * 1000;
            summaries.insert(segment, summary);
        }
        let mut state = crate::state::LogState::default();
        let id = state.create_pending("a", 7);
        state.apply(&crate::record::RecordMeta::Other(
            crate::Record::ChannelCreated {
                channel_id: id,
                name: "a".into(),
                created_ms: 7,
            },
        ));
        let snapshot = state.snapshot();
        let bytes = index.encode_checkpoint(9, 1234, &snapshot, &summaries);
        // The same bytes as the owned form.
        let owned = Checkpoint {
            format: CHECKPOINT_FORMAT,
            segment: 9,
            position: 1234,
            state: snapshot.clone(),
            summaries: summaries.clone().into_iter().collect(),
            index_from: (9, 0),
        };
        assert_eq!(
            bytes[..bytes.len() - 4],
            options().serialize(&owned).unwrap()[..]
        );
        index.write_checkpoint(&bytes).unwrap();
        let loaded = index.load_checkpoint().unwrap().unwrap();
        assert_eq!(loaded.state, snapshot);
        assert_eq!(loaded.summaries, owned.summaries);
        assert_eq!(
            (loaded.segment, loaded.position, loaded.index_from),
            (9, 1234, (9, 0))
        );
    }

    #[test]
    fn a_damaged_checkpoint_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let index = index_with_segments(dir.path(), 1);
        index
            .save_checkpoint(Checkpoint {
                segment: 0,
                position: 16,
                ..Checkpoint::default()
            })
            .unwrap();
        assert_eq!(index.load_checkpoint().unwrap().unwrap().position, 16);
        let path = dir.path().join("index").join(CHECKPOINT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(index.load_checkpoint().unwrap().is_none());
        std::fs::write(&path, &bytes[..3]).unwrap();
        assert!(index.load_checkpoint().unwrap().is_none());
        // Another format, whole: ignored too.
        let mut other = options()
            .serialize(&Checkpoint {
                format: 2,
                ..Checkpoint::default()
            })
            .unwrap();
        let crc = crc32c::crc32c(&other);
        other.extend_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &other).unwrap();
        assert!(index.load_checkpoint().unwrap().is_none());
    }

    #[test]
    fn the_sled_database_of_an_earlier_format_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let index_dir = dir.path().join("index");
        std::fs::create_dir_all(&index_dir).unwrap();
        for f in ["conf", "db", "snap.0000000000000070"] {
            std::fs::write(index_dir.join(f), b"sled").unwrap();
        }
        let index = index_with_segments(dir.path(), 1);
        assert!(index.load_checkpoint().unwrap().is_none());
        assert_eq!(std::fs::read_dir(&index_dir).unwrap().count(), 0);
    }
}
