//! The sled side of storage (docs/storage.md §4): the batch index and checkpoints.
//!
//! Nothing here is the only copy of anything: sled's `flush()` does not fsync (sled issue
//! #1452), so every entry can be rebuilt from the segment files, and is, when the directory
//! is missing, unreadable or disagrees with the log.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

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
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }

    fn encode_value(&self) -> [u8; 40] {
        let mut v = [0u8; 40];
        v[0..8].copy_from_slice(&self.segment.to_le_bytes());
        v[8..16].copy_from_slice(&self.position.to_le_bytes());
        v[16..20].copy_from_slice(&self.len.to_le_bytes());
        v[20..24].copy_from_slice(&self.count.to_le_bytes());
        v[24..32].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        v[32..40].copy_from_slice(&self.bytes.to_le_bytes());
        v
    }

    fn decode(key: &[u8], v: &[u8]) -> Option<IndexEntry> {
        let u64_at = |b: &[u8], i: usize| {
            b.get(i..i + 8)
                .map(|s| u64::from_le_bytes(s.try_into().expect("8")))
        };
        let u32_at = |b: &[u8], i: usize| {
            b.get(i..i + 4)
                .map(|s| u32::from_le_bytes(s.try_into().expect("4")))
        };
        if key.len() != 16 || v.len() != 40 {
            return None;
        }
        Some(IndexEntry {
            channel_id: u64::from_be_bytes(key[0..8].try_into().ok()?),
            base_offset: u64::from_be_bytes(key[8..16].try_into().ok()?),
            segment: u64_at(v, 0)?,
            position: u64_at(v, 8)?,
            len: u32_at(v, 16)?,
            count: u32_at(v, 20)?,
            timestamp_ms: u64_at(v, 24)?,
            bytes: u64_at(v, 32)?,
        })
    }
}

fn key(channel_id: u64, offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..8].copy_from_slice(&channel_id.to_be_bytes());
    k[8..16].copy_from_slice(&offset.to_be_bytes());
    k
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
    /// By channel id. A map, not a list: with thousands of channels in one segment a
    /// linear search per appended batch cost the writer thread a tenth of its time. bincode
    /// writes a map exactly as it wrote the list of pairs, so checkpoints stay readable.
    pub spans: std::collections::BTreeMap<u64, Span>,
}

impl SegmentSummary {
    pub fn add(&mut self, channel_id: u64, first: u64, end: u64, bytes: u64) {
        self.spans
            .entry(channel_id)
            .and_modify(|span| {
                span.first_offset = span.first_offset.min(first);
                span.end_offset = span.end_offset.max(end);
                span.bytes += bytes;
            })
            .or_insert(Span {
                first_offset: first,
                end_offset: end,
                bytes,
            });
    }
}

/// A consistent point of the log: everything before `(segment, position)` is reflected in
/// `state` and in the summaries, and everything before `index_from` in the batch index
/// (recovery indexes again from there: the batches of channels' open chunks in between
/// may be only in memory).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: u32,
    pub segment: u64,
    pub position: u64,
    pub state: StateSnapshot,
    pub summaries: Vec<(u64, SegmentSummary)>,
    /// Set by [`Index::save_checkpoint`].
    pub index_from: (u64, u64),
}

const CHECKPOINT_FORMAT: u32 = 2;
const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// The tree of chunks. Format 1 kept one sled entry per batch in a tree named `batches`;
/// it is dropped on open (its checkpoint, of format 1, is ignored, so the log is re-indexed).
const CHUNKS_TREE: &[u8] = b"batch-chunks";
const OLD_BATCHES_TREE: &[u8] = b"batches";
/// Batches per chunk: a sled insert costs ~10 µs whatever its size (it copies the leaf it
/// lands in), so with one-message batches on thousands of channels, one insert per batch
/// was a quarter of the broker's CPU. Sixteen batches share one insert; the open chunks of
/// 10,000 channels take at most ~9 MB.
const CHUNK_ENTRIES: usize = 16;
/// Bytes of one entry inside a chunk: base offset, then [`IndexEntry::encode_value`].
const ENTRY_BYTES: usize = 48;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
}

fn encode_chunk(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_BYTES);
    for e in entries {
        out.extend_from_slice(&e.base_offset.to_le_bytes());
        out.extend_from_slice(&e.encode_value());
    }
    out
}

fn decode_chunk(key: &[u8], value: &[u8]) -> Vec<IndexEntry> {
    let Some(channel) = key.get(0..8) else {
        return Vec::new();
    };
    value
        .chunks_exact(ENTRY_BYTES)
        .filter_map(|e| {
            let mut k = [0u8; 16];
            k[0..8].copy_from_slice(channel);
            k[8..16].copy_from_slice(&u64::from_le_bytes(e[0..8].try_into().ok()?).to_be_bytes());
            IndexEntry::decode(&k, &e[8..])
        })
        .collect()
}

fn key_channel_base(k: &[u8]) -> u64 {
    k.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Upserts `entry` into a list sorted by base offset.
fn upsert_sorted(entries: &mut Vec<IndexEntry>, entry: IndexEntry) {
    match entries.binary_search_by_key(&entry.base_offset, |e| e.base_offset) {
        Ok(i) => entries[i] = entry,
        Err(i) => entries.insert(i, entry),
    }
}

/// A channel's newest batches, not yet in a full chunk.
#[derive(Debug, Default)]
struct Tail {
    /// Sorted by base offset; the chunk's sled key is the first one's. A checkpoint writes
    /// a copy to sled under that key; the copy here stays authoritative until the chunk is
    /// full and written for good.
    entries: Vec<IndexEntry>,
    /// The highest base offset indexed for the channel: a larger one is appended.
    last_base: Option<u64>,
    /// Whether sled holds a copy of `entries` as they are.
    mirrored: bool,
}

impl Tail {
    /// Where in the log the oldest of the open chunk's batches is.
    fn oldest(&self) -> Option<(u64, u64)> {
        self.entries.iter().map(|e| (e.segment, e.position)).min()
    }
}

/// The sled database: the batch index and the checkpoint.
///
/// A channel's batch entries are grouped in **chunks** of up to [`CHUNK_ENTRIES`], one sled
/// entry each, keyed by the channel and the chunk's first base offset; chunks of a channel
/// cover disjoint ranges. The newest chunk of each channel fills in memory and goes to sled
/// when full. A checkpoint does not copy every open chunk to sled (10,000 of them took
/// 100-350 ms of the log writer): recovery indexes again from the previous checkpoint's
/// position, so only open chunks holding a batch older than that are copied. Readers see
/// a channel's sled chunks below its open chunk, then the open chunk.
#[derive(Debug)]
pub struct Index {
    db: sled::Db,
    chunks: sled::Tree,
    tails: Mutex<HashMap<u64, Tail>>,
    /// Serializes changes (the log writer's inserts, retention's removals, checkpoints):
    /// each reads a chunk, changes it and writes it back. Holds where the next checkpoint
    /// may let recovery start indexing: the previous checkpoint's position.
    changing: Mutex<(u64, u64)>,
}

impl Index {
    /// Opens (or creates) the index. A sled directory that cannot be opened is discarded and
    /// recreated: it holds nothing the log cannot give back.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Index, StorageError> {
        let open = || -> Result<Index, sled::Error> {
            let db = sled::Config::new()
                .path(dir)
                .cache_capacity(cache_bytes)
                .flush_every_ms(Some(1000))
                .open()?;
            if db.tree_names().iter().any(|n| n == OLD_BATCHES_TREE) {
                db.drop_tree(OLD_BATCHES_TREE)?;
            }
            let chunks = db.open_tree(CHUNKS_TREE)?;
            Ok(Index {
                db,
                chunks,
                tails: Mutex::new(HashMap::new()),
                changing: Mutex::new((0, 0)),
            })
        };
        match open() {
            Ok(index) => Ok(index),
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "index unreadable; rebuilding it from the log");
                std::fs::remove_dir_all(dir)
                    .map_err(|source| StorageError::io("remove", dir, source))?;
                Ok(open()?)
            }
        }
    }

    fn tails(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tail>> {
        self.tails.lock().expect("index tails lock")
    }

    /// The channel's last chunk in sled, if any.
    fn last_sled_chunk(&self, channel_id: u64) -> Result<Option<Vec<IndexEntry>>, StorageError> {
        match self
            .chunks
            .range(key(channel_id, 0)..=key(channel_id, u64::MAX))
            .next_back()
        {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some(decode_chunk(&k, &v)))
            }
            None => Ok(None),
        }
    }

    pub fn insert(&self, entry: &IndexEntry) -> Result<(), StorageError> {
        self.insert_all(std::slice::from_ref(entry))
    }

    /// Indexes batches; one already indexed (same channel and base offset) is replaced.
    pub fn insert_all(&self, entries: &[IndexEntry]) -> Result<(), StorageError> {
        let _changing = self.changing.lock().expect("index change lock");
        for entry in entries {
            self.insert_one(*entry)?;
        }
        Ok(())
    }

    fn insert_one(&self, entry: IndexEntry) -> Result<(), StorageError> {
        let channel = entry.channel_id;
        // The common case, a known channel's next batch: one lock, one lookup.
        let appended = {
            let mut tails = self.tails();
            match tails.get_mut(&channel) {
                Some(tail) if tail.last_base.is_none_or(|last| entry.base_offset > last) => {
                    Some(Self::append(tail, entry))
                }
                Some(_) => None,
                None => {
                    drop(tails);
                    // First sight since the index opened: continue after what sled holds.
                    let last = self
                        .last_sled_chunk(channel)?
                        .and_then(|c| c.last().map(|e| e.base_offset));
                    let mut tails = self.tails();
                    let tail = tails.entry(channel).or_default();
                    tail.last_base = last;
                    last.is_none_or(|last| entry.base_offset > last)
                        .then(|| Self::append(tail, entry))
                }
            }
        };
        match appended {
            Some(Some(chunk)) => {
                // Into sled first, then out of memory: a reader finds it in one or the other.
                self.chunks
                    .insert(key(channel, chunk[0].base_offset), encode_chunk(&chunk))?;
                let mut tails = self.tails();
                if let Some(tail) = tails.get_mut(&channel) {
                    tail.entries = Vec::new();
                    tail.mirrored = false;
                }
                return Ok(());
            }
            Some(None) => return Ok(()),
            None => {}
        }
        // An entry at or below the newest one: a compaction copy or a replay of what sled
        // already holds. Replace it where it lives.
        {
            let mut tails = self.tails();
            if let Some(tail) = tails.get_mut(&channel) {
                if tail
                    .entries
                    .first()
                    .is_some_and(|f| f.base_offset <= entry.base_offset)
                {
                    upsert_sorted(&mut tail.entries, entry);
                    tail.mirrored = false;
                    return Ok(());
                }
            }
        }
        let holder = self
            .chunks
            .range(key(channel, 0)..=key(channel, entry.base_offset))
            .next_back()
            .transpose()?;
        match holder {
            Some((k, v)) => {
                let mut chunk = decode_chunk(&k, &v);
                if chunk.contains(&entry) {
                    // Recovery indexing again what sled already holds.
                    return Ok(());
                }
                upsert_sorted(&mut chunk, entry);
                self.chunks.insert(k, encode_chunk(&chunk))?;
            }
            None => {
                self.chunks
                    .insert(key(channel, entry.base_offset), encode_chunk(&[entry]))?;
            }
        }
        Ok(())
    }

    /// Appends to a channel's open chunk; answers the chunk once it is full.
    fn append(tail: &mut Tail, entry: IndexEntry) -> Option<Vec<IndexEntry>> {
        if tail.entries.is_empty() {
            tail.entries.reserve_exact(CHUNK_ENTRIES);
        }
        tail.entries.push(entry);
        tail.last_base = Some(entry.base_offset);
        tail.mirrored = false;
        (tail.entries.len() >= CHUNK_ENTRIES).then(|| tail.entries.clone())
    }

    /// The channel's batches in base offset order, starting with the last one whose base
    /// offset is at most `at` (or the first one, if none is), until `want` says stop.
    fn walk(
        &self,
        channel_id: u64,
        at: u64,
        mut want: impl FnMut(&IndexEntry) -> bool,
    ) -> Result<(), StorageError> {
        let tail: Vec<IndexEntry> = self
            .tails()
            .get(&channel_id)
            .map(|t| t.entries.clone())
            .unwrap_or_default();
        let sled_end = tail.first().map_or(u64::MAX, |e| e.base_offset);
        let mut pending: Option<IndexEntry> = None;
        // Bases strictly increase along a channel's chunks; a repeat is a chunk seen under
        // its old and its new key while retention re-keys it.
        let mut last: Option<u64> = None;
        let mut step = |entry: IndexEntry| -> bool {
            if last.is_some_and(|l| entry.base_offset <= l) {
                return true;
            }
            last = Some(entry.base_offset);
            if entry.base_offset <= at {
                pending = Some(entry);
                return true;
            }
            if let Some(before) = pending.take() {
                if !want(&before) {
                    return false;
                }
            }
            want(&entry)
        };
        if at >= sled_end {
            // Everything from `at` is in memory: no sled read.
            for entry in tail {
                if !step(entry) {
                    return Ok(());
                }
            }
        } else {
            let start = self
                .chunks
                .range(key(channel_id, 0)..=key(channel_id, at))
                .next_back()
                .transpose()?
                .map_or(key(channel_id, 0), |(k, _)| {
                    key(channel_id, key_channel_base(&k))
                });
            for item in self.chunks.range(start..key(channel_id, sled_end)) {
                let (k, v) = item?;
                for entry in decode_chunk(&k, &v) {
                    if !step(entry) {
                        return Ok(());
                    }
                }
            }
            for entry in tail {
                if !step(entry) {
                    return Ok(());
                }
            }
        }
        if let Some(last) = pending {
            want(&last);
        }
        Ok(())
    }

    /// The batch holding `offset`, or the first one after it.
    pub fn find(&self, channel_id: u64, offset: u64) -> Result<Option<IndexEntry>, StorageError> {
        let mut found = None;
        self.walk(channel_id, offset, |e| {
            if e.end_offset() > offset {
                found = Some(*e);
                false
            } else {
                true
            }
        })?;
        Ok(found)
    }

    /// Batches of a channel from `from` (base offset) on, at most `limit`.
    pub fn scan(
        &self,
        channel_id: u64,
        from: u64,
        limit: usize,
    ) -> Result<Vec<IndexEntry>, StorageError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.walk(channel_id, from, |e| {
            if e.base_offset >= from {
                out.push(*e);
            }
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Removes a channel's entries whose base offset lies in `[from, to)`.
    pub fn remove_range(&self, channel_id: u64, from: u64, to: u64) -> Result<usize, StorageError> {
        if from >= to {
            return Ok(0);
        }
        let _changing = self.changing.lock().expect("index change lock");
        let inside = |e: &IndexEntry| e.base_offset >= from && e.base_offset < to;
        // Sled chunks that may hold entries in the range: the one holding `from`, and every
        // one starting inside the range (including a checkpoint's copy of the open chunk).
        let start = self
            .chunks
            .range(key(channel_id, 0)..=key(channel_id, from))
            .next_back()
            .transpose()?
            .map_or(key(channel_id, from), |(k, _)| {
                key(channel_id, key_channel_base(&k))
            });
        let end = key(channel_id, to.saturating_sub(1));
        let found: Vec<(sled::IVec, sled::IVec)> =
            self.chunks.range(start..=end).collect::<Result<_, _>>()?;
        // Base offsets removed (a checkpoint's copy of the open chunk repeats some).
        let mut gone = std::collections::BTreeSet::new();
        // One atomic batch: a chunk re-keyed after losing its first entries is never
        // missing for a reader in between (`walk` skips the repeats it may see instead).
        let mut batch = sled::Batch::default();
        for (k, v) in found {
            let mut chunk = decode_chunk(&k, &v);
            let before = chunk.len();
            gone.extend(chunk.iter().filter(|e| inside(e)).map(|e| e.base_offset));
            chunk.retain(|e| !inside(e));
            if chunk.len() == before {
                continue;
            }
            batch.remove(k);
            if let Some(first) = chunk.first() {
                batch.insert(
                    &key(channel_id, first.base_offset)[..],
                    encode_chunk(&chunk),
                );
            }
        }
        self.chunks.apply_batch(batch)?;
        let mut tails = self.tails();
        if let Some(tail) = tails.get_mut(&channel_id) {
            let before = tail.entries.len();
            gone.extend(
                tail.entries
                    .iter()
                    .filter(|e| inside(e))
                    .map(|e| e.base_offset),
            );
            tail.entries.retain(|e| !inside(e));
            tail.mirrored &= tail.entries.len() == before;
            if tail.last_base.is_some_and(|last| last >= from && last < to) {
                // The newest entries went (a torn tail cut off, or the channel deleted):
                // the next insert learns again from sled where appends continue.
                match tail.entries.last() {
                    Some(last) => tail.last_base = Some(last.base_offset),
                    None => {
                        tails.remove(&channel_id);
                    }
                }
            }
        }
        Ok(gone.len())
    }

    pub fn clear(&self) -> Result<(), StorageError> {
        let mut changing = self.changing.lock().expect("index change lock");
        *changing = (0, 0);
        self.tails().clear();
        self.chunks.clear()?;
        self.db.remove(CHECKPOINT_KEY)?;
        Ok(())
    }

    pub fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StorageError> {
        let Some(bytes) = self.db.get(CHECKPOINT_KEY)? else {
            return Ok(None);
        };
        match options().deserialize::<Checkpoint>(&bytes) {
            Ok(c) if c.format == CHECKPOINT_FORMAT => Ok(Some(c)),
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

    /// Where recovery indexes from until the first checkpoint is saved: where it started
    /// indexing (every open chunk was filled from there on).
    pub fn set_indexed_from(&self, from: (u64, u64)) {
        *self.changing.lock().expect("index change lock") = from;
    }

    /// Stores a checkpoint once every entry before its `index_from` (the previous
    /// checkpoint's position) is in sled and flushed, so a checkpoint sled gives back
    /// implies the entries it covers are there too: open chunks holding an older batch
    /// are copied to sled first.
    pub fn save_checkpoint(&self, mut checkpoint: Checkpoint) -> Result<(), StorageError> {
        checkpoint.format = CHECKPOINT_FORMAT;
        let mut changing = self.changing.lock().expect("index change lock");
        let from = *changing;
        let stale: Vec<(u64, [u8; 16], Vec<u8>)> = self
            .tails()
            .iter()
            .filter(|(_, t)| !t.mirrored && t.oldest().is_some_and(|o| o < from))
            .filter_map(|(channel, t)| {
                let first = t.entries.first()?;
                Some((
                    *channel,
                    key(*channel, first.base_offset),
                    encode_chunk(&t.entries),
                ))
            })
            .collect();
        for (channel, k, chunk) in stale {
            self.chunks.insert(k, chunk)?;
            if let Some(tail) = self.tails().get_mut(&channel) {
                tail.mirrored = true;
            }
        }
        checkpoint.index_from = from;
        self.db.flush()?;
        let bytes = options()
            .serialize(&checkpoint)
            .expect("bincode serialization into memory cannot fail");
        self.db.insert(CHECKPOINT_KEY, bytes)?;
        self.db.flush()?;
        *changing = (checkpoint.segment, checkpoint.position);
        Ok(())
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
        assert_eq!(now.spans[&7], span(0, 4, 40));
        assert_eq!(now.spans[&3], span(10, 12, 20));
    }

    #[test]
    fn finds_the_batch_holding_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        index.insert(&entry(1, 0, 10)).unwrap();
        index.insert(&entry(1, 10, 5)).unwrap();
        index.insert(&entry(2, 0, 3)).unwrap();
        assert_eq!(index.find(1, 0).unwrap().unwrap().base_offset, 0);
        assert_eq!(index.find(1, 12).unwrap().unwrap().base_offset, 10);
        assert_eq!(index.find(1, 15).unwrap(), None);
        assert_eq!(index.find(2, 2).unwrap().unwrap().channel_id, 2);
        assert_eq!(index.scan(1, 0, 10).unwrap().len(), 2);
        assert_eq!(index.remove_range(1, 0, 10).unwrap(), 1);
        // An offset below the first retained batch finds the next one.
        assert_eq!(index.find(1, 3).unwrap().unwrap().base_offset, 10);
    }

    #[test]
    fn checkpoint_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        assert!(index.load_checkpoint().unwrap().is_none());
        let mut summary = SegmentSummary::default();
        summary.add(3, 0, 5, 100);
        summary.add(3, 5, 9, 10);
        index
            .save_checkpoint(Checkpoint {
                segment: 2,
                position: 99,
                summaries: vec![(2, summary.clone())],
                ..Checkpoint::default()
            })
            .unwrap();
        let loaded = index.load_checkpoint().unwrap().unwrap();
        assert_eq!((loaded.segment, loaded.position), (2, 99));
        assert_eq!(loaded.summaries[0].1.spans[&3].end_offset, 9);
        assert_eq!(loaded.summaries[0].1.spans[&3].bytes, 110);
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
        model: &std::collections::BTreeMap<(u64, u64), IndexEntry>,
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
        model: &std::collections::BTreeMap<(u64, u64), IndexEntry>,
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
                let want: Vec<IndexEntry> = model
                    .range((channel, offset)..=(channel, u64::MAX))
                    .take(5)
                    .map(|(_, e)| *e)
                    .collect();
                assert_eq!(
                    index.scan(channel, offset, 5).unwrap(),
                    want,
                    "scan({channel}, {offset})"
                );
            }
        }
    }

    /// A checkpoint at the log position of step `step` of the model test.
    fn at(step: u64) -> Checkpoint {
        Checkpoint {
            segment: 1 + step / 100,
            position: step,
            ..Checkpoint::default()
        }
    }

    #[test]
    fn a_checkpoint_copies_only_open_chunks_older_than_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = |channel, base, position| IndexEntry {
            segment: 1,
            position,
            ..entry(channel, base, 1)
        };
        {
            let index = Index::open(dir.path(), 1 << 20).unwrap();
            index.insert(&e(1, 0, 10)).unwrap();
            // The first checkpoint lets recovery index from the start: nothing is copied.
            index
                .save_checkpoint(Checkpoint {
                    segment: 1,
                    position: 20,
                    ..Checkpoint::default()
                })
                .unwrap();
            assert_eq!(index.chunks.len(), 0);
            index.insert(&e(2, 0, 30)).unwrap();
            // The second lets recovery start at 20: channel 1's open chunk (at 10) is copied,
            // channel 2's (at 30) is left to recovery.
            index
                .save_checkpoint(Checkpoint {
                    segment: 1,
                    position: 40,
                    ..Checkpoint::default()
                })
                .unwrap();
            assert_eq!(index.chunks.len(), 1);
            assert_eq!(
                index.load_checkpoint().unwrap().unwrap().index_from,
                (1, 20)
            );
        }
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(index.find(1, 0).unwrap(), Some(e(1, 0, 10)));
        assert_eq!(index.find(2, 0).unwrap(), None);
    }

    #[test]
    fn chunked_entries_answer_like_a_sorted_map_through_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = std::collections::BTreeMap::new();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let channels = 4;
        let mut heads = vec![0u64; channels as usize];
        {
            let index = Index::open(dir.path(), 1 << 20).unwrap();
            for step in 0..2_000u64 {
                let channel = rng.below(channels);
                let head = &mut heads[channel as usize];
                match rng.below(20) {
                    // Mostly appends of batches of 1-3 messages.
                    0..=14 => {
                        let count = 1 + rng.below(3) as u32;
                        let e = IndexEntry {
                            segment: 1 + step / 100,
                            position: step,
                            ..entry(channel, *head, count)
                        };
                        *head += u64::from(count);
                        index.insert(&e).unwrap();
                        model.insert((channel, e.base_offset), e);
                    }
                    // A compaction copy: an existing batch moves.
                    15 | 16 => {
                        let picked = model
                            .range((channel, 0)..=(channel, u64::MAX))
                            .nth(rng.below(40) as usize)
                            .map(|(_, e)| *e);
                        if let Some(e) = picked {
                            let moved = IndexEntry {
                                segment: 999,
                                position: step,
                                ..e
                            };
                            index.insert(&moved).unwrap();
                            model.insert((channel, e.base_offset), moved);
                        }
                    }
                    // Retention: a prefix goes.
                    17 => {
                        let to = rng.below(*head + 1);
                        index.remove_range(channel, 0, to).unwrap();
                        model.retain(|&(c, base), _| c != channel || base >= to);
                    }
                    // A torn tail cut off: appends continue lower.
                    18 => {
                        let from = head.saturating_sub(rng.below(6));
                        index.remove_range(channel, from, u64::MAX).unwrap();
                        model.retain(|&(c, base), _| c != channel || base < from);
                        // Appends continue after the last batch left, as recovery's head does.
                        *head = model
                            .range((channel, 0)..=(channel, u64::MAX))
                            .next_back()
                            .map_or(from, |(_, e)| e.end_offset().max(from));
                    }
                    // A checkpoint at the log's current position.
                    _ => index.save_checkpoint(at(step)).unwrap(),
                }
            }
            let max = heads.iter().max().copied().unwrap() + 2;
            check_against(&index, &model, channels, max);
            // Two checkpoints past every entry: after the second (whose index_from is the
            // first's position) every entry is in sled.
            index.save_checkpoint(at(10_000)).unwrap();
            index.save_checkpoint(at(10_001)).unwrap();
            let saved = index.load_checkpoint().unwrap().unwrap();
            assert_eq!(saved.index_from, (101, 10_000));
        }
        // A reopened index answers the same.
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let max = heads.iter().max().copied().unwrap() + 2;
        check_against(&index, &model, channels, max);
        // And appends continue after what sled holds.
        let e = entry(0, heads[0], 1);
        index.insert(&e).unwrap();
        model.insert((0, e.base_offset), e);
        check_against(&index, &model, channels, max + 1);
    }

    #[test]
    fn a_chunk_seen_under_its_old_and_new_key_is_read_once() {
        // What a reader may meet while retention re-keys a chunk that lost its first
        // entries: the old and the new key side by side.
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let (a, b, c) = (entry(1, 0, 1), entry(1, 1, 1), entry(1, 2, 1));
        index
            .chunks
            .insert(key(1, 0), encode_chunk(&[a, b, c]))
            .unwrap();
        index
            .chunks
            .insert(key(1, 1), encode_chunk(&[b, c]))
            .unwrap();
        assert_eq!(index.scan(1, 0, 10).unwrap(), vec![a, b, c]);
        assert_eq!(index.scan(1, 1, 10).unwrap(), vec![b, c]);
        assert_eq!(index.find(1, 1).unwrap(), Some(b));
        // And removing the first entry leaves one chunk under the new key.
        assert_eq!(index.remove_range(1, 0, 1).unwrap(), 1);
        assert_eq!(index.scan(1, 0, 10).unwrap(), vec![b, c]);
        assert_eq!(index.chunks.len(), 1);
    }

    #[test]
    fn a_format_one_index_is_dropped_and_its_checkpoint_ignored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let old = db.open_tree(OLD_BATCHES_TREE).unwrap();
            old.insert(key(1, 0), &entry(1, 0, 1).encode_value()[..])
                .unwrap();
            let checkpoint = Checkpoint {
                format: 1,
                ..Checkpoint::default()
            };
            db.insert(CHECKPOINT_KEY, options().serialize(&checkpoint).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        assert!(index.load_checkpoint().unwrap().is_none());
        assert!(!index.db.tree_names().iter().any(|n| n == OLD_BATCHES_TREE));
        assert_eq!(index.find(1, 0).unwrap(), None);
    }
}
