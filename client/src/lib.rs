//! The DirectMQ client library that producer and consumer agents embed.
//!
//! It speaks `directmq-protocol` over QUIC with mutual TLS and depends on nothing of the
//! broker or its storage. A [`Client`] holds one connection and re-establishes it when it
//! dies; [`Producer`]s and [`Consumer`]s resume by themselves after a reconnect: a producer
//! re-sends unacknowledged batches with the same sequence numbers (the broker appends each
//! sequence once), a consumer resubscribes and continues after its last commit.
//!
//! ```no_run
//! use directmq_client::{Client, ClientConfig, StartPosition};
//!
//! # async fn run() -> Result<(), directmq_client::Error> {
//! let config = ClientConfig::from_certs_dir("127.0.0.1:7070", "./directmq-data/certs".as_ref())?;
//! let client = Client::connect(config).await?;
//!
//! let producer = client.producer("dc-a/db1/s1", "agent-1").await?;
//! let receipt = producer.send("change #1").await?;
//! println!("stored at offset {:?}", receipt.offset);
//!
//! let mut consumer = client.consumer("dc-a/db1/s1", "dc-b", StartPosition::Earliest).await?;
//! if let Some(message) = consumer.next().await {
//!     let message = message?;
//!     consumer.commit(message.offset + 1).await?;
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod consumer;
pub mod net;
mod producer;
mod stream;
mod watch;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use directmq_protocol::{self as proto, ErrorCode, Frame, RequestBody, ResponseBody};
use tokio::sync::Mutex;

pub use consumer::{Consumer, Message};
pub use directmq_protocol::{
    ChannelInfo, ChannelStatus, ConsumerStatus, StartPosition, TokenIssued,
};
pub use producer::{MultiProducer, PendingAck, Producer, ProducerOptions, Receipt};
pub use watch::{ChannelChange, Watcher};
pub use wire::{FrameReader, FrameWriter, StreamError};

/// What can go wrong for a client.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("the broker refused the request: {message} [{code}]")]
    Broker { code: ErrorCode, message: String },
    #[error("could not load certificates from {path}: {reason}")]
    Certificates { path: PathBuf, reason: String },
    #[error("invalid broker address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("could not connect to the broker at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the connection to the broker was lost: {0}")]
    Connection(String),
    #[error("the broker broke the protocol: {0}")]
    Protocol(String),
    #[error("the message of {size} bytes is larger than the broker's limit of {max} bytes")]
    MessageTooLarge { size: u64, max: u64 },
    #[error("the client is closed")]
    Closed,
}

impl Error {
    /// The broker's error code, if the broker refused something.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_frame(e: proto::ErrorFrame) -> Error {
        Error::Broker {
            code: e.code,
            message: e.message,
        }
    }

    /// Whether the operation may succeed when retried after a reconnect.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connection(_) | Error::Connect { .. } => true,
            Error::Broker { code, .. } => {
                matches!(*code, ErrorCode::SHUTTING_DOWN | ErrorCode::STORAGE_FULL)
            }
            _ => false,
        }
    }
}

impl From<StreamError> for Error {
    fn from(e: StreamError) -> Error {
        match e {
            StreamError::Decode(d) => Error::Protocol(d.to_string()),
            other => Error::Connection(other.to_string()),
        }
    }
}

impl From<quinn::ConnectionError> for Error {
    fn from(e: quinn::ConnectionError) -> Error {
        Error::Connection(e.to_string())
    }
}

/// How to reach and authenticate to a broker.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the broker.
    pub broker: String,
    /// TLS name to verify; defaults to the host part of `broker`.
    pub server_name: Option<String>,
    pub tls: Arc<rustls::ClientConfig>,
    /// Name sent in the hello, for the broker's logs.
    pub client_name: String,
    pub net: net::NetOptions,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// Stop reconnecting after this long without success (`None`: never give up).
    pub reconnect_for: Option<Duration>,
    /// A token (`directmq token issue`) sent in the hello, for a client without a
    /// certificate; see [`ClientConfig::with_token`].
    pub token: Option<String>,
}

impl ClientConfig {
    /// A config using `ca.pem`, `client.pem` and `client.key` from `certs_dir`.
    pub fn from_certs_dir(broker: &str, certs_dir: &Path) -> Result<ClientConfig, Error> {
        Ok(ClientConfig::with_tls(
            broker,
            net::client_tls(certs_dir)?,
            None,
        ))
    }

    /// A config that authenticates with `token` instead of a client certificate and
    /// verifies the broker with the CA in `ca_file`.
    pub fn with_token(broker: &str, ca_file: &Path, token: &str) -> Result<ClientConfig, Error> {
        Ok(ClientConfig::with_tls(
            broker,
            net::token_tls(ca_file)?,
            Some(token.to_owned()),
        ))
    }

    fn with_tls(broker: &str, tls: rustls::ClientConfig, token: Option<String>) -> ClientConfig {
        ClientConfig {
            broker: broker.to_owned(),
            server_name: None,
            tls: Arc::new(tls),
            client_name: format!("directmq-client/{}", env!("CARGO_PKG_VERSION")),
            net: net::NetOptions::default(),
            connect_timeout: Duration::from_secs(10),
            reconnect_for: None,
            token,
        }
    }

    fn server_name(&self) -> String {
        if let Some(name) = &self.server_name {
            return name.clone();
        }
        let host = match self.broker.rsplit_once(':') {
            Some((host, _)) => host,
            None => &self.broker,
        };
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    }

    fn resolve(&self) -> Result<SocketAddr, Error> {
        self.broker
            .to_socket_addrs()
            .map_err(|e| Error::Address {
                addr: self.broker.clone(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| Error::Address {
                addr: self.broker.clone(),
                reason: "the name resolves to no address".into(),
            })
    }
}

/// One live connection and its control stream.
struct Conn {
    connection: quinn::Connection,
    control: Arc<Mutex<(FrameWriter, FrameReader)>>,
    hello: proto::HelloOk,
    /// Ends the connection's silence watch when dropped: the watch holds a handle to the
    /// connection, which would otherwise keep a dropped client's connection open.
    _silence_watch: tokio::sync::oneshot::Sender<()>,
}

struct Inner {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    conn: Mutex<Option<Arc<Conn>>>,
    next_request: AtomicU64,
    /// Set by [`Client::close`]: nothing reconnects after it.
    closed: std::sync::atomic::AtomicBool,
    /// The token sent in each hello (starts as `config.token`; see [`Client::set_token`]).
    token: std::sync::Mutex<Option<String>>,
}

/// A connection to a broker that reconnects when needed. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.inner.config.broker)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and completes the hello; fails if the broker cannot be reached within
    /// `connect_timeout`.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        let addr = config.resolve()?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let socket =
            net::udp_socket(bind, config.net.socket_buffer_bytes).map_err(|e| Error::Connect {
                addr: config.broker.clone(),
                reason: e.to_string(),
            })?;
        let endpoint = net::endpoint(socket, None).map_err(|e| Error::Connect {
            addr: config.broker.clone(),
            reason: e.to_string(),
        })?;
        let token = config.token.clone();
        let client = Client {
            inner: Arc::new(Inner {
                config,
                endpoint,
                conn: Mutex::new(None),
                next_request: AtomicU64::new(1),
                closed: std::sync::atomic::AtomicBool::new(false),
                token: std::sync::Mutex::new(token),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    /// The broker's limits and the identity it authenticated, from the last hello.
    pub async fn hello(&self) -> Result<proto::HelloOk, Error> {
        Ok(self.connection().await?.hello.clone())
    }

    async fn dial(&self) -> Result<Conn, Error> {
        let config = &self.inner.config;
        let addr = config.resolve()?;
        let connect_err = |reason: String| Error::Connect {
            addr: config.broker.clone(),
            reason,
        };
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config.tls.clone())
            .map_err(|e| connect_err(e.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
        client_config.transport_config(config.net.transport());
        let connecting = self
            .inner
            .endpoint
            .connect_with(client_config, addr, &config.server_name())
            .map_err(|e| connect_err(e.to_string()))?;
        let connection = tokio::time::timeout(config.connect_timeout, connecting)
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(
            recv,
            proto::max_frame_bytes(proto::DEFAULT_MAX_MESSAGE_BYTES),
        );
        let token = self.inner.token.lock().expect("token lock").clone();
        writer
            .write(&Frame::Hello(proto::Hello {
                version: proto::PROTOCOL_VERSION,
                client: config.client_name.clone(),
                token,
            }))
            .await?;
        let hello = match tokio::time::timeout(config.connect_timeout, reader.next()).await {
            Err(_) => return Err(connect_err("no hello from the broker".into())),
            Ok(Ok(Some(Frame::HelloOk(h)))) => h,
            Ok(Ok(Some(Frame::Error(e)))) => return Err(Error::from_frame(e)),
            Ok(Ok(Some(other))) => {
                return Err(Error::Protocol(format!(
                    "expected HelloOk, got {}",
                    other.name()
                )))
            }
            Ok(Ok(None)) => return Err(connect_err("the broker closed the connection".into())),
            Ok(Err(e)) => {
                // A handshake refusal (bad certificate) surfaces as the connection's reason.
                return Err(match connection.close_reason() {
                    Some(reason) => connect_err(reason.to_string()),
                    None => e.into(),
                });
            }
        };
        reader.set_max_frame_bytes(hello.max_frame_bytes);
        let (silence_watch, dropped) = tokio::sync::oneshot::channel();
        tokio::spawn(give_up_when_silent(
            connection.clone(),
            config.net.idle_timeout,
            dropped,
        ));
        Ok(Conn {
            connection,
            control: Arc::new(Mutex::new((writer, reader))),
            hello,
            _silence_watch: silence_watch,
        })
    }

    /// The live connection, reconnecting with backoff if the last one died.
    async fn connection(&self) -> Result<Arc<Conn>, Error> {
        let mut slot = self.inner.conn.lock().await;
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if let Some(conn) = slot.as_ref() {
            if conn.connection.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            match self.dial().await {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    *slot = Some(conn.clone());
                    return Ok(conn);
                }
                Err(e) if slot.is_none() => {
                    // The very first connection: report at once instead of retrying forever.
                    return Err(e);
                }
                Err(e) => {
                    let give_up = self
                        .inner
                        .config
                        .reconnect_for
                        .is_some_and(|limit| started.elapsed() >= limit);
                    if give_up || !e.is_transient() {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// How long reconnecting may go on before giving up (`None`: never).
    pub(crate) fn reconnect_limit(&self) -> Option<Duration> {
        self.inner.config.reconnect_for
    }

    /// Opens a stream on the live connection, reconnecting if needed; also returns the
    /// broker's largest message size.
    pub(crate) async fn open_stream(&self) -> Result<(FrameWriter, FrameReader, u64), Error> {
        let conn = self.connection().await?;
        match conn.connection.open_bi().await {
            Ok((send, recv)) => Ok((
                FrameWriter::new(send),
                FrameReader::new(recv, conn.hello.max_frame_bytes),
                conn.hello.max_message_bytes,
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn request(&self, body: RequestBody) -> Result<ResponseBody, Error> {
        let mut answers = self.requests(vec![body]).await?;
        answers.pop().expect("one answer per request")
    }

    /// Sends `bodies` on the control stream without waiting for each answer (the protocol
    /// lets requests be pipelined, and the broker answers them in order), [`PIPELINE`] at a
    /// time: an agent registering thousands of channels pays a round trip per
    /// [`PIPELINE`] requests instead of one each. Answers come back in request order; an
    /// error that ends the stream fails the call.
    ///
    /// Cancel-safe: the exchange runs in a task of its own once the stream is this call's,
    /// so a caller that stops waiting (a timeout, a dropped future) cannot stop it between
    /// two writes of one frame, which would leave half a frame on the control stream and
    /// break every later request on the connection. The task then sends no further request
    /// and reads the answers to those already sent (the broker carries them out), so the
    /// stream is left clean for the next call.
    async fn requests(
        &self,
        bodies: Vec<RequestBody>,
    ) -> Result<Vec<Result<ResponseBody, Error>>, Error> {
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.connection().await?;
        let control = conn.control.clone().lock_owned().await;
        // Taken under the lock: ids increase in the order requests go on the stream, which
        // is how `answer` tells an abandoned request's answer from the one it waits for.
        let first_id = self
            .inner
            .next_request
            .fetch_add(bodies.len() as u64, Ordering::Relaxed);
        let waiting = Waiting::default();
        match tokio::spawn(exchange(control, first_id, bodies, waiting.abandoned())).await {
            Ok(answers) => answers,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Connection(
                "the runtime stopped the control request".into(),
            )),
        }
    }

    /// Creates a channel (channels are also created on first publish).
    pub async fn create_channel(&self, name: &str) -> Result<(), Error> {
        self.request(RequestBody::CreateChannel { name: name.into() })
            .await
            .map(drop)
    }

    /// Creates many channels, pipelined: the broker plans creations that arrive together
    /// as one and they share its group commits, where one call per channel waits for an
    /// fsync each (10,000 shards: seconds instead of one round trip per 512). One answer
    /// per name, in order; a name that exists already is `CHANNEL_EXISTS`, as for
    /// [`Client::create_channel`].
    pub async fn create_channels(&self, names: &[&str]) -> Result<Vec<Result<(), Error>>, Error> {
        let bodies = names
            .iter()
            .map(|name| RequestBody::CreateChannel {
                name: (*name).into(),
            })
            .collect();
        Ok(self
            .requests(bodies)
            .await?
            .into_iter()
            .map(|answer| answer.map(drop))
            .collect())
    }

    /// Deletes a channel and every message in it.
    pub async fn delete_channel(&self, name: &str) -> Result<(), Error> {
        self.request(RequestBody::DeleteChannel { name: name.into() })
            .await
            .map(drop)
    }

    /// Channels whose names start with `prefix`.
    pub async fn list_channels(&self, prefix: &str) -> Result<Vec<ChannelInfo>, Error> {
        match self
            .request(RequestBody::ListChannels {
                prefix: prefix.into(),
            })
            .await?
        {
            ResponseBody::Channels(c) => Ok(c),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Channels under `prefix` with their consumers and lag.
    pub async fn status(&self, prefix: &str) -> Result<Vec<ChannelStatus>, Error> {
        match self
            .request(RequestBody::Status {
                prefix: prefix.into(),
            })
            .await?
        {
            ResponseBody::Status(s) => Ok(s),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// [`Client::last_sequence`] for many channels, pipelined; one answer per channel, in
    /// order.
    pub async fn last_sequences(
        &self,
        channels: &[&str],
        producer_id: &str,
    ) -> Result<Vec<Result<Option<u64>, Error>>, Error> {
        let bodies = channels
            .iter()
            .map(|channel| RequestBody::LastSequence {
                channel: (*channel).into(),
                producer_id: producer_id.into(),
            })
            .collect();
        Ok(self
            .requests(bodies)
            .await?
            .into_iter()
            .map(|answer| match answer? {
                ResponseBody::LastSequence(s) => Ok(s),
                other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
            })
            .collect())
    }

    /// The last sequence the broker appended for `producer_id` on `channel`.
    pub async fn last_sequence(
        &self,
        channel: &str,
        producer_id: &str,
    ) -> Result<Option<u64>, Error> {
        let mut answers = self.last_sequences(&[channel], producer_id).await?;
        answers.pop().expect("one answer per channel")
    }

    /// Moves a durable consumer (creating it if needed).
    pub async fn reset_consumer(
        &self,
        channel: &str,
        consumer: &str,
        to: StartPosition,
    ) -> Result<(), Error> {
        self.request(RequestBody::ResetConsumer {
            channel: channel.into(),
            consumer: consumer.into(),
            to,
        })
        .await
        .map(drop)
    }

    /// A producer publishing to `channel` as `producer_id`, with default options.
    pub async fn producer(&self, channel: &str, producer_id: &str) -> Result<Producer, Error> {
        Producer::open(
            self.clone(),
            channel,
            producer_id,
            ProducerOptions::default(),
        )
        .await
    }

    /// A producer with explicit options.
    pub async fn producer_with(
        &self,
        channel: &str,
        producer_id: &str,
        options: ProducerOptions,
    ) -> Result<Producer, Error> {
        Producer::open(self.clone(), channel, producer_id, options).await
    }

    /// A producer for many channels over one stream, as `producer_id` (see
    /// [`MultiProducer`]).
    pub async fn multi_producer(
        &self,
        producer_id: &str,
        options: ProducerOptions,
    ) -> Result<MultiProducer, Error> {
        MultiProducer::open(self.clone(), producer_id, options).await
    }

    /// A session of the durable consumer `name` on `channel`. `start` applies only if the
    /// consumer does not exist yet.
    pub async fn consumer(
        &self,
        channel: &str,
        name: &str,
        start: StartPosition,
    ) -> Result<Consumer, Error> {
        Consumer::open(self.clone(), channel, name, start, false).await
    }

    /// Like [`Client::consumer`], but when another session holds the consumer this one
    /// waits as its standby instead of failing with `CONSUMER_BUSY`: the call returns once
    /// the active session has ended (its connection closed, or went silent past the
    /// broker's idle timeout), and delivery continues right after the last commit. Run one
    /// per target datacenter agent replica for a hot standby.
    pub async fn standby_consumer(
        &self,
        channel: &str,
        name: &str,
        start: StartPosition,
    ) -> Result<Consumer, Error> {
        Consumer::open(self.clone(), channel, name, start, true).await
    }

    /// Watches `prefix` (`""` for every channel the identity may see): first each existing
    /// channel is reported as created, then every creation and deletion, across reconnects.
    pub async fn watch(&self, prefix: &str) -> Result<Watcher, Error> {
        Watcher::open(self.clone(), prefix).await
    }

    /// Signs a token for `identity` with rights on the given prefixes, valid for `ttl`.
    /// Needs the `admin` right on every prefix it grants.
    pub async fn issue_token(
        &self,
        identity: &str,
        publish: Vec<String>,
        consume: Vec<String>,
        admin: Vec<String>,
        ttl: Duration,
    ) -> Result<TokenIssued, Error> {
        self.token_request(RequestBody::IssueToken {
            identity: identity.into(),
            publish,
            consume,
            admin,
            ttl_ms: ttl.as_millis().min(u128::from(u64::MAX)) as u64,
        })
        .await
    }

    /// A new token with the same id and rights as `token`, valid for `ttl` from now;
    /// `token` must not have expired or been revoked.
    pub async fn renew_token(&self, token: &str, ttl: Duration) -> Result<TokenIssued, Error> {
        self.token_request(RequestBody::RenewToken {
            token: token.into(),
            ttl_ms: ttl.as_millis().min(u128::from(u64::MAX)) as u64,
        })
        .await
    }

    /// Revokes a token and its renewals, by the token or its id; survives restarts.
    pub async fn revoke_token(&self, token_or_id: &str) -> Result<(), Error> {
        self.request(RequestBody::RevokeToken {
            token_or_id: token_or_id.into(),
        })
        .await
        .map(drop)
    }

    async fn token_request(&self, body: RequestBody) -> Result<TokenIssued, Error> {
        match self.request(body).await? {
            ResponseBody::Token(t) => Ok(t),
            other => Err(Error::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Switches to `token` (say, one [`Client::renew_token`] returned before the current
    /// one expires): the connection is replaced by one that presents it; producers and
    /// consumers carry on across the reconnect as after any other.
    pub async fn set_token(&self, token: &str) {
        *self.inner.token.lock().expect("token lock") = Some(token.to_owned());
        if let Some(conn) = self.inner.conn.lock().await.take() {
            conn.connection
                .close(0u32.into(), b"switching to a renewed token");
        }
    }

    /// Closes the connection; open producers and consumers fail.
    pub async fn close(&self) {
        // Set before taking the connection lock (a reconnect loop may hold it while the
        // broker is away; it checks the flag each round), and checked under it.
        self.inner.closed.store(true, Ordering::Release);
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.take() {
            conn.connection.close(0u32.into(), b"client closed");
        }
        drop(slot);
        self.inner.endpoint.wait_idle().await;
    }
}

/// Requests written before their answers are read, at most.
const PIPELINE: usize = 512;

/// Set when the caller of [`Client::requests`] stops waiting (its future is dropped).
#[derive(Default)]
struct Waiting(Arc<std::sync::atomic::AtomicBool>);

impl Waiting {
    fn abandoned(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.0.clone()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Writes `bodies` as requests `first_id..` on the control stream, [`PIPELINE`] ahead of
/// their answers, and reads the answers in order. Once `abandoned` is set no further
/// request is written; the answers to those written are still read.
async fn exchange(
    mut control: tokio::sync::OwnedMutexGuard<(FrameWriter, FrameReader)>,
    first_id: u64,
    bodies: Vec<RequestBody>,
    abandoned: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<Result<ResponseBody, Error>>, Error> {
    let (writer, reader) = &mut *control;
    let mut answers = Vec::with_capacity(bodies.len());
    let mut bodies = (first_id..).zip(bodies).peekable();
    while bodies.peek().is_some() && !abandoned.load(Ordering::Acquire) {
        let mut sent = Vec::with_capacity(PIPELINE);
        for (request_id, body) in bodies.by_ref().take(PIPELINE) {
            writer
                .write(&Frame::Request(proto::Request { request_id, body }))
                .await?;
            sent.push(request_id);
            if abandoned.load(Ordering::Acquire) {
                break;
            }
        }
        for request_id in sent {
            answers.push(answer(reader, request_id).await?);
        }
    }
    Ok(answers)
}

/// Reads the answer to `request_id` off the control stream. Answers to earlier requests
/// (of an exchange that failed partway) are skipped. `Err` only when the stream cannot go
/// on.
async fn answer(
    reader: &mut FrameReader,
    request_id: u64,
) -> Result<Result<ResponseBody, Error>, Error> {
    loop {
        match reader.next().await? {
            Some(Frame::Response(r)) if r.request_id < request_id => continue,
            Some(Frame::Response(r)) if r.request_id == request_id => return Ok(Ok(r.body)),
            Some(Frame::Error(e)) if e.request_id != 0 && e.request_id < request_id => continue,
            Some(Frame::Error(e)) if e.request_id == request_id => {
                return Ok(Err(Error::from_frame(e)))
            }
            Some(Frame::Error(e)) => return Err(Error::from_frame(e)),
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected {} on the control stream",
                    other.name()
                )))
            }
            None => {
                return Err(Error::Connection(
                    "the broker closed the control stream".into(),
                ))
            }
        }
    }
}

/// A connection that sent at least [`SILENT_SENDS`] datagrams over this long and received
/// none is given up, so the client reconnects instead of waiting out the idle timeout.
const SILENCE_LIMIT: Duration = Duration::from_secs(3);

/// Datagrams sent into a silence that make it a dead peer rather than an idle connection.
const SILENT_SENDS: u64 = 2;

/// Closes `connection` when the broker stops answering: [`SILENCE_LIMIT`] (or half the idle
/// timeout, if less) in which this side sent and nothing came back.
///
/// A broker that is killed and restarted on the same address answers its predecessor's
/// connections with a stateless reset, but only once a packet reaches it, and after a few
/// lost probes QUIC sends the next one only after an exponential backoff, uncapped in
/// quinn: a broker down for a few seconds was noticed only 10 s or more after it came back
/// (up to the 30 s idle timeout). A live peer acknowledges within its ACK delay (25 ms),
/// and an idle connection sends nothing between keep-alives, so neither trips this.
async fn give_up_when_silent(
    connection: quinn::Connection,
    idle_timeout: Duration,
    mut dropped: tokio::sync::oneshot::Receiver<()>,
) {
    let limit = SILENCE_LIMIT
        .min(idle_timeout / 2)
        .max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval(limit / 4);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stats = connection.stats();
    let (mut received, mut sent_then) = (stats.udp_rx.datagrams, stats.udp_tx.datagrams);
    let mut heard_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = connection.closed() => return,
            _ = &mut dropped => return,
            _ = ticks.tick() => {}
        }
        let stats = connection.stats();
        if stats.udp_rx.datagrams != received {
            received = stats.udp_rx.datagrams;
            sent_then = stats.udp_tx.datagrams;
            heard_at = tokio::time::Instant::now();
            continue;
        }
        let silent_sends = stats.udp_tx.datagrams - sent_then;
        if heard_at.elapsed() >= limit && silent_sends >= SILENT_SENDS {
            tracing::info!(
                silent_for = ?heard_at.elapsed(),
                silent_sends,
                "the broker stopped answering; reconnecting"
            );
            connection.close(0u32.into(), b"the broker stopped answering");
            return;
        }
    }
}
