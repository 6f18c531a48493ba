//! The producer: pipelined, batched publishing with sequence numbers that make retries safe.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use directmq_protocol::{self as proto, ErrorCode, Frame, Headers, PublishMessage};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::stream::{self, Incoming};
use crate::{Client, Error, FrameWriter};

/// Tuning of a producer.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// Most messages in one batch.
    pub max_batch_messages: usize,
    /// A batch is closed once its payloads reach this size.
    pub max_batch_bytes: usize,
    /// Most batches sent but not yet acknowledged.
    pub max_in_flight_batches: usize,
    /// Most payload bytes sent but not yet acknowledged (checked before each batch is sent,
    /// so one batch may take it over). At the default a 64 MiB message travels alone: its
    /// transfer, write and fsync are not overlapped with the next one's; raise it for
    /// large messages (at 256 MiB, 64 MiB messages publish ~1.5x faster, docs/benchmarks.md).
    pub max_in_flight_bytes: usize,
    /// Create the channel on first publish.
    pub create_channel: bool,
    /// A broker refusing with STORAGE_FULL is retried with pauses (nothing is lost); after
    /// this long without an ack the pending messages fail with that error instead, so an
    /// agent can surface it. `None` (the default): retry until room is made.
    pub storage_full_timeout: Option<Duration>,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            max_batch_messages: 2048,
            max_batch_bytes: 1024 * 1024,
            max_in_flight_batches: 64,
            max_in_flight_bytes: 64 * 1024 * 1024,
            create_channel: true,
            storage_full_timeout: None,
        }
    }
}

/// Where a message was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub sequence: u64,
    /// The message's offset; `None` for a duplicate the broker no longer remembers.
    pub offset: Option<u64>,
    /// Whether the broker had already appended this sequence before.
    pub duplicate: bool,
}

/// The acknowledgement of one queued message; await it.
#[derive(Debug)]
pub struct PendingAck(oneshot::Receiver<Result<Receipt, Error>>);

impl Future for PendingAck {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

type Waiter = oneshot::Sender<Result<Receipt, Error>>;

enum Cmd {
    Publish(PublishMessage, Waiter),
    Flush(oneshot::Sender<()>),
}

/// Publishes to one channel as one producer id. Messages are sent at once, batched while
/// earlier batches are in flight, and each acknowledgement comes after the broker made the
/// message durable. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Producer {
    tx: mpsc::Sender<Cmd>,
    next_sequence: Mutex<u64>,
    opened_last_sequence: Option<u64>,
    max_message_bytes: u64,
}

impl Producer {
    pub(crate) async fn open(
        client: Client,
        channel: &str,
        producer_id: &str,
        options: ProducerOptions,
    ) -> Result<Producer, Error> {
        let open = proto::OpenPublish {
            channel: channel.to_owned(),
            producer_id: producer_id.to_owned(),
            create: options.create_channel,
        };
        let stream = open_stream(&client, &open).await?;
        let last = stream.last_sequence;
        let max_message_bytes = stream.max_message_bytes;
        let (tx, rx) = mpsc::channel(4096);
        let task = Task {
            client,
            open,
            options,
            rx,
            stream: Some(stream),
            queued: VecDeque::new(),
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            next_batch_id: 1,
            flushes: Vec::new(),
            full_since: None,
        };
        tokio::spawn(task.run());
        Ok(Producer {
            tx,
            next_sequence: Mutex::new(last.map_or(0, |s| s + 1)),
            opened_last_sequence: last,
            max_message_bytes,
        })
    }

    /// The last sequence the broker had appended for this producer when it was opened:
    /// an agent resumes its source log after it.
    pub fn last_sequence(&self) -> Option<u64> {
        self.opened_last_sequence
    }

    /// Publishes and waits until the message is durable.
    pub async fn send(&self, payload: impl Into<Bytes>) -> Result<Receipt, Error> {
        self.enqueue(payload).await?.await
    }

    /// Queues a message with the next sequence number and returns its pending ack, so one
    /// task can keep many messages in flight.
    pub async fn enqueue(&self, payload: impl Into<Bytes>) -> Result<PendingAck, Error> {
        let mut next = self.next_sequence.lock().await;
        let sequence = *next;
        let ack = self.push(sequence, Vec::new(), payload.into()).await?;
        *next = sequence + 1;
        Ok(ack)
    }

    /// Queues a message with an explicit sequence (for example the source log position).
    /// Sequences must strictly increase; one at or below the last appended one is answered
    /// as a duplicate and not stored again.
    pub async fn enqueue_with(
        &self,
        sequence: u64,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<PendingAck, Error> {
        let mut next = self.next_sequence.lock().await;
        let ack = self.push(sequence, headers, payload.into()).await?;
        *next = (*next).max(sequence + 1);
        Ok(ack)
    }

    async fn push(
        &self,
        sequence: u64,
        headers: Headers,
        payload: Bytes,
    ) -> Result<PendingAck, Error> {
        if payload.len() as u64 > self.max_message_bytes {
            return Err(Error::MessageTooLarge {
                size: payload.len() as u64,
                max: self.max_message_bytes,
            });
        }
        let (waiter, ack) = oneshot::channel();
        let message = PublishMessage {
            sequence,
            headers,
            payload,
        };
        self.tx
            .send(Cmd::Publish(message, waiter))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(PendingAck(ack))
    }

    /// Waits until every message queued so far is acknowledged (or failed).
    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }
}

struct Stream {
    writer: FrameWriter,
    incoming: Incoming,
    last_sequence: Option<u64>,
    max_message_bytes: u64,
}

async fn open_stream(client: &Client, open: &proto::OpenPublish) -> Result<Stream, Error> {
    let first = Frame::OpenPublish(open.clone());
    let (writer, reader, answer, max_message_bytes) =
        stream::open(client, first, "publish").await?;
    let Frame::PublishOpened(opened) = answer else {
        return Err(Error::Protocol(format!(
            "expected PublishOpened, got {}",
            answer.name()
        )));
    };
    Ok(Stream {
        writer,
        incoming: Incoming::spawn(reader, 256, "publish"),
        last_sequence: opened.last_sequence,
        max_message_bytes,
    })
}

struct InFlight {
    batch: proto::PublishBatch,
    waiters: Vec<Waiter>,
    bytes: usize,
}

struct Task {
    client: Client,
    open: proto::OpenPublish,
    options: ProducerOptions,
    rx: mpsc::Receiver<Cmd>,
    stream: Option<Stream>,
    queued: VecDeque<(PublishMessage, Waiter)>,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    next_batch_id: u64,
    flushes: Vec<oneshot::Sender<()>>,
    /// Since when the broker has refused with STORAGE_FULL without an ack in between.
    full_since: Option<tokio::time::Instant>,
}

/// Broker refusals worth retrying with the same batch after a pause.
fn retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::STORAGE_FULL | ErrorCode::SHUTTING_DOWN | ErrorCode::STORAGE_ERROR
    )
}

impl Task {
    async fn run(mut self) {
        let mut closing = false;
        let mut backoff = Duration::from_millis(20);
        loop {
            if closing && self.queued.is_empty() && self.in_flight.is_empty() {
                self.resolve_flushes();
                return;
            }
            let pending = !self.queued.is_empty() || !self.in_flight.is_empty();
            if self.stream.is_none() && !pending {
                // Nothing to send: open a stream only when there is.
                match self.rx.recv().await {
                    Some(cmd) => self.take(cmd),
                    None => closing = true,
                }
                self.resolve_flushes();
                continue;
            }
            if self.stream.is_none() {
                match self.reopen().await {
                    Ok(()) => backoff = Duration::from_millis(20),
                    Err(e) if e.is_transient() => {
                        tracing::debug!(error = %e, "publish stream unavailable; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                    Err(e) => {
                        self.fail_all(e);
                        self.resolve_flushes();
                        continue;
                    }
                }
            }
            self.send_batches().await;
            let accepting = !closing && self.in_flight_bytes < self.options.max_in_flight_bytes;
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            tokio::select! {
                biased;
                frame = stream.incoming.frames.recv() => {
                    match frame {
                        Some(Ok(frame)) => {
                            if let Some(pause) = self.on_frame(frame) {
                                tokio::time::sleep(pause).await;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "publish stream broke; resending in-flight batches");
                            self.stream = None;
                        }
                        None => self.stream = None,
                    }
                }
                cmd = self.rx.recv(), if accepting => match cmd {
                    Some(cmd) => {
                        self.take(cmd);
                        while self.queued.len() < self.options.max_batch_messages * 4 {
                            match self.rx.try_recv() {
                                Ok(cmd) => self.take(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => closing = true,
                },
            }
            self.resolve_flushes();
        }
    }

    fn take(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Publish(message, waiter) => self.queued.push_back((message, waiter)),
            Cmd::Flush(done) => self.flushes.push(done),
        }
    }

    fn resolve_flushes(&mut self) {
        if self.queued.is_empty() && self.in_flight.is_empty() {
            for done in self.flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    async fn reopen(&mut self) -> Result<(), Error> {
        let mut stream = open_stream(&self.client, &self.open).await?;
        // Resend, in order, everything not acknowledged: the broker answers the batches it
        // already appended with their original offsets and appends the rest.
        for in_flight in &self.in_flight {
            stream
                .writer
                .write(&Frame::PublishBatch(in_flight.batch.clone()))
                .await?;
        }
        self.stream = Some(stream);
        Ok(())
    }

    async fn send_batches(&mut self) {
        while !self.queued.is_empty()
            && self.in_flight.len() < self.options.max_in_flight_batches
            && self.in_flight_bytes < self.options.max_in_flight_bytes
        {
            let mut messages = Vec::new();
            let mut waiters = Vec::new();
            let mut bytes = 0usize;
            while let Some((message, _)) = self.queued.front() {
                let size = message.payload.len();
                if !messages.is_empty()
                    && (messages.len() >= self.options.max_batch_messages
                        || bytes + size > self.options.max_batch_bytes)
                {
                    break;
                }
                let (message, waiter) = self.queued.pop_front().expect("front exists");
                bytes += size;
                messages.push(message);
                waiters.push(waiter);
            }
            let batch = proto::PublishBatch {
                batch_id: self.next_batch_id,
                messages,
            };
            self.next_batch_id += 1;
            let frame = Frame::PublishBatch(batch);
            let written = match self.stream.as_mut() {
                Some(stream) => stream.writer.write(&frame).await,
                None => Ok(()),
            };
            let Frame::PublishBatch(batch) = frame else {
                unreachable!()
            };
            self.in_flight_bytes += bytes;
            self.in_flight.push_back(InFlight {
                batch,
                waiters,
                bytes,
            });
            if written.is_err() {
                // Resent after the reconnect.
                self.stream = None;
                return;
            }
        }
    }

    /// Handles a frame from the broker; returns a pause before the next attempt when the
    /// broker asked to back off.
    fn on_frame(&mut self, frame: Frame) -> Option<Duration> {
        match frame {
            Frame::PublishAck(ack) => {
                self.full_since = None;
                let Some(front) = self.in_flight.front() else {
                    self.protocol_error("an ack for no batch in flight");
                    return None;
                };
                if front.batch.batch_id != ack.batch_id {
                    self.protocol_error("acks out of order");
                    return None;
                }
                let done = self.in_flight.pop_front().expect("front exists");
                self.in_flight_bytes -= done.bytes;
                let mut next_offset = ack.first_offset;
                let mut dups = ack.duplicates.iter().peekable();
                for (i, (waiter, message)) in done
                    .waiters
                    .into_iter()
                    .zip(done.batch.messages.iter())
                    .enumerate()
                {
                    let receipt = match dups.peek() {
                        Some(d) if d.index as usize == i => {
                            let d = dups.next().expect("peeked");
                            Receipt {
                                sequence: message.sequence,
                                offset: d.offset,
                                duplicate: true,
                            }
                        }
                        _ => {
                            let offset = next_offset;
                            next_offset += 1;
                            Receipt {
                                sequence: message.sequence,
                                offset: Some(offset),
                                duplicate: false,
                            }
                        }
                    };
                    let _ = waiter.send(Ok(receipt));
                }
                None
            }
            Frame::Error(e) => {
                // The broker closes the stream after any batch error and processes nothing
                // after it, so every later batch is resent on the next stream.
                self.stream = None;
                if retryable(e.code) {
                    let since = if e.code == ErrorCode::STORAGE_FULL {
                        *self
                            .full_since
                            .get_or_insert_with(tokio::time::Instant::now)
                    } else {
                        tokio::time::Instant::now()
                    };
                    let give_up = self
                        .options
                        .storage_full_timeout
                        .is_some_and(|limit| since.elapsed() >= limit);
                    if !give_up {
                        tracing::warn!(code = %e.code, message = %e.message, "broker asked to back off; retrying");
                        return Some(Duration::from_millis(200));
                    }
                    self.full_since = None;
                    self.fail_all(Error::from_frame(e));
                    return None;
                }
                let error = Error::from_frame(e.clone());
                match self.in_flight.front() {
                    Some(front) if e.request_id == front.batch.batch_id => {
                        let failed = self.in_flight.pop_front().expect("front exists");
                        self.in_flight_bytes -= failed.bytes;
                        for waiter in failed.waiters {
                            let _ = waiter.send(Err(error.clone()));
                        }
                    }
                    _ => self.fail_all(error),
                }
                None
            }
            other => {
                self.protocol_error(other.name());
                None
            }
        }
    }

    fn protocol_error(&mut self, what: &str) {
        tracing::warn!(what, "unexpected frame on the publish stream; reopening it");
        self.stream = None;
    }

    fn fail_all(&mut self, error: Error) {
        // Nothing is pending any more: a later STORAGE_FULL starts a new wait.
        self.full_since = None;
        for in_flight in self.in_flight.drain(..) {
            for waiter in in_flight.waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        self.in_flight_bytes = 0;
        for (_, waiter) in self.queued.drain(..) {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}
