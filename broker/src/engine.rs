//! The broker's decisions, with no I/O: what to append for a publish (offsets and
//! deduplication), where a consumer starts, whether a commit is valid, what retention may
//! delete. The network shell asks, queues what the answer says, and awaits the fsync.

use directmq_protocol::{ErrorCode, StartPosition};
use directmq_storage::{
    Batch, Channel, LogState, ProducerStamp, Record, SequenceCheck, Sequences, StoredMessage,
};

/// A refusal, with the stable code the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Finds a channel by name, or registers its creation when allowed.
pub fn resolve_channel(
    state: &mut LogState,
    name: &str,
    create: bool,
    now_ms: u64,
) -> Result<(u64, Option<Record>), Refusal> {
    if let Some(id) = state.channel_id(name) {
        return Ok((id, None));
    }
    if let Err(e) = directmq_protocol::validate_channel_name(name) {
        return Err(Refusal::new(
            ErrorCode::INVALID_CHANNEL_NAME,
            format!("invalid channel name {name:?}: {e}"),
        ));
    }
    if !create {
        return Err(Refusal::new(
            ErrorCode::CHANNEL_NOT_FOUND,
            format!("channel {name:?} does not exist"),
        ));
    }
    let id = state.create_pending(name, now_ms);
    Ok((
        id,
        Some(Record::ChannelCreated {
            channel_id: id,
            name: name.to_owned(),
            created_ms: now_ms,
        }),
    ))
}

/// How a publish batch is answered.
#[derive(Debug, PartialEq)]
pub enum PublishDecision {
    /// Queue `record` (if any) and ack after it is durable (or, with nothing to append, after
    /// what is already queued is durable).
    Append {
        record: Option<Record>,
        first_offset: u64,
        appended: u32,
        /// (index in batch, stored offset if remembered) of messages already appended.
        duplicates: Vec<(u32, Option<u64>)>,
    },
    /// Some messages are retries of ones still waiting for their fsync: wait for what is
    /// queued to become durable, then decide again with the messages given back.
    WaitForInFlight(Vec<Incoming>),
}

/// One message of a publish, as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub sequence: u64,
    pub message: StoredMessage,
}

/// Decides offsets and deduplication for a batch, and reserves the offsets.
pub fn plan_publish(
    state: &mut LogState,
    channel_id: u64,
    producer_id: &str,
    messages: Vec<Incoming>,
    now_ms: u64,
) -> Result<PublishDecision, Refusal> {
    if messages.windows(2).any(|w| w[1].sequence <= w[0].sequence) {
        return Err(Refusal::new(
            ErrorCode::INVALID_SEQUENCE,
            "sequence numbers must strictly increase within a batch",
        ));
    }
    let channel = state
        .channel(channel_id)
        .filter(|c| !c.deleting)
        .ok_or_else(|| Refusal::new(ErrorCode::CHANNEL_NOT_FOUND, "the channel was deleted"))?;
    let producer = channel.producers.get(producer_id);
    let check = |sequence| producer.map_or(SequenceCheck::New, |p| p.check(sequence));
    let (mut all_new, mut in_flight) = (true, false);
    for m in &messages {
        match check(m.sequence) {
            SequenceCheck::New => {}
            SequenceCheck::InFlight => in_flight = true,
            _ => all_new = false,
        }
    }
    if in_flight {
        return Ok(PublishDecision::WaitForInFlight(messages));
    }
    let mut duplicates = Vec::new();
    // The common case, no retry among them, keeps the list it was given.
    let fresh = if all_new {
        messages
    } else {
        let mut fresh = Vec::with_capacity(messages.len());
        for (i, incoming) in messages.into_iter().enumerate() {
            match check(incoming.sequence) {
                SequenceCheck::New => fresh.push(incoming),
                SequenceCheck::Stored(offset) => duplicates.push((i as u32, Some(offset))),
                SequenceCheck::Forgotten | SequenceCheck::InFlight => {
                    duplicates.push((i as u32, None))
                }
            }
        }
        fresh
    };
    if fresh.is_empty() {
        return Ok(PublishDecision::Append {
            record: None,
            first_offset: channel.pending_next,
            appended: 0,
            duplicates,
        });
    }
    let count = fresh.len() as u64;
    let last = fresh.last().expect("not empty").sequence;
    let base = state.reserve(channel_id, count).expect("channel exists");
    state.note_pending_sequence(channel_id, producer_id, last);
    // Strictly increasing (checked above), so dense exactly when the ends are `count - 1`
    // apart; no list is built for it.
    let first = fresh[0].sequence;
    let sequences = if last - first == count - 1 {
        Sequences::Dense {
            first,
            count: count as u32,
        }
    } else {
        Sequences::from_list(fresh.iter().map(|m| m.sequence).collect())
    };
    let record = Record::Batch(Batch {
        channel_id,
        base_offset: base,
        timestamp_ms: now_ms,
        producer: Some(ProducerStamp {
            producer_id: producer_id.into(),
            sequences,
        }),
        messages: fresh.into_iter().map(|m| m.message).collect(),
    });
    Ok(PublishDecision::Append {
        record: Some(record),
        first_offset: base,
        appended: count as u32,
        duplicates,
    })
}

/// Where a consumer session starts, and the record that makes a new consumer durable.
pub fn plan_subscribe(
    channel: &Channel,
    consumer: &str,
    start: StartPosition,
) -> Result<(u64, Option<Record>), Refusal> {
    if let Err(e) = directmq_protocol::validate_identifier(consumer) {
        return Err(Refusal::new(
            ErrorCode::INVALID_NAME,
            format!("invalid consumer name {consumer:?}: {e}"),
        ));
    }
    if let Some(&committed) = channel.consumers.get(consumer) {
        return Ok((committed.max(channel.first_offset), None));
    }
    let offset = start_offset(channel, start);
    Ok((
        offset,
        Some(Record::CursorCommitted {
            channel_id: channel.id,
            consumer: consumer.to_owned(),
            offset,
        }),
    ))
}

/// The offset a start position means now, clamped to the retained range. Message times
/// live in the index, not in the state: the shell turns a [`StartPosition::Timestamp`] into
/// an offset first (`Store::offset_at_time`); one that reaches here means "nothing that old
/// or newer is known" and starts at the head.
pub fn start_offset(channel: &Channel, start: StartPosition) -> u64 {
    match start {
        StartPosition::Earliest => channel.first_offset,
        StartPosition::Latest | StartPosition::Timestamp(_) => channel.next_offset,
        StartPosition::Offset(o) => o.clamp(channel.first_offset, channel.next_offset),
    }
}

/// Validates a cumulative commit; `None` when it changes nothing.
pub fn plan_commit(
    channel: &Channel,
    consumer: &str,
    offset: u64,
) -> Result<Option<Record>, Refusal> {
    if offset > channel.next_offset {
        return Err(Refusal::new(
            ErrorCode::OFFSET_OUT_OF_RANGE,
            format!(
                "cannot commit offset {offset}: the channel's head is {}",
                channel.next_offset
            ),
        ));
    }
    let current = channel.consumers.get(consumer).copied().unwrap_or(0);
    if offset <= current {
        return Ok(None);
    }
    Ok(Some(Record::CursorCommitted {
        channel_id: channel.id,
        consumer: consumer.to_owned(),
        offset,
    }))
}

/// The offset below which retention may delete a channel's messages: everything every
/// durable consumer has committed. A channel nobody consumes keeps everything.
pub fn retention_floor(channel: &Channel) -> u64 {
    channel
        .consumers
        .values()
        .copied()
        .min()
        .unwrap_or(channel.first_offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use directmq_storage::RecordMeta;

    fn msgs(sequences: &[u64]) -> Vec<Incoming> {
        sequences
            .iter()
            .map(|&sequence| Incoming {
                sequence,
                message: StoredMessage {
                    headers: vec![],
                    payload: Bytes::from_static(b"x"),
                },
            })
            .collect()
    }

    /// Applies what the shell would make durable.
    fn durable(state: &mut LogState, record: &Record) {
        let meta = match record {
            Record::Batch(b) => RecordMeta::Batch(directmq_storage::BatchMeta::of(b)),
            other => RecordMeta::Other(other.clone()),
        };
        state.apply(&meta);
    }

    fn channel(state: &mut LogState) -> u64 {
        let (id, record) = resolve_channel(state, "dc-a/s1", true, 5).unwrap();
        durable(state, &record.unwrap());
        id
    }

    #[test]
    fn pipelined_batches_get_consecutive_offsets() {
        let mut state = LogState::default();
        let id = channel(&mut state);
        let PublishDecision::Append {
            first_offset: a, ..
        } = plan_publish(&mut state, id, "p", msgs(&[1, 2]), 9).unwrap()
        else {
            panic!()
        };
        let PublishDecision::Append {
            first_offset: b,
            appended,
            ..
        } = plan_publish(&mut state, id, "p", msgs(&[3]), 9).unwrap()
        else {
            panic!()
        };
        assert_eq!((a, b, appended), (0, 2, 1));
    }

    #[test]
    fn a_retried_batch_appends_nothing_and_gets_its_offsets() {
        let mut state = LogState::default();
        let id = channel(&mut state);
        let PublishDecision::Append { record, .. } =
            plan_publish(&mut state, id, "p", msgs(&[10, 11]), 9).unwrap()
        else {
            panic!()
        };
        // Before the fsync, the retry waits.
        assert_eq!(
            plan_publish(&mut state, id, "p", msgs(&[10, 11]), 9).unwrap(),
            PublishDecision::WaitForInFlight(msgs(&[10, 11]))
        );
        durable(&mut state, &record.unwrap());
        let decision = plan_publish(&mut state, id, "p", msgs(&[10, 11, 12]), 9).unwrap();
        let PublishDecision::Append {
            record,
            first_offset,
            appended,
            duplicates,
        } = decision
        else {
            panic!()
        };
        assert_eq!(duplicates, vec![(0, Some(0)), (1, Some(1))]);
        assert_eq!((first_offset, appended), (2, 1));
        let Some(Record::Batch(b)) = record else {
            panic!()
        };
        assert_eq!(b.messages.len(), 1);
        // Another producer's sequences are its own.
        let PublishDecision::Append { duplicates, .. } =
            plan_publish(&mut state, id, "q", msgs(&[10]), 9).unwrap()
        else {
            panic!()
        };
        assert!(duplicates.is_empty());
    }

    #[test]
    fn a_batch_stamps_its_sequences_as_a_run_only_when_they_are_one() {
        let mut state = LogState::default();
        let id = channel(&mut state);
        let stamped = |state: &mut LogState, sequences: &[u64]| {
            let PublishDecision::Append {
                record: Some(Record::Batch(b)),
                ..
            } = plan_publish(state, id, "p", msgs(sequences), 9).unwrap()
            else {
                panic!("nothing appended")
            };
            durable(state, &Record::Batch(b.clone()));
            b.producer.unwrap().sequences
        };
        assert_eq!(
            stamped(&mut state, &[1, 2, 3]),
            Sequences::Dense { first: 1, count: 3 }
        );
        assert_eq!(
            stamped(&mut state, &[5, 9, 20]),
            Sequences::List(vec![5, 9, 20])
        );
        // A retried 20 is left out; what remains is a run.
        assert_eq!(
            stamped(&mut state, &[20, 21, 22]),
            Sequences::Dense {
                first: 21,
                count: 2
            }
        );
        assert_eq!(
            stamped(&mut state, &[23, 24, 26]),
            Sequences::List(vec![23, 24, 26])
        );
    }

    #[test]
    fn unordered_sequences_and_bad_names_are_refused() {
        let mut state = LogState::default();
        let id = channel(&mut state);
        let err = plan_publish(&mut state, id, "p", msgs(&[2, 2]), 9).unwrap_err();
        assert_eq!(err.code, ErrorCode::INVALID_SEQUENCE);
        let err = resolve_channel(&mut state, "bad name", true, 1).unwrap_err();
        assert_eq!(err.code, ErrorCode::INVALID_CHANNEL_NAME);
        let err = resolve_channel(&mut state, "missing", false, 1).unwrap_err();
        assert_eq!(err.code, ErrorCode::CHANNEL_NOT_FOUND);
    }

    #[test]
    fn consumers_start_where_asked_then_where_committed() {
        let mut state = LogState::default();
        let id = channel(&mut state);
        let PublishDecision::Append { record, .. } =
            plan_publish(&mut state, id, "p", msgs(&[1, 2, 3]), 9).unwrap()
        else {
            panic!()
        };
        durable(&mut state, &record.unwrap());
        let c = state.channel(id).unwrap();
        assert_eq!(
            plan_subscribe(c, "x", StartPosition::Earliest).unwrap().0,
            0
        );
        assert_eq!(plan_subscribe(c, "x", StartPosition::Latest).unwrap().0, 3);
        assert_eq!(
            plan_subscribe(c, "x", StartPosition::Offset(99)).unwrap().0,
            3
        );
        let (_, record) = plan_subscribe(c, "x", StartPosition::Offset(1)).unwrap();
        durable(&mut state, &record.unwrap());
        let c = state.channel(id).unwrap();
        assert_eq!(
            plan_subscribe(c, "x", StartPosition::Earliest).unwrap(),
            (1, None)
        );
        assert_eq!(plan_commit(c, "x", 1).unwrap(), None);
        assert!(plan_commit(c, "x", 2).unwrap().is_some());
        assert_eq!(
            plan_commit(c, "x", 4).unwrap_err().code,
            ErrorCode::OFFSET_OUT_OF_RANGE
        );
        assert_eq!(retention_floor(c), 1);
        assert_eq!(
            plan_subscribe(c, "a/b", StartPosition::Earliest)
                .unwrap_err()
                .code,
            ErrorCode::INVALID_NAME
        );
    }
}
