//! The consumer: one session of a durable consumer, with credit-based flow control,
//! cumulative commits and resumption after reconnects.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use directmq_protocol::{self as proto, ErrorCode, Frame, Headers, StartPosition};
use tokio::sync::{mpsc, oneshot};

use crate::stream::{self, Incoming};
use crate::{Client, Error, FrameWriter};

/// Messages the broker may send ahead of what the application has taken.
const CREDIT_MESSAGES: u32 = 16384;
/// Payload bytes the broker may send ahead.
const CREDIT_BYTES: u64 = 16 * 1024 * 1024;

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: Arc<str>,
    pub offset: u64,
    /// Broker append time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub headers: Headers,
    pub payload: Bytes,
}

enum Cmd {
    Commit(u64, Option<oneshot::Sender<Result<(), Error>>>),
    Taken { messages: u32, bytes: u64 },
}

/// A session of a durable consumer. Messages arrive in offset order without gaps; after a
/// reconnect delivery resumes after the last commit, and messages this session already
/// yielded are not yielded again.
#[derive(Debug)]
pub struct Consumer {
    /// A delivery's messages at a time: one channel operation per delivery, not per message.
    messages: mpsc::UnboundedReceiver<Result<Vec<Message>, Error>>,
    /// Received and not yet yielded.
    buffered: std::collections::VecDeque<Message>,
    cmd: mpsc::UnboundedSender<Cmd>,
    first_offset: u64,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Consumer {
    pub(crate) async fn open(
        client: Client,
        channel: &str,
        name: &str,
        start: StartPosition,
        standby: bool,
    ) -> Result<Consumer, Error> {
        let subscribe = proto::Subscribe {
            channel: channel.to_owned(),
            consumer: name.to_owned(),
            start,
            credit_messages: CREDIT_MESSAGES,
            credit_bytes: CREDIT_BYTES,
            standby,
        };
        let (stream, subscribed) = open_stream(&client, &subscribe).await?;
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = Task {
            client,
            subscribe,
            channel: channel.into(),
            stream: Some(stream),
            next: subscribed.next_offset,
            messages: messages_tx,
            cmd: cmd_rx,
            commit_requested: None,
            commit_waiters: Vec::new(),
            taken_messages: 0,
            taken_bytes: 0,
            dropped: dropped.clone(),
        };
        tokio::spawn(task.run());
        Ok(Consumer {
            messages,
            buffered: std::collections::VecDeque::new(),
            cmd,
            first_offset: subscribed.next_offset,
            dropped,
        })
    }

    /// Offsets this session skipped because the broker no longer stored them when it got
    /// there: a drop-oldest retention bound moved the consumer past them. 0 unless the
    /// channel opted into drop-oldest.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The offset delivery started at (the committed offset when the session opened).
    pub fn start_offset(&self) -> u64 {
        self.first_offset
    }

    /// The next message; `None` once the consumer is closed for good.
    pub async fn next(&mut self) -> Option<Result<Message, Error>> {
        if let Some(message) = self.buffered.pop_front() {
            return Some(Ok(message));
        }
        let batch = match self.messages.recv().await? {
            Ok(batch) => batch,
            Err(e) => return Some(Err(e)),
        };
        // Taken once in this consumer's hands: the broker's credit bounds what is buffered
        // here, and the application drains it.
        let _ = self.cmd.send(Cmd::Taken {
            messages: batch.len() as u32,
            bytes: batch.iter().map(|m| m.payload.len() as u64).sum(),
        });
        self.buffered.extend(batch);
        self.buffered.pop_front().map(Ok)
    }

    /// Commits every offset below `offset` and waits until the commit is durable.
    pub async fn commit(&self, offset: u64) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Commit(offset, Some(tx)))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Commits every offset below `offset` without waiting.
    pub fn commit_nowait(&self, offset: u64) {
        let _ = self.cmd.send(Cmd::Commit(offset, None));
    }
}

struct Stream {
    writer: FrameWriter,
    incoming: Incoming,
}

async fn open_stream(
    client: &Client,
    subscribe: &proto::Subscribe,
) -> Result<(Stream, proto::Subscribed), Error> {
    let first = Frame::Subscribe(subscribe.clone());
    let (writer, reader, answer, _) = stream::open(client, first, "consume").await?;
    let Frame::Subscribed(subscribed) = answer else {
        return Err(Error::Protocol(format!(
            "expected Subscribed, got {}",
            answer.name()
        )));
    };
    let incoming = Incoming::spawn(reader, 64, "consume");
    Ok((Stream { writer, incoming }, subscribed))
}

struct Task {
    client: Client,
    subscribe: proto::Subscribe,
    channel: Arc<str>,
    stream: Option<Stream>,
    /// The next offset to hand to the application.
    next: u64,
    messages: mpsc::UnboundedSender<Result<Vec<Message>, Error>>,
    cmd: mpsc::UnboundedReceiver<Cmd>,
    commit_requested: Option<u64>,
    commit_waiters: Vec<(u64, oneshot::Sender<Result<(), Error>>)>,
    taken_messages: u32,
    taken_bytes: u64,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Task {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(20);
        loop {
            if self.messages.is_closed() {
                return;
            }
            if self.stream.is_none() {
                match self.reopen().await {
                    Ok(()) => backoff = Duration::from_millis(20),
                    Err(e) if e.is_transient() || e.code() == Some(ErrorCode::CONSUMER_BUSY) => {
                        // The broker may still hold the old session's lease until it notices
                        // that connection is gone.
                        tracing::debug!(error = %e, "consume stream unavailable; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                    Err(e) => {
                        self.fail(e);
                        return;
                    }
                }
            }
            let stream = self.stream.as_mut().expect("opened above");
            tokio::select! {
                frame = stream.incoming.frames.recv() => match frame {
                    Some(Ok(frame)) => {
                        if let Err(e) = self.on_frame(frame).await {
                            self.fail(e);
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "consume stream broke; resubscribing");
                        self.stream = None;
                    }
                    None => self.stream = None,
                },
                cmd = self.cmd.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => return,
                },
            }
        }
    }

    async fn reopen(&mut self) -> Result<(), Error> {
        let (mut stream, subscribed) = open_stream(&self.client, &self.subscribe).await?;
        // At least once: the broker restarts at its committed offset; what this session
        // already yielded is skipped. If the consumer was moved forward, follow it.
        if subscribed.next_offset > self.next {
            self.dropped.fetch_add(
                subscribed.next_offset - self.next,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        self.next = self.next.max(subscribed.next_offset);
        if let Some(offset) = self.commit_requested {
            stream
                .writer
                .write(&Frame::Commit(proto::Commit { offset }))
                .await?;
        }
        self.taken_messages = 0;
        self.taken_bytes = 0;
        self.stream = Some(stream);
        Ok(())
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), Error> {
        match frame {
            Frame::Deliver(deliver) => {
                let mut batch = Vec::with_capacity(deliver.messages.len());
                for m in deliver.messages {
                    if m.offset < self.next {
                        // Redelivered after a reconnect; the application already has it. It
                        // still used credit.
                        self.taken_messages += 1;
                        self.taken_bytes += m.payload.len() as u64;
                        continue;
                    }
                    if m.offset != self.next {
                        // What came before the bad one is in order: the application gets it
                        // (`next` already counts it).
                        if !batch.is_empty() {
                            let _ = self.messages.send(Ok(batch));
                        }
                        return Err(Error::Protocol(format!(
                            "expected offset {}, the broker sent {}",
                            self.next, m.offset
                        )));
                    }
                    self.next += 1;
                    let message = Message {
                        channel: self.channel.clone(),
                        offset: m.offset,
                        timestamp_ms: m.timestamp_ms,
                        headers: m.headers,
                        payload: m.payload,
                    };
                    batch.push(message);
                }
                if !batch.is_empty() && self.messages.send(Ok(batch)).is_err() {
                    return Ok(());
                }
                self.grant().await;
                Ok(())
            }
            Frame::CommitOk(ok) => {
                let mut i = 0;
                while i < self.commit_waiters.len() {
                    if self.commit_waiters[i].0 <= ok.offset {
                        let (_, waiter) = self.commit_waiters.swap_remove(i);
                        let _ = waiter.send(Ok(()));
                    } else {
                        i += 1;
                    }
                }
                if self.commit_requested.is_some_and(|r| r <= ok.offset) {
                    self.commit_requested = None;
                }
                Ok(())
            }
            Frame::Error(e) => {
                let error = Error::from_frame(e);
                if error.is_transient() {
                    self.stream = None;
                    return Ok(());
                }
                if error.code() == Some(ErrorCode::MESSAGES_DROPPED) {
                    // Subscribing again starts at the committed offset, which the broker
                    // moved past what it dropped; `reopen` follows it and counts the skip.
                    tracing::warn!(channel = %self.channel, %error, "messages were dropped before this consumer read them");
                    self.stream = None;
                    return Ok(());
                }
                if error.code() == Some(ErrorCode::OFFSET_OUT_OF_RANGE) {
                    // A refused commit fails its waiters; the session goes on.
                    for (_, waiter) in self.commit_waiters.drain(..) {
                        let _ = waiter.send(Err(error.clone()));
                    }
                    self.commit_requested = None;
                    return Ok(());
                }
                Err(error)
            }
            other => Err(Error::Protocol(format!(
                "unexpected {} on a consume stream",
                other.name()
            ))),
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Commit(offset, waiter) => {
                if let Some(waiter) = waiter {
                    self.commit_waiters.push((offset, waiter));
                }
                // Commits are cumulative: never send one below what was already asked.
                let offset = self.commit_requested.map_or(offset, |r| r.max(offset));
                self.commit_requested = Some(offset);
                let frame = Frame::Commit(proto::Commit { offset });
                if let Some(stream) = self.stream.as_mut() {
                    if stream.writer.write(&frame).await.is_err() {
                        self.stream = None;
                    }
                }
            }
            Cmd::Taken { messages, bytes } => {
                self.taken_messages += messages;
                self.taken_bytes += bytes;
                self.grant().await;
            }
        }
    }

    /// Gives credit back in steps of a quarter of the window, not per message.
    async fn grant(&mut self) {
        if self.taken_messages < CREDIT_MESSAGES / 4 && self.taken_bytes < CREDIT_BYTES / 4 {
            return;
        }
        let frame = Frame::Credit(proto::Credit {
            messages: self.taken_messages,
            bytes: self.taken_bytes,
        });
        self.taken_messages = 0;
        self.taken_bytes = 0;
        if let Some(stream) = self.stream.as_mut() {
            if stream.writer.write(&frame).await.is_err() {
                self.stream = None;
            }
        }
    }

    fn fail(&mut self, error: Error) {
        for (_, waiter) in self.commit_waiters.drain(..) {
            let _ = waiter.send(Err(error.clone()));
        }
        let _ = self.messages.send(Err(error));
    }
}
