//! The broker's decision core under arbitrary interleavings.
//!
//! The input is a sequence of operations — streams opening and closing, publishes (fresh,
//! retried, out of order), consumer sessions and their commits, admin requests, group
//! commits that succeed or fail, retention — played against `directmq_broker::engine` and
//! a `LogState`. The harness does what the network shell (broker/src/server.rs) and the
//! storage writer (storage/src/store.rs) do around the engine, with the writer's queue
//! made explicit: records are queued, then a `Flush` makes the oldest jobs durable (applied
//! in log order, completions after) and a `FailWrite` drops the group and everything queued
//! behind it with `reset_pending`, as `Writer::fail` does.
//!
//! Invariants checked:
//! - nothing panics;
//! - offsets are dense per channel: every durable batch starts at the channel's head, and
//!   `pending_next - next_offset` is exactly what is queued for the channel;
//! - a producer's sequence is appended at most once per channel, in increasing order, and
//!   every ack (fresh or duplicate) names the offset the sequence really has;
//! - a consumer's durable cursor never moves backwards through commits (only an explicit
//!   reset may move it back), and never points past the channel's head;
//! - retention never goes above the lowest committed offset.

#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use arbitrary::Arbitrary;
use bytes::Bytes;
use directmq_broker::engine::{self, Incoming, PublishDecision};
use directmq_protocol::{validate_channel_name, validate_identifier, ErrorCode, StartPosition};
use directmq_storage::{BatchMeta, LogState, Record, RecordMeta, StoredMessage};
use libfuzzer_sys::fuzz_target;

/// Names the operations pick from; the last of each is invalid.
const CHANNELS: [&str; 4] = ["a", "dc-1/b", "dc-1/b/c", "bad name"];
const PRODUCERS: [&str; 3] = ["p", "q", "bad/id"];
const CONSUMERS: [&str; 3] = ["c1", "c2", "bad/name"];
const PUBLISHERS: usize = 4;
const SESSIONS: usize = 3;
const MAX_OPS: usize = 400;
const MAX_BATCH: usize = 6;

#[derive(Arbitrary, Debug)]
enum Op {
    OpenPublish {
        slot: u8,
        channel: u8,
        producer: u8,
        create: bool,
    },
    Publish {
        slot: u8,
        first: SeqChoice,
        count: u8,
        gaps: u8,
        disorder: bool,
    },
    ClosePublish {
        slot: u8,
    },
    CreateChannel {
        channel: u8,
    },
    DeleteChannel {
        channel: u8,
    },
    Subscribe {
        slot: u8,
        channel: u8,
        consumer: u8,
        start: Start,
    },
    Commit {
        slot: u8,
        offset: OffsetChoice,
    },
    EndSession {
        slot: u8,
    },
    ResetConsumer {
        channel: u8,
        consumer: u8,
        to: Start,
    },
    Flush {
        jobs: u8,
    },
    FailWrite,
    Retain {
        channel: u8,
        pick: u8,
    },
    Tick {
        ms: u8,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SeqChoice {
    /// Right after the last sequence this stream sent.
    Next,
    /// A retry: `n` below the last sequence sent.
    Retry(u8),
    Exact(u8),
    Huge,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Start {
    Earliest,
    Latest,
    Offset(u8),
}

impl Start {
    fn position(self) -> StartPosition {
        match self {
            Start::Earliest => StartPosition::Earliest,
            Start::Latest => StartPosition::Latest,
            Start::Offset(o) => StartPosition::Offset(u64::from(o)),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum OffsetChoice {
    Head,
    AheadOfLast(u8),
    BehindLast(u8),
    Exact(u8),
    BeyondHead(u8),
}

/// Who waits for a queued job, and what to check when it completes.
#[derive(Debug)]
enum Owner {
    Nobody,
    PublishOpen { stream: u64 },
    PublishBatch { stream: u64, ack: AckCheck },
    PublishRetry { stream: u64 },
    SubscribeNew { stream: u64 },
}

/// What a publish ack promised: `fresh[i]` is stored at `first_offset + i`.
#[derive(Debug)]
struct AckCheck {
    channel: u64,
    producer: &'static str,
    first_offset: u64,
    fresh: Vec<u64>,
}

/// Why a cursor record was queued.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CursorWhy {
    Commit,
    NewConsumer,
    Reset,
}

#[derive(Debug)]
struct Job {
    records: Vec<(Record, Option<CursorWhy>)>,
    owner: Owner,
}

#[derive(Debug, PartialEq)]
enum Phase {
    Opening,
    Open,
    /// Waiting for in-flight retries to become durable; the batch to plan again.
    Waiting(Vec<u64>),
}

#[derive(Debug)]
struct Publisher {
    stream: u64,
    channel: u64,
    producer: &'static str,
    epoch: u64,
    phase: Phase,
    last_sent: u64,
}

#[derive(Debug)]
struct Session {
    stream: u64,
    channel: u64,
    consumer: &'static str,
    open: bool,
    last_commit: u64,
}

#[derive(Default)]
struct World {
    state: LogState,
    now: u64,
    queue: VecDeque<Job>,
    next_stream: u64,
    publishers: [Option<Publisher>; PUBLISHERS],
    sessions: [Option<Session>; SESSIONS],
    leases: HashSet<(u64, &'static str)>,
    /// Ground truth from durable batches: (channel, producer) → sequence → offset.
    stored: HashMap<(u64, String), BTreeMap<u64, u64>>,
    /// Durable head of every live channel, counted independently of `LogState`.
    heads: HashMap<u64, u64>,
    /// Base offsets of durable batches per channel (where retention may cut).
    batch_starts: HashMap<u64, BTreeSet<u64>>,
    /// Every channel id ever made durable: ids are never reused.
    ids_used: HashSet<u64>,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut world = World::default();
    for op in ops.into_iter().take(MAX_OPS) {
        world.step(op);
        world.check();
    }
    // Drain: everything queued becomes durable and every ack is checked.
    while !world.queue.is_empty() {
        world.flush(usize::MAX);
        world.check();
    }
});

fn pick<T: Copy>(items: &[T], i: u8) -> T {
    items[usize::from(i) % items.len()]
}

impl World {
    fn stream_id(&mut self) -> u64 {
        self.next_stream += 1;
        self.next_stream
    }

    fn enqueue(&mut self, records: Vec<(Record, Option<CursorWhy>)>, owner: Owner) {
        self.queue.push_back(Job { records, owner });
    }

    /// The shell's `channel_id`: a durable channel by name.
    fn durable_channel(&self, name: &str) -> Option<u64> {
        self.state
            .channel_id(name)
            .filter(|id| self.state.channel(*id).is_some_and(|c| c.durable))
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::OpenPublish {
                slot,
                channel,
                producer,
                create,
            } => self.open_publish(
                usize::from(slot) % PUBLISHERS,
                pick(&CHANNELS, channel),
                pick(&PRODUCERS, producer),
                create,
            ),
            Op::Publish {
                slot,
                first,
                count,
                gaps,
                disorder,
            } => {
                let slot = usize::from(slot) % PUBLISHERS;
                let Some(p) = &mut self.publishers[slot] else {
                    return;
                };
                if p.phase != Phase::Open {
                    return;
                }
                let mut seq = match first {
                    SeqChoice::Next => p.last_sent.saturating_add(1),
                    SeqChoice::Retry(n) => p.last_sent.saturating_sub(u64::from(n)),
                    SeqChoice::Exact(n) => u64::from(n),
                    SeqChoice::Huge => u64::MAX - 3,
                };
                let mut sequences = Vec::new();
                for i in 0..usize::from(count) % (MAX_BATCH + 1) {
                    sequences.push(seq);
                    let step = 1 + u64::from(gaps >> (i % 8) & 1);
                    match seq.checked_add(step) {
                        Some(next) => seq = next,
                        None => break,
                    }
                }
                if disorder && sequences.len() >= 2 {
                    sequences.swap(0, 1);
                }
                if let Some(&max) = sequences.iter().max() {
                    p.last_sent = p.last_sent.max(max);
                }
                self.plan_batch(slot, sequences);
            }
            Op::ClosePublish { slot } => {
                self.publishers[usize::from(slot) % PUBLISHERS] = None;
            }
            Op::CreateChannel { channel } => {
                let name = pick(&CHANNELS, channel);
                match engine::resolve_channel(&mut self.state, name, true, self.now) {
                    Ok((_, None)) => {} // CHANNEL_EXISTS
                    Ok((id, Some(record))) => {
                        assert!(!self.ids_used.contains(&id), "channel id {id} reused");
                        self.enqueue(vec![(record, None)], Owner::Nobody);
                    }
                    Err(r) => {
                        assert_eq!(r.code, ErrorCode::INVALID_CHANNEL_NAME);
                        assert!(validate_channel_name(name).is_err());
                    }
                }
            }
            Op::DeleteChannel { channel } => {
                let Some(id) = self.durable_channel(pick(&CHANNELS, channel)) else {
                    return;
                };
                self.state.channel_mut(id).expect("durable").deleting = true;
                self.enqueue(
                    vec![(Record::ChannelDeleted { channel_id: id }, None)],
                    Owner::Nobody,
                );
            }
            Op::Subscribe {
                slot,
                channel,
                consumer,
                start,
            } => self.subscribe(
                usize::from(slot) % SESSIONS,
                pick(&CHANNELS, channel),
                pick(&CONSUMERS, consumer),
                start.position(),
            ),
            Op::Commit { slot, offset } => self.commit(usize::from(slot) % SESSIONS, offset),
            Op::EndSession { slot } => self.end_session(usize::from(slot) % SESSIONS),
            Op::ResetConsumer {
                channel,
                consumer,
                to,
            } => {
                let consumer = pick(&CONSUMERS, consumer);
                if validate_identifier(consumer).is_err() {
                    return;
                }
                let Some(id) = self.durable_channel(pick(&CHANNELS, channel)) else {
                    return;
                };
                if self.leases.contains(&(id, consumer)) {
                    return; // CONSUMER_BUSY
                }
                let c = self.state.channel(id).expect("durable");
                let offset = engine::start_offset(c, to.position());
                assert!(c.first_offset <= offset && offset <= c.next_offset);
                let record = Record::CursorCommitted {
                    channel_id: id,
                    consumer: consumer.to_owned(),
                    offset,
                };
                self.enqueue(vec![(record, Some(CursorWhy::Reset))], Owner::Nobody);
            }
            Op::Flush { jobs } => self.flush(1 + usize::from(jobs % 4)),
            Op::FailWrite => self.fail(),
            Op::Retain {
                channel,
                pick: choice,
            } => self.retain(channel, choice),
            Op::Tick { ms } => self.now += u64::from(ms),
        }
    }

    // ---- publish streams (server.rs `open_publish`, `plan_batch`) ----

    fn open_publish(
        &mut self,
        slot: usize,
        channel: &'static str,
        producer: &'static str,
        create: bool,
    ) {
        self.publishers[slot] = None;
        if validate_channel_name(channel).is_err() || validate_identifier(producer).is_err() {
            return;
        }
        let (id, record) = match engine::resolve_channel(&mut self.state, channel, create, self.now)
        {
            Ok(resolved) => resolved,
            Err(r) => {
                assert_eq!(r.code, ErrorCode::CHANNEL_NOT_FOUND);
                assert!(!create);
                return;
            }
        };
        let c = self.state.channel(id).expect("resolved");
        let pending_producer = c
            .producers
            .get(producer)
            .is_some_and(|p| p.pending_last.is_some());
        let wait = record.is_some() || !c.durable || pending_producer;
        let stream = self.stream_id();
        self.publishers[slot] = Some(Publisher {
            stream,
            channel: id,
            producer,
            epoch: 0,
            phase: Phase::Opening,
            last_sent: 0,
        });
        if wait {
            let records = record.into_iter().map(|r| (r, None)).collect();
            self.enqueue(records, Owner::PublishOpen { stream });
        } else {
            self.opened(slot);
        }
    }

    /// The open finished waiting: answer from durable state only.
    fn opened(&mut self, slot: usize) {
        let Some(p) = &mut self.publishers[slot] else {
            return;
        };
        match self.state.channel(p.channel).filter(|c| c.durable) {
            None => self.publishers[slot] = None, // STORAGE_ERROR: could not be created
            Some(c) => {
                let last = c
                    .producers
                    .get(p.producer)
                    .and_then(|pr| pr.durable.last_sequence);
                p.epoch = self.state.epoch();
                p.phase = Phase::Open;
                p.last_sent = last.unwrap_or(0);
            }
        }
    }

    fn plan_batch(&mut self, slot: usize, sequences: Vec<u64>) {
        let p = self.publishers[slot].as_ref().expect("caller checked");
        let (stream, channel, producer) = (p.stream, p.channel, p.producer);
        if self.state.epoch() != p.epoch {
            // A write failed since the stream opened: the stream is refused.
            self.publishers[slot] = None;
            return;
        }
        let incoming = sequences
            .iter()
            .map(|&sequence| Incoming {
                sequence,
                message: StoredMessage {
                    headers: vec![],
                    payload: Bytes::from(sequence.to_le_bytes().to_vec()),
                },
            })
            .collect();
        let durable_last = self
            .state
            .channel(channel)
            .and_then(|c| c.producers.get(producer))
            .and_then(|p| p.durable.last_sequence);
        let decision = engine::plan_publish(&mut self.state, channel, producer, incoming, self.now);
        match decision {
            Err(r) => {
                match r.code {
                    ErrorCode::INVALID_SEQUENCE => assert!(
                        sequences.windows(2).any(|w| w[1] <= w[0]),
                        "refused increasing sequences {sequences:?}"
                    ),
                    ErrorCode::CHANNEL_NOT_FOUND => {
                        assert!(self.state.channel(channel).is_none_or(|c| c.deleting))
                    }
                    other => panic!("unexpected refusal {other}: {}", r.message),
                }
                self.publishers[slot] = None;
            }
            Ok(PublishDecision::WaitForInFlight(back)) => {
                let back: Vec<u64> = back.iter().map(|m| m.sequence).collect();
                assert_eq!(back, sequences, "messages given back changed");
                self.enqueue(vec![], Owner::PublishRetry { stream });
                self.publishers[slot].as_mut().expect("open").phase = Phase::Waiting(back);
            }
            Ok(PublishDecision::Append {
                record,
                first_offset,
                appended,
                duplicates,
            }) => {
                assert_eq!(
                    appended as usize + duplicates.len(),
                    sequences.len(),
                    "every message is either appended or a duplicate"
                );
                let truth = self.stored.get(&(channel, producer.to_owned()));
                let mut is_dup = vec![false; sequences.len()];
                for &(index, offset) in &duplicates {
                    let seq = sequences[index as usize];
                    assert!(!is_dup[index as usize], "index {index} reported twice");
                    is_dup[index as usize] = true;
                    assert!(
                        durable_last.is_some_and(|last| seq <= last),
                        "sequence {seq} called a duplicate above the durable last {durable_last:?}"
                    );
                    if let Some(offset) = offset {
                        assert_eq!(
                            truth.and_then(|t| t.get(&seq)),
                            Some(&offset),
                            "duplicate {seq} answered with the wrong offset"
                        );
                    }
                }
                let fresh: Vec<u64> = sequences
                    .iter()
                    .zip(&is_dup)
                    .filter(|(_, d)| !**d)
                    .map(|(s, _)| *s)
                    .collect();
                if let Some(t) = truth {
                    for s in &fresh {
                        assert!(!t.contains_key(s), "sequence {s} appended twice");
                    }
                }
                match record {
                    Some(Record::Batch(b)) => {
                        assert_eq!(b.channel_id, channel);
                        assert_eq!(b.base_offset, first_offset);
                        assert_eq!(b.messages.len(), appended as usize);
                        let ack = AckCheck {
                            channel,
                            producer,
                            first_offset,
                            fresh,
                        };
                        self.enqueue(
                            vec![(Record::Batch(b), None)],
                            Owner::PublishBatch { stream, ack },
                        );
                    }
                    Some(other) => panic!("plan_publish returned {other:?}"),
                    None => {
                        assert_eq!(appended, 0);
                        // A barrier: acked once what is queued before is durable.
                        self.enqueue(vec![], Owner::Nobody);
                    }
                }
            }
        }
    }

    // ---- consumer sessions (server.rs `open_session`, `commit`) ----

    fn subscribe(
        &mut self,
        slot: usize,
        channel: &'static str,
        consumer: &'static str,
        start: StartPosition,
    ) {
        if self.sessions[slot].is_some() {
            return;
        }
        let Some(id) = self.durable_channel(channel) else {
            return;
        };
        if self.leases.contains(&(id, consumer)) {
            return; // CONSUMER_BUSY
        }
        // The shell waits for a barrier before planning: everything queued so far (the
        // replaced session's commits, a reset) is durable first.
        self.flush(self.queue.len());
        let Some(c) = self.state.channel(id).filter(|c| c.durable) else {
            return; // deleted meanwhile: CHANNEL_NOT_FOUND
        };
        let (next, record) = match engine::plan_subscribe(c, consumer, start) {
            Ok(planned) => planned,
            Err(r) => {
                assert_eq!(r.code, ErrorCode::INVALID_NAME);
                assert!(validate_identifier(consumer).is_err());
                return;
            }
        };
        assert!(
            c.first_offset <= next && next <= c.next_offset,
            "session starts at {next} outside {}..={}",
            c.first_offset,
            c.next_offset
        );
        assert_eq!(record.is_some(), !c.consumers.contains_key(consumer));
        self.leases.insert((id, consumer));
        let stream = self.stream_id();
        let open = record.is_none();
        if let Some(record) = record {
            self.enqueue(
                vec![(record, Some(CursorWhy::NewConsumer))],
                Owner::SubscribeNew { stream },
            );
        }
        self.sessions[slot] = Some(Session {
            stream,
            channel: id,
            consumer,
            open,
            last_commit: next,
        });
    }

    fn commit(&mut self, slot: usize, choice: OffsetChoice) {
        let Some(s) = &mut self.sessions[slot] else {
            return;
        };
        if !s.open {
            return;
        }
        let head = self.state.channel(s.channel).map(|c| c.next_offset);
        let offset = match choice {
            OffsetChoice::Head => head.unwrap_or(s.last_commit),
            OffsetChoice::AheadOfLast(n) => s.last_commit + u64::from(n),
            OffsetChoice::BehindLast(n) => s.last_commit.saturating_sub(u64::from(n)),
            OffsetChoice::Exact(n) => u64::from(n),
            OffsetChoice::BeyondHead(n) => head.unwrap_or(0) + 1 + u64::from(n),
        };
        if offset <= s.last_commit {
            return; // cumulative: changes nothing
        }
        let Some(c) = self.state.channel(s.channel) else {
            return; // CHANNEL_NOT_FOUND
        };
        match engine::plan_commit(c, s.consumer, offset) {
            Ok(Some(record)) => {
                s.last_commit = offset;
                self.enqueue(vec![(record, Some(CursorWhy::Commit))], Owner::Nobody);
            }
            Ok(None) => {
                assert!(c.consumers.get(s.consumer).is_some_and(|&o| o >= offset));
                s.last_commit = offset;
            }
            Err(r) => {
                assert_eq!(r.code, ErrorCode::OFFSET_OUT_OF_RANGE);
                assert!(offset > c.next_offset);
            }
        }
    }

    fn end_session(&mut self, slot: usize) {
        if let Some(s) = self.sessions[slot].take() {
            self.leases.remove(&(s.channel, s.consumer));
        }
    }

    // ---- the storage writer (store.rs `write_group`, `fail`, `retain`) ----

    fn flush(&mut self, jobs: usize) {
        let n = jobs.min(self.queue.len());
        let group: Vec<Job> = self.queue.drain(..n).collect();
        for job in &group {
            for (record, why) in &job.records {
                self.apply(record, *why);
            }
        }
        for job in group {
            self.complete(job.owner, true);
        }
    }

    /// A failed write: the group being written and everything queued behind it fail.
    fn fail(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let epoch = self.state.epoch();
        self.state.reset_pending();
        assert_eq!(self.state.epoch(), epoch + 1);
        let failed: Vec<Job> = self.queue.drain(..).collect();
        for job in failed {
            self.complete(job.owner, false);
        }
    }

    fn apply(&mut self, record: &Record, why: Option<CursorWhy>) {
        let meta = match record {
            Record::Batch(b) => {
                let c = self
                    .state
                    .channel(b.channel_id)
                    .expect("a batch is queued only for a channel that exists");
                assert!(c.durable, "batch of channel {} before its creation", c.id);
                assert_eq!(
                    b.base_offset, c.next_offset,
                    "offsets not dense on channel {}",
                    c.id
                );
                assert_eq!(self.heads.get(&c.id).copied(), Some(c.next_offset));
                let count = b.messages.len() as u64;
                assert!(count > 0, "empty batch record");
                if let Some(stamp) = &b.producer {
                    let truth = self
                        .stored
                        .entry((b.channel_id, stamp.producer_id.to_string()))
                        .or_default();
                    assert_eq!(stamp.sequences.len(), b.messages.len());
                    for i in 0..stamp.sequences.len() {
                        let seq = stamp.sequences.get(i).expect("in range");
                        if let Some((&last, _)) = truth.last_key_value() {
                            assert!(
                                seq > last,
                                "producer {} appended {seq} after {last} on channel {}",
                                stamp.producer_id,
                                b.channel_id
                            );
                        }
                        assert!(
                            truth.insert(seq, b.base_offset + i as u64).is_none(),
                            "sequence {seq} appended twice"
                        );
                    }
                }
                self.heads.insert(b.channel_id, b.base_offset + count);
                self.batch_starts
                    .entry(b.channel_id)
                    .or_default()
                    .insert(b.base_offset);
                // What `Txn::append` hands the writer.
                RecordMeta::Batch(BatchMeta::of(b))
            }
            Record::ChannelCreated { channel_id, .. } => {
                assert!(
                    self.ids_used.insert(*channel_id),
                    "channel id {channel_id} created twice"
                );
                self.heads.insert(*channel_id, 0);
                RecordMeta::Other(record.clone())
            }
            Record::ChannelDeleted { channel_id } => {
                self.heads.remove(channel_id);
                self.batch_starts.remove(channel_id);
                RecordMeta::Other(record.clone())
            }
            Record::CursorCommitted {
                channel_id,
                consumer,
                offset,
            } => {
                if let Some(c) = self.state.channel(*channel_id) {
                    assert!(
                        *offset <= c.next_offset,
                        "cursor {consumer} at {offset} beyond head {}",
                        c.next_offset
                    );
                    let current = c.consumers.get(consumer).copied();
                    if why == Some(CursorWhy::Commit) {
                        assert!(
                            current.is_none_or(|cur| cur <= *offset),
                            "commit moved consumer {consumer} of channel {channel_id} back from {current:?} to {offset}"
                        );
                    }
                }
                RecordMeta::Other(record.clone())
            }
            other => RecordMeta::Other(other.clone()),
        };
        self.state.apply(&meta);
    }

    fn complete(&mut self, owner: Owner, ok: bool) {
        match owner {
            Owner::Nobody => {}
            Owner::PublishOpen { stream } => {
                if let Some(slot) = self.publisher(stream) {
                    if ok {
                        self.opened(slot);
                    } else {
                        self.publishers[slot] = None;
                    }
                }
            }
            Owner::PublishBatch { stream, ack } => {
                if ok {
                    let truth = &self.stored[&(ack.channel, ack.producer.to_owned())];
                    for (i, seq) in ack.fresh.iter().enumerate() {
                        assert_eq!(
                            truth.get(seq),
                            Some(&(ack.first_offset + i as u64)),
                            "ack for sequence {seq} names the wrong offset"
                        );
                    }
                } else if let Some(slot) = self.publisher(stream) {
                    self.publishers[slot] = None;
                }
            }
            Owner::PublishRetry { stream } => {
                let Some(slot) = self.publisher(stream) else {
                    return;
                };
                if !ok {
                    self.publishers[slot] = None;
                    return;
                }
                let p = self.publishers[slot].as_mut().expect("found");
                let Phase::Waiting(sequences) = std::mem::replace(&mut p.phase, Phase::Open) else {
                    panic!("retry completed for a stream that was not waiting");
                };
                self.plan_batch(slot, sequences);
            }
            Owner::SubscribeNew { stream } => {
                let Some(slot) = self
                    .sessions
                    .iter()
                    .position(|s| s.as_ref().is_some_and(|s| s.stream == stream))
                else {
                    return;
                };
                if ok {
                    self.sessions[slot].as_mut().expect("found").open = true;
                } else {
                    self.end_session(slot);
                }
            }
        }
    }

    fn publisher(&self, stream: u64) -> Option<usize> {
        self.publishers
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.stream == stream))
    }

    /// Retention cuts at a batch boundary at or below the floor (whole segments go; live
    /// batches of a mostly dead segment are copied forward), or at the head when the floor
    /// is there.
    fn retain(&mut self, channel: u8, choice: u8) {
        let Some(id) = self.durable_channel(pick(&CHANNELS, channel)) else {
            return;
        };
        let c = self.state.channel(id).expect("durable");
        let floor = engine::retention_floor(c);
        assert!(
            floor <= c.next_offset,
            "retention floor {floor} above the head"
        );
        for (name, &committed) in &c.consumers {
            assert!(
                floor <= committed,
                "floor {floor} above consumer {name} at {committed}"
            );
        }
        if floor < c.first_offset {
            return;
        }
        let mut cuts: Vec<u64> = self
            .batch_starts
            .get(&id)
            .map(|s| s.range(c.first_offset..=floor).copied().collect())
            .unwrap_or_default();
        if floor >= c.next_offset && c.next_offset >= c.first_offset {
            cuts.push(c.next_offset);
        }
        if cuts.is_empty() {
            return;
        }
        let cut = cuts[usize::from(choice) % cuts.len()];
        self.state.channel_mut(id).expect("durable").first_offset = cut;
    }

    // ---- invariants after every step ----

    fn check(&self) {
        let mut queued: HashMap<u64, u64> = HashMap::new();
        let mut queued_last: HashSet<(u64, &str, u64)> = HashSet::new();
        for job in &self.queue {
            for (record, _) in &job.records {
                if let Record::Batch(b) = record {
                    *queued.entry(b.channel_id).or_default() += b.messages.len() as u64;
                    if let Some(stamp) = &b.producer {
                        if let Some(last) = stamp.sequences.last() {
                            queued_last.insert((b.channel_id, &stamp.producer_id, last));
                        }
                    }
                }
            }
        }
        for c in self.state.channels() {
            assert!(
                c.first_offset <= c.next_offset && c.next_offset <= c.pending_next,
                "channel {}: first {} next {} pending {}",
                c.id,
                c.first_offset,
                c.next_offset,
                c.pending_next
            );
            assert_eq!(
                c.pending_next - c.next_offset,
                queued.get(&c.id).copied().unwrap_or(0),
                "channel {}: reserved offsets differ from what is queued",
                c.id
            );
            if c.durable {
                assert_eq!(self.heads.get(&c.id), Some(&c.next_offset));
            }
            for (name, &committed) in &c.consumers {
                assert!(committed <= c.next_offset, "{name} committed past the head");
            }
            for (id, p) in &c.producers {
                let truth_last = self
                    .stored
                    .get(&(c.id, id.to_string()))
                    .and_then(|t| t.last_key_value())
                    .map(|(s, _)| *s);
                assert_eq!(p.durable.last_sequence, truth_last, "producer {id}");
                if let Some(pending) = p.pending_last {
                    assert!(Some(pending) > p.durable.last_sequence);
                    assert!(
                        queued_last.contains(&(c.id, id.as_str(), pending)),
                        "producer {id} pending at {pending} with no such batch queued"
                    );
                }
            }
        }
    }
}
