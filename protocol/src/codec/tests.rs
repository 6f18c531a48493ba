//! Codec tests (§2): round trips of every frame, pinned wire bytes, zero-copy payloads,
//! partial input, every decode error, hostile length prefixes and a seeded mutation test.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::*;
use crate::{max_frame_bytes, DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

/// The frame limit for tests that are not about the limit: what a default broker accepts.
const LIMIT: u64 = 64 * 1024 * 1024 + 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex, ignoring whitespace (golden constants are spread over lines).
fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len() % 2 == 0, "odd number of hex digits");
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("hex is ASCII");
            u8::from_str_radix(pair, 16).expect("valid hex digit")
        })
        .collect()
}

/// One frame as hex, laid out as `length kind meta_length` then the meta and data sections,
/// so a failed golden comparison shows which part changed.
fn layout(frame: &[u8]) -> String {
    let meta_len = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) as usize;
    let (meta, data) = frame[HEADER_LEN..].split_at(meta_len);
    format!(
        "{} {} {} | meta {} | data {}",
        hex(&frame[..4]),
        hex(&frame[4..5]),
        hex(&frame[5..9]),
        hex(meta),
        hex(data)
    )
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(frame, &mut buf);
    buf
}

/// Decodes exactly one frame from `bytes`, which must hold nothing else.
fn decode_exactly(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = decode(&mut buf, LIMIT)
        .expect("valid frame")
        .expect("complete frame");
    assert!(buf.is_empty(), "{} bytes left after the frame", buf.len());
    frame
}

fn decode_err(bytes: &[u8], limit: u64) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, limit) {
        Err(err) => err,
        Ok(frame) => panic!("expected an error, decoded {frame:?}"),
    }
}

/// A frame built by hand: a header whose lengths match `meta` and `data`.
fn raw_frame(kind: u8, meta: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = header((meta.len() + data.len()) as u32, kind, meta.len() as u32);
    out.extend_from_slice(meta);
    out.extend_from_slice(data);
    out
}

fn header(len: u32, kind: u8, meta_len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&meta_len.to_be_bytes());
    out
}

/// Appends `extra` to the data section of an encoded frame and fixes its length field.
fn with_extra_data(frame: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out.extend_from_slice(extra);
    let len = (out.len() - HEADER_LEN) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn le64(value: u64) -> [u8; 8] {
    value.to_le_bytes()
}

/// A payload whose bytes depend on their position, so misplaced slices are caught.
fn payload(len: usize, salt: u8) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8 ^ salt)
        .collect::<Vec<u8>>()
        .into()
}

fn request(request_id: u64, body: RequestBody) -> Frame {
    Frame::Request(Request { request_id, body })
}

fn response(request_id: u64, body: ResponseBody) -> Frame {
    Frame::Response(Response { request_id, body })
}

fn headers() -> Headers {
    vec![
        ("trace".to_string(), Bytes::from_static(b"t-1")),
        ("empty".to_string(), Bytes::new()),
    ]
}

fn channel_info() -> ChannelInfo {
    ChannelInfo {
        name: "dc-a/db1/s1".into(),
        head: 100,
        first: 40,
        bytes: 6000,
        created_ms: 1_700_000_000_000,
    }
}

/// One named sample of every frame kind and of every request, response and start position
/// variant. Small payloads only: these are pinned byte for byte in [`GOLDEN`].
fn samples() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: "dmq/0.1".into(),
                token: None,
            }),
        ),
        (
            "hello_token",
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: "dmq/0.1".into(),
                token: Some("dmq1.e30.c2ln".into()),
            }),
        ),
        (
            "hello_ok",
            Frame::HelloOk(HelloOk {
                version: PROTOCOL_VERSION,
                server: "dmq/0.1".into(),
                identity: "agent".into(),
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
                max_frame_bytes: max_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES),
            }),
        ),
        (
            "error",
            Frame::Error(ErrorFrame {
                request_id: 7,
                code: ErrorCode::CONSUMER_BUSY,
                message: "busy".into(),
            }),
        ),
        (
            "request_create_channel",
            request(
                1,
                RequestBody::CreateChannel {
                    name: "dc-a/s1".into(),
                },
            ),
        ),
        (
            "request_delete_channel",
            request(
                2,
                RequestBody::DeleteChannel {
                    name: "dc-a/s1".into(),
                },
            ),
        ),
        (
            "request_list_channels",
            request(
                3,
                RequestBody::ListChannels {
                    prefix: "dc-a/".into(),
                },
            ),
        ),
        (
            "request_status",
            request(
                4,
                RequestBody::Status {
                    prefix: String::new(),
                },
            ),
        ),
        (
            "request_last_sequence",
            request(
                5,
                RequestBody::LastSequence {
                    channel: "dc-a/s1".into(),
                    producer_id: "p1".into(),
                },
            ),
        ),
        (
            "request_reset_consumer_earliest",
            request(
                6,
                RequestBody::ResetConsumer {
                    channel: "dc-a/s1".into(),
                    consumer: "dc-b".into(),
                    to: StartPosition::Earliest,
                },
            ),
        ),
        (
            "request_reset_consumer_latest",
            request(
                7,
                RequestBody::ResetConsumer {
                    channel: "dc-a/s1".into(),
                    consumer: "dc-b".into(),
                    to: StartPosition::Latest,
                },
            ),
        ),
        (
            "request_reset_consumer_offset",
            request(
                8,
                RequestBody::ResetConsumer {
                    channel: "dc-a/s1".into(),
                    consumer: "dc-b".into(),
                    to: StartPosition::Offset(42),
                },
            ),
        ),
        (
            "request_reset_consumer_timestamp",
            request(
                9,
                RequestBody::ResetConsumer {
                    channel: "dc-a/s1".into(),
                    consumer: "dc-b".into(),
                    to: StartPosition::Timestamp(1_700_000_000_000),
                },
            ),
        ),
        (
            "request_issue_token",
            request(
                10,
                RequestBody::IssueToken {
                    identity: "dc-b-agent".into(),
                    publish: vec![],
                    consume: vec!["dc-a/".into()],
                    admin: vec![],
                    ttl_ms: 3_600_000,
                },
            ),
        ),
        (
            "request_renew_token",
            request(
                11,
                RequestBody::RenewToken {
                    token: "dmq1.e30.c2ln".into(),
                    ttl_ms: 60_000,
                },
            ),
        ),
        (
            "request_revoke_token",
            request(
                12,
                RequestBody::RevokeToken {
                    token_or_id: "00ff".into(),
                },
            ),
        ),
        ("response_done", response(1, ResponseBody::Done)),
        (
            "response_channels",
            response(3, ResponseBody::Channels(vec![channel_info()])),
        ),
        (
            "response_status",
            response(
                4,
                ResponseBody::Status(vec![ChannelStatus {
                    channel: channel_info(),
                    last_append_ms: 1_700_000_000_500,
                    consumers: vec![ConsumerStatus {
                        name: "dc-b".into(),
                        committed: 90,
                        lag_messages: 10,
                        lag_bytes: 600,
                        lag_ms: 1500,
                        active: true,
                        stalled: true,
                    }],
                }]),
            ),
        ),
        (
            "response_last_sequence_some",
            response(5, ResponseBody::LastSequence(Some(99))),
        ),
        (
            "response_last_sequence_none",
            response(5, ResponseBody::LastSequence(None)),
        ),
        (
            "response_token",
            response(
                10,
                ResponseBody::Token(TokenIssued {
                    token: "dmq1.e30.c2ln".into(),
                    id: "00ff".into(),
                    expires_ms: 1_700_000_000_000,
                }),
            ),
        ),
        (
            "open_publish",
            Frame::OpenPublish(OpenPublish {
                channel: "dc-a/s1".into(),
                producer_id: "p1".into(),
                create: true,
            }),
        ),
        (
            "publish_opened_some",
            Frame::PublishOpened(PublishOpened {
                last_sequence: Some(10),
            }),
        ),
        (
            "publish_opened_none",
            Frame::PublishOpened(PublishOpened {
                last_sequence: None,
            }),
        ),
        (
            "publish_batch",
            Frame::PublishBatch(PublishBatch {
                batch_id: 3,
                messages: vec![
                    PublishMessage {
                        sequence: 11,
                        headers: headers(),
                        payload: Bytes::from_static(b"hello"),
                    },
                    PublishMessage {
                        sequence: 12,
                        headers: Vec::new(),
                        payload: Bytes::new(),
                    },
                ],
            }),
        ),
        (
            "publish_batch_empty",
            Frame::PublishBatch(PublishBatch {
                batch_id: 4,
                messages: Vec::new(),
            }),
        ),
        (
            "publish_ack",
            Frame::PublishAck(PublishAck {
                batch_id: 3,
                first_offset: 100,
                appended: 1,
                duplicates: vec![
                    DuplicateAck {
                        index: 0,
                        offset: Some(90),
                    },
                    DuplicateAck {
                        index: 2,
                        offset: None,
                    },
                ],
            }),
        ),
        (
            "open_publish_multi",
            Frame::OpenPublishMulti(OpenPublishMulti {
                producer_id: "p1".into(),
                create: true,
            }),
        ),
        (
            "publish_multi",
            Frame::PublishMulti(PublishMulti {
                batch_id: 5,
                declare: vec!["s1".into(), "s2".into()],
                parts: vec![
                    ChannelBatch {
                        channel: 0,
                        messages: vec![PublishMessage {
                            sequence: 7,
                            headers: Vec::new(),
                            payload: Bytes::from_static(b"ab"),
                        }],
                    },
                    ChannelBatch {
                        channel: 1,
                        messages: vec![
                            PublishMessage {
                                sequence: 1,
                                headers: headers(),
                                payload: Bytes::from_static(b"c"),
                            },
                            PublishMessage {
                                sequence: 2,
                                headers: Vec::new(),
                                payload: Bytes::new(),
                            },
                        ],
                    },
                ],
            }),
        ),
        (
            "publish_multi_ack",
            Frame::PublishMultiAck(PublishMultiAck {
                batch_id: 5,
                parts: vec![
                    PartAck {
                        first_offset: 40,
                        appended: 1,
                        duplicates: Vec::new(),
                    },
                    PartAck {
                        first_offset: 9,
                        appended: 1,
                        duplicates: vec![DuplicateAck {
                            index: 0,
                            offset: Some(8),
                        }],
                    },
                ],
            }),
        ),
        (
            "subscribe",
            Frame::Subscribe(Subscribe {
                channel: "dc-a/s1".into(),
                consumer: "dc-b".into(),
                start: StartPosition::Earliest,
                credit_messages: 1000,
                credit_bytes: 1 << 20,
                standby: true,
            }),
        ),
        (
            "subscribed",
            Frame::Subscribed(Subscribed {
                next_offset: 40,
                head: 100,
            }),
        ),
        (
            "deliver",
            Frame::Deliver(Deliver {
                messages: vec![
                    DeliveredMessage {
                        offset: 40,
                        timestamp_ms: 1_700_000_000_000,
                        headers: headers(),
                        payload: Bytes::from_static(b"hi"),
                    },
                    DeliveredMessage {
                        offset: 41,
                        timestamp_ms: 1_700_000_000_001,
                        headers: Vec::new(),
                        payload: Bytes::new(),
                    },
                ],
            }),
        ),
        (
            "deliver_empty",
            Frame::Deliver(Deliver {
                messages: Vec::new(),
            }),
        ),
        (
            "credit",
            Frame::Credit(Credit {
                messages: 100,
                bytes: 1 << 20,
            }),
        ),
        ("commit", Frame::Commit(Commit { offset: 41 })),
        ("commit_ok", Frame::CommitOk(CommitOk { offset: 41 })),
        (
            "watch",
            Frame::Watch(Watch {
                prefix: "dc-a/".into(),
            }),
        ),
        (
            "watch_event",
            Frame::WatchEvent(WatchEvent {
                kind: WatchEventKind::Created,
                channels: vec!["dc-a/s1".into(), "dc-a/s2".into()],
            }),
        ),
    ]
}

fn sample(name: &str) -> Frame {
    samples()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| f)
        .unwrap_or_else(|| panic!("no sample {name}"))
}

const SIZES: [usize; 3] = [0, 1024, 100 * 1024];

/// Frames carrying payloads of 0 bytes, 1 KiB and 100 KiB, alone and mixed in one frame.
fn payload_frames() -> Vec<Frame> {
    let mut frames = Vec::new();
    for (i, size) in SIZES.into_iter().enumerate() {
        frames.push(Frame::PublishBatch(PublishBatch {
            batch_id: i as u64,
            messages: vec![PublishMessage {
                sequence: 1,
                headers: headers(),
                payload: payload(size, 1),
            }],
        }));
        frames.push(Frame::Deliver(Deliver {
            messages: vec![DeliveredMessage {
                offset: 5,
                timestamp_ms: 6,
                headers: headers(),
                payload: payload(size, 2),
            }],
        }));
    }
    frames.push(mixed_batch());
    frames.push(mixed_deliver());
    frames
}

/// Large, empty, small and large payloads in that order: small ones are coalesced between
/// the large ones, which travel as their own chunks.
fn mixed_sizes() -> [usize; 4] {
    [100 * 1024, 0, 1024, 100 * 1024]
}

fn mixed_batch() -> Frame {
    Frame::PublishBatch(PublishBatch {
        batch_id: 9,
        messages: mixed_sizes()
            .into_iter()
            .enumerate()
            .map(|(i, size)| PublishMessage {
                sequence: 100 + i as u64,
                headers: if i == 2 { headers() } else { Vec::new() },
                payload: payload(size, i as u8),
            })
            .collect(),
    })
}

fn mixed_deliver() -> Frame {
    Frame::Deliver(Deliver {
        messages: mixed_sizes()
            .into_iter()
            .enumerate()
            .map(|(i, size)| DeliveredMessage {
                offset: 7 + i as u64,
                timestamp_ms: 1_700_000_000_000 + i as u64,
                headers: if i == 1 { headers() } else { Vec::new() },
                payload: payload(size, 0x40 | i as u8),
            })
            .collect(),
    })
}

fn payloads_of(frame: &Frame) -> Vec<Bytes> {
    match frame {
        Frame::PublishBatch(b) => b.messages.iter().map(|m| m.payload.clone()).collect(),
        Frame::Deliver(d) => d.messages.iter().map(|m| m.payload.clone()).collect(),
        Frame::PublishMulti(b) => b
            .parts
            .iter()
            .flat_map(|p| p.messages.iter().map(|m| m.payload.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

fn has_data_section(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::PublishBatch(_) | Frame::Deliver(_) | Frame::PublishMulti(_)
    )
}

// ---------------------------------------------------------------------------------------
// Coverage of the samples
// ---------------------------------------------------------------------------------------

/// Exhaustive on purpose: a new variant does not compile until it gets a sample.
fn request_variant(body: &RequestBody) -> usize {
    match body {
        RequestBody::CreateChannel { .. } => 0,
        RequestBody::DeleteChannel { .. } => 1,
        RequestBody::ListChannels { .. } => 2,
        RequestBody::Status { .. } => 3,
        RequestBody::LastSequence { .. } => 4,
        RequestBody::ResetConsumer { .. } => 5,
        RequestBody::IssueToken { .. } => 6,
        RequestBody::RenewToken { .. } => 7,
        RequestBody::RevokeToken { .. } => 8,
    }
}
const REQUEST_VARIANTS: usize = 9;

fn response_variant(body: &ResponseBody) -> usize {
    match body {
        ResponseBody::Done => 0,
        ResponseBody::Channels(_) => 1,
        ResponseBody::Status(_) => 2,
        ResponseBody::LastSequence(_) => 3,
        ResponseBody::Token(_) => 4,
    }
}
const RESPONSE_VARIANTS: usize = 5;

fn start_variant(start: StartPosition) -> usize {
    match start {
        StartPosition::Earliest => 0,
        StartPosition::Latest => 1,
        StartPosition::Offset(_) => 2,
        StartPosition::Timestamp(_) => 3,
    }
}
const START_VARIANTS: usize = 4;

fn known_kinds() -> Vec<u8> {
    (0..=u8::MAX)
        .filter(|&k| kind::name(k) != "unknown")
        .collect()
}

#[test]
fn samples_cover_every_frame_kind_and_every_body_variant() {
    let samples = samples();
    let mut kinds: Vec<u8> = samples.iter().map(|(_, f)| f.kind()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds, known_kinds());

    let mut requests = [false; REQUEST_VARIANTS];
    let mut responses = [false; RESPONSE_VARIANTS];
    let mut starts = [false; START_VARIANTS];
    for (_, frame) in &samples {
        match frame {
            Frame::Request(r) => {
                requests[request_variant(&r.body)] = true;
                if let RequestBody::ResetConsumer { to, .. } = r.body {
                    starts[start_variant(to)] = true;
                }
            }
            Frame::Response(r) => responses[response_variant(&r.body)] = true,
            Frame::Subscribe(s) => starts[start_variant(s.start)] = true,
            _ => {}
        }
    }
    assert!(requests.iter().all(|&seen| seen), "{requests:?}");
    assert!(responses.iter().all(|&seen| seen), "{responses:?}");
    assert!(starts.iter().all(|&seen| seen), "{starts:?}");
}

#[test]
fn kind_numbers_are_pinned() {
    // A wire contract (§2): changing a number breaks every deployed peer.
    let table: Vec<(u8, &str)> = known_kinds()
        .into_iter()
        .map(|k| (k, kind::name(k)))
        .collect();
    assert_eq!(
        table,
        [
            (1, "Hello"),
            (2, "HelloOk"),
            (3, "Error"),
            (4, "Request"),
            (5, "Response"),
            (10, "OpenPublish"),
            (11, "PublishOpened"),
            (12, "PublishBatch"),
            (13, "PublishAck"),
            (14, "OpenPublishMulti"),
            (15, "PublishMulti"),
            (16, "PublishMultiAck"),
            (20, "Subscribe"),
            (21, "Subscribed"),
            (22, "Deliver"),
            (23, "Credit"),
            (24, "Commit"),
            (25, "CommitOk"),
            (30, "Watch"),
            (31, "WatchEvent"),
        ]
    );
    for (name, frame) in samples() {
        assert_eq!(kind::name(frame.kind()), frame.name(), "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------

#[test]
fn every_frame_round_trips_through_encode_and_decode() {
    let frames = samples()
        .into_iter()
        .map(|(_, f)| f)
        .chain(payload_frames());
    for frame in frames {
        let bytes = encoded(&frame);
        assert_eq!(
            frame_len(&bytes, LIMIT).unwrap(),
            Some(bytes.len()),
            "{frame:?}"
        );
        assert_eq!(decode_exactly(&bytes), frame);
    }
}

#[test]
fn every_frame_round_trips_through_encode_chunks() {
    let frames = samples()
        .into_iter()
        .map(|(_, f)| f)
        .chain(payload_frames());
    for frame in frames {
        let mut chunks = Vec::new();
        encode_chunks(&frame, &mut chunks);
        assert!(chunks.iter().all(|c| !c.is_empty()), "empty chunk");
        let joined: Vec<u8> = chunks.concat();
        assert_eq!(joined, &encoded(&frame)[..], "chunks differ from encode");
        assert_eq!(decode_exactly(&joined), frame);
    }
}

#[test]
fn encode_chunks_appends_after_existing_chunks() {
    let first = Frame::Commit(Commit { offset: 1 });
    let second = mixed_batch();
    let mut chunks = Vec::new();
    encode_chunks(&first, &mut chunks);
    let after_first = chunks.len();
    encode_chunks(&second, &mut chunks);
    assert_eq!(chunks[..after_first].concat(), &encoded(&first)[..]);

    let mut buf = BytesMut::from(&chunks.concat()[..]);
    assert_eq!(decode(&mut buf, LIMIT).unwrap(), Some(first));
    assert_eq!(decode(&mut buf, LIMIT).unwrap(), Some(second));
    assert!(buf.is_empty());
}

#[test]
fn encode_appends_without_touching_existing_bytes() {
    let mut buf = BytesMut::from(&b"prefix"[..]);
    let frame = samples()[0].1.clone();
    encode(&frame, &mut buf);
    assert_eq!(&buf[..6], b"prefix");
    assert_eq!(&buf[6..], &encoded(&frame)[..]);
}

#[test]
fn encode_chunks_passes_large_payloads_without_copying() {
    for frame in [mixed_batch(), mixed_deliver()] {
        let mut chunks = Vec::new();
        encode_chunks(&frame, &mut chunks);
        // Header and meta; 100 KiB; the 0-byte and 1 KiB payloads coalesced; 100 KiB.
        assert_eq!(
            chunks.len(),
            4,
            "{:?}",
            chunks.iter().map(Bytes::len).collect::<Vec<_>>()
        );
        let payloads = payloads_of(&frame);
        for (index, chunk) in [(0, &chunks[1]), (3, &chunks[3])] {
            assert_eq!(
                chunk.as_ptr(),
                payloads[index].as_ptr(),
                "payload {index} copied"
            );
            assert_eq!(chunk.len(), payloads[index].len());
        }
        assert_eq!(chunks[2].len(), 1024);
        assert_ne!(chunks[2].as_ptr(), payloads[2].as_ptr());
    }
}

#[test]
fn encode_chunks_emits_a_single_chunk_below_the_coalescing_threshold() {
    for size in [0, 1024, COALESCE_BELOW - 1] {
        let frame = Frame::PublishBatch(PublishBatch {
            batch_id: 1,
            messages: vec![PublishMessage {
                sequence: 1,
                headers: Vec::new(),
                payload: payload(size, 3),
            }],
        });
        let mut chunks = Vec::new();
        encode_chunks(&frame, &mut chunks);
        assert_eq!(chunks.len(), 1, "payload of {size} bytes");
    }
    let frame = Frame::PublishBatch(PublishBatch {
        batch_id: 1,
        messages: vec![PublishMessage {
            sequence: 1,
            headers: Vec::new(),
            payload: payload(COALESCE_BELOW, 3),
        }],
    });
    let mut chunks = Vec::new();
    encode_chunks(&frame, &mut chunks);
    assert_eq!(
        chunks.len(),
        2,
        "a payload at the threshold is its own chunk"
    );
}

// ---------------------------------------------------------------------------------------
// Golden bytes
// ---------------------------------------------------------------------------------------

/// The exact encoding of each sample. Any change here is a wire change: it needs a new
/// protocol version and ALPN (§1, §3), not an updated constant.
const GOLDEN: &[(&str, &str)] = &[
    (
        "hello",
        "00000012 01 00000012 \
         02000700000000000000646d712f302e3100",
    ),
    (
        "hello_token",
        "00000027 01 00000027 \
         02000700000000000000646d712f302e31010d00000000000000646d71312e65 \
         33302e63326c6e",
    ),
    (
        "hello_ok",
        "0000002e 02 0000002e \
         02000700000000000000646d712f302e3105000000000000006167656e740000 \
         0004000000000000100400000000",
    ),
    (
        "error",
        "00000016 03 00000016 \
         07000000000000000e00040000000000000062757379",
    ),
    (
        "request_create_channel",
        "0000001b 04 0000001b \
         010000000000000000000000070000000000000064632d612f7331",
    ),
    (
        "request_delete_channel",
        "0000001b 04 0000001b \
         020000000000000001000000070000000000000064632d612f7331",
    ),
    (
        "request_list_channels",
        "00000019 04 00000019 \
         030000000000000002000000050000000000000064632d612f",
    ),
    (
        "request_status",
        "00000014 04 00000014 \
         0400000000000000030000000000000000000000",
    ),
    (
        "request_last_sequence",
        "00000025 04 00000025 \
         050000000000000004000000070000000000000064632d612f73310200000000 \
         0000007031",
    ),
    (
        "request_reset_consumer_earliest",
        "0000002b 04 0000002b \
         060000000000000005000000070000000000000064632d612f73310400000000 \
         00000064632d6200000000",
    ),
    (
        "request_reset_consumer_latest",
        "0000002b 04 0000002b \
         070000000000000005000000070000000000000064632d612f73310400000000 \
         00000064632d6201000000",
    ),
    (
        "request_reset_consumer_offset",
        "00000033 04 00000033 \
         080000000000000005000000070000000000000064632d612f73310400000000 \
         00000064632d62020000002a00000000000000",
    ),
    (
        "request_reset_consumer_timestamp",
        "00000033 04 00000033 \
         090000000000000005000000070000000000000064632d612f73310400000000 \
         00000064632d62030000000068e5cf8b010000",
    ),
    (
        "request_issue_token",
        "0000004b 04 0000004b \
         0a00000000000000060000000a0000000000000064632d622d6167656e740000 \
         0000000000000100000000000000050000000000000064632d612f0000000000 \
         00000080ee360000000000",
    ),
    (
        "request_renew_token",
        "00000029 04 00000029 \
         0b00000000000000070000000d00000000000000646d71312e6533302e63326c \
         6e60ea000000000000",
    ),
    (
        "request_revoke_token",
        "00000018 04 00000018 \
         0c0000000000000008000000040000000000000030306666",
    ),
    (
        "response_done",
        "0000000c 05 0000000c \
         010000000000000000000000",
    ),
    (
        "response_channels",
        "00000047 05 00000047 \
         03000000000000000100000001000000000000000b0000000000000064632d61 \
         2f6462312f733164000000000000002800000000000000701700000000000000 \
         68e5cf8b010000",
    ),
    (
        "response_status",
        "00000085 05 00000085 \
         04000000000000000200000001000000000000000b0000000000000064632d61 \
         2f6462312f733164000000000000002800000000000000701700000000000000 \
         68e5cf8b010000f469e5cf8b0100000100000000000000040000000000000064 \
         632d625a000000000000000a000000000000005802000000000000dc05000000 \
         0000000101",
    ),
    (
        "response_last_sequence_some",
        "00000015 05 00000015 \
         050000000000000003000000016300000000000000",
    ),
    (
        "response_last_sequence_none",
        "0000000d 05 0000000d \
         05000000000000000300000000",
    ),
    (
        "response_token",
        "00000035 05 00000035 \
         0a00000000000000040000000d00000000000000646d71312e6533302e63326c6e \
         0400000000000000303066660068e5cf8b010000",
    ),
    (
        "open_publish",
        "0000001a 0a 0000001a \
         070000000000000064632d612f73310200000000000000703101",
    ),
    (
        "publish_opened_some",
        "00000009 0b 00000009 \
         010a00000000000000",
    ),
    (
        "publish_opened_none",
        "00000001 0b 00000001 \
         00",
    ),
    (
        "publish_batch",
        "0000006a 0c 00000065 \
         030000000000000002000000000000000b000000000000000200000000000000 \
         050000000000000074726163650300000000000000742d310500000000000000 \
         656d7074790000000000000000050000000c0000000000000000000000000000 \
         0000000000 \
         68656c6c6f",
    ),
    (
        "publish_batch_empty",
        "00000010 0c 00000010 \
         04000000000000000000000000000000",
    ),
    (
        "publish_ack",
        "0000002e 0d 0000002e \
         0300000000000000640000000000000001000000020000000000000000000000 \
         015a000000000000000200000000",
    ),
    (
        "open_publish_multi",
        "0000000b 0e 0000000b \
         0200000000000000703101",
    ),
    (
        "publish_multi",
        "000000b0 0f 000000ad \
         0500000000000000020000000000000002000000000000007331020000000000 \
         0000733202000000000000000000000001000000000000000700000000000000 \
         0000000000000000020000000100000002000000000000000100000000000000 \
         0200000000000000050000000000000074726163650300000000000000742d31 \
         0500000000000000656d70747900000000000000000100000002000000000000 \
         00000000000000000000000000616263",
    ),
    (
        "publish_multi_ack",
        "00000045 10 00000045 \
         0500000000000000020000000000000028000000000000000100000000000000 \
         0000000009000000000000000100000001000000000000000000000001080000 \
         0000000000",
    ),
    (
        "subscribe",
        "0000002c 14 0000002c \
         070000000000000064632d612f7331040000000000000064632d6200000000e8 \
         030000000010000000000001",
    ),
    (
        "subscribed",
        "00000010 15 00000010 \
         28000000000000006400000000000000",
    ),
    (
        "deliver",
        "0000006f 16 0000006d \
         020000000000000028000000000000000068e5cf8b0100000200000000000000 \
         050000000000000074726163650300000000000000742d310500000000000000 \
         656d70747900000000000000000200000029000000000000000168e5cf8b0100 \
         00000000000000000000000000 \
         6869",
    ),
    (
        "deliver_empty",
        "00000008 16 00000008 \
         0000000000000000",
    ),
    (
        "credit",
        "0000000c 17 0000000c \
         640000000000100000000000",
    ),
    (
        "commit",
        "00000008 18 00000008 \
         2900000000000000",
    ),
    (
        "commit_ok",
        "00000008 19 00000008 \
         2900000000000000",
    ),
    (
        "watch",
        "0000000d 1e 0000000d \
         050000000000000064632d612f",
    ),
    (
        "watch_event",
        "0000002a 1f 0000002a \
         0100000002000000000000000700000000000000 \
         64632d612f7331070000000000000064632d612f7332",
    ),
];

#[test]
fn golden_bytes_pin_every_frame_kind() {
    let samples = samples();
    let names: Vec<&str> = samples.iter().map(|(n, _)| *n).collect();
    let golden_names: Vec<&str> = GOLDEN.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, golden_names, "every sample has a golden encoding");
    for ((name, frame), (_, golden)) in samples.iter().zip(GOLDEN) {
        let actual = encoded(frame);
        let expected = unhex(golden);
        assert_eq!(
            layout(&actual),
            layout(&expected),
            "wire bytes of {name} changed"
        );
        assert_eq!(&decode_exactly(&expected), frame, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Zero copy
// ---------------------------------------------------------------------------------------

#[test]
fn decoded_payloads_are_slices_of_the_received_buffer() {
    for frame in payload_frames()
        .into_iter()
        .chain(samples().into_iter().map(|(_, f)| f))
    {
        let mut buf = encoded(&frame);
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let decoded = decode(&mut buf, LIMIT).unwrap().unwrap();
        for p in payloads_of(&decoded).iter().filter(|p| !p.is_empty()) {
            let at = p.as_ptr() as usize;
            assert!(
                start <= at && at + p.len() <= end,
                "a payload of {} bytes was copied",
                p.len()
            );
        }
        assert_eq!(decoded, frame);
    }
}

// ---------------------------------------------------------------------------------------
// Partial input
// ---------------------------------------------------------------------------------------

#[test]
fn partial_frames_wait_for_more_bytes_and_leave_the_buffer_untouched() {
    let frames: Vec<Frame> = samples().into_iter().map(|(_, f)| f).collect();
    let mut all = Vec::new();
    let mut ends = Vec::new();
    for frame in &frames {
        all.extend_from_slice(&encoded(frame));
        ends.push(all.len());
    }

    let mut buf = BytesMut::new();
    let mut consumed = 0;
    let mut decoded = Vec::new();
    for (i, &byte) in all.iter().enumerate() {
        buf.extend_from_slice(&[byte]);
        let fed = i + 1;
        // At most one frame can complete per byte.
        match decode(&mut buf, LIMIT).unwrap() {
            Some(frame) => {
                assert_eq!(
                    fed,
                    ends[decoded.len()],
                    "frame completed at the wrong byte"
                );
                consumed = fed;
                decoded.push(frame);
                assert!(buf.is_empty());
            }
            None => {
                assert_ne!(
                    Some(&fed),
                    ends.get(decoded.len()),
                    "complete frame not decoded"
                );
                assert_eq!(&buf[..], &all[consumed..fed], "Ok(None) changed the buffer");
            }
        }
        assert_eq!(decode(&mut buf, LIMIT).unwrap(), None);
    }
    assert_eq!(decoded, frames);
}

#[test]
fn frame_len_needs_the_whole_header_then_the_whole_body() {
    let bytes = encoded(&Frame::Commit(Commit { offset: 3 }));
    for n in 0..bytes.len() {
        assert_eq!(frame_len(&bytes[..n], LIMIT).unwrap(), None, "{n} bytes");
    }
    assert_eq!(frame_len(&bytes, LIMIT).unwrap(), Some(bytes.len()));
}

#[test]
fn a_buffer_holding_several_frames_decodes_them_in_order() {
    let frames: Vec<Frame> = samples()
        .into_iter()
        .map(|(_, f)| f)
        .chain(payload_frames())
        .collect();
    let mut buf = BytesMut::new();
    for frame in &frames {
        encode(frame, &mut buf);
    }
    let mut decoded = Vec::new();
    while let Some(frame) = decode(&mut buf, LIMIT).unwrap() {
        decoded.push(frame);
    }
    assert!(buf.is_empty());
    assert_eq!(decoded, frames);
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[test]
fn oversized_length_is_refused_from_the_header_alone() {
    let max = 1024;
    let mut buf = BytesMut::from(&header(1025, kind::PUBLISH_BATCH, 8)[..]);
    let err = decode(&mut buf, max).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TooLarge {
                len: 1025,
                max: 1024
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), ErrorCode::FRAME_TOO_LARGE);
    assert_eq!(buf.len(), HEADER_LEN, "the header is left in place");

    let err = decode_err(&header(u32::MAX, kind::DELIVER, 0), max);
    assert!(matches!(err, DecodeError::TooLarge { len, .. } if len == u64::from(u32::MAX)));

    // Exactly at the limit is fine: the decoder waits for the body.
    let mut buf = BytesMut::from(&header(1024, kind::PUBLISH_BATCH, 8)[..]);
    assert_eq!(decode(&mut buf, max).unwrap(), None);
}

#[test]
fn unknown_kind_is_refused_from_the_header_alone() {
    let known = known_kinds();
    for k in (0..=u8::MAX).filter(|k| !known.contains(k)) {
        let err = decode_err(&header(8, k, 8), LIMIT);
        assert!(
            matches!(err, DecodeError::UnknownKind { kind } if kind == k),
            "{err:?}"
        );
        assert_eq!(err.code(), ErrorCode::UNKNOWN_FRAME_KIND);
    }
}

#[test]
fn meta_length_beyond_the_frame_is_refused_from_the_header_alone() {
    let err = decode_err(&header(4, kind::COMMIT, 5), LIMIT);
    assert!(
        matches!(
            err,
            DecodeError::MetaLength {
                kind: "Commit",
                meta_len: 5,
                len: 4
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), ErrorCode::MALFORMED_FRAME);
}

#[test]
fn garbage_meta_is_malformed() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Seven bytes where a u64 is expected.
        ("Commit", raw_frame(kind::COMMIT, &[1; 7], &[])),
        // One byte after a complete meta: bincode must reject trailing bytes.
        ("Commit", raw_frame(kind::COMMIT, &[1; 9], &[])),
        // Empty meta.
        ("CommitOk", raw_frame(kind::COMMIT_OK, &[], &[])),
        // A bool that is neither 0 nor 1.
        ("OpenPublish", {
            let mut meta = Vec::new();
            meta.extend_from_slice(&le64(1));
            meta.push(b'c');
            meta.extend_from_slice(&le64(1));
            meta.push(b'p');
            meta.push(2);
            raw_frame(kind::OPEN_PUBLISH, &meta, &[])
        }),
        // A string that is not UTF-8.
        ("Hello", {
            let mut meta = vec![1, 0];
            meta.extend_from_slice(&le64(2));
            meta.extend_from_slice(&[0xff, 0xfe]);
            raw_frame(kind::HELLO, &meta, &[])
        }),
        // A request body variant that does not exist.
        ("Request", {
            let mut meta = le64(1).to_vec();
            meta.extend_from_slice(&99u32.to_le_bytes());
            raw_frame(kind::REQUEST, &meta, &[])
        }),
        // An Option tag that is neither 0 nor 1.
        ("PublishOpened", raw_frame(kind::PUBLISH_OPENED, &[2], &[])),
        // A string longer than the meta that holds it.
        ("Hello", {
            let mut meta = vec![1, 0];
            meta.extend_from_slice(&le64(100));
            meta.extend_from_slice(b"short");
            raw_frame(kind::HELLO, &meta, &[])
        }),
    ];
    for (name, bytes) in cases {
        let err = decode_err(&bytes, LIMIT);
        assert!(
            matches!(err, DecodeError::Malformed { kind, .. } if kind == name),
            "{name}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::MALFORMED_FRAME);
    }
}

#[test]
fn payload_lengths_must_add_up_to_the_data_section() {
    for (frame, declared) in [
        (sample("publish_batch"), 5u64), // "hello" and ""
        (sample("deliver"), 2u64),       // "hi" and ""
    ] {
        assert!(has_data_section(&frame));
        let bytes = encoded(&frame);

        let longer = with_extra_data(&bytes, b"x");
        let err = decode_err(&longer, LIMIT);
        assert!(
            matches!(err, DecodeError::PayloadLength { declared: d, actual: a, .. }
                if d == declared && a == declared + 1),
            "{err:?}"
        );
        assert_eq!(err.code(), ErrorCode::MALFORMED_FRAME);

        let mut shorter = bytes[..bytes.len() - 1].to_vec();
        let len = (shorter.len() - HEADER_LEN) as u32;
        shorter[..4].copy_from_slice(&len.to_be_bytes());
        let err = decode_err(&shorter, LIMIT);
        assert!(
            matches!(err, DecodeError::PayloadLength { declared: d, actual: a, .. }
                if d == declared && a == declared - 1),
            "{err:?}"
        );
    }
}

#[test]
fn frames_without_payloads_refuse_trailing_data() {
    for (name, frame) in samples().into_iter().filter(|(_, f)| !has_data_section(f)) {
        let bytes = with_extra_data(&encoded(&frame), b"x");
        let err = decode_err(&bytes, LIMIT);
        assert!(
            matches!(err, DecodeError::PayloadLength { kind, declared: 0, actual: 1 }
                if kind == frame.name()),
            "{name}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::MALFORMED_FRAME);
    }
}

#[test]
fn decode_errors_map_to_their_error_codes() {
    let too_large = decode_err(&header(11, kind::COMMIT, 8), 10);
    let unknown = decode_err(&header(8, 0, 8), LIMIT);
    let meta_length = decode_err(&header(4, kind::COMMIT, 5), LIMIT);
    let malformed = decode_err(&raw_frame(kind::COMMIT, &[0; 3], &[]), LIMIT);
    let payload_length = decode_err(&raw_frame(kind::COMMIT, &[0; 8], b"x"), LIMIT);
    let expected = [
        (&too_large, ErrorCode::FRAME_TOO_LARGE),
        (&unknown, ErrorCode::UNKNOWN_FRAME_KIND),
        (&meta_length, ErrorCode::MALFORMED_FRAME),
        (&malformed, ErrorCode::MALFORMED_FRAME),
        (&payload_length, ErrorCode::MALFORMED_FRAME),
    ];
    assert!(matches!(too_large, DecodeError::TooLarge { .. }));
    assert!(matches!(unknown, DecodeError::UnknownKind { .. }));
    assert!(matches!(meta_length, DecodeError::MetaLength { .. }));
    assert!(matches!(malformed, DecodeError::Malformed { .. }));
    assert!(matches!(payload_length, DecodeError::PayloadLength { .. }));
    for (err, code) in expected {
        assert_eq!(err.code(), code, "{err}");
    }
    assert_eq!(
        too_large.to_string(),
        "frame of 11 bytes exceeds the limit of 10 bytes"
    );
}

// ---------------------------------------------------------------------------------------
// Hostile length prefixes inside the meta
// ---------------------------------------------------------------------------------------

#[test]
fn hostile_length_prefixes_in_meta_fail_fast_without_allocating() {
    const HUGE: u64 = u64::MAX / 2;
    let padding = [0u8; 24];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // PublishBatch { batch_id, messages: Vec<_> of HUGE entries }.
        (
            "PublishBatch",
            [&le64(1)[..], &le64(HUGE), &padding].concat(),
        ),
        // Deliver { messages: Vec<_> of HUGE entries }.
        ("Deliver", [&le64(HUGE)[..], &padding].concat()),
        // One PublishBatch entry whose headers Vec claims HUGE pairs.
        (
            "PublishBatch",
            [&le64(1)[..], &le64(1), &le64(7), &le64(HUGE), &padding].concat(),
        ),
        // One header whose key String claims HUGE bytes.
        (
            "PublishBatch",
            [
                &le64(1)[..],
                &le64(1),
                &le64(7),
                &le64(1),
                &le64(HUGE),
                &padding,
            ]
            .concat(),
        ),
        // One header whose value Bytes claims HUGE bytes.
        (
            "PublishBatch",
            [
                &le64(1)[..],
                &le64(1),
                &le64(7),
                &le64(1),
                &le64(1),
                b"k",
                &le64(HUGE),
            ]
            .concat(),
        ),
        // PublishAck { .., duplicates: Vec<_> of HUGE entries }.
        (
            "PublishAck",
            [
                &le64(1)[..],
                &le64(2),
                &3u32.to_le_bytes(),
                &le64(HUGE),
                &padding,
            ]
            .concat(),
        ),
        // Response { request_id, body: Channels(Vec<_> of HUGE entries) }.
        (
            "Response",
            [&le64(1)[..], &1u32.to_le_bytes(), &le64(HUGE), &padding].concat(),
        ),
    ];
    let started = Instant::now();
    for (name, meta) in cases {
        let k = (0..=u8::MAX).find(|&k| kind::name(k) == name).unwrap();
        let err = decode_err(&raw_frame(k, &meta, &[]), LIMIT);
        assert!(
            matches!(err, DecodeError::Malformed { kind, .. } if kind == name),
            "{name}: {err:?}"
        );
    }
    // Trusting any of those lengths would abort on allocation or take far longer.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Randomized mutation
// ---------------------------------------------------------------------------------------

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 spreads the seed; the state must not be zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`; `n` must be positive.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seed() -> u64 {
    const DEFAULT_SEED: u64 = 0xd1ec_7a9e_5eed_0001;
    match std::env::var("DIRECTMQ_SEED") {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("DIRECTMQ_SEED={text:?} is not a u64"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    const INTERESTING: [u64; 8] = [
        0,
        1,
        0x7f,
        0xffff_ffff,
        0x1_0000_0000,
        u64::MAX / 2,
        u64::MAX,
        1 << 20,
    ];
    let len = bytes.len();
    match rng.below(7) {
        0 if len > 0 => {
            let at = rng.below(len);
            bytes[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            bytes[at] = rng.next() as u8;
        }
        2 => bytes.truncate(rng.below(len + 1)),
        3 => {
            let at = rng.below(len + 1);
            let count = 1 + rng.below(8);
            let fresh: Vec<u8> = (0..count).map(|_| rng.next() as u8).collect();
            bytes.splice(at..at, fresh);
        }
        4 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(8)).min(len);
            bytes.drain(at..end);
        }
        5 if len >= 8 => {
            // Length prefixes are where decoders go wrong.
            let at = rng.below(len - 7);
            let value = INTERESTING[rng.below(INTERESTING.len())];
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        6 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(16)).min(len);
            let copy = bytes[at..end].to_vec();
            let to = rng.below(len + 1);
            bytes.splice(to..to, copy);
        }
        _ => bytes.push(rng.next() as u8),
    }
}

/// Makes the header agree with the bytes so the mutation reaches the meta decoder, and
/// sometimes relabels the frame as another kind.
fn repair_header(rng: &mut Rng, bytes: &mut [u8]) {
    if bytes.len() < HEADER_LEN {
        return;
    }
    let len = (bytes.len() - HEADER_LEN) as u32;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    if rng.below(4) == 0 {
        let known = known_kinds();
        bytes[4] = known[rng.below(known.len())];
    }
    let meta_len = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
    if meta_len > len {
        let meta_len = rng.below(len as usize + 1) as u32;
        bytes[5..9].copy_from_slice(&meta_len.to_be_bytes());
    }
}

/// Decodes every frame it can; each decoded frame must re-encode to exactly the bytes it
/// came from (the encoding is canonical). Returns how many frames decoded.
fn decode_all(bytes: &[u8], limit: u64) -> usize {
    let mut buf = BytesMut::from(bytes);
    let mut frames = 0;
    // Each decoded frame consumes at least a header, so this bound is never reached.
    for _ in 0..=bytes.len() / HEADER_LEN {
        let before = buf.clone();
        match decode(&mut buf, limit) {
            Ok(Some(frame)) => {
                let consumed = before.len() - buf.len();
                assert_eq!(
                    &encoded(&frame)[..],
                    &before[..consumed],
                    "decoded {frame:?} does not re-encode to its bytes"
                );
                frames += 1;
            }
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) changed the buffer");
                return frames;
            }
            Err(_) => return frames,
        }
    }
    panic!("decode loop did not terminate");
}

#[test]
fn random_mutations_never_panic_the_decoder() {
    const ITERATIONS: usize = 20_000;
    const MUTATION_LIMIT: u64 = 1024 * 1024;
    let seed = seed();
    eprintln!("random_mutations_never_panic_the_decoder: DIRECTMQ_SEED={seed:#x}");
    let mut rng = Rng::new(seed);

    let mut bases: Vec<Vec<u8>> = samples().iter().map(|(_, f)| encoded(f).to_vec()).collect();
    // Frames with 1 KiB payloads and two frames back to back.
    bases.extend(
        payload_frames()
            .iter()
            .filter(|f| payloads_of(f).iter().all(|p| p.len() <= 1024))
            .map(|f| encoded(f).to_vec()),
    );
    let pair = [encoded(&sample("hello")), encoded(&sample("publish_batch"))].concat();
    bases.push(pair);

    let mut decoded = 0;
    for iteration in 0..ITERATIONS {
        let mut bytes = bases[rng.below(bases.len())].clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut bytes);
        }
        if rng.below(2) == 0 {
            repair_header(&mut rng, &mut bytes);
        }
        match catch_unwind(AssertUnwindSafe(|| decode_all(&bytes, MUTATION_LIMIT))) {
            Ok(n) => decoded += n,
            Err(_) => panic!(
                "decoder failed at iteration {iteration} with DIRECTMQ_SEED={seed:#x} on input {}",
                hex(&bytes)
            ),
        }
    }
    eprintln!("{ITERATIONS} mutated inputs, {decoded} frames still decoded");
    assert!(decoded > 0, "the mutations never left a decodable frame");
}

/// A Deliver frame whose payloads are slices of two "batch buffers", as the broker reads
/// them: 40 payloads of 1 KiB side by side after a 50-byte meta in the first, then 3 small
/// ones in the second, then one that is in no buffer given.
fn backed_deliver() -> (Frame, Vec<Bytes>) {
    let first = payload(50 + 40 * 1024, 0x11);
    let second = payload(30 + 3 * 100, 0x22);
    let mut payloads: Vec<Bytes> = (0..40)
        .map(|i| first.slice(50 + i * 1024..50 + (i + 1) * 1024))
        .collect();
    payloads.extend((0..3).map(|i| second.slice(30 + i * 100..30 + (i + 1) * 100)));
    payloads.push(payload(700, 0x33));
    let frame = Frame::Deliver(Deliver {
        messages: payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| DeliveredMessage {
                offset: i as u64,
                timestamp_ms: 5,
                headers: Vec::new(),
                payload,
            })
            .collect(),
    });
    (frame, vec![second, first])
}

#[test]
fn backed_encoding_sends_the_same_bytes() {
    let (frame, backing) = backed_deliver();
    let mut chunks = Vec::new();
    encode_chunks_backed(&frame, &backing, &mut chunks);
    let sent: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    assert_eq!(sent, encoded(&frame).to_vec());
    assert_eq!(decode_exactly(&sent), frame);
    // Nothing backed, or payloads in no buffer given: as encode_chunks.
    for frame in payload_frames() {
        let (mut backed, mut plain) = (Vec::new(), Vec::new());
        encode_chunks_backed(&frame, &[], &mut backed);
        encode_chunks(&frame, &mut plain);
        assert_eq!(backed.concat(), plain.concat());
    }
}

#[test]
fn backed_encoding_passes_payloads_side_by_side_as_one_uncopied_slice() {
    let (frame, backing) = backed_deliver();
    let mut chunks = Vec::new();
    encode_chunks_backed(&frame, &backing, &mut chunks);
    // Header and meta; the 40 KiB run of the first buffer, uncopied; the 300-byte run of
    // the second and the unbacked payload, copied after it.
    assert_eq!(
        chunks.iter().map(Bytes::len).collect::<Vec<_>>()[1..],
        [40 * 1024, 300 + 700],
    );
    let first = &backing[1];
    assert_eq!(
        chunks[1].as_ptr(),
        first[50..].as_ptr(),
        "the run was copied"
    );
}

fn deliver_of(payloads: Vec<Bytes>) -> Frame {
    Frame::Deliver(Deliver {
        messages: payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| DeliveredMessage {
                offset: i as u64,
                timestamp_ms: 1,
                headers: Vec::new(),
                payload,
            })
            .collect(),
    })
}

/// The chunks of a backed encoding, checked to carry exactly `encode`'s bytes.
fn backed_chunks(frame: &Frame, backing: &[Bytes]) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    encode_chunks_backed(frame, backing, &mut chunks);
    assert_eq!(
        chunks.concat(),
        encoded(frame).to_vec(),
        "wire bytes differ"
    );
    chunks
}

/// Whether any chunk points into `buffer` (was passed uncopied).
fn sliced_from(chunks: &[Bytes], buffer: &Bytes) -> bool {
    chunks.iter().any(|c| within(buffer, c))
}

#[test]
fn backed_encoding_joins_only_neighbours_in_order() {
    let buffer = payload(5 * 16 * 1024, 0x5a);
    let piece = |i: usize| buffer.slice(i * 16 * 1024..(i + 1) * 16 * 1024);
    // Gaps (0 then 2, 1 then 3) and a reversal (2 then 1): nothing to join, each 16 KiB
    // piece is a fifth of its buffer, so each is copied, and the bytes stay in order.
    let frame = deliver_of(vec![piece(0), piece(2), piece(1), piece(3)]);
    let chunks = backed_chunks(&frame, std::slice::from_ref(&buffer));
    assert!(
        !sliced_from(&chunks, &buffer),
        "a fifth of a buffer is kept alive"
    );
    // An empty payload between neighbours ends the run there; the bytes are still right.
    let frame = deliver_of(vec![piece(0), Bytes::new(), piece(1), piece(2), piece(3)]);
    let chunks = backed_chunks(&frame, std::slice::from_ref(&buffer));
    assert_eq!(
        chunks
            .iter()
            .filter(|c| within(&buffer, c))
            .map(Bytes::len)
            .sum::<usize>(),
        48 * 1024,
        "the run after the empty payload, three fifths of the buffer, goes uncopied"
    );
}

#[test]
fn backed_runs_are_split_into_bounded_slices_and_small_shares_are_copied() {
    // 2.5 MiB of 1 KiB payloads side by side: slices of at most MAX_CHUNK, all uncopied.
    let buffer = payload(2 * MAX_CHUNK + MAX_CHUNK / 2, 0x6b);
    let payloads: Vec<Bytes> = (0..buffer.len() / 1024)
        .map(|i| buffer.slice(i * 1024..(i + 1) * 1024))
        .collect();
    let chunks = backed_chunks(&deliver_of(payloads.clone()), std::slice::from_ref(&buffer));
    let slices: Vec<&Bytes> = chunks.iter().filter(|c| within(&buffer, c)).collect();
    assert_eq!(
        slices.iter().map(|c| c.len()).collect::<Vec<_>>(),
        [MAX_CHUNK, MAX_CHUNK, MAX_CHUNK / 2]
    );
    // A run of exactly the threshold that is its whole buffer goes uncopied...
    let exact = payload(COALESCE_BELOW, 0x7c);
    let chunks = backed_chunks(
        &deliver_of(vec![exact.clone()]),
        std::slice::from_ref(&exact),
    );
    assert!(sliced_from(&chunks, &exact));
    // ...a 100 KiB run out of the 2.5 MiB buffer is copied, not keeping the buffer alive.
    let chunks = backed_chunks(
        &deliver_of(payloads[..100].to_vec()),
        std::slice::from_ref(&buffer),
    );
    assert!(!sliced_from(&chunks, &buffer));
}
