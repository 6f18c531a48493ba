//! The log's state machine: channels, consumer cursors and producer sequences, rebuilt by
//! applying records in log order (docs/storage.md §3).
//!
//! Every field exists twice where it matters: the *durable* value (what the fsync'd log says)
//! and the *pending* value (what appends queued behind the next fsync will make it). Offsets
//! and deduplication are decided against the pending values, so pipelined publishes get
//! consecutive offsets; acks and deliveries use the durable ones. If a write fails, pending
//! collapses back to durable ([`LogState::reset_pending`]).

use std::collections::{BTreeMap, VecDeque};

use compact_str::CompactString;
use foldhash::{HashMap, HashMapExt};

use serde::{Deserialize, Serialize};

use crate::record::{BatchMeta, Record, RecordMeta};

/// How many sequence runs a producer remembers per channel for answering retries with
/// their offsets (an older duplicate is still refused, without its offset). Consecutive
/// sequences at consecutive offsets share a run; sparse ones (a source log position) and
/// producers interleaving on a channel take a run per message. Kept per (producer, channel)
/// in memory and in every snapshot: 256 runs held 6 KiB per pair, 60 MB for 10,000 channels
/// of log-position sequences; 32 hold 768 bytes.
pub const MAX_RUNS_PER_PRODUCER: usize = 32;

/// Consecutive sequences stored at consecutive offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub first_sequence: u64,
    pub first_offset: u64,
    pub count: u64,
}

/// What the log knows of one producer on one channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// The last durable sequence.
    pub last_sequence: Option<u64>,
    /// Recent sequences and where they are stored, oldest first.
    pub recent: VecDeque<Run>,
}

/// How a sequence relates to what a producer has already appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Never appended: append it.
    New,
    /// Appended and durable at this offset.
    Stored(u64),
    /// At or below the last durable sequence but no longer remembered (or never sent).
    Forgotten,
    /// Appended but its fsync has not finished yet.
    InFlight,
}

impl ProducerState {
    fn record(&mut self, sequences: impl Iterator<Item = u64>, base_offset: u64) {
        for (i, sequence) in sequences.enumerate() {
            let offset = base_offset + i as u64;
            match self.recent.back_mut() {
                Some(run)
                    if run.first_sequence.checked_add(run.count) == Some(sequence)
                        && run.first_offset + run.count == offset =>
                {
                    run.count += 1
                }
                _ => {
                    // Room made before the push, so the buffer never grows past the bound.
                    while self.recent.len() >= MAX_RUNS_PER_PRODUCER {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(Run {
                        first_sequence: sequence,
                        first_offset: offset,
                        count: 1,
                    })
                }
            }
            self.last_sequence = Some(sequence);
        }
    }

    /// Where a durable sequence is stored, if remembered.
    pub fn offset_of(&self, sequence: u64) -> Option<u64> {
        let i = self
            .recent
            .partition_point(|r| r.first_sequence <= sequence);
        let run = self.recent.get(i.checked_sub(1)?)?;
        (sequence - run.first_sequence < run.count)
            .then(|| run.first_offset + (sequence - run.first_sequence))
    }
}

/// A producer's durable state and the last sequence queued behind an fsync.
#[derive(Debug, Clone, Default)]
pub struct Producer {
    pub durable: ProducerState,
    pub pending_last: Option<u64>,
}

impl Producer {
    /// The last sequence appended, durable or not.
    pub fn last_sequence(&self) -> Option<u64> {
        self.pending_last.max(self.durable.last_sequence)
    }

    pub fn check(&self, sequence: u64) -> SequenceCheck {
        let durable_last = self.durable.last_sequence;
        if durable_last.is_some_and(|last| sequence <= last) {
            return match self.durable.offset_of(sequence) {
                Some(offset) => SequenceCheck::Stored(offset),
                None => SequenceCheck::Forgotten,
            };
        }
        if self.pending_last.is_some_and(|last| sequence <= last) {
            return SequenceCheck::InFlight;
        }
        SequenceCheck::New
    }
}

/// One channel.
#[derive(Debug, Clone)]
pub struct Channel {
    pub id: u64,
    pub name: String,
    pub created_ms: u64,
    /// Whether the channel's creation record is durable.
    pub durable: bool,
    /// Its deletion is queued: nothing more may be planned for it.
    pub deleting: bool,
    /// Offset the next durable message gets; messages below it may be delivered.
    pub next_offset: u64,
    /// Offset the next queued message gets.
    pub pending_next: u64,
    /// First retained offset.
    pub first_offset: u64,
    /// Retained payload bytes.
    pub retained_bytes: u64,
    /// Broker time of the newest durable message.
    pub last_append_ms: u64,
    /// By producer id, inline up to 24 bytes: a lookup compares the id in the table, not
    /// behind a pointer of its own (with thousands of channels, a cache miss per batch).
    pub producers: HashMap<CompactString, Producer>,
    /// Durable consumers and their committed offsets.
    pub consumers: BTreeMap<String, u64>,
}

impl Channel {
    fn new(id: u64, name: String, created_ms: u64, durable: bool) -> Channel {
        Channel {
            id,
            name,
            created_ms,
            durable,
            deleting: false,
            next_offset: 0,
            pending_next: 0,
            first_offset: 0,
            retained_bytes: 0,
            last_append_ms: 0,
            producers: HashMap::new(),
            consumers: BTreeMap::new(),
        }
    }
}

/// A channel as written into snapshots and checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    pub id: u64,
    pub name: String,
    pub created_ms: u64,
    pub next_offset: u64,
    pub first_offset: u64,
    pub retained_bytes: u64,
    pub last_append_ms: u64,
    pub producers: Vec<(String, ProducerState)>,
    pub consumers: Vec<(String, u64)>,
}

/// The durable state as a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub next_channel_id: u64,
    pub channels: Vec<ChannelSnapshot>,
}

/// All channels, cursors and producer states.
#[derive(Debug, Default)]
pub struct LogState {
    channels: HashMap<u64, Channel>,
    by_name: BTreeMap<String, u64>,
    next_channel_id: u64,
    pending_channel_id: u64,
    /// Counts [`LogState::reset_pending`] calls: a publisher that saw another epoch before
    /// must not append after a batch of its own may have been dropped.
    epoch: u64,
}

impl LogState {
    /// How many times queued appends were undone since start.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn channel(&self, id: u64) -> Option<&Channel> {
        self.channels.get(&id)
    }

    pub fn channel_mut(&mut self, id: u64) -> Option<&mut Channel> {
        self.channels.get_mut(&id)
    }

    pub fn channel_id(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// Channels whose names start with `prefix`, in name order.
    pub fn channels_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Channel> + 'a {
        self.by_name
            .range(prefix.to_owned()..)
            .take_while(move |(name, _)| name.starts_with(prefix))
            .filter_map(|(_, id)| self.channels.get(id))
    }

    pub fn channels(&self) -> impl Iterator<Item = &Channel> {
        self.channels.values()
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Registers a channel whose creation record is about to be queued; returns its id.
    pub fn create_pending(&mut self, name: &str, created_ms: u64) -> u64 {
        let id = self.pending_channel_id.max(self.next_channel_id);
        self.pending_channel_id = id + 1;
        self.channels
            .insert(id, Channel::new(id, name.to_owned(), created_ms, false));
        self.by_name.insert(name.to_owned(), id);
        id
    }

    /// Reserves `count` offsets for a batch about to be queued; returns the base offset.
    pub fn reserve(&mut self, channel_id: u64, count: u64) -> Option<u64> {
        let channel = self.channels.get_mut(&channel_id)?;
        let base = channel.pending_next;
        channel.pending_next += count;
        Some(base)
    }

    /// Notes that a producer's sequences up to `last` are queued.
    pub fn note_pending_sequence(&mut self, channel_id: u64, producer_id: &str, last: u64) {
        if let Some(channel) = self.channels.get_mut(&channel_id) {
            producer_mut(&mut channel.producers, producer_id).pending_last = Some(last);
        }
    }

    /// Undoes everything queued but not durable, after a failed write. Channel ids handed
    /// out are not reused, so a stale id can never name another channel.
    pub fn reset_pending(&mut self) {
        self.epoch += 1;
        self.channels.retain(|_, c| c.durable);
        self.by_name.retain(|_, id| self.channels.contains_key(id));
        for channel in self.channels.values_mut() {
            channel.deleting = false;
            channel.pending_next = channel.next_offset;
            channel
                .producers
                .retain(|_, p| p.durable.last_sequence.is_some());
            for producer in channel.producers.values_mut() {
                producer.pending_last = None;
            }
        }
    }

    /// Applies a durable record (during replay, or after its fsync).
    pub fn apply(&mut self, record: &RecordMeta) {
        match record {
            RecordMeta::Batch(meta) => self.apply_batch(meta),
            RecordMeta::Other(record) => self.apply_other(record),
        }
    }

    fn apply_other(&mut self, record: &Record) {
        match record {
            Record::ChannelCreated {
                channel_id,
                name,
                created_ms,
            } => {
                let channel = self
                    .channels
                    .entry(*channel_id)
                    .or_insert_with(|| Channel::new(*channel_id, name.clone(), *created_ms, true));
                channel.durable = true;
                self.by_name.insert(name.clone(), *channel_id);
                self.next_channel_id = self.next_channel_id.max(channel_id + 1);
                self.pending_channel_id = self.pending_channel_id.max(self.next_channel_id);
            }
            Record::ChannelDeleted { channel_id } => {
                if let Some(channel) = self.channels.remove(channel_id) {
                    if self.by_name.get(&channel.name) == Some(channel_id) {
                        self.by_name.remove(&channel.name);
                    }
                }
            }
            Record::CursorCommitted {
                channel_id,
                consumer,
                offset,
            } => {
                if let Some(channel) = self.channels.get_mut(channel_id) {
                    channel.consumers.insert(consumer.clone(), *offset);
                }
            }
            Record::Snapshot(snapshot) => self.load(snapshot),
            Record::Batch(_) => unreachable!("batches arrive as RecordMeta::Batch"),
        }
    }

    fn apply_batch(&mut self, meta: &BatchMeta) {
        let Some(channel) = self.channels.get_mut(&meta.channel_id) else {
            return;
        };
        let end = meta.end_offset();
        if end <= channel.next_offset {
            // Already reflected (a snapshot or checkpoint taken after this batch).
            return;
        }
        channel.next_offset = end;
        channel.pending_next = channel.pending_next.max(end);
        channel.retained_bytes += meta.payload_bytes();
        channel.last_append_ms = channel.last_append_ms.max(meta.timestamp_ms);
        if let Some(stamp) = &meta.producer {
            let producer = producer_mut(&mut channel.producers, &stamp.producer_id);
            let sequences = (0..stamp.sequences.len()).filter_map(|i| stamp.sequences.get(i));
            producer.durable.record(sequences, meta.base_offset);
            if producer.pending_last <= producer.durable.last_sequence {
                producer.pending_last = None;
            }
        }
    }

    /// The durable state as a value, for snapshots and checkpoints.
    pub fn snapshot(&self) -> StateSnapshot {
        let mut channels: Vec<ChannelSnapshot> = self
            .channels
            .values()
            .filter(|c| c.durable)
            .map(|c| ChannelSnapshot {
                id: c.id,
                name: c.name.clone(),
                created_ms: c.created_ms,
                next_offset: c.next_offset,
                first_offset: c.first_offset,
                retained_bytes: c.retained_bytes,
                last_append_ms: c.last_append_ms,
                producers: c
                    .producers
                    .iter()
                    .filter(|(_, p)| p.durable.last_sequence.is_some())
                    .map(|(id, p)| (id.to_string(), p.durable.clone()))
                    .collect(),
                consumers: c.consumers.iter().map(|(n, o)| (n.clone(), *o)).collect(),
            })
            .collect();
        channels.sort_by_key(|c| c.id);
        StateSnapshot {
            next_channel_id: self.next_channel_id,
            channels,
        }
    }

    /// Replaces the whole state by a snapshot.
    pub fn load(&mut self, snapshot: &StateSnapshot) {
        let (epoch, pending_channel_id) = (self.epoch, self.pending_channel_id);
        *self = LogState::default();
        self.epoch = epoch;
        self.next_channel_id = snapshot.next_channel_id;
        self.pending_channel_id = pending_channel_id.max(snapshot.next_channel_id);
        for c in &snapshot.channels {
            let mut channel = Channel::new(c.id, c.name.clone(), c.created_ms, true);
            channel.next_offset = c.next_offset;
            channel.pending_next = c.next_offset;
            channel.first_offset = c.first_offset;
            channel.retained_bytes = c.retained_bytes;
            channel.last_append_ms = c.last_append_ms;
            channel.producers = c
                .producers
                .iter()
                .map(|(id, p)| {
                    (
                        CompactString::from(id.as_str()),
                        Producer {
                            durable: p.clone(),
                            pending_last: None,
                        },
                    )
                })
                .collect();
            channel.consumers = c.consumers.iter().cloned().collect();
            self.by_name.insert(c.name.clone(), c.id);
            self.channels.insert(c.id, channel);
        }
    }
}

/// A channel's state for `producer_id`, created if new. Looked up by `&str` first: every
/// batch passes here twice (planned and applied), and `entry` would allocate the owned key
/// each time even for a producer already known.
fn producer_mut<'a>(
    producers: &'a mut HashMap<CompactString, Producer>,
    producer_id: &str,
) -> &'a mut Producer {
    if !producers.contains_key(producer_id) {
        producers.insert(producer_id.into(), Producer::default());
    }
    producers.get_mut(producer_id).expect("just ensured")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ProducerStamp, Sequences};

    fn created(id: u64, name: &str) -> RecordMeta {
        RecordMeta::Other(Record::ChannelCreated {
            channel_id: id,
            name: name.into(),
            created_ms: 1,
        })
    }

    fn batch(channel_id: u64, base: u64, producer: &str, sequences: Vec<u64>) -> RecordMeta {
        RecordMeta::Batch(BatchMeta {
            channel_id,
            base_offset: base,
            timestamp_ms: 10,
            entries: sequences.iter().map(|_| (vec![], 4)).collect(),
            producer: Some(ProducerStamp {
                producer_id: producer.into(),
                sequences: Sequences::from_list(sequences),
            }),
        })
    }

    #[test]
    fn retries_are_answered_with_their_offsets() {
        let mut state = LogState::default();
        state.apply(&created(0, "a"));
        state.apply(&batch(0, 0, "p", vec![1, 2, 3]));
        state.apply(&batch(0, 3, "p", vec![10, 20]));
        let p = &state.channel(0).unwrap().producers["p"];
        assert_eq!(p.check(2), SequenceCheck::Stored(1));
        assert_eq!(p.check(20), SequenceCheck::Stored(4));
        assert_eq!(p.check(15), SequenceCheck::Forgotten);
        assert_eq!(p.check(21), SequenceCheck::New);
        assert_eq!(
            p.durable.recent.len(),
            3,
            "dense runs merge: {:?}",
            p.durable.recent
        );
    }

    #[test]
    fn pending_sequences_are_in_flight_until_durable() {
        let mut state = LogState::default();
        state.apply(&created(0, "a"));
        assert_eq!(state.reserve(0, 2), Some(0));
        state.note_pending_sequence(0, "p", 2);
        assert_eq!(
            state.channel(0).unwrap().producers["p"].check(1),
            SequenceCheck::InFlight
        );
        state.apply(&batch(0, 0, "p", vec![1, 2]));
        let p = &state.channel(0).unwrap().producers["p"];
        assert_eq!(p.check(1), SequenceCheck::Stored(0));
        assert_eq!(p.pending_last, None);
    }

    #[test]
    fn reset_pending_forgets_what_was_not_written() {
        let mut state = LogState::default();
        state.apply(&created(0, "a"));
        state.apply(&batch(0, 0, "p", vec![1]));
        let new = state.create_pending("b", 2);
        assert_eq!(new, 1);
        state.reserve(0, 5);
        state.note_pending_sequence(0, "p", 9);
        state.note_pending_sequence(0, "q", 9);
        state.reset_pending();
        assert!(state.channel_id("b").is_none());
        let a = state.channel(0).unwrap();
        assert_eq!(a.pending_next, 1);
        assert_eq!(a.producers["p"].last_sequence(), Some(1));
        assert!(!a.producers.contains_key("q"));
        assert_eq!(state.create_pending("b", 3), 2, "ids are never reused");
        assert_eq!(state.epoch(), 1);
    }

    #[test]
    fn snapshot_round_trips_and_replaces_state() {
        let mut state = LogState::default();
        state.apply(&created(0, "a/x"));
        state.apply(&created(1, "b"));
        state.apply(&batch(0, 0, "p", vec![1, 2]));
        state.apply(&RecordMeta::Other(Record::CursorCommitted {
            channel_id: 0,
            consumer: "c".into(),
            offset: 1,
        }));
        let snap = state.snapshot();
        let mut other = LogState::default();
        other.apply(&created(5, "stale"));
        other.apply(&RecordMeta::Other(Record::Snapshot(Box::new(snap.clone()))));
        assert_eq!(other.snapshot(), snap);
        assert!(other.channel_id("stale").is_none());
        let names: Vec<_> = other
            .channels_with_prefix("a/")
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(names, vec!["a/x".to_string()]);
        // Replaying a batch the snapshot already covers changes nothing.
        other.apply(&batch(0, 0, "p", vec![1, 2]));
        assert_eq!(other.snapshot(), snap);
    }

    #[test]
    fn the_largest_sequence_does_not_overflow() {
        let mut p = ProducerState::default();
        p.record([u64::MAX - 1, u64::MAX].into_iter(), 7);
        assert_eq!(p.offset_of(u64::MAX), Some(8));
        assert_eq!(p.offset_of(3), None);
        p.record(std::iter::once(u64::MAX), 9);
        assert_eq!(p.offset_of(u64::MAX), Some(9));
    }

    #[test]
    fn runs_are_bounded() {
        let mut p = ProducerState::default();
        for i in 0..1000u64 {
            p.record(std::iter::once(i * 2), i);
        }
        assert_eq!(p.recent.len(), MAX_RUNS_PER_PRODUCER);
        // Memory, not only length: a buffer that grew past the bound keeps its capacity.
        assert!(
            p.recent.capacity() < 2 * MAX_RUNS_PER_PRODUCER,
            "{} runs of room held for {MAX_RUNS_PER_PRODUCER}",
            p.recent.capacity()
        );
        assert_eq!(p.offset_of(1998), Some(999));
        let oldest = 2 * (1000 - MAX_RUNS_PER_PRODUCER as u64);
        assert_eq!(p.offset_of(oldest), Some(oldest / 2));
        assert_eq!(p.offset_of(oldest - 2), None);
        assert_eq!(p.offset_of(0), None);
        // A producer alone on its channel stays one run, however many batches it sends.
        let mut alone = ProducerState::default();
        for i in 0..1000u64 {
            alone.record([2 * i, 2 * i + 1].into_iter(), 2 * i);
        }
        assert_eq!(alone.recent.len(), 1);
        assert_eq!(alone.offset_of(0), Some(0));
    }
}
