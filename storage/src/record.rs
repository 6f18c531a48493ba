//! Log records and their on-disk encoding (docs/storage.md §2).
//!
//! ```text
//! +-------------+--------------+---------+----------------------------------------+
//! | len u32 LE  | crc32c u32 LE| kind u8 | body (len - 1 bytes)                   |
//! +-------------+--------------+---------+----------------------------------------+
//!   crc32c covers kind and body. A batch body is: meta_len u32 LE, bincode meta,
//!   then the payloads back to back, so reading a batch slices payloads without copying.
//! ```

use bincode::Options;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::state::StateSnapshot;

/// Bytes before a record's body.
pub const RECORD_HEADER_LEN: usize = 9;

/// Largest record the log accepts; bounds what recovery will try to read.
pub const MAX_RECORD_BYTES: u64 = 1 << 31;

const KIND_CHANNEL_CREATED: u8 = 1;
const KIND_CHANNEL_DELETED: u8 = 2;
const KIND_BATCH: u8 = 3;
const KIND_CURSOR: u8 = 4;
const KIND_SNAPSHOT: u8 = 5;

/// Headers of a stored message.
pub type Headers = Vec<(String, Bytes)>;

/// One entry of the log.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Record {
    ChannelCreated {
        channel_id: u64,
        name: String,
        created_ms: u64,
    },
    ChannelDeleted {
        channel_id: u64,
    },
    Batch(Batch),
    /// A durable consumer's position: everything below `offset` is committed.
    CursorCommitted {
        channel_id: u64,
        consumer: String,
        offset: u64,
    },
    /// The whole durable state at this point of the log, written before retention deletes
    /// segments that held the last copy of some of it.
    Snapshot(Box<StateSnapshot>),
}

/// The producer that appended a batch and the sequence of each message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerStamp {
    /// Inline up to 24 bytes (no allocation per batch); written as a string.
    pub producer_id: CompactString,
    pub sequences: Sequences,
}

/// Sequence numbers of a batch's messages; dense runs take 16 bytes whatever their length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sequences {
    Dense { first: u64, count: u32 },
    List(Vec<u64>),
}

impl Sequences {
    /// Builds the compact form of a strictly increasing list.
    pub fn from_list(list: Vec<u64>) -> Sequences {
        let dense = list.windows(2).all(|w| w[1] == w[0] + 1);
        match list.first() {
            Some(&first) if dense => Sequences::Dense {
                first,
                count: list.len() as u32,
            },
            _ => Sequences::List(list),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Sequences::Dense { count, .. } => *count as usize,
            Sequences::List(list) => list.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, index: usize) -> Option<u64> {
        match self {
            Sequences::Dense { first, count } => {
                (index < *count as usize).then(|| first + index as u64)
            }
            Sequences::List(list) => list.get(index).copied(),
        }
    }

    pub fn last(&self) -> Option<u64> {
        self.len().checked_sub(1).and_then(|i| self.get(i))
    }
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub headers: Headers,
    pub payload: Bytes,
}

/// Consecutive messages of one channel appended together.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub channel_id: u64,
    pub base_offset: u64,
    pub timestamp_ms: u64,
    pub producer: Option<ProducerStamp>,
    pub messages: Vec<StoredMessage>,
}

impl Batch {
    /// Offset after the batch's last message.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + self.messages.len() as u64
    }

    /// Payload bytes of the batch.
    pub fn payload_bytes(&self) -> u64 {
        self.messages.iter().map(|m| m.payload.len() as u64).sum()
    }
}

/// A [`BatchMeta`] borrowed from its [`Batch`], for encoding: bincode writes the same bytes
/// as for the owned one (a test checks it) without cloning the producer id and every
/// message's headers into a new list — three allocations per batch, a tenth of the broker's
/// allocations when each batch is one message on one of thousands of channels.
#[derive(Serialize)]
struct BatchMetaRef<'a> {
    channel_id: u64,
    base_offset: u64,
    timestamp_ms: u64,
    producer: Option<&'a ProducerStamp>,
    entries: EntriesRef<'a>,
}

impl BatchMetaRef<'_> {
    fn of(batch: &Batch) -> BatchMetaRef<'_> {
        BatchMetaRef {
            channel_id: batch.channel_id,
            base_offset: batch.base_offset,
            timestamp_ms: batch.timestamp_ms,
            producer: batch.producer.as_ref(),
            entries: EntriesRef(&batch.messages),
        }
    }
}

/// `BatchMeta::entries` of borrowed messages: (headers, payload length) each.
struct EntriesRef<'a>(&'a [StoredMessage]);

impl Serialize for EntriesRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|m| (&m.headers, m.payload.len() as u32)))
    }
}

/// Everything of a batch but its payloads: what replay and the index need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMeta {
    pub channel_id: u64,
    pub base_offset: u64,
    pub timestamp_ms: u64,
    pub producer: Option<ProducerStamp>,
    pub entries: Vec<(Headers, u32)>,
}

impl BatchMeta {
    /// A batch's metadata, copied out of it (what a reader of the log decodes).
    pub fn of(batch: &Batch) -> BatchMeta {
        BatchMeta {
            channel_id: batch.channel_id,
            base_offset: batch.base_offset,
            timestamp_ms: batch.timestamp_ms,
            producer: batch.producer.clone(),
            entries: batch
                .messages
                .iter()
                .map(|m| (m.headers.clone(), m.payload.len() as u32))
                .collect(),
        }
    }

    pub fn end_offset(&self) -> u64 {
        self.base_offset + self.entries.len() as u64
    }

    pub fn payload_bytes(&self) -> u64 {
        self.entries.iter().map(|(_, len)| u64::from(*len)).sum()
    }
}

#[derive(Serialize, Deserialize)]
struct ChannelCreatedBody {
    channel_id: u64,
    name: String,
    created_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct CursorBody {
    channel_id: u64,
    consumer: String,
    offset: u64,
}

/// Why record bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record is truncated")]
    Truncated,
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record body is malformed: {0}")]
    Malformed(#[from] bincode::Error),
    #[error("batch declares {declared} payload bytes but holds {actual}")]
    PayloadLength { declared: u64, actual: u64 },
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .allow_trailing_bytes()
}

/// Payloads at least this large are written from the publisher's own buffers instead of
/// being copied into the record; smaller ones are copied (cheaper than an iovec each).
const COPY_BELOW: usize = 16 * 1024;

/// A record encoded for writing: its bytes in order, large payloads as slices of the
/// buffers they arrived in rather than copies.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Header, metadata and the payloads copied in.
    head: Bytes,
    /// Large payloads and the small ones between them; empty (no allocation) for most
    /// records, which is what thousands of one-message batches a second need.
    rest: Vec<Bytes>,
    len: usize,
}

impl Encoded {
    /// Total length, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The record's bytes, in order.
    pub fn parts(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.head).chain(&self.rest)
    }
}

impl From<Bytes> for Encoded {
    fn from(bytes: Bytes) -> Encoded {
        Encoded {
            len: bytes.len(),
            head: bytes,
            rest: Vec::new(),
        }
    }
}

impl Record {
    /// Encodes the record with its header and checksum into one buffer.
    pub fn encode(&self) -> Bytes {
        let encoded = self.encode_with(usize::MAX);
        debug_assert!(encoded.rest.is_empty());
        encoded.head
    }

    /// Encodes the record for a vectored write: the same bytes as [`Record::encode`], with
    /// large payloads left where they are.
    pub fn encode_parts(&self) -> Encoded {
        self.encode_with(COPY_BELOW)
    }

    fn encode_with(&self, copy_below: usize) -> Encoded {
        let mut buf = BytesMut::with_capacity(self.head_capacity(copy_below));
        buf.put_bytes(0, RECORD_HEADER_LEN - 1);
        // Parts after `buf`: large payloads, and small ones between them.
        let mut rest: Vec<Bytes> = Vec::new();
        {
            let mut w = (&mut buf).writer();
            let r = match self {
                Record::ChannelCreated {
                    channel_id,
                    name,
                    created_ms,
                } => {
                    w.get_mut().put_u8(KIND_CHANNEL_CREATED);
                    let body = ChannelCreatedBody {
                        channel_id: *channel_id,
                        name: name.clone(),
                        created_ms: *created_ms,
                    };
                    options().serialize_into(&mut w, &body)
                }
                Record::ChannelDeleted { channel_id } => {
                    w.get_mut().put_u8(KIND_CHANNEL_DELETED);
                    options().serialize_into(&mut w, channel_id)
                }
                Record::CursorCommitted {
                    channel_id,
                    consumer,
                    offset,
                } => {
                    w.get_mut().put_u8(KIND_CURSOR);
                    let body = CursorBody {
                        channel_id: *channel_id,
                        consumer: consumer.clone(),
                        offset: *offset,
                    };
                    options().serialize_into(&mut w, &body)
                }
                Record::Snapshot(snapshot) => {
                    w.get_mut().put_u8(KIND_SNAPSHOT);
                    options().serialize_into(&mut w, snapshot.as_ref())
                }
                Record::Batch(batch) => {
                    w.get_mut().put_u8(KIND_BATCH);
                    let meta = BatchMetaRef::of(batch);
                    let meta_len = options().serialized_size(&meta).unwrap_or(0) as u32;
                    w.get_mut().put_u32_le(meta_len);
                    let r = options().serialize_into(&mut w, &meta);
                    let mut small = BytesMut::new();
                    for m in &batch.messages {
                        if m.payload.len() >= copy_below {
                            if !small.is_empty() {
                                rest.push(small.split().freeze());
                            }
                            rest.push(m.payload.clone());
                        } else if rest.is_empty() {
                            w.get_mut().extend_from_slice(&m.payload);
                        } else {
                            small.extend_from_slice(&m.payload);
                        }
                    }
                    if !small.is_empty() {
                        rest.push(small.freeze());
                    }
                    r
                }
            };
            r.expect("bincode serialization into memory cannot fail");
        }
        let rest_len: usize = rest.iter().map(Bytes::len).sum();
        let len = buf.len() - (RECORD_HEADER_LEN - 1) + rest_len;
        let mut crc = crc32c::crc32c(&buf[RECORD_HEADER_LEN - 1..]);
        for part in &rest {
            crc = crc32c::crc32c_append(crc, part);
        }
        let declared = u32::try_from(len).expect("record larger than 4 GiB");
        buf[0..4].copy_from_slice(&declared.to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        Encoded {
            head: buf.freeze(),
            rest,
            len: len + RECORD_HEADER_LEN - 1,
        }
    }

    /// The length of an encoded record's first part: exact for a batch, whose buffer is
    /// then allocated once and frozen without another allocation (`Bytes` from a buffer
    /// with spare room allocates a shared header; at one-message batches on thousands of
    /// channels that was one allocation per message).
    fn head_capacity(&self, copy_below: usize) -> usize {
        match self {
            Record::Batch(b) => {
                let meta = options().serialized_size(&BatchMetaRef::of(b)).unwrap_or(0) as usize;
                // Payloads up to the first large one are copied into the first part.
                let copied: usize = b
                    .messages
                    .iter()
                    .map(|m| m.payload.len())
                    .take_while(|&len| len < copy_below)
                    .sum();
                RECORD_HEADER_LEN + 4 + meta + copied
            }
            _ => RECORD_HEADER_LEN + 64,
        }
    }

    /// Decodes a full record (header included), verifying its checksum. Payloads are slices
    /// of `bytes`.
    pub fn decode(bytes: Bytes) -> Result<Record, RecordError> {
        let mut body = verified_body(bytes)?;
        let kind = body.get_u8();
        match kind {
            KIND_CHANNEL_CREATED => {
                let b: ChannelCreatedBody = options().deserialize(&body)?;
                Ok(Record::ChannelCreated {
                    channel_id: b.channel_id,
                    name: b.name,
                    created_ms: b.created_ms,
                })
            }
            KIND_CHANNEL_DELETED => Ok(Record::ChannelDeleted {
                channel_id: options().deserialize(&body)?,
            }),
            KIND_CURSOR => {
                let b: CursorBody = options().deserialize(&body)?;
                Ok(Record::CursorCommitted {
                    channel_id: b.channel_id,
                    consumer: b.consumer,
                    offset: b.offset,
                })
            }
            KIND_SNAPSHOT => Ok(Record::Snapshot(Box::new(options().deserialize(&body)?))),
            KIND_BATCH => {
                let (meta, mut data) = split_batch(body)?;
                let messages = meta
                    .entries
                    .into_iter()
                    .map(|(headers, len)| StoredMessage {
                        headers,
                        payload: data.split_to(len as usize),
                    })
                    .collect();
                Ok(Record::Batch(Batch {
                    channel_id: meta.channel_id,
                    base_offset: meta.base_offset,
                    timestamp_ms: meta.timestamp_ms,
                    producer: meta.producer,
                    messages,
                }))
            }
            other => Err(RecordError::UnknownKind(other)),
        }
    }
}

/// A record with its payloads left out, as replay sees it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RecordMeta {
    Batch(BatchMeta),
    Other(Record),
}

/// Decodes a record but skips payloads of batches.
pub fn decode_meta(bytes: Bytes) -> Result<RecordMeta, RecordError> {
    let body = verified_body(bytes.clone())?;
    if body.first() == Some(&KIND_BATCH) {
        let mut body = body;
        body.advance(1);
        Ok(RecordMeta::Batch(split_batch(body)?.0))
    } else {
        Ok(RecordMeta::Other(Record::decode(bytes)?))
    }
}

fn verified_body(bytes: Bytes) -> Result<Bytes, RecordError> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let stored = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if bytes.len() != RECORD_HEADER_LEN - 1 + len || len == 0 {
        return Err(RecordError::Truncated);
    }
    let body = bytes.slice(RECORD_HEADER_LEN - 1..);
    let computed = crc32c::crc32c(&body);
    if computed != stored {
        return Err(RecordError::Checksum { stored, computed });
    }
    Ok(body)
}

fn split_batch(mut body: Bytes) -> Result<(BatchMeta, Bytes), RecordError> {
    if body.len() < 4 {
        return Err(RecordError::Truncated);
    }
    let meta_len = body.get_u32_le() as usize;
    if meta_len > body.len() {
        return Err(RecordError::Truncated);
    }
    let meta_bytes = body.split_to(meta_len);
    let meta: BatchMeta = options()
        .with_limit(meta_len as u64)
        .deserialize(&meta_bytes)?;
    let declared = meta.payload_bytes();
    if declared != body.len() as u64 {
        return Err(RecordError::PayloadLength {
            declared,
            actual: body.len() as u64,
        });
    }
    Ok((meta, body))
}

/// Reads the total length (header included) of the record starting at `header`.
pub fn record_len(header: &[u8; RECORD_HEADER_LEN]) -> u64 {
    (RECORD_HEADER_LEN - 1) as u64
        + u64::from(u32::from_le_bytes(
            header[0..4].try_into().expect("4 bytes"),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            channel_id: 7,
            base_offset: 100,
            timestamp_ms: 1_700_000_000_000,
            producer: Some(ProducerStamp {
                producer_id: "p".into(),
                sequences: Sequences::from_list(vec![5, 6, 7]),
            }),
            messages: vec![
                StoredMessage {
                    headers: vec![("k".into(), Bytes::from_static(b"v"))],
                    payload: Bytes::from_static(b"hello"),
                },
                StoredMessage {
                    headers: vec![],
                    payload: Bytes::new(),
                },
                StoredMessage {
                    headers: vec![],
                    payload: Bytes::from(vec![9u8; 3000]),
                },
            ],
        }
    }

    #[test]
    fn a_producer_stamp_writes_the_bytes_a_string_id_wrote() {
        #[derive(Serialize)]
        struct Before {
            producer_id: String,
            sequences: Sequences,
        }
        // Inline (up to 24 bytes) and on the heap.
        for id in [
            "p",
            "a-producer-id-of-sixty-four-characters-which-names-a-source-shard",
        ] {
            let now = ProducerStamp {
                producer_id: id.into(),
                sequences: Sequences::Dense { first: 3, count: 2 },
            };
            let before = Before {
                producer_id: id.to_owned(),
                sequences: now.sequences.clone(),
            };
            let bytes = options().serialize(&before).unwrap();
            assert_eq!(options().serialize(&now).unwrap(), bytes, "{id}");
            assert_eq!(options().deserialize::<ProducerStamp>(&bytes).unwrap(), now);
        }
    }

    #[test]
    fn every_record_round_trips() {
        let records = vec![
            Record::ChannelCreated {
                channel_id: 1,
                name: "dc-a/s1".into(),
                created_ms: 5,
            },
            Record::ChannelDeleted { channel_id: 1 },
            Record::CursorCommitted {
                channel_id: 1,
                consumer: "dc-b".into(),
                offset: 42,
            },
            Record::Batch(batch()),
            Record::Snapshot(Box::default()),
        ];
        for record in records {
            let bytes = record.encode();
            assert_eq!(
                record_len(bytes[..9].try_into().unwrap()),
                bytes.len() as u64
            );
            assert_eq!(Record::decode(bytes).unwrap(), record);
        }
    }

    #[test]
    fn a_record_in_parts_is_the_same_bytes_with_large_payloads_not_copied() {
        let large = Bytes::from(vec![3u8; 40_000]);
        let mut b = batch();
        b.messages.insert(
            1,
            StoredMessage {
                headers: vec![],
                payload: large.clone(),
            },
        );
        b.messages.push(StoredMessage {
            headers: vec![],
            payload: Bytes::from(vec![4u8; 20_000]),
        });
        b.messages.push(StoredMessage {
            headers: vec![],
            payload: Bytes::from_static(b"tail"),
        });
        let record = Record::Batch(b);
        let whole = record.encode();
        let encoded = record.encode_parts();
        let joined: Vec<u8> = encoded.parts().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(joined, whole.to_vec());
        assert_eq!(encoded.len(), whole.len());
        // head + small ones, the 40 KB payload, the empty and 3,000-byte ones, the 20 KB
        // one, "tail".
        assert_eq!(encoded.parts().count(), 5);
        assert_eq!(
            encoded.parts().nth(1).unwrap().as_ptr(),
            large.as_ptr(),
            "written in place"
        );
        assert_eq!(Record::decode(whole).unwrap(), record);
        // Only small payloads: one part.
        assert_eq!(Record::Batch(batch()).encode_parts().parts().count(), 1);
    }

    #[test]
    fn a_batch_buffer_is_sized_exactly() {
        let mut long = batch();
        long.producer = Some(ProducerStamp {
            producer_id: "a-producer-id-of-sixty-four-characters-which-names-a-source-shard".into(),
            sequences: Sequences::from_list(vec![1, 5, 9]),
        });
        long.messages[0]
            .headers
            .push(("trace-id".into(), Bytes::from(vec![1u8; 100])));
        let mut large = batch();
        large.messages.insert(
            2,
            StoredMessage {
                headers: vec![],
                payload: Bytes::from(vec![3u8; 40_000]),
            },
        );
        for b in [batch(), long, large] {
            let record = Record::Batch(b);
            let head_len = record.encode_parts().parts().next().unwrap().len();
            assert_eq!(record.head_capacity(COPY_BELOW), head_len);
            assert_eq!(record.head_capacity(usize::MAX), record.encode().len());
        }
    }

    #[test]
    fn a_borrowed_batch_meta_encodes_as_the_owned_one() {
        let mut sparse = batch();
        sparse.producer = Some(ProducerStamp {
            producer_id: "source-log".into(),
            sequences: Sequences::from_list(vec![5, 9, 1_000_000]),
        });
        let mut anonymous = batch();
        anonymous.producer = None;
        anonymous.messages.clear();
        for b in [batch(), sparse, anonymous] {
            let owned = BatchMeta::of(&b);
            let borrowed = BatchMetaRef::of(&b);
            assert_eq!(
                options().serialize(&borrowed).unwrap(),
                options().serialize(&owned).unwrap()
            );
            // And a reader of the log gets the owned one back.
            let RecordMeta::Batch(read) = decode_meta(Record::Batch(b).encode()).unwrap() else {
                panic!("not a batch")
            };
            assert_eq!(read, owned);
        }
    }

    #[test]
    fn batch_meta_skips_payloads() {
        let bytes = Record::Batch(batch()).encode();
        let RecordMeta::Batch(meta) = decode_meta(bytes).unwrap() else {
            panic!("not a batch")
        };
        assert_eq!(meta.end_offset(), 103);
        assert_eq!(meta.payload_bytes(), 3005);
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let bytes = Record::Batch(batch()).encode();
        for i in 8..bytes.len() {
            let mut corrupt = bytes.to_vec();
            corrupt[i] ^= 0x10;
            assert!(Record::decode(Bytes::from(corrupt)).is_err(), "byte {i}");
        }
    }

    #[test]
    fn sequences_compact_dense_runs() {
        assert_eq!(
            Sequences::from_list(vec![3, 4, 5]),
            Sequences::Dense { first: 3, count: 3 }
        );
        let sparse = Sequences::from_list(vec![3, 9]);
        assert_eq!(sparse, Sequences::List(vec![3, 9]));
        assert_eq!(sparse.last(), Some(9));
        assert_eq!(Sequences::Dense { first: 3, count: 3 }.get(2), Some(5));
    }
}
