//! The producer: pipelined, batched publishing with sequence numbers that make retries safe.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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
    /// A message, for the stream's channel or (on a multi-channel stream) the one named.
    Publish(Option<Arc<str>>, PublishMessage, Waiter),
    Flush(oneshot::Sender<()>),
}

/// What a publish stream is opened for.
#[derive(Clone)]
enum Mode {
    Single(proto::OpenPublish),
    Multi(proto::OpenPublishMulti),
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
        let open = Mode::Single(proto::OpenPublish {
            channel: channel.to_owned(),
            producer_id: producer_id.to_owned(),
            create: options.create_channel,
        });
        let (tx, stream) = Task::spawn(client, open, options).await?;
        let last = stream.0;
        let max_message_bytes = stream.1;
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
        queue(
            &self.tx,
            self.max_message_bytes,
            None,
            sequence,
            headers,
            payload,
        )
        .await
    }

    /// Waits until every message queued so far is acknowledged (or failed).
    pub async fn flush(&self) -> Result<(), Error> {
        flush(&self.tx).await
    }
}

/// Publishes to many channels as one producer id over one stream: each frame carries the
/// batches of every channel with queued messages and gets one ack, so a producer agent
/// for thousands of shards pays per frame what it would pay for one channel (§4.2.1 of
/// docs/protocol.md). Per channel, messages keep their order and have their own sequence
/// numbers; after a reconnect unacknowledged frames are resent and the broker appends
/// each sequence once, as for a [`Producer`]. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct MultiProducer {
    client: Client,
    producer_id: String,
    tx: mpsc::Sender<Cmd>,
    /// Per registered channel, the next sequence.
    next: Mutex<HashMap<Arc<str>, u64>>,
    max_message_bytes: u64,
    /// `ProducerOptions::create_channel`.
    create: bool,
}

impl MultiProducer {
    pub(crate) async fn open(
        client: Client,
        producer_id: &str,
        options: ProducerOptions,
    ) -> Result<MultiProducer, Error> {
        proto::validate_identifier(producer_id).map_err(|e| Error::Broker {
            code: ErrorCode::INVALID_NAME,
            message: format!("invalid producer id {producer_id:?}: {e}"),
        })?;
        let create = options.create_channel;
        let open = Mode::Multi(proto::OpenPublishMulti {
            producer_id: producer_id.to_owned(),
            create,
        });
        let (tx, (_, max_message_bytes)) = Task::spawn(client.clone(), open, options).await?;
        Ok(MultiProducer {
            client,
            producer_id: producer_id.to_owned(),
            tx,
            next: Mutex::new(HashMap::new()),
            max_message_bytes,
            create,
        })
    }

    /// Registers `channel` and answers the last sequence the broker appended for this
    /// producer on it (`None` for a new channel): an agent resumes its source log after it.
    /// The first message for a channel registers it too. A name the broker would refuse,
    /// or a channel this identity may not publish to, fails here, before it can hold up
    /// the messages for other channels sharing a frame with it.
    pub async fn open_channel(&self, channel: &str) -> Result<Option<u64>, Error> {
        let mut next = self.next.lock().await;
        self.register(&mut next, channel)
            .await
            .map(|(_, last)| last)
    }

    /// [`MultiProducer::open_channel`] for many channels at once: the broker is asked about
    /// all of them pipelined, a round trip per 512 where registering them one by one cost a
    /// round trip each (minutes for an agent of 10,000 shards across a WAN). One answer per
    /// channel, in order; a refused channel is not registered and does not affect the
    /// others. `Err` only when the connection fails.
    pub async fn open_channels(
        &self,
        channels: &[&str],
    ) -> Result<Vec<Result<Option<u64>, Error>>, Error> {
        let mut answers: Vec<Option<Result<Option<u64>, Error>>> = Vec::new();
        let mut ask = Vec::new();
        {
            let next = self.next.lock().await;
            for (i, channel) in channels.iter().enumerate() {
                answers.push(match next.get(*channel) {
                    Some(seq) => Some(Ok(seq.checked_sub(1))),
                    None => match checked_name(channel) {
                        Ok(()) => {
                            ask.push(i);
                            None
                        }
                        Err(e) => Some(Err(e)),
                    },
                });
            }
        }
        // Asked without holding the registry: messages for registered channels go on
        // meanwhile.
        let names: Vec<&str> = ask.iter().map(|&i| channels[i]).collect();
        let asked = self
            .client
            .last_sequences(&names, &self.producer_id)
            .await?;
        let mut next = self.next.lock().await;
        for (i, answer) in ask.into_iter().zip(asked) {
            let answer = self.accept(answer);
            if let Ok(last) = answer {
                // A channel registered meanwhile (its first message) keeps its sequence.
                next.entry(Arc::from(channels[i]))
                    .or_insert(last.map_or(0, |s| s + 1));
            }
            answers[i] = Some(answer);
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every channel answered"))
            .collect())
    }

    /// The channel's name as registered (registering it first if new) and its next
    /// sequence. The name is cloned once, for the message: each clone and drop writes the
    /// count's cache line, which the producer task, on another thread, writes too.
    async fn registered(
        &self,
        next: &mut HashMap<Arc<str>, u64>,
        channel: &str,
    ) -> Result<(Arc<str>, u64), Error> {
        if let Some((name, seq)) = next.get_key_value(channel) {
            return Ok((name.clone(), *seq));
        }
        let (name, _) = self.register(next, channel).await?;
        let seq = next[&name];
        Ok((name, seq))
    }

    async fn register(
        &self,
        next: &mut HashMap<Arc<str>, u64>,
        channel: &str,
    ) -> Result<(Arc<str>, Option<u64>), Error> {
        if let Some((name, seq)) = next.get_key_value(channel) {
            return Ok((name.clone(), seq.checked_sub(1)));
        }
        checked_name(channel)?;
        let last = self.accept(self.client.last_sequence(channel, &self.producer_id).await)?;
        let name: Arc<str> = Arc::from(channel);
        next.insert(name.clone(), last.map_or(0, |s| s + 1));
        Ok((name, last))
    }

    /// A channel's last sequence as the broker answered it. A missing channel is created by
    /// its first message when creation is on; otherwise it is refused here, before its
    /// first message could make a whole shared frame fail.
    fn accept(&self, answer: Result<Option<u64>, Error>) -> Result<Option<u64>, Error> {
        match answer {
            Err(e) if e.code() == Some(ErrorCode::CHANNEL_NOT_FOUND) && self.create => Ok(None),
            other => other,
        }
    }

    /// Publishes to `channel` and waits until the message is durable.
    pub async fn send(&self, channel: &str, payload: impl Into<Bytes>) -> Result<Receipt, Error> {
        self.enqueue(channel, payload).await?.await
    }

    /// Queues a message for `channel` with its next sequence number and returns its
    /// pending ack.
    pub async fn enqueue(
        &self,
        channel: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PendingAck, Error> {
        let mut next = self.next.lock().await;
        let (name, sequence) = self.registered(&mut next, channel).await?;
        let ack = self
            .push(name, sequence, Vec::new(), payload.into())
            .await?;
        *next.get_mut(channel).expect("registered above") = sequence + 1;
        Ok(ack)
    }

    /// Queues a message for `channel` with an explicit sequence; as
    /// [`Producer::enqueue_with`].
    pub async fn enqueue_with(
        &self,
        channel: &str,
        sequence: u64,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<PendingAck, Error> {
        let mut next = self.next.lock().await;
        let (name, _) = self.registered(&mut next, channel).await?;
        let ack = self.push(name, sequence, headers, payload.into()).await?;
        let after = next.get_mut(channel).expect("registered above");
        *after = (*after).max(sequence + 1);
        Ok(ack)
    }

    async fn push(
        &self,
        channel: Arc<str>,
        sequence: u64,
        headers: Headers,
        payload: Bytes,
    ) -> Result<PendingAck, Error> {
        let max = self.max_message_bytes;
        queue(&self.tx, max, Some(channel), sequence, headers, payload).await
    }

    /// Waits until every message queued so far is acknowledged (or failed).
    pub async fn flush(&self) -> Result<(), Error> {
        flush(&self.tx).await
    }
}

/// A channel name the broker would accept, checked before asking it.
fn checked_name(channel: &str) -> Result<(), Error> {
    proto::validate_channel_name(channel).map_err(|e| Error::Broker {
        code: ErrorCode::INVALID_CHANNEL_NAME,
        message: format!("invalid channel name {channel:?}: {e}"),
    })
}

/// Hands a message to a producer task; its ack resolves the returned future.
async fn queue(
    tx: &mpsc::Sender<Cmd>,
    max_message_bytes: u64,
    channel: Option<Arc<str>>,
    sequence: u64,
    headers: Headers,
    payload: Bytes,
) -> Result<PendingAck, Error> {
    if payload.len() as u64 > max_message_bytes {
        return Err(Error::MessageTooLarge {
            size: payload.len() as u64,
            max: max_message_bytes,
        });
    }
    let (waiter, ack) = oneshot::channel();
    let message = PublishMessage {
        sequence,
        headers,
        payload,
    };
    tx.send(Cmd::Publish(channel, message, waiter))
        .await
        .map_err(|_| Error::Closed)?;
    Ok(PendingAck(ack))
}

/// Resolves once a producer task has everything queued before acknowledged (or failed).
async fn flush(tx: &mpsc::Sender<Cmd>) -> Result<(), Error> {
    let (done, rx) = oneshot::channel();
    tx.send(Cmd::Flush(done)).await.map_err(|_| Error::Closed)?;
    rx.await.map_err(|_| Error::Closed)
}

struct Stream {
    writer: FrameWriter,
    incoming: Incoming,
    last_sequence: Option<u64>,
    max_message_bytes: u64,
    /// On a multi-channel stream, the channels its frames declared, by number.
    numbers: HashMap<Arc<str>, u32>,
}

async fn open_stream(client: &Client, open: &Mode) -> Result<Stream, Error> {
    let first = match open {
        Mode::Single(open) => Frame::OpenPublish(open.clone()),
        Mode::Multi(open) => Frame::OpenPublishMulti(open.clone()),
    };
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
        numbers: HashMap::new(),
    })
}

/// Numbers the parts of a multi-channel `frame` (their channels are `names`) on a stream
/// whose frames declared the channels in `numbers`: a channel new to the stream is declared
/// by this frame. Run for each frame in the order it is written, again on a new stream.
fn number_parts(frame: &mut Frame, names: &[Arc<str>], numbers: &mut HashMap<Arc<str>, u32>) {
    let Frame::PublishMulti(multi) = frame else {
        return;
    };
    multi.declare.clear();
    for (part, name) in multi.parts.iter_mut().zip(names) {
        part.channel = match numbers.get(name) {
            Some(&number) => number,
            None => {
                let number = u32::try_from(numbers.len()).expect("under 2^32 channels a stream");
                numbers.insert(name.clone(), number);
                multi.declare.push(name.to_string());
                number
            }
        };
    }
}

/// A frame part being built: the channel (none on a single-channel stream), its messages
/// and their waiters.
type Part = (Option<Arc<str>>, Vec<PublishMessage>, Vec<Waiter>);

struct InFlight {
    /// A `PublishBatch`, or a `PublishMulti` on a multi-channel stream, numbered for the
    /// stream it was last written to.
    frame: Frame,
    /// A `PublishMulti`'s channel per part, to number it for a new stream.
    names: Vec<Arc<str>>,
    batch_id: u64,
    /// Per part of the frame (one for a `PublishBatch`), in message order.
    waiters: Vec<Vec<Waiter>>,
    bytes: usize,
}

struct Task {
    client: Client,
    open: Mode,
    options: ProducerOptions,
    rx: mpsc::Receiver<Cmd>,
    stream: Option<Stream>,
    queued: VecDeque<(Option<Arc<str>>, PublishMessage, Waiter)>,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    next_batch_id: u64,
    /// Which part of the frame being built holds each channel, by the address of its name:
    /// kept between frames, cleared for each, so a frame of 2,048 channels does not grow a
    /// new map from empty. A [`MultiProducer`] has one `Arc` per channel name (its registry
    /// never replaces a key), so the address names the channel; keyed by it, a message's
    /// name is moved into a new part, never cloned. With 10,000 channels the clones and
    /// drops of names (whose counts the enqueuing thread writes too) were a third of this
    /// task's time.
    part_of: HashMap<usize, usize>,
    /// The parts of the frame being built.
    parts: Vec<Part>,
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
    /// Opens the stream and starts the task; answers the opened stream's last sequence
    /// and largest message.
    async fn spawn(
        client: Client,
        open: Mode,
        options: ProducerOptions,
    ) -> Result<(mpsc::Sender<Cmd>, (Option<u64>, u64)), Error> {
        let stream = open_stream(&client, &open).await?;
        let opened = (stream.last_sequence, stream.max_message_bytes);
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
            part_of: HashMap::new(),
            parts: Vec::new(),
            flushes: Vec::new(),
            full_since: None,
        };
        tokio::spawn(task.run());
        Ok((tx, opened))
    }

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
            Cmd::Publish(channel, message, waiter) => {
                self.queued.push_back((channel, message, waiter))
            }
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
        for in_flight in &mut self.in_flight {
            number_parts(&mut in_flight.frame, &in_flight.names, &mut stream.numbers);
            stream.writer.write(&in_flight.frame).await?;
        }
        self.stream = Some(stream);
        Ok(())
    }

    async fn send_batches(&mut self) {
        while !self.queued.is_empty()
            && self.in_flight.len() < self.options.max_in_flight_batches
            && self.in_flight_bytes < self.options.max_in_flight_bytes
        {
            // Parts by channel, in first-message order; a single-channel stream has one.
            // Kept between frames, as `part_of`: 2,048 parts grown from empty for each frame
            // were ~250 KB of copies and fresh pages a frame.
            let parts = &mut self.parts;
            parts.clear();
            let part_of = &mut self.part_of;
            part_of.clear();
            let mut count = 0usize;
            let mut bytes = 0usize;
            while let Some((_, message, _)) = self.queued.front() {
                let size = message.payload.len();
                if count > 0
                    && (count >= self.options.max_batch_messages
                        || bytes + size > self.options.max_batch_bytes)
                {
                    break;
                }
                let (channel, message, waiter) = self.queued.pop_front().expect("front exists");
                bytes += size;
                count += 1;
                let index = match channel {
                    Some(name) => match part_of.entry(Arc::as_ptr(&name) as *const u8 as usize) {
                        Entry::Occupied(part) => {
                            debug_assert_eq!(parts[*part.get()].0.as_deref(), Some(&*name));
                            *part.get()
                        }
                        Entry::Vacant(slot) => {
                            parts.push((Some(name), Vec::new(), Vec::new()));
                            *slot.insert(parts.len() - 1)
                        }
                    },
                    None => {
                        if parts.is_empty() {
                            parts.push((None, Vec::new(), Vec::new()));
                        }
                        0
                    }
                };
                parts[index].1.push(message);
                parts[index].2.push(waiter);
            }
            let batch_id = self.next_batch_id;
            self.next_batch_id += 1;
            let mut waiters = Vec::with_capacity(parts.len());
            let mut names = Vec::new();
            let mut frame = match self.open {
                Mode::Single(_) => {
                    let (_, messages, w) = parts.pop().expect("one part");
                    waiters.push(w);
                    Frame::PublishBatch(proto::PublishBatch { batch_id, messages })
                }
                Mode::Multi(_) => {
                    names.reserve(parts.len());
                    Frame::PublishMulti(proto::PublishMulti {
                        batch_id,
                        declare: Vec::new(),
                        parts: parts
                            .drain(..)
                            .map(|(channel, messages, w)| {
                                waiters.push(w);
                                names
                                    .push(channel.expect("a multi-channel part names its channel"));
                                proto::ChannelBatch {
                                    channel: 0,
                                    messages,
                                }
                            })
                            .collect(),
                    })
                }
            };
            let written = match self.stream.as_mut() {
                Some(stream) => {
                    number_parts(&mut frame, &names, &mut stream.numbers);
                    stream.writer.write(&frame).await
                }
                None => Ok(()),
            };
            self.in_flight_bytes += bytes;
            self.in_flight.push_back(InFlight {
                frame,
                names,
                batch_id,
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
                let parts = [(ack.first_offset, ack.duplicates)];
                self.complete(ack.batch_id, parts.into_iter(), false);
                None
            }
            Frame::PublishMultiAck(ack) => {
                let parts = ack
                    .parts
                    .into_iter()
                    .map(|p| (p.first_offset, p.duplicates));
                self.complete(ack.batch_id, parts, true);
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
                    Some(front) if e.request_id == front.batch_id => {
                        let failed = self.in_flight.pop_front().expect("front exists");
                        self.in_flight_bytes -= failed.bytes;
                        for waiter in failed.waiters.into_iter().flatten() {
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

    /// Resolves the waiters of the oldest batch in flight from its ack: per part, the
    /// first offset and the messages that were duplicates.
    fn complete(
        &mut self,
        batch_id: u64,
        parts: impl ExactSizeIterator<Item = (u64, Vec<proto::DuplicateAck>)>,
        multi: bool,
    ) {
        self.full_since = None;
        let Some(front) = self.in_flight.front() else {
            self.protocol_error("an ack for no batch in flight");
            return;
        };
        if front.batch_id != batch_id {
            self.protocol_error("acks out of order");
            return;
        }
        if multi != matches!(front.frame, Frame::PublishMulti(_))
            || parts.len() != front.waiters.len()
        {
            self.protocol_error("an ack that does not match its batch");
            return;
        }
        let done = self.in_flight.pop_front().expect("front exists");
        self.in_flight_bytes -= done.bytes;
        let messages: Vec<&[PublishMessage]> = match &done.frame {
            Frame::PublishBatch(b) => vec![&b.messages],
            Frame::PublishMulti(m) => m.parts.iter().map(|p| &p.messages[..]).collect(),
            _ => Vec::new(),
        };
        for (((first_offset, duplicates), waiters), messages) in
            parts.zip(done.waiters).zip(messages)
        {
            let mut next_offset = first_offset;
            let mut dups = duplicates.iter().peekable();
            for (i, (waiter, message)) in waiters.into_iter().zip(messages).enumerate() {
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
            for waiter in in_flight.waiters.into_iter().flatten() {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        self.in_flight_bytes = 0;
        for (_, _, waiter) in self.queued.drain(..) {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}
