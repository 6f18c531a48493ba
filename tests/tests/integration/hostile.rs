//! Issue 5: hostile input. Thousands of random and mutated frames go to the decoder, and a
//! few hundred real QUIC streams of them to a live broker; afterwards the broker still
//! serves a normal client byte for byte and nothing acknowledged before the barrage is lost.
//!
//! Everything random comes from one seed, printed at the start; set `DIRECTMQ_HOSTILE_SEED`
//! to replay another. All cases are generated before any is sent, so what is sent and what
//! is asserted do not depend on how the concurrent connections interleave.

use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::{Bytes, BytesMut};
use directmq_client::{net, FrameReader, StartPosition, StreamError};
use directmq_protocol::{self as proto, ErrorCode, Frame, RequestBody};
use directmq_tests::{client, payload, test_config};

const DEFAULT_SEED: u64 = 0x0005_4057_11e5_eed5;
/// Cases fed to the decoder directly.
const DECODER_CASES: usize = 4000;
/// Connections that each carry `STREAMS_PER_CONNECTION` hostile streams and then a barrage
/// of mutated requests on their control stream.
const CONNECTIONS: usize = 8;
const STREAMS_PER_CONNECTION: usize = 40;
/// Connections whose very first frame (the hello) is mutated.
const HOSTILE_HELLOS: usize = 32;
const REQUESTS_PER_BARRAGE: usize = 12;
/// How long the broker may take to answer and end one stream.
const STREAM_DEADLINE: Duration = Duration::from_secs(10);
const MAX_MESSAGE_BYTES: u64 = 64 * 1024;
/// Differs in length from every name in the templates, so no mutation can reach it.
const GOOD_CHANNEL: &str = "survivor/ledger-0001";
const GOOD_BEFORE: u64 = 40;
const GOOD_AFTER: u64 = 40;
/// Payload of good message `seq`.
fn good_payload(seq: u64) -> Bytes {
    payload(5, 1, seq, 64 + (seq as usize * 37) % 700)
}

/// SplitMix64: small, fast and good enough to pick mutations.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    proto::encode(frame, &mut buf);
    buf.to_vec()
}

/// Valid frames of every kind a client or broker sends, to be mutated.
fn template(rng: &mut Rng) -> Frame {
    let small = |rng: &mut Rng| {
        let n = rng.below(48);
        Bytes::from(rng.bytes(n))
    };
    match rng.below(17) {
        0 => Frame::Hello(proto::Hello {
            version: proto::PROTOCOL_VERSION,
            client: "hostile".into(),
            token: None,
        }),
        1 | 2 => Frame::OpenPublish(proto::OpenPublish {
            channel: ["hostile/a", "hostile/b"][rng.below(2)].into(),
            producer_id: "raw".into(),
            create: rng.percent(70),
        }),
        3..=5 => {
            let first = rng.below(20) as u64;
            Frame::PublishBatch(proto::PublishBatch {
                batch_id: rng.next() % 1000,
                messages: (0..1 + rng.below(4) as u64)
                    .map(|i| proto::PublishMessage {
                        sequence: first + i,
                        headers: if rng.percent(30) {
                            vec![("k".into(), small(rng))]
                        } else {
                            vec![]
                        },
                        payload: small(rng),
                    })
                    .collect(),
            })
        }
        6 | 7 => Frame::Subscribe(proto::Subscribe {
            channel: "hostile/a".into(),
            consumer: ["raw-c", "raw-d"][rng.below(2)].into(),
            start: [
                StartPosition::Earliest,
                StartPosition::Latest,
                StartPosition::Offset(3),
            ][rng.below(3)],
            credit_messages: 16,
            credit_bytes: 4096,
            standby: false,
        }),
        8 => Frame::Credit(proto::Credit {
            messages: 5,
            bytes: 100,
        }),
        9 => Frame::Commit(proto::Commit { offset: 2 }),
        10 | 11 => Frame::Request(proto::Request {
            request_id: rng.next() % 100,
            body: request_body(rng),
        }),
        12 => Frame::Error(proto::ErrorFrame {
            request_id: 0,
            code: ErrorCode::MALFORMED_FRAME,
            message: "hostile".into(),
        }),
        13 => Frame::PublishAck(proto::PublishAck {
            batch_id: 1,
            first_offset: 7,
            appended: 2,
            duplicates: vec![proto::DuplicateAck {
                index: 0,
                offset: Some(3),
            }],
        }),
        14 => Frame::Deliver(proto::Deliver {
            messages: vec![proto::DeliveredMessage {
                offset: 9,
                timestamp_ms: 1,
                headers: vec![],
                payload: small(rng),
            }],
        }),
        15 => Frame::Watch(proto::Watch {
            prefix: "hostile/".into(),
        }),
        _ => Frame::Subscribed(proto::Subscribed {
            next_offset: 1,
            head: 2,
        }),
    }
}

fn request_body(rng: &mut Rng) -> RequestBody {
    match rng.below(6) {
        0 => RequestBody::CreateChannel {
            name: "hostile/c".into(),
        },
        1 => RequestBody::DeleteChannel {
            name: "hostile/b".into(),
        },
        2 => RequestBody::ListChannels { prefix: "".into() },
        3 => RequestBody::Status {
            prefix: "hostile".into(),
        },
        4 => RequestBody::LastSequence {
            channel: "hostile/a".into(),
            producer_id: "raw".into(),
        },
        _ => RequestBody::ResetConsumer {
            channel: "hostile/a".into(),
            consumer: "raw-c".into(),
            to: StartPosition::Latest,
        },
    }
}

/// One to three mutations of a valid encoding: flipped bytes, truncation, changed lengths,
/// a changed kind, inserted or deleted bytes, a second frame glued on.
fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(3) {
        let len = bytes.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                bytes[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                bytes[i] = rng.next() as u8;
            }
            2 => bytes.truncate(rng.below(len + 1)),
            3 if len >= 4 => {
                let old = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                let new = match rng.below(4) {
                    0 => old.wrapping_add(1 + rng.below(16) as u32),
                    1 => old.wrapping_sub(1 + rng.below(16) as u32),
                    2 => u32::MAX - rng.below(4) as u32,
                    _ => rng.next() as u32,
                };
                bytes[..4].copy_from_slice(&new.to_be_bytes());
            }
            4 if len >= 5 => {
                bytes[4] = if rng.percent(50) {
                    // Another valid kind, so the meta is read as the wrong type.
                    [
                        1, 2, 3, 4, 5, 10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 30, 31,
                    ][rng.below(17)]
                } else {
                    rng.next() as u8
                };
            }
            5 if len >= 9 => {
                let old = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
                let new = match rng.below(3) {
                    0 => old.wrapping_add(1 + rng.below(8) as u32),
                    1 => old.wrapping_sub(1 + rng.below(8) as u32),
                    _ => rng.next() as u32,
                };
                bytes[5..9].copy_from_slice(&new.to_be_bytes());
            }
            6 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(12);
                let extra = rng.bytes(n);
                bytes.splice(at..at, extra);
            }
            7 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(12)).min(len);
                bytes.drain(at..end);
            }
            8 if len >= 17 => {
                // A hostile length prefix inside the meta (bincode lengths are u64 LE).
                let at = 9 + rng.below(len - 16);
                bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            }
            _ => {
                let frame = template(rng);
                bytes.extend_from_slice(&encoded(&frame));
            }
        }
    }
    bytes
}

/// A hostile byte string: mostly mutated frames, sometimes pure noise.
fn hostile(rng: &mut Rng) -> Vec<u8> {
    if rng.percent(10) {
        let n = rng.below(64);
        return rng.bytes(n);
    }
    let frame = template(rng);
    mutate(rng, encoded(&frame))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What decoding one case gave.
#[derive(Debug, Default)]
struct Tally {
    frames: usize,
    partial: usize,
    errors: [usize; 3],
}

/// Decodes every frame of `bytes` like `FrameReader` does, checking each error is a codec
/// error and each frame survives a round trip.
fn decode_all(bytes: &[u8], limit: u64, tally: &mut Tally) -> Result<()> {
    let mut buf = BytesMut::from(bytes);
    loop {
        let header = proto::frame_len(&buf, limit);
        match proto::decode(&mut buf, limit) {
            Ok(Some(frame)) => {
                tally.frames += 1;
                let again = proto::decode(&mut BytesMut::from(&encoded(&frame)[..]), limit)
                    .context("a re-encoded frame must decode")?
                    .context("a re-encoded frame is complete")?;
                ensure!(
                    again == frame,
                    "round trip changed {frame:?} into {again:?}"
                );
            }
            Ok(None) => {
                tally.partial += usize::from(!buf.is_empty());
                return Ok(());
            }
            Err(e) => {
                let slot = match e.code() {
                    ErrorCode::MALFORMED_FRAME => 0,
                    ErrorCode::UNKNOWN_FRAME_KIND => 1,
                    ErrorCode::FRAME_TOO_LARGE => 2,
                    other => bail!("decode error {e} has the non-codec code {other}"),
                };
                tally.errors[slot] += 1;
                ensure!(e.to_string().len() > 10, "unhelpful message {e:?}");
                if let Err(h) = header {
                    ensure!(h.code() == e.code(), "frame_len said {h}, decode said {e}");
                }
                return Ok(());
            }
        }
    }
}

/// What the broker must answer on a stream whose bytes are `bytes`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// An error frame with this code, then the end of the stream.
    Error(ErrorCode),
    /// The stream ends without a frame (the bytes ended in the middle of one).
    Silent,
    /// A valid first frame opened a stream: any well-formed answer, then the end.
    Served,
    /// A `Subscribe` that may wait as a standby: like `Served`, or no answer at all when the
    /// consumer is busy and the stream ends while waiting (which depends on timing).
    Standby,
    /// (Control streams) `HelloOk`, then anything well-formed.
    HelloOk,
}

fn expect_stream(bytes: &[u8], limit: u64) -> Expect {
    match proto::decode(&mut BytesMut::from(bytes), limit) {
        Err(e) => Expect::Error(e.code()),
        Ok(None) => Expect::Silent,
        Ok(Some(Frame::Subscribe(s))) if s.standby => Expect::Standby,
        Ok(Some(Frame::OpenPublish(_) | Frame::Subscribe(_) | Frame::Watch(_))) => Expect::Served,
        Ok(Some(_)) => Expect::Error(ErrorCode::UNEXPECTED_FRAME),
    }
}

fn expect_hello(bytes: &[u8], limit: u64) -> Expect {
    match proto::decode(&mut BytesMut::from(bytes), limit) {
        Err(e) => Expect::Error(e.code()),
        Ok(None) => Expect::Silent,
        Ok(Some(Frame::Hello(h))) if h.version == proto::PROTOCOL_VERSION => Expect::HelloOk,
        Ok(Some(Frame::Hello(_))) => Expect::Error(ErrorCode::UNSUPPORTED_VERSION),
        Ok(Some(_)) => Expect::Error(ErrorCode::UNEXPECTED_FRAME),
    }
}

/// A stream of a hostile connection: the bytes and what the broker must answer.
#[derive(Debug, Clone)]
struct Case {
    label: String,
    bytes: Vec<u8>,
    expect: Expect,
}

/// All the live cases, generated up front from the seed.
#[derive(Debug)]
struct Plan {
    /// Per connection: its data streams, then its control-stream barrage.
    connections: Vec<(Vec<Case>, Vec<u8>)>,
    hellos: Vec<Case>,
}

fn plan(rng: &mut Rng, limit: u64) -> Plan {
    let mut connections = Vec::new();
    for c in 0..CONNECTIONS {
        let mut streams = Vec::new();
        for s in 0..STREAMS_PER_CONNECTION {
            let (bytes, expect) = if rng.percent(35) {
                // A valid opener, then mutated frames behind it.
                let opener = if rng.percent(50) {
                    Frame::OpenPublish(proto::OpenPublish {
                        channel: "hostile/a".into(),
                        producer_id: format!("raw-{c}"),
                        create: true,
                    })
                } else {
                    Frame::Subscribe(proto::Subscribe {
                        channel: "hostile/a".into(),
                        consumer: format!("raw-{c}"),
                        start: StartPosition::Earliest,
                        credit_messages: 8,
                        credit_bytes: 1 << 20,
                        standby: false,
                    })
                };
                let mut bytes = encoded(&opener);
                for _ in 0..1 + rng.below(4) {
                    bytes.extend(hostile(rng));
                }
                (bytes, Expect::Served)
            } else {
                let bytes = hostile(rng);
                let expect = expect_stream(&bytes, limit);
                (bytes, expect)
            };
            streams.push(Case {
                label: format!("connection {c} stream {s}"),
                bytes,
                expect,
            });
        }
        let mut barrage = Vec::new();
        for _ in 0..REQUESTS_PER_BARRAGE {
            let request = Frame::Request(proto::Request {
                request_id: rng.next() % 100,
                body: request_body(rng),
            });
            if rng.percent(50) {
                barrage.extend(encoded(&request));
            } else {
                barrage.extend(mutate(rng, encoded(&request)));
            }
        }
        connections.push((streams, barrage));
    }
    let hellos = (0..HOSTILE_HELLOS)
        .map(|h| {
            let hello = Frame::Hello(proto::Hello {
                version: proto::PROTOCOL_VERSION,
                client: "hostile".into(),
                token: None,
            });
            let bytes = mutate(rng, encoded(&hello));
            let expect = expect_hello(&bytes, limit);
            Case {
                label: format!("hostile hello {h}"),
                bytes,
                expect,
            }
        })
        .collect();
    Plan {
        connections,
        hellos,
    }
}

/// A QUIC connection made by hand, to send what the client library never would.
async fn raw_connection(addr: SocketAddr, data: &Path) -> Result<quinn::Connection> {
    let tls = net::client_tls(&data.join("certs"))?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    Ok(endpoint.connect(addr, "127.0.0.1")?.await?)
}

/// Sends `case.bytes` on a new stream, finishes it, and checks the broker's answer.
async fn run_case(send: quinn::SendStream, recv: quinn::RecvStream, case: &Case) -> Result<()> {
    let check = async {
        let mut send = send;
        // The broker may stop reading as soon as it sees an error; that is fine.
        let _ = send.write_all(&case.bytes).await;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, 1 << 30);
        let mut frames = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) | Err(StreamError::Read(_)) => break,
                Err(e) => bail!("the broker sent something undecodable: {e}"),
            }
            if frames.len() > 10_000 {
                bail!("the broker keeps sending");
            }
        }
        Ok(frames)
    };
    let frames = tokio::time::timeout(STREAM_DEADLINE, check)
        .await
        .with_context(|| {
            format!(
                "{}: no end of stream within {STREAM_DEADLINE:?}",
                case.label
            )
        })??;
    let context = || {
        format!(
            "{} ({:?}), sent {}",
            case.label,
            case.expect,
            hex(&case.bytes)
        )
    };
    for frame in &frames {
        if let Frame::Error(e) = frame {
            ensure!(
                ErrorCode::ALL.contains(&e.code),
                "unknown code in {e:?}: {}",
                context()
            );
        }
    }
    match case.expect {
        Expect::Error(code) => match frames.as_slice() {
            [Frame::Error(e)] if e.code == code => {}
            other => bail!("expected one {code} error, got {other:?}: {}", context()),
        },
        Expect::Silent => ensure!(
            frames.is_empty(),
            "expected no answer, got {frames:?}: {}",
            context()
        ),
        Expect::HelloOk => ensure!(
            matches!(frames.first(), Some(Frame::HelloOk(_))),
            "expected HelloOk, got {frames:?}: {}",
            context()
        ),
        Expect::Standby if frames.is_empty() => {}
        Expect::Served | Expect::Standby => ensure!(
            matches!(
                frames.first(),
                Some(
                    Frame::PublishOpened(_)
                        | Frame::Subscribed(_)
                        | Frame::WatchEvent(_)
                        | Frame::Error(_)
                )
            ),
            "expected the opener to be answered, got {frames:?}: {}",
            context()
        ),
    }
    Ok(())
}

/// One hostile connection: a proper hello, its data streams one after another, then a
/// barrage of (partly mutated) requests on the control stream.
async fn hostile_connection(
    addr: SocketAddr,
    data: &Path,
    streams: &[Case],
    barrage: Vec<u8>,
) -> Result<usize> {
    let conn = raw_connection(addr, data).await?;
    let (mut control_send, control_recv) = conn.open_bi().await?;
    control_send
        .write_all(&encoded(&Frame::Hello(proto::Hello {
            version: proto::PROTOCOL_VERSION,
            client: "hostile".into(),
            token: None,
        })))
        .await?;
    let mut control = FrameReader::new(control_recv, 1 << 30);
    match control.next().await? {
        Some(Frame::HelloOk(_)) => {}
        other => bail!("expected HelloOk, got {other:?}"),
    }
    for case in streams {
        let (send, recv) = conn.open_bi().await?;
        run_case(send, recv, case).await?;
    }
    // The control stream: every answer is a response or an error, then it ends.
    let barrage = Case {
        label: "control barrage".into(),
        bytes: barrage,
        expect: Expect::Served,
    };
    let rest = tokio::time::timeout(STREAM_DEADLINE, async {
        let _ = control_send.write_all(&barrage.bytes).await;
        let _ = control_send.finish();
        let mut frames = Vec::new();
        loop {
            match control.next().await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) | Err(StreamError::Read(_)) => return Ok(frames),
                Err(e) => bail!("the broker sent something undecodable: {e}"),
            }
        }
    })
    .await
    .context("the control stream did not end")??;
    for frame in &rest {
        ensure!(
            matches!(frame, Frame::Response(_))
                || matches!(frame, Frame::Error(e) if ErrorCode::ALL.contains(&e.code)),
            "control answer {frame:?} to {}",
            hex(&barrage.bytes)
        );
    }
    conn.close(0u32.into(), b"done");
    Ok(streams.len() + 1)
}

/// A connection whose hello is mutated; closed right after the first answer.
async fn hostile_hello(addr: SocketAddr, data: &Path, case: &Case) -> Result<()> {
    let conn = raw_connection(addr, data).await?;
    let (send, recv) = conn.open_bi().await?;
    let check = async {
        let mut send = send;
        let _ = send.write_all(&case.bytes).await;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, 1 << 30);
        match reader.next().await {
            Ok(frame) => Ok(frame),
            // The broker closes the connection when it sees no hello.
            Err(StreamError::Read(_)) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e)),
        }
    };
    let first = tokio::time::timeout(STREAM_DEADLINE, check)
        .await
        .with_context(|| format!("{}: no answer within {STREAM_DEADLINE:?}", case.label))??;
    conn.close(0u32.into(), b"done");
    let context = || {
        format!(
            "{} ({:?}), sent {}",
            case.label,
            case.expect,
            hex(&case.bytes)
        )
    };
    match (case.expect, first) {
        (Expect::Error(code), Some(Frame::Error(e))) if e.code == code => {}
        (Expect::Silent, None) => {}
        (Expect::HelloOk, Some(Frame::HelloOk(_))) => {}
        (_, other) => bail!("got {other:?}: {}", context()),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_never_hurt_the_broker_or_acknowledged_data() -> Result<()> {
    directmq_tests::init_logging();
    let started = Instant::now();
    let seed = match std::env::var("DIRECTMQ_HOSTILE_SEED") {
        Ok(s) => s.parse().context("DIRECTMQ_HOSTILE_SEED must be a u64")?,
        Err(_) => DEFAULT_SEED,
    };
    println!("hostile input seed: {seed} (replay with DIRECTMQ_HOSTILE_SEED={seed})");
    let limit = proto::max_frame_bytes(MAX_MESSAGE_BYTES);

    // (a) The decoder alone.
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    for case in 0..DECODER_CASES {
        let bytes = hostile(&mut rng);
        let result = catch_unwind(AssertUnwindSafe(|| decode_all(&bytes, limit, &mut tally)));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("decoder case {case} (seed {seed}), {}: {e:#}", hex(&bytes)),
            Err(_) => bail!(
                "the decoder panicked on case {case} (seed {seed}): {}",
                hex(&bytes)
            ),
        }
    }
    println!("decoder: {DECODER_CASES} cases, {tally:?}");
    ensure!(
        tally.frames > 0 && tally.partial > 0 && tally.errors.iter().all(|&n| n > 0),
        "the mutations missed a whole class of outcomes: {tally:?}"
    );

    // (b) A live broker.
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.max_message_bytes = MAX_MESSAGE_BYTES;
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;
    let good = client(addr, dir.path()).await?;
    let producer = good.producer(GOOD_CHANNEL, "keeper").await?;
    for seq in 0..GOOD_BEFORE {
        let receipt = producer.send(good_payload(seq)).await?;
        ensure!(receipt.offset == Some(seq), "{receipt:?}");
    }

    let plan = plan(&mut rng, limit);
    let mut expected: std::collections::BTreeMap<String, usize> = Default::default();
    for case in plan
        .connections
        .iter()
        .flat_map(|(s, _)| s)
        .chain(&plan.hellos)
    {
        *expected.entry(format!("{:?}", case.expect)).or_default() += 1;
    }
    println!("live cases by expected answer: {expected:?}");
    let mut tasks = tokio::task::JoinSet::new();
    let hellos_per_task = HOSTILE_HELLOS.div_ceil(CONNECTIONS);
    for (i, (streams, barrage)) in plan.connections.into_iter().enumerate() {
        let data = dir.path().to_owned();
        let hellos: Vec<Case> = plan
            .hellos
            .iter()
            .skip(i * hellos_per_task)
            .take(hellos_per_task)
            .cloned()
            .collect();
        tasks.spawn(async move {
            let mut count = hostile_connection(addr, &data, &streams, barrage).await?;
            for case in &hellos {
                hostile_hello(addr, &data, case).await?;
                count += 1;
            }
            anyhow::Ok(count)
        });
    }
    let mut streams = 0;
    while let Some(joined) = tasks.join_next().await {
        streams += joined.context("a hostile connection task panicked")??;
    }
    println!(
        "live broker: {streams} hostile streams answered, {:?} in",
        started.elapsed()
    );

    // The broker still serves a normal client, on the old connection and on a new one.
    for seq in GOOD_BEFORE..GOOD_BEFORE + GOOD_AFTER {
        let receipt = producer.send(good_payload(seq)).await?;
        ensure!(receipt.offset == Some(seq), "{receipt:?}");
    }
    let fresh = client(addr, dir.path()).await?;
    let mut consumer = fresh
        .consumer(GOOD_CHANNEL, "auditor", StartPosition::Earliest)
        .await?;
    for seq in 0..GOOD_BEFORE + GOOD_AFTER {
        let m = tokio::time::timeout(STREAM_DEADLINE, consumer.next())
            .await
            .with_context(|| format!("message {seq} did not arrive"))?
            .context("the consumer closed")??;
        ensure!(m.offset == seq, "expected offset {seq}, got {}", m.offset);
        ensure!(
            m.payload == good_payload(seq),
            "message {seq} came back different"
        );
    }
    let info = &fresh.list_channels(GOOD_CHANNEL).await?[0];
    ensure!(
        info.name == GOOD_CHANNEL && info.head == GOOD_BEFORE + GOOD_AFTER && info.first == 0,
        "{info:?}"
    );
    running.shutdown().await;
    println!("done in {:?}", started.elapsed());
    Ok(())
}
