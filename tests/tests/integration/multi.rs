//! Multi-channel publish streams (docs/protocol.md §4.2.1): one stream carries batches for
//! many channels; per channel, order, sequences and exactly-once appends hold as on a
//! stream per channel, through a SIGKILL of the broker; a frame with one bad part is
//! refused whole and appends nothing; parts name their channels by numbers the stream's
//! frames declared.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use directmq_client::{FrameReader, FrameWriter, PendingAck, ProducerOptions, StartPosition};
use directmq_protocol::{self as proto, ErrorCode, Frame};
use directmq_tests::{client, payload, test_config, ChildBroker};

use crate::bad_input::{hello, raw_connection};

fn name(c: u32) -> String {
    format!("dc-a/many/s{c:03}")
}

/// Reads channel `c` from the start and checks it holds exactly `count` messages, the
/// payloads of sequences `0..count` of producer 0 in order.
async fn check_channel(client: &directmq_client::Client, c: u32, count: u64) -> Result<()> {
    let mut consumer = client
        .consumer(&name(c), "check", StartPosition::Earliest)
        .await?;
    for seq in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .with_context(|| format!("channel {c}: message {seq} never came"))?
            .context("the consumer ended")??;
        ensure!(
            message.offset == seq,
            "channel {c}: offset {} for {seq}",
            message.offset
        );
        ensure!(
            message.payload == payload(c, 0, seq, 100 + (seq as usize % 7) * 50),
            "channel {c}: message {seq} differs"
        );
    }
    let head = client
        .list_channels(&name(c))
        .await?
        .into_iter()
        .find(|i| i.name == name(c))
        .context("listed")?
        .head;
    ensure!(
        head == count,
        "channel {c} holds {head} messages, not {count}: a duplicate or a loss"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stream_publishes_many_channels_in_order_and_exactly_once_across_a_sigkill(
) -> Result<()> {
    directmq_tests::init_logging();
    const CHANNELS: u32 = 60;
    const PER_CHANNEL: u64 = 60;
    let dir = tempfile::tempdir()?;
    let bin = crate::directmq_bin();
    let mut broker = ChildBroker::start(&bin, dir.path(), None)?;
    let addr = broker.quic;
    let producer_client = client(addr, dir.path()).await?;
    let multi = producer_client
        .multi_producer("agent-0", ProducerOptions::default())
        .await?;
    ensure!(
        multi.open_channel(&name(0)).await?.is_none(),
        "a new channel has no sequence"
    );

    let mut pending: Vec<(u32, u64, PendingAck)> = Vec::new();
    let total = u64::from(CHANNELS) * PER_CHANNEL;
    for i in 0..total {
        let (c, seq) = ((i % u64::from(CHANNELS)) as u32, i / u64::from(CHANNELS));
        let ack = multi
            .enqueue(&name(c), payload(c, 0, seq, 100 + (seq as usize % 7) * 50))
            .await?;
        pending.push((c, seq, ack));
        if i == total / 2 {
            // Half queued, some of it in flight: the broker dies and comes back on the
            // same address. The stream is reopened and every unacknowledged frame
            // resent; the broker appends each sequence once.
            broker.kill();
            broker = ChildBroker::start(&bin, dir.path(), Some(addr))?;
        }
    }
    for (c, seq, ack) in pending {
        let receipt = tokio::time::timeout(Duration::from_secs(60), ack)
            .await
            .context("an ack never came")??;
        ensure!(
            receipt.sequence == seq,
            "channel {c}: sequence {}",
            receipt.sequence
        );
        // A resent message the broker had appended before the kill is answered as a
        // duplicate with its original offset: either way it is stored once, at `seq`.
        ensure!(
            receipt.offset == Some(seq),
            "channel {c}: message {seq} at offset {:?}",
            receipt.offset
        );
    }
    let checker = client(addr, dir.path()).await?;
    for c in 0..CHANNELS {
        check_channel(&checker, c, PER_CHANNEL).await?;
    }
    // A new producer with the same id resumes each channel after its last sequence.
    let again = checker
        .multi_producer("agent-0", ProducerOptions::default())
        .await?;
    ensure!(again.open_channel(&name(7)).await? == Some(PER_CHANNEL - 1));
    let receipt = again.send(&name(7), "next").await?;
    ensure!(receipt.sequence == PER_CHANNEL && receipt.offset == Some(PER_CHANNEL));
    // Sequences already stored are answered as duplicates with their offsets, part by
    // part, next to new messages for another channel in the same frame.
    let dup = again
        .enqueue_with(&name(3), 5, vec![], payload(3, 0, 5, 100 + 5 * 50))
        .await?;
    let fresh = again.enqueue(&name(4), "fresh").await?;
    let (dup, fresh) = (dup.await?, fresh.await?);
    ensure!(dup.duplicate && dup.offset == Some(5), "{dup:?}");
    ensure!(
        !fresh.duplicate && fresh.offset == Some(PER_CHANNEL),
        "{fresh:?}"
    );
    // Names are checked before anything is queued.
    let err = again
        .send("bad name!", "x")
        .await
        .expect_err("invalid name");
    ensure!(err.code() == Some(ErrorCode::INVALID_CHANNEL_NAME), "{err}");
    checker.close().await;
    producer_client.close().await;
    broker.terminate()?;
    Ok(())
}

/// Numbers channels for frames written by hand on one multi-channel stream, as the client
/// library does: a name new to the stream is declared by the first frame that uses it.
#[derive(Default)]
struct Numbering(HashMap<String, u32>);

impl Numbering {
    fn frame(&mut self, batch_id: u64, parts: Vec<(&str, Vec<proto::PublishMessage>)>) -> Frame {
        let mut declare = Vec::new();
        let parts = parts
            .into_iter()
            .map(|(name, messages)| {
                let next = self.0.len() as u32;
                let channel = *self.0.entry(name.to_owned()).or_insert_with(|| {
                    declare.push(name.to_owned());
                    next
                });
                proto::ChannelBatch { channel, messages }
            })
            .collect();
        Frame::PublishMulti(proto::PublishMulti {
            batch_id,
            declare,
            parts,
        })
    }
}

/// The broker's answer on `r`, which must be an error with `code`.
async fn refused(r: &mut FrameReader, code: ErrorCode) -> Result<proto::ErrorFrame> {
    match r.next().await? {
        Some(Frame::Error(e)) if e.code == code => Ok(e),
        other => bail!("expected {code}, got {other:?}"),
    }
}

/// Messages stored on the channels named `prefix*`.
async fn stored_under(c: &directmq_client::Client, prefix: &str) -> Result<u64> {
    Ok(c.list_channels(prefix).await?.iter().map(|i| i.head).sum())
}

/// Opens a multi-channel publish stream by hand, as `producer_id`.
async fn open_multi(
    conn: &quinn::Connection,
    producer_id: &str,
) -> Result<(FrameWriter, FrameReader)> {
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv, 1 << 30);
    w.write(&Frame::OpenPublishMulti(proto::OpenPublishMulti {
        producer_id: producer_id.into(),
        create: true,
    }))
    .await?;
    match r.next().await? {
        Some(Frame::PublishOpened(_)) => Ok((w, r)),
        other => bail!("expected PublishOpened, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_a_bad_part_is_refused_whole_and_appends_nothing() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.max_message_bytes = 4096;
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;
    let conn = raw_connection(addr, dir.path()).await?;
    let (_control_w, _control_r, reply) = hello(&conn, proto::PROTOCOL_VERSION).await?;
    ensure!(matches!(reply, Some(Frame::HelloOk(_))), "{reply:?}");
    let message = |sequence, size: usize| proto::PublishMessage {
        sequence,
        headers: vec![],
        payload: Bytes::from(vec![3u8; size]),
    };
    // Each frame: a good part first, then one that must be refused.
    let cases: Vec<(&str, Vec<proto::PublishMessage>, ErrorCode)> = vec![
        (
            "multi/b",
            vec![message(1, 5000)],
            ErrorCode::MESSAGE_TOO_LARGE,
        ),
        (
            "no spaces allowed",
            vec![message(1, 10)],
            ErrorCode::INVALID_CHANNEL_NAME,
        ),
        (
            "multi/b",
            vec![message(5, 10), message(5, 10)],
            ErrorCode::INVALID_SEQUENCE,
        ),
    ];
    for (batch_id, (bad, messages, code)) in (1u64..).zip(cases) {
        let (mut w, mut r) = open_multi(&conn, "raw").await?;
        let frame = Numbering::default().frame(
            batch_id,
            vec![("multi/a", vec![message(batch_id, 10)]), (bad, messages)],
        );
        w.write(&frame).await?;
        let e = refused(&mut r, code).await?;
        ensure!(e.request_id == batch_id, "{e:?}");
        ensure!(
            r.next().await?.is_none(),
            "the stream stays open after a refusal"
        );
    }
    // Nothing of the good parts was appended.
    let c = client(addr, dir.path()).await?;
    let stored = stored_under(&c, "multi/").await?;
    ensure!(
        stored == 0,
        "{stored} messages of refused frames were stored"
    );
    // A part naming a number the stream never declared refuses the frame whole: the
    // declared part before it is not appended either.
    let (mut w, mut r) = open_multi(&conn, "raw3").await?;
    let mut frame = Numbering::default().frame(
        7,
        vec![
            ("multi/a", vec![message(1, 10)]),
            ("multi/b", vec![message(1, 10)]),
        ],
    );
    if let Frame::PublishMulti(multi) = &mut frame {
        multi.declare.pop();
    }
    w.write(&frame).await?;
    let e = refused(&mut r, ErrorCode::MALFORMED_FRAME).await?;
    ensure!(
        e.request_id == 7 && e.message.contains("channel number 1"),
        "{e:?}"
    );
    let stored = stored_under(&c, "multi/").await?;
    ensure!(
        stored == 0,
        "{stored} messages of a refused frame were stored"
    );
    // A channel deleted after the stream first used it refuses the next frame whole.
    let (mut w, mut r) = open_multi(&conn, "raw2").await?;
    let mut numbering = Numbering::default();
    w.write(&numbering.frame(1, vec![("multi/doomed", vec![message(1, 10)])]))
        .await?;
    ensure!(
        matches!(r.next().await?, Some(Frame::PublishMultiAck(_))),
        "the first frame is stored"
    );
    c.delete_channel("multi/doomed").await?;
    w.write(&numbering.frame(
        2,
        vec![
            ("multi/a", vec![message(100, 10)]),
            ("multi/doomed", vec![message(2, 10)]),
        ],
    ))
    .await?;
    let e = refused(&mut r, ErrorCode::CHANNEL_NOT_FOUND).await?;
    ensure!(e.request_id == 2, "{e:?}");
    // A multi-channel stream takes only PublishMulti frames.
    let (mut w, mut r) = open_multi(&conn, "raw").await?;
    w.write(&Frame::PublishBatch(proto::PublishBatch {
        batch_id: 9,
        messages: vec![message(1, 10)],
    }))
    .await?;
    refused(&mut r, ErrorCode::UNEXPECTED_FRAME).await?;
    // An invalid producer id is refused when the stream opens.
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv, 1 << 30);
    w.write(&Frame::OpenPublishMulti(proto::OpenPublishMulti {
        producer_id: "not valid!".into(),
        create: true,
    }))
    .await?;
    refused(&mut r, ErrorCode::INVALID_NAME).await?;
    // A stream declares a name once: again in the same frame, or in a later frame, refuses
    // the frame whole (its table grows with the channels it uses, not with repetitions).
    let (mut w, mut r) = open_multi(&conn, "raw4").await?;
    w.write(&Frame::PublishMulti(proto::PublishMulti {
        batch_id: 1,
        declare: vec!["twice/c".into(), "twice/c".into()],
        parts: vec![proto::ChannelBatch {
            channel: 1,
            messages: vec![message(1, 10)],
        }],
    }))
    .await?;
    let e = refused(&mut r, ErrorCode::MALFORMED_FRAME).await?;
    ensure!(e.message.contains("declared twice"), "{e:?}");
    let (mut w, mut r) = open_multi(&conn, "raw5").await?;
    let mut numbering = Numbering::default();
    w.write(&numbering.frame(1, vec![("twice/d", vec![message(1, 10)])]))
        .await?;
    ensure!(
        matches!(r.next().await?, Some(Frame::PublishMultiAck(_))),
        "the first declaration is taken"
    );
    w.write(&Frame::PublishMulti(proto::PublishMulti {
        batch_id: 2,
        declare: vec!["twice/d".into()],
        parts: vec![proto::ChannelBatch {
            channel: 1,
            messages: vec![message(2, 10)],
        }],
    }))
    .await?;
    let e = refused(&mut r, ErrorCode::MALFORMED_FRAME).await?;
    ensure!(e.request_id == 2, "{e:?}");
    let twice: Vec<(String, u64)> = c
        .list_channels("twice/")
        .await?
        .into_iter()
        .map(|i| (i.name, i.head))
        .collect();
    ensure!(
        twice == [("twice/d".to_owned(), 1)],
        "only the first frame's message is stored, and no channel of a refused frame is created: {twice:?}"
    );
    // And the broker still serves. The first message stored on multi/a gets offset 0:
    // no part of any refused frame above was appended there, not even one queued behind
    // the checks (which a read of the durable head alone could miss).
    let multi = c.multi_producer("fine", ProducerOptions::default()).await?;
    let receipt = multi.send("multi/a", "ok").await?;
    ensure!(receipt.offset == Some(0), "{receipt:?}");
    c.close().await;
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_budget_counts_a_whole_frame_not_each_part() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let config = directmq_broker::Config {
        // Each 100 KB part fits on its own; the two together do not.
        max_disk_bytes: 150_000,
        ..test_config(dir.path())
    };
    let running = directmq_broker::start(config).await?;
    let conn = raw_connection(running.quic_addr, dir.path()).await?;
    let (_control_w, _control_r, reply) = hello(&conn, proto::PROTOCOL_VERSION).await?;
    ensure!(matches!(reply, Some(Frame::HelloOk(_))), "{reply:?}");
    let (mut w, mut r) = open_multi(&conn, "big").await?;
    let message = || {
        vec![proto::PublishMessage {
            sequence: 1,
            headers: vec![],
            payload: Bytes::from(vec![5u8; 100_000]),
        }]
    };
    w.write(&Numbering::default().frame(1, vec![("budget/a", message()), ("budget/b", message())]))
        .await?;
    let e = refused(&mut r, ErrorCode::STORAGE_FULL).await?;
    ensure!(e.request_id == 1, "{e:?}");
    // Nothing of the frame was stored: the first message on budget/a gets offset 0.
    let c = client(running.quic_addr, dir.path()).await?;
    let receipt = c.producer("budget/a", "check").await?.send("x").await?;
    ensure!(receipt.offset == Some(0), "{receipt:?}");
    c.close().await;
    running.shutdown().await;
    Ok(())
}

/// The fsyncs of the broker serving `/metrics` at `http` so far.
async fn fsyncs(http: std::net::SocketAddr) -> Result<f64> {
    crate::operations::scrape(http)
        .await?
        .get("directmq_storage_fsyncs_total")
        .copied()
        .context("no fsync counter on /metrics")
}

/// An agent's first frame naming hundreds of channels the broker has never seen creates
/// them together, in a few group commits: opening them one by one took an fsync each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_channels_of_a_frame_are_created_in_a_few_fsyncs() -> Result<()> {
    directmq_tests::init_logging();
    const NEW: u32 = 300;
    let dir = tempfile::tempdir()?;
    // A broker of its own: the fsync counter of an in-process one counts other tests' too.
    let mut broker = ChildBroker::start(&crate::directmq_bin(), dir.path(), None)?;
    let conn = raw_connection(broker.quic, dir.path()).await?;
    let (_control_w, _control_r, reply) = hello(&conn, proto::PROTOCOL_VERSION).await?;
    ensure!(matches!(reply, Some(Frame::HelloOk(_))), "{reply:?}");
    let http = broker.http;
    let (mut w, mut r) = open_multi(&conn, "agent-new").await?;
    let before = fsyncs(http).await?;
    let names: Vec<String> = (0..NEW).map(|c| format!("dc-a/new/s{c:03}")).collect();
    let parts = (0..NEW)
        .map(|c| {
            let message = proto::PublishMessage {
                sequence: 1,
                headers: vec![],
                payload: payload(c, 0, 1, 64),
            };
            (names[c as usize].as_str(), vec![message])
        })
        .collect();
    w.write(&Numbering::default().frame(1, parts)).await?;
    match r.next().await? {
        Some(Frame::PublishMultiAck(ack)) => ensure!(
            ack.parts.len() == NEW as usize && ack.parts.iter().all(|p| p.appended == 1),
            "{ack:?}"
        ),
        other => bail!("expected PublishMultiAck, got {other:?}"),
    }
    // The log writer takes whatever is queued when it wakes, so how many groups the
    // creations fall into depends on timing (2 to 16 seen under load); awaited one by one
    // they need one each, NEW + 1 in all.
    let spent = fsyncs(http).await? - before;
    ensure!(
        spent < f64::from(NEW / 4),
        "{spent} fsyncs to create {NEW} channels and append a message to each"
    );
    let c = client(broker.quic, dir.path()).await?;
    let listed = c.list_channels("dc-a/new/").await?;
    ensure!(
        listed.len() == NEW as usize && listed.iter().all(|i| i.head == 1),
        "{} channels listed",
        listed.len()
    );
    c.close().await;
    broker.terminate()?;
    Ok(())
}

/// Channel creations pipelined on the control stream share group commits, and each still
/// gets its own answer in order: one that exists already (created earlier or earlier in
/// the same call) is refused with CHANNEL_EXISTS, a bad name with its own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_creations_share_group_commits() -> Result<()> {
    directmq_tests::init_logging();
    const NEW: u32 = 300;
    let dir = tempfile::tempdir()?;
    // A broker of its own: the fsync counter of an in-process one counts other tests' too.
    let mut broker = ChildBroker::start(&crate::directmq_bin(), dir.path(), None)?;
    let http = broker.http;
    let c = client(broker.quic, dir.path()).await?;
    c.create_channel("dc-a/made/s000").await?;
    let mut names: Vec<String> = (0..NEW).map(|i| format!("dc-a/made/s{i:03}")).collect();
    names.insert(10, "dc-a/made/s005".into());
    names.insert(20, "not a name".into());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let before = fsyncs(http).await?;
    let answers = c.create_channels(&refs).await?;
    let spent = fsyncs(http).await? - before;
    ensure!(answers.len() == refs.len(), "{} answers", answers.len());
    ensure!(
        answers[0].as_ref().err().and_then(|e| e.code()) == Some(ErrorCode::CHANNEL_EXISTS),
        "re-creating an existing channel: {:?}",
        answers[0]
    );
    ensure!(answers[5].is_ok(), "s005 the first time: {:?}", answers[5]);
    ensure!(
        answers[10].as_ref().err().and_then(|e| e.code()) == Some(ErrorCode::CHANNEL_EXISTS),
        "s005 the second time: {:?}",
        answers[10]
    );
    ensure!(
        answers[20].as_ref().err().and_then(|e| e.code()) == Some(ErrorCode::INVALID_CHANNEL_NAME),
        "a bad name: {:?}",
        answers[20]
    );
    let created = answers.iter().filter(|a| a.is_ok()).count();
    ensure!(created == NEW as usize - 1, "{created} created");
    // Awaited one by one they need an fsync each, NEW - 1 in all.
    ensure!(
        spent < f64::from(NEW / 4),
        "{spent} fsyncs to create {created} channels"
    );
    let listed = c.list_channels("dc-a/made/").await?;
    ensure!(
        listed.len() == NEW as usize,
        "{} channels listed",
        listed.len()
    );
    c.close().await;
    broker.terminate()?;
    Ok(())
}

/// An agent registers all its channels in one call, pipelined past the 512 requests sent
/// ahead: per channel, in order, the last sequence of a channel it published to, none for
/// a new one, an error of its own for one the broker refuses; publishing then goes on from
/// each answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_channels_answers_each_channel_in_order() -> Result<()> {
    directmq_tests::init_logging();
    const N: u32 = 700;
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let reg = |i: u32| format!("dc-a/reg/s{i:03}");
    let last = |i: u32| u64::from(i) * 10 + 7;
    let first = c
        .multi_producer("agent-r", ProducerOptions::default())
        .await?;
    for i in (0..N).step_by(3) {
        first.enqueue_with(&reg(i), last(i), vec![], "x").await?;
    }
    first.flush().await?;
    drop(first);

    let strict = c
        .multi_producer(
            "agent-r",
            ProducerOptions {
                create_channel: false,
                ..ProducerOptions::default()
            },
        )
        .await?;
    let mut names: Vec<String> = (0..N).map(reg).collect();
    names.push("not a name".into());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let answers = strict.open_channels(&refs).await?;
    ensure!(answers.len() == refs.len(), "{} answers", answers.len());
    let code =
        |a: &Result<Option<u64>, directmq_client::Error>| a.as_ref().err().and_then(|e| e.code());
    for i in 0..N {
        let answer = &answers[i as usize];
        if i % 3 == 0 {
            ensure!(
                matches!(answer, Ok(Some(s)) if *s == last(i)),
                "channel {i}: {answer:?}"
            );
        } else {
            ensure!(
                code(answer) == Some(ErrorCode::CHANNEL_NOT_FOUND),
                "channel {i}: {answer:?}"
            );
        }
    }
    ensure!(code(&answers[N as usize]) == Some(ErrorCode::INVALID_CHANNEL_NAME));
    // A registered channel goes on after its answer; a refused one stays refused.
    let receipt = strict.send(&reg(3), "next").await?;
    ensure!(
        receipt.sequence == last(3) + 1 && receipt.offset == Some(1),
        "{receipt:?}"
    );
    ensure!(strict.send(&reg(1), "no").await.is_err());

    // Allowed to create, the same producer gets no sequence for the new channels, whose
    // messages then start at sequence 0.
    let creating = c
        .multi_producer("agent-r", ProducerOptions::default())
        .await?;
    let answers = creating.open_channels(&refs[..N as usize]).await?;
    for (i, answer) in answers.iter().enumerate() {
        let expected = match i % 3 {
            0 if i == 3 => Some(last(3) + 1),
            0 => Some(last(i as u32)),
            _ => None,
        };
        ensure!(
            matches!(answer, Ok(s) if *s == expected),
            "channel {i}: {answer:?}"
        );
    }
    let receipt = creating.send(&reg(1), "first").await?;
    ensure!(
        receipt.sequence == 0 && receipt.offset == Some(0),
        "{receipt:?}"
    );
    c.close().await;
    running.shutdown().await;
    Ok(())
}

/// A caller that stops waiting for its control requests while they are still being written
/// (a timeout, a dropped future) leaves no half frame on the control stream: the next
/// request on the connection is answered. And the requests not yet sent are not sent: of
/// 200 creations abandoned at once, not all are made. The client's send window is made
/// tiny so that flow control stops the writes partway into the second request's frame
/// (sending all 200 would take over a hundred round trips).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_mid_write_leave_the_control_stream_usable() -> Result<()> {
    directmq_tests::init_logging();
    const N: usize = 200;
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let mut config = directmq_tests::client_config(running.quic_addr, dir.path())?;
    config.net.send_window_bytes = 100;
    let c = directmq_client::Client::connect(config).await?;
    let names: Vec<String> = (0..N).map(|i| format!("dc-a/abandoned/s{i:04}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let abandoned = tokio::time::timeout(Duration::ZERO, c.create_channels(&refs)).await;
    ensure!(
        abandoned.is_err(),
        "{N} requests were written and answered in one poll"
    );
    tokio::time::timeout(Duration::from_secs(20), c.create_channel("dc-a/after"))
        .await
        .context("the next request was never answered")?
        .context("the next request failed")?;
    let listed = c.list_channels("dc-a/after").await?;
    ensure!(
        listed.iter().any(|ch| ch.name == "dc-a/after"),
        "the channel was not created: {listed:?}"
    );
    let made = c.list_channels("dc-a/abandoned/").await?.len();
    ensure!(made < N, "all {N} abandoned creations were still sent");
    c.close().await;
    running.shutdown().await;
    Ok(())
}
