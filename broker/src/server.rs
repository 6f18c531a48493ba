//! The network shell: accepts QUIC connections, moves frames, asks the engine, queues what
//! it decides and sends acks once storage reports the fsync done (docs/protocol.md §3–§4).

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use directmq_client::{FrameReader, FrameWriter, StreamError};
use directmq_protocol::{self as proto, ErrorCode, Frame, RequestBody, ResponseBody};
use directmq_storage::{Durability, ReadMessage, Record, StorageError, Store, StoredMessage};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::acl::{Acl, Right};
use crate::config::{ChannelSettings, Config, OnFull};
use crate::engine::{self, Incoming, PublishDecision, Refusal};
use crate::metrics as m;
use crate::tokens::{Claims, Revocations, TokenKeys};

/// How long a new stream may take to send its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Most messages and payload bytes in one Deliver frame.
const DELIVER_MESSAGES: usize = 1024;
const DELIVER_BYTES: u64 = 1024 * 1024;

/// How long a consumer session out of credit keeps what it read for its next frame.
const HOLD_READ_FOR: Duration = Duration::from_millis(100);

/// A consumer's read started ahead of its delivery.
type ReadAhead =
    tokio::task::JoinHandle<Result<(Vec<ReadMessage>, Vec<bytes::Bytes>), StorageError>>;

/// What a consumer session has read and not yet delivered.
#[derive(Default)]
struct InHand {
    /// Messages read past what the last frame could take (the rest of its last batch:
    /// reads answer whole batches). The next frame starts with them instead of reading that
    /// batch again, which a catch-up in frames smaller than its batches did for ~15-40% more
    /// bytes than it delivered.
    carry: std::collections::VecDeque<ReadMessage>,
    /// The buffers the carried messages lie in.
    buffers: Vec<bytes::Bytes>,
    /// The read of the frame after the carried messages, started while a frame is sent, and
    /// where it starts: a catch-up's disk reads overlap its sends instead of alternating
    /// with them (reads past the page cache have no kernel read-ahead).
    ahead: Option<(u64, ReadAhead)>,
}

impl InHand {
    /// Lets all of it go: dropped when the session waits for new messages, or for credit
    /// longer than [`HOLD_READ_FOR`], so an idle session holds no batch.
    fn drop_all(&mut self) {
        *self = InHand::default();
    }

    fn is_empty(&self) -> bool {
        self.carry.is_empty() && self.ahead.is_none()
    }

    /// Starts reading the frame after the carried messages when more is durable (below
    /// `head`) and the credit reaches past them.
    fn read_ahead(
        &mut self,
        store: &Arc<Store>,
        channel_id: u64,
        credit_messages: u64,
        credit_bytes: u64,
        head: u64,
    ) {
        let Some(last) = self.carry.back() else {
            return;
        };
        let from = last.offset + 1;
        let read_bytes: u64 = self.carry.iter().map(|m| m.payload.len() as u64).sum();
        let messages_left = credit_messages.saturating_sub(self.carry.len() as u64);
        let bytes_left = credit_bytes.saturating_sub(read_bytes);
        if from >= head || messages_left == 0 || bytes_left == 0 {
            return;
        }
        let store = store.clone();
        let max_messages = (messages_left as usize).min(DELIVER_MESSAGES);
        let max_bytes = bytes_left.min(DELIVER_BYTES);
        self.ahead = Some((
            from,
            tokio::task::spawn_blocking(move || {
                store.read_whole_batches(channel_id, from, max_messages, max_bytes)
            }),
        ));
    }
}

/// Largest Hello from a peer not yet authenticated (a token is well under 4 KiB).
const HELLO_LIMIT: u64 = 64 * 1024;
/// Publish batches accepted on one stream before their acks are written.
const ACKS_IN_FLIGHT: usize = 256;
/// Most pipelined channel creations planned together on a control stream.
const CREATIONS_TOGETHER: usize = 1024;
/// Channel creations and deletions buffered for slow watchers; one that falls further
/// behind is sent the full list again.
const WATCH_BACKLOG: usize = 4096;

/// A channel created or deleted, for watch streams.
#[derive(Debug, Clone)]
struct ChannelChange {
    kind: proto::WatchEventKind,
    name: Arc<str>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The broker's shared state.
pub struct Broker {
    config: Config,
    store: Arc<Store>,
    pub(crate) acl: RwLock<Arc<Acl>>,
    pub(crate) token_keys: RwLock<Arc<TokenKeys>>,
    revocations: Arc<Revocations>,
    /// The QUIC endpoint, once serving: reloads swap its TLS configuration.
    pub(crate) endpoint: Mutex<Option<quinn::Endpoint>>,
    /// Active consumer sessions: (channel id, consumer name).
    sessions: Mutex<HashSet<(u64, String)>>,
    /// Woken whenever a session's lease is released, for standbys.
    lease_released: tokio::sync::Notify,
    /// Durable head per channel, for waking consumer sessions.
    heads: Mutex<HashMap<u64, watch::Sender<u64>>>,
    /// Channel creations and deletions, for watch streams.
    changes: broadcast::Sender<ChannelChange>,
    /// When each (channel, consumer) last moved its commit forward, in ms since the epoch;
    /// consumers not here have not moved since `started_ms`.
    progress: Mutex<HashMap<(u64, String), u64>>,
    started_ms: u64,
    /// Consumer names that have a lag gauge.
    lag_names: Mutex<HashSet<String>>,
    /// Channels over a retention bound, with why (set by the bounds check).
    full_channels: Mutex<HashMap<u64, String>>,
    /// Drop-oldest channels: the offset below which retention may delete even without
    /// consumer commits (a channel with no consumer keeps everything otherwise).
    forced_floors: Mutex<HashMap<u64, u64>>,
    /// Why the filesystem counts as full, when it does (set by the bounds check).
    disk_full: Mutex<Option<String>>,
    /// Payload bytes of publishes planned but not yet written, for the disk budget.
    reserved_bytes: Arc<std::sync::atomic::AtomicU64>,
    connections: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) shutdown: watch::Sender<bool>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(
        config: Config,
        store: Arc<Store>,
        acl: Acl,
        token_keys: TokenKeys,
        revocations: Revocations,
    ) -> Arc<Broker> {
        Arc::new(Broker {
            config,
            store,
            acl: RwLock::new(Arc::new(acl)),
            token_keys: RwLock::new(Arc::new(token_keys)),
            revocations: Arc::new(revocations),
            endpoint: Mutex::new(None),
            sessions: Mutex::new(HashSet::new()),
            lease_released: tokio::sync::Notify::new(),
            heads: Mutex::new(HashMap::new()),
            changes: broadcast::channel(WATCH_BACKLOG).0,
            progress: Mutex::new(HashMap::new()),
            started_ms: now_ms(),
            lag_names: Mutex::new(HashSet::new()),
            full_channels: Mutex::new(HashMap::new()),
            forced_floors: Mutex::new(HashMap::new()),
            disk_full: Mutex::new(None),
            reserved_bytes: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            connections: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            tasks: TaskTracker::new(),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// QUIC transport settings for this broker's endpoint.
    pub fn net_options(&self) -> directmq_client::net::NetOptions {
        self.config.net_options()
    }

    pub(crate) fn acl(&self) -> Arc<Acl> {
        self.acl.read().expect("acl lock").clone()
    }

    /// Whether `who` may do `right` on `channel`: the ACL grants it to the identity, and a
    /// token, if that is how `who` came in, covers it and is neither expired nor revoked.
    /// Read at every operation, so reloads and revocations apply at once.
    pub(crate) fn authorize(
        &self,
        who: &Principal,
        right: Right,
        channel: &str,
    ) -> Result<(), Refusal> {
        self.check_token(who)?;
        granted(&self.acl(), who, right, channel)
    }

    /// A token that expired or was revoked since the connection began stops working.
    fn check_token(&self, who: &Principal) -> Result<(), Refusal> {
        let Some(token) = &who.token else {
            return Ok(());
        };
        if self.revocations.is_revoked(&token.id) {
            return Err(Refusal::new(
                ErrorCode::UNAUTHORIZED,
                format!("the token {} was revoked", token.id),
            ));
        }
        if !self
            .token_keys
            .read()
            .expect("token keys lock")
            .knows(&token.kid)
        {
            return Err(Refusal::new(
                ErrorCode::UNAUTHORIZED,
                format!(
                    "the key that signed token {} was removed; get a new token",
                    token.id
                ),
            ));
        }
        if now_ms() >= token.exp {
            return Err(Refusal::new(
                ErrorCode::UNAUTHORIZED,
                format!("the token {} expired; renew it before it expires", token.id),
            ));
        }
        Ok(())
    }

    /// A requested token lifetime, checked against `max_token_ttl_ms`.
    fn token_ttl(&self, ttl_ms: u64) -> Result<u64, Refusal> {
        let max = self.config.max_token_ttl_ms;
        if ttl_ms == 0 || ttl_ms > max {
            return Err(Refusal::new(
                ErrorCode::INVALID_NAME,
                format!("a token lifetime must be between 1 ms and max_token_ttl_ms ({max} ms); {ttl_ms} ms was asked"),
            ));
        }
        Ok(ttl_ms)
    }

    fn sign(&self, claims: Claims) -> ResponseBody {
        let (id, expires_ms) = (claims.id.clone(), claims.exp);
        let token = self
            .token_keys
            .read()
            .expect("token keys lock")
            .sign(claims);
        ResponseBody::Token(proto::TokenIssued {
            token,
            id,
            expires_ms,
        })
    }

    /// Whether `who` sees `channel` in listings, status and watches: it may consume it.
    fn may_see(&self, acl: &Acl, who: &Principal, channel: &str) -> bool {
        acl.may_see(&who.name, channel)
            && who
                .token
                .as_ref()
                .is_none_or(|t| t.allows(Right::Consume, channel) && self.check_token(who).is_ok())
    }

    /// The durable-head notifier of a channel, created from the state on first use.
    fn head_sender(&self, channel_id: u64) -> watch::Sender<u64> {
        let mut heads = self.heads.lock().expect("heads lock");
        heads
            .entry(channel_id)
            .or_insert_with(|| {
                let head = self
                    .store
                    .with_state(|s| s.channel(channel_id).map_or(0, |c| c.next_offset));
                watch::channel(head).0
            })
            .clone()
    }

    /// Tells watchers that a channel was created or deleted.
    fn announce(&self, kind: proto::WatchEventKind, name: &str) {
        // No watcher is not an error.
        let _ = self.changes.send(ChannelChange {
            kind,
            name: name.into(),
        });
    }

    /// Notes that a consumer's commit moved forward now.
    fn note_progress(&self, channel_id: u64, consumer: &str) {
        self.progress
            .lock()
            .expect("progress lock")
            .insert((channel_id, consumer.to_owned()), now_ms());
    }

    fn storage_refusal(&self, e: &StorageError) -> Refusal {
        match e {
            StorageError::Closed => Refusal::new(
                ErrorCode::SHUTTING_DOWN,
                "the broker is shutting down; retry",
            ),
            e if e.is_full() => Refusal::new(
                ErrorCode::STORAGE_FULL,
                "the broker's storage is full; nothing was stored, retry later",
            ),
            e => Refusal::new(
                ErrorCode::STORAGE_ERROR,
                format!("the broker could not store the data: {e}"),
            ),
        }
    }

    /// Queues `records` and waits until they are durable.
    async fn append(&self, records: Vec<Record>) -> Result<(), Refusal> {
        let (tx, rx) = oneshot::channel();
        self.store
            .begin()
            .append(records, Box::new(move |r| drop(tx.send(r))))
            .map_err(|e| self.storage_refusal(&e))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.storage_refusal(&e)),
            Err(_) => Err(self.storage_refusal(&StorageError::Closed)),
        }
    }

    /// Serves connections from `endpoint` until `shutdown` resolves, then shuts down
    /// gracefully: stop accepting, let streams finish their acks, drain storage, close.
    pub async fn run(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        *self.endpoint.lock().expect("endpoint lock") = Some(endpoint.clone());
        let retention = self.tasks.spawn(self.clone().retention_loop());
        let reloads = self.tasks.spawn(self.clone().reload_loop());
        loop {
            tokio::select! {
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let broker = self.clone();
                        self.tasks.spawn(async move { broker.connection(incoming).await });
                    }
                    None => break,
                },
                () = &mut shutdown => break,
            }
        }
        info!("shutting down: no new connections; finishing in-flight appends and acks");
        {
            // Under the lock a reload holds while it swaps the TLS configuration, so none
            // can put one back after this.
            let mut held = self.endpoint.lock().expect("endpoint lock");
            self.shutting_down.store(true, Ordering::Release);
            endpoint.set_server_config(None);
            held.take();
        }
        let _ = self.shutdown.send(true);
        retention.abort();
        reloads.abort();
        self.tasks.close();
        // Streams stop reading new frames, their pending appends complete, acks are sent.
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            warn!("some streams did not finish within 10 s");
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        endpoint.close(
            quinn::VarInt::from_u32(u32::from(ErrorCode::SHUTTING_DOWN.0)),
            b"broker shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        info!("shutdown complete");
    }

    async fn retention_loop(self: Arc<Self>) {
        let period = Duration::from_millis(self.config.retention_interval_ms);
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            let store = self.store.clone();
            let forced = self.forced_floors.lock().expect("forced lock").clone();
            let result = tokio::task::spawn_blocking(move || {
                store.retain(|state, id| {
                    state.channel(id).map_or(u64::MAX, |c| {
                        engine::retention_floor(c).max(forced.get(&id).copied().unwrap_or(0))
                    })
                })
            })
            .await;
            match result {
                Ok(Ok(report)) if report.segments_deleted > 0 => {
                    debug!(?report, "retention pass");
                }
                Ok(Err(e)) => warn!(error = %e, "retention pass failed"),
                _ => {}
            }
            let broker = self.clone();
            let _ = tokio::task::spawn_blocking(move || broker.check_bounds()).await;
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        if self.connections.load(Ordering::Acquire) >= self.config.max_connections {
            warn!(%remote, limit = self.config.max_connections, "refusing a connection: too many connections");
            metrics::counter!(m::REFUSED, "op" => "connect", "code" => "TOO_MANY_CONNECTIONS")
                .increment(1);
            incoming.refuse();
            return;
        }
        let connection = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                metrics::counter!(m::REFUSED, "op" => "connect", "code" => "HANDSHAKE_FAILED")
                    .increment(1);
                info!(%remote, error = %e, "refused a connection during the handshake");
                return;
            }
        };
        // Without a certificate (possible only when tokens are allowed) the identity comes
        // from the token in the Hello.
        let identity = crate::tls::peer_identity(&connection);
        if identity.is_none() && !self.config.allow_tokens {
            connection.close(
                1u32.into(),
                b"a client certificate with a common name is required",
            );
            return;
        }
        let shown = identity.clone().unwrap_or_else(|| "(token)".into());
        let span = tracing::info_span!("conn", %remote, identity = %shown);
        self.connections.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        self.clone()
            .serve_connection(connection, identity, remote)
            .instrument(span)
            .await;
        self.connections.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }

    /// Who a Hello speaks for: the certificate's identity, or the identity of a valid token
    /// when the connection has no certificate.
    fn principal(
        &self,
        certificate: Option<String>,
        token: Option<&str>,
    ) -> Result<Principal, Refusal> {
        match (certificate, token) {
            (Some(name), None) => Ok(Principal { name, token: None }),
            (Some(_), Some(_)) => Err(Refusal::new(
                ErrorCode::UNAUTHORIZED,
                "present a client certificate or a token, not both",
            )),
            (None, None) => Err(Refusal::new(
                ErrorCode::UNAUTHORIZED,
                "a client certificate or a token is required",
            )),
            (None, Some(token)) => {
                let claims = self
                    .token_keys
                    .read()
                    .expect("token keys lock")
                    .verify(token)
                    .map_err(|e| Refusal::new(ErrorCode::UNAUTHORIZED, e.to_string()))?;
                let principal = Principal {
                    name: claims.sub.clone(),
                    token: Some(claims),
                };
                self.check_token(&principal)?;
                Ok(principal)
            }
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        connection: quinn::Connection,
        identity: Option<String>,
        remote: SocketAddr,
    ) {
        let max_frame = proto::max_frame_bytes(self.config.max_message_bytes);
        // §3: the first stream is the control stream and starts with Hello.
        let Ok(Ok((send, recv))) =
            tokio::time::timeout(FIRST_FRAME_TIMEOUT, connection.accept_bi()).await
        else {
            connection.close(0u32.into(), b"no control stream");
            return;
        };
        let mut writer = FrameWriter::new(send);
        let frame_timeout = Duration::from_millis(self.config.frame_timeout_ms);
        // Until it is authenticated (by a token in its Hello), a peer without a
        // certificate gets a small frame limit.
        let first_limit = if identity.is_some() {
            max_frame
        } else {
            HELLO_LIMIT
        };
        let mut reader = FrameReader::new(recv, first_limit).with_frame_timeout(frame_timeout);
        // An older ALPN is accepted only to refuse its Hello (proto::OLDER_ALPNS).
        let current_alpn = connection
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .is_some_and(|alpn| alpn == proto::ALPN);
        let principal = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(Frame::Hello(hello))))
                if hello.version == proto::PROTOCOL_VERSION && current_alpn =>
            {
                debug!(client = %hello.client, "hello");
                match self.principal(identity, hello.token.as_deref()) {
                    Ok(p) => p,
                    Err(r) => {
                        info!(reason = %r.message, "refusing a client");
                        metrics::counter!(m::REFUSED, "op" => "connect", "code" => r.code.name())
                            .increment(1);
                        writer.fail(r.code, r.message).await;
                        close_after_flush(&connection, r.code).await;
                        return;
                    }
                }
            }
            Ok(Ok(Some(Frame::Hello(hello)))) => {
                let message = format!(
                    "this broker speaks protocol version {} (ALPN {}); the client asked for version {}{}",
                    proto::PROTOCOL_VERSION,
                    String::from_utf8_lossy(proto::ALPN),
                    hello.version,
                    if current_alpn { "" } else { " over an older ALPN: upgrade the client" }
                );
                info!(%message, "refusing a client");
                writer.fail(ErrorCode::UNSUPPORTED_VERSION, message).await;
                close_after_flush(&connection, ErrorCode::UNSUPPORTED_VERSION).await;
                return;
            }
            Ok(Ok(Some(other))) => {
                writer
                    .fail(
                        ErrorCode::UNEXPECTED_FRAME,
                        format!("expected Hello first, got {}", other.name()),
                    )
                    .await;
                close_after_flush(&connection, ErrorCode::UNEXPECTED_FRAME).await;
                return;
            }
            Ok(Err(StreamError::Decode(e))) => {
                writer.fail(e.code(), format!("invalid hello: {e}")).await;
                close_after_flush(&connection, e.code()).await;
                return;
            }
            _ => {
                connection.close(0u32.into(), b"no hello");
                return;
            }
        };
        reader.set_max_frame_bytes(max_frame);
        let hello_ok = Frame::HelloOk(proto::HelloOk {
            version: proto::PROTOCOL_VERSION,
            server: format!("directmq/{}", env!("CARGO_PKG_VERSION")),
            identity: principal.name.clone(),
            max_message_bytes: self.config.max_message_bytes,
            max_frame_bytes: max_frame,
        });
        if writer.write(&hello_ok).await.is_err() {
            return;
        }
        debug!(%remote, "connection ready");
        let identity: Arc<Principal> = Arc::new(principal);
        {
            let broker = self.clone();
            let identity = identity.clone();
            self.tasks.spawn(
                async move { broker.control(identity, writer, reader).await }.in_current_span(),
            );
        }
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                a = connection.accept_bi() => a,
                _ = shutdown.changed() => break,
            };
            let (send, recv) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    debug!(reason = %e, "connection closed");
                    break;
                }
            };
            let broker = self.clone();
            let identity = identity.clone();
            self.tasks.spawn(
                async move {
                    broker
                        .stream(
                            identity,
                            FrameWriter::new(send),
                            FrameReader::new(recv, max_frame).with_frame_timeout(frame_timeout),
                        )
                        .await
                }
                .in_current_span(),
            );
        }
    }

    async fn stream(
        self: Arc<Self>,
        identity: Arc<Principal>,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) {
        let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, reader.next()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Err(StreamError::Decode(e))) => {
                metrics::counter!(m::PROTOCOL_ERRORS, "code" => e.code().name()).increment(1);
                writer.fail(e.code(), e.to_string()).await;
                reader.stop(0);
                return;
            }
            Err(_) => {
                writer
                    .fail(
                        ErrorCode::UNEXPECTED_FRAME,
                        "no frame within 10 s of opening the stream".into(),
                    )
                    .await;
                return;
            }
            _ => return,
        };
        match first {
            Frame::OpenPublish(open) => self.publish(identity, open, writer, reader).await,
            Frame::OpenPublishMulti(open) => {
                self.publish_multi(identity, open, writer, reader).await
            }
            Frame::Subscribe(sub) => self.consume(identity, sub, writer, reader).await,
            Frame::Watch(w) => self.watch(identity, w.prefix, writer, reader).await,
            other => {
                writer
                    .fail(
                        ErrorCode::UNEXPECTED_FRAME,
                        format!(
                            "a stream must start with OpenPublish, OpenPublishMulti, Subscribe or Watch, not {}",
                            other.name()
                        ),
                    )
                    .await;
                reader.stop(0);
            }
        }
    }

    // ---- control stream (§4.1) ----

    async fn control(
        self: Arc<Self>,
        identity: Arc<Principal>,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        // A frame already read past a run of creations (below), handled next.
        let mut ahead = None;
        loop {
            let next = match ahead.take() {
                Some(next) => next,
                None => tokio::select! {
                    next = reader.next() => next,
                    _ = shutdown.changed() => return,
                },
            };
            let frame = match next {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(StreamError::Decode(e)) => {
                    metrics::counter!(m::PROTOCOL_ERRORS, "code" => e.code().name()).increment(1);
                    writer.fail(e.code(), e.to_string()).await;
                    return;
                }
                Err(e @ StreamError::SlowFrame(_)) => {
                    metrics::counter!(m::PROTOCOL_ERRORS, "code" => "FRAME_TIMEOUT").increment(1);
                    writer.fail(ErrorCode::FRAME_TIMEOUT, e.to_string()).await;
                    return;
                }
                Err(_) => return,
            };
            let Frame::Request(request) = frame else {
                writer
                    .fail(
                        ErrorCode::UNEXPECTED_FRAME,
                        format!("expected a Request, got {}", frame.name()),
                    )
                    .await;
                return;
            };
            if let RequestBody::CreateChannel { .. } = &request.body {
                // Creations a client pipelined behind this one (an agent or a script
                // creating thousands of shards) are planned together and share group
                // commits instead of waiting for an fsync each. They are planned in order,
                // answered in order, and durable before anything after them runs, as if
                // handled one by one.
                let mut creations = vec![request];
                while creations.len() < CREATIONS_TOGETHER {
                    match reader.next_buffered() {
                        Ok(Some(Frame::Request(next)))
                            if matches!(next.body, RequestBody::CreateChannel { .. }) =>
                        {
                            creations.push(next)
                        }
                        Ok(None) => break,
                        other => {
                            ahead = Some(other);
                            break;
                        }
                    }
                }
                for (request_id, result) in self.create_channels(&identity, creations).await {
                    if writer.write(&reply(request_id, result)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            let result = self.request(&identity, request.body).await;
            if writer
                .write(&reply(request.request_id, result))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Creates channels in request order, each queued as soon as it is checked, then waits
    /// for them all: one group commit can cover every one.
    async fn create_channels(
        &self,
        identity: &Principal,
        requests: Vec<proto::Request>,
    ) -> Vec<(u64, Result<ResponseBody, Refusal>)> {
        let queued: Vec<_> = requests
            .into_iter()
            .map(|request| {
                let RequestBody::CreateChannel { name } = request.body else {
                    unreachable!("only creations are gathered");
                };
                let queued = self.queue_creation(identity, &name);
                (request.request_id, name, queued)
            })
            .collect();
        let mut results = Vec::with_capacity(queued.len());
        for (request_id, name, queued) in queued {
            let result = match queued {
                Ok(durable) => self.created(&name, durable).await,
                Err(refusal) => Err(refusal),
            };
            results.push((request_id, result));
        }
        results
    }

    /// Checks a creation and queues its record; the receiver answers once it is durable.
    fn queue_creation(
        &self,
        identity: &Principal,
        name: &str,
    ) -> Result<oneshot::Receiver<Result<(), Arc<StorageError>>>, Refusal> {
        self.check_token(identity)?;
        self.authorize(identity, Right::Admin, name)?;
        let mut txn = self.store.begin();
        let (_, record) = engine::resolve_channel(txn.state(), name, true, now_ms())?;
        let record = record.ok_or_else(|| {
            Refusal::new(
                ErrorCode::CHANNEL_EXISTS,
                format!("channel {name:?} already exists"),
            )
        })?;
        let (tx, rx) = oneshot::channel();
        txn.append(vec![record], Box::new(move |r| drop(tx.send(r))))
            .map_err(|e| self.storage_refusal(&e))?;
        Ok(rx)
    }

    /// Answers a queued creation once it is durable, and tells watchers.
    async fn created(
        &self,
        name: &str,
        durable: oneshot::Receiver<Result<(), Arc<StorageError>>>,
    ) -> Result<ResponseBody, Refusal> {
        match durable.await {
            Ok(Ok(())) => {
                self.announce(proto::WatchEventKind::Created, name);
                Ok(ResponseBody::Done)
            }
            Ok(Err(e)) => Err(self.storage_refusal(&e)),
            Err(_) => Err(self.storage_refusal(&StorageError::Closed)),
        }
    }

    async fn request(
        &self,
        identity: &Principal,
        body: RequestBody,
    ) -> Result<ResponseBody, Refusal> {
        self.check_token(identity)?;
        match body {
            RequestBody::CreateChannel { name } => {
                let durable = self.queue_creation(identity, &name)?;
                self.created(&name, durable).await
            }
            RequestBody::DeleteChannel { name } => {
                self.authorize(identity, Right::Admin, &name)?;
                let id = self.channel_id(&name)?;
                let (tx, rx) = oneshot::channel();
                {
                    let mut txn = self.store.begin();
                    // From now on no publish is planned for it; batches queued before are
                    // written before the deletion and go with the channel.
                    if let Some(channel) = txn.state().channel_mut(id) {
                        channel.deleting = true;
                    }
                    txn.append(
                        vec![Record::ChannelDeleted { channel_id: id }],
                        Box::new(move |r| drop(tx.send(r))),
                    )
                    .map_err(|e| self.storage_refusal(&e))?;
                }
                match rx.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(self.storage_refusal(&e)),
                    Err(_) => return Err(self.storage_refusal(&StorageError::Closed)),
                }
                // Wake the channel's consumer sessions: they find it gone and end.
                if let Some(heads) = self.heads.lock().expect("heads lock").remove(&id) {
                    heads.send_modify(|_| {});
                }
                self.progress
                    .lock()
                    .expect("progress lock")
                    .retain(|(channel, _), _| *channel != id);
                self.announce(proto::WatchEventKind::Deleted, &name);
                info!(channel = %name, "channel deleted");
                Ok(ResponseBody::Done)
            }
            RequestBody::ListChannels { prefix } => {
                let acl = self.acl();
                let infos = self.store.with_state(|s| {
                    s.channels_with_prefix(&prefix)
                        .filter(|c| c.durable && self.may_see(&acl, identity, &c.name))
                        .map(channel_info)
                        .collect()
                });
                Ok(ResponseBody::Channels(infos))
            }
            RequestBody::Status { prefix } => {
                Ok(ResponseBody::Status(self.status(identity, &prefix)?))
            }
            RequestBody::LastSequence {
                channel,
                producer_id,
            } => {
                self.authorize(identity, Right::Publish, &channel)?;
                let id = self.channel_id(&channel)?;
                let last = self.store.with_state(|s| {
                    s.channel(id)
                        .and_then(|c| c.producers.get(producer_id.as_str()))
                        .and_then(|p| p.durable.last_sequence)
                });
                Ok(ResponseBody::LastSequence(last))
            }
            RequestBody::ResetConsumer {
                channel,
                consumer,
                to,
            } => {
                self.authorize(identity, Right::Admin, &channel)?;
                if let Err(e) = proto::validate_identifier(&consumer) {
                    return Err(Refusal::new(
                        ErrorCode::INVALID_NAME,
                        format!("invalid consumer name {consumer:?}: {e}"),
                    ));
                }
                let id = self.channel_id(&channel)?;
                // Hold the consumer's lease while resetting, so no session opens and
                // reads the old position meanwhile.
                let key = (id, consumer.clone());
                if !self
                    .sessions
                    .lock()
                    .expect("sessions lock")
                    .insert(key.clone())
                {
                    return Err(Refusal::new(
                        ErrorCode::CONSUMER_BUSY,
                        format!("consumer {consumer:?} on {channel:?} has an active session; stop it first"),
                    ));
                }
                let reset = async {
                    let to = self.resolve_start(id, to).await?;
                    let offset = self
                        .store
                        .with_state(|s| s.channel(id).map(|c| engine::start_offset(c, to)))
                        .ok_or_else(|| {
                            Refusal::new(ErrorCode::CHANNEL_NOT_FOUND, "the channel was deleted")
                        })?;
                    self.append(vec![Record::CursorCommitted {
                        channel_id: id,
                        consumer: consumer.clone(),
                        offset,
                    }])
                    .await
                }
                .await;
                self.sessions.lock().expect("sessions lock").remove(&key);
                self.lease_released.notify_waiters();
                reset?;
                self.note_progress(id, &consumer);
                Ok(ResponseBody::Done)
            }
            RequestBody::IssueToken {
                identity: subject,
                publish,
                consume,
                admin,
                ttl_ms,
            } => {
                if identity.token.is_some() {
                    // A token must not outlive its own revocation through children.
                    return Err(Refusal::new(
                        ErrorCode::UNAUTHORIZED,
                        "tokens are issued to certificate holders only; connect with a client certificate",
                    ));
                }
                if let Err(e) = proto::validate_identifier(&subject) {
                    return Err(Refusal::new(
                        ErrorCode::INVALID_NAME,
                        format!("invalid identity {subject:?}: {e}"),
                    ));
                }
                // The issuer administers everything the token reaches.
                for prefix in publish.iter().chain(&consume).chain(&admin) {
                    if let Err(e) = proto::validate_prefix(prefix) {
                        return Err(Refusal::new(
                            ErrorCode::INVALID_CHANNEL_NAME,
                            format!("invalid prefix {prefix:?}: {e}"),
                        ));
                    }
                    self.authorize(identity, Right::Admin, prefix)?;
                }
                let now = now_ms();
                let claims = Claims {
                    id: crate::tokens::new_id()
                        .map_err(|e| Refusal::new(ErrorCode::STORAGE_ERROR, e))?,
                    sub: subject,
                    publish,
                    consume,
                    admin,
                    iat: now,
                    exp: now.saturating_add(self.token_ttl(ttl_ms)?),
                    kid: String::new(),
                };
                Ok(self.sign(claims))
            }
            RequestBody::RenewToken { token, ttl_ms } => {
                let keys = self.token_keys.read().expect("token keys lock").clone();
                let old = keys
                    .verify(&token)
                    .map_err(|e| Refusal::new(ErrorCode::UNAUTHORIZED, e.to_string()))?;
                // The token's own holder may renew it; so may whoever administers its scope.
                let own = identity.token.as_ref().is_some_and(|t| t.id == old.id);
                if !own {
                    for prefix in old.publish.iter().chain(&old.consume).chain(&old.admin) {
                        self.authorize(identity, Right::Admin, prefix)?;
                    }
                }
                self.check_token(&Principal {
                    name: old.sub.clone(),
                    token: Some(old.clone()),
                })?;
                let now = now_ms();
                let claims = Claims {
                    iat: now,
                    exp: now.saturating_add(self.token_ttl(ttl_ms)?),
                    ..old
                };
                Ok(self.sign(claims))
            }
            RequestBody::RevokeToken { token_or_id } => {
                let keys = self.token_keys.read().expect("token keys lock").clone();
                let (id, exp) = match keys.verify(&token_or_id) {
                    Ok(claims) => {
                        for prefix in claims
                            .publish
                            .iter()
                            .chain(&claims.consume)
                            .chain(&claims.admin)
                        {
                            self.authorize(identity, Right::Admin, prefix)?;
                        }
                        // Renewals share the id and may expire later than this token;
                        // none made before now outlives now + the longest lifetime.
                        let cover = now_ms().saturating_add(self.config.max_token_ttl_ms);
                        (claims.id, claims.exp.max(cover))
                    }
                    Err(_)
                        if token_or_id.len() == 32
                            && token_or_id.bytes().all(|b| b.is_ascii_hexdigit()) =>
                    {
                        // By id alone the scope is unknown: only an administrator of
                        // everything may revoke it.
                        self.authorize(identity, Right::Admin, "")?;
                        (token_or_id, u64::MAX)
                    }
                    Err(e) => {
                        return Err(Refusal::new(
                            ErrorCode::INVALID_NAME,
                            format!("neither a valid token nor a token id: {e}"),
                        ))
                    }
                };
                // The file is written and fsync'd off the runtime's workers.
                let revocations = self.revocations.clone();
                let now = now_ms();
                let revoked = id.clone();
                tokio::task::spawn_blocking(move || revocations.revoke(&revoked, exp, now))
                    .await
                    .map_err(|_| Refusal::new(ErrorCode::INTERNAL, "the revocation task failed"))?
                    .map_err(|e| Refusal::new(ErrorCode::STORAGE_ERROR, e))?;
                info!(token = %id, "token revoked");
                Ok(ResponseBody::Done)
            }
            _ => Err(Refusal::new(ErrorCode::UNEXPECTED_FRAME, "unknown request")),
        }
    }

    /// Turns a start time into the offset of the first retained message appended at or
    /// after it (the head when there is none); other positions pass through.
    async fn resolve_start(
        &self,
        channel_id: u64,
        start: proto::StartPosition,
    ) -> Result<proto::StartPosition, Refusal> {
        let proto::StartPosition::Timestamp(t) = start else {
            return Ok(start);
        };
        let (first, next) = self
            .store
            .with_state(|s| {
                s.channel(channel_id)
                    .map(|c| (c.first_offset, c.next_offset))
            })
            .ok_or_else(|| Refusal::new(ErrorCode::CHANNEL_NOT_FOUND, "the channel was deleted"))?;
        let store = self.store.clone();
        let offset =
            tokio::task::spawn_blocking(move || store.offset_at_time(channel_id, first, next, t))
                .await
                .map_err(|_| Refusal::new(ErrorCode::STORAGE_ERROR, "the index lookup failed"))?
                .map_err(|e| self.storage_refusal(&e))?;
        Ok(proto::StartPosition::Offset(offset))
    }

    fn channel_id(&self, name: &str) -> Result<u64, Refusal> {
        self.store
            .with_state(|s| {
                s.channel_id(name)
                    .filter(|id| s.channel(*id).is_some_and(|c| c.durable))
            })
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::CHANNEL_NOT_FOUND,
                    format!("channel {name:?} does not exist"),
                )
            })
    }

    fn status(
        &self,
        identity: &Principal,
        prefix: &str,
    ) -> Result<Vec<proto::ChannelStatus>, Refusal> {
        let acl = self.acl();
        let now = now_ms();
        let channels: Vec<StatusRow> = self.store.with_state(|s| {
            s.channels_with_prefix(prefix)
                .filter(|c| c.durable && self.may_see(&acl, identity, &c.name))
                .map(|c| {
                    (
                        channel_info(c),
                        c.id,
                        c.last_append_ms,
                        c.consumers.iter().map(|(n, o)| (n.clone(), *o)).collect(),
                    )
                })
                .collect()
        });
        let sessions = self.sessions.lock().expect("sessions lock").clone();
        let progress = self.progress.lock().expect("progress lock").clone();
        let stalled_after = self.config.stalled_after_ms;
        let mut out = Vec::with_capacity(channels.len());
        for (info, id, last_append_ms, consumers) in channels {
            let mut statuses = Vec::new();
            for (name, committed) in consumers {
                let lag_messages = info.head.saturating_sub(committed);
                let (lag_bytes, lag_ms) = if lag_messages == 0 {
                    (0, 0)
                } else {
                    let (bytes, oldest) = self
                        .store
                        .backlog(id, committed)
                        .map_err(|e| self.storage_refusal(&e))?;
                    (bytes, oldest.map_or(0, |t| now.saturating_sub(t)))
                };
                let key = (id, name);
                let moved = progress.get(&key).copied().unwrap_or(self.started_ms);
                let stalled = lag_messages > 0 && now.saturating_sub(moved) >= stalled_after;
                let (_, name) = key;
                statuses.push(proto::ConsumerStatus {
                    active: sessions.contains(&(id, name.clone())),
                    stalled,
                    name,
                    committed,
                    lag_messages,
                    lag_bytes,
                    lag_ms,
                });
            }
            out.push(proto::ChannelStatus {
                channel: info,
                last_append_ms,
                consumers: statuses,
            });
        }
        Ok(out)
    }

    /// Sets the gauges that are cheaper to compute when scraped than to keep up to date:
    /// channels, log bytes and, per consumer name, lag across its channels.
    pub fn refresh_gauges(&self) {
        #[derive(Default)]
        struct Lag {
            max: u64,
            sum: u64,
            max_ms: u64,
        }
        let now = now_ms();
        let progress = self.progress.lock().expect("progress lock").clone();
        let stalled_after = self.config.stalled_after_ms;
        // (channel id, head, consumer, committed), taken under the state lock.
        let (channels, positions): (usize, Vec<(u64, u64, String, u64)>) =
            self.store.with_state(|s| {
                let mut positions = Vec::new();
                let mut count = 0;
                for c in s.channels_with_prefix("").filter(|c| c.durable) {
                    count += 1;
                    for (name, committed) in &c.consumers {
                        positions.push((c.id, c.next_offset, name.clone(), *committed));
                    }
                }
                (count, positions)
            });
        let mut lags: HashMap<String, Lag> = HashMap::new();
        let mut stalled = 0u64;
        for (id, head, name, committed) in positions {
            let lag_messages = head.saturating_sub(committed);
            let mut lag_ms = 0;
            if lag_messages > 0 {
                if let Ok(Some(t)) = self.store.timestamp_at(id, committed) {
                    lag_ms = now.saturating_sub(t);
                }
                let moved = progress
                    .get(&(id, name.clone()))
                    .copied()
                    .unwrap_or(self.started_ms);
                if now.saturating_sub(moved) >= stalled_after {
                    stalled += 1;
                }
            }
            let lag = lags.entry(name).or_default();
            lag.max = lag.max.max(lag_messages);
            lag.sum += lag_messages;
            lag.max_ms = lag.max_ms.max(lag_ms);
        }
        let mut known = self.lag_names.lock().expect("lag names lock");
        for name in known.iter() {
            // A consumer that went away (its channels deleted) reads 0, not its last lag.
            lags.entry(name.clone()).or_default();
        }
        for (name, lag) in lags {
            metrics::gauge!(m::CONSUMER_LAG_MESSAGES_MAX, "consumer" => name.clone())
                .set(lag.max as f64);
            metrics::gauge!(m::CONSUMER_LAG_MESSAGES_SUM, "consumer" => name.clone())
                .set(lag.sum as f64);
            metrics::gauge!(m::CONSUMER_LAG_SECONDS_MAX, "consumer" => name.clone())
                .set(lag.max_ms as f64 / 1000.0);
            known.insert(name);
        }
        metrics::gauge!(m::CONSUMERS_STALLED).set(stalled as f64);
        metrics::gauge!(m::CHANNELS).set(channels as f64);
        metrics::gauge!(m::STORAGE_BYTES).set(self.store.disk_bytes() as f64);
    }

    /// Marks the channels whose unconsumed messages exceed their `max_bytes` or
    /// `max_age_ms`, and the filesystem when it is past `disk_high_water_percent`; publishes
    /// to them are refused with STORAGE_FULL until retention and consumers make room.
    fn check_bounds(&self) {
        let now = now_ms();
        // Channels with a bound, taken under the state lock.
        let forced = self.forced_floors.lock().expect("forced lock").clone();
        let bounded: Vec<(u64, String, u64, u64, ChannelSettings)> = self.store.with_state(|s| {
            s.channels_with_prefix("")
                .filter(|c| c.durable)
                .filter_map(|c| {
                    let settings = self.config.channel_settings(&c.name);
                    let floor = engine::retention_floor(c)
                        .max(forced.get(&c.id).copied().unwrap_or(0))
                        .min(c.next_offset);
                    ((settings.max_bytes > 0 || settings.max_age_ms > 0) && floor < c.next_offset)
                        .then(|| (c.id, c.name.clone(), floor, c.next_offset, settings))
                })
                .collect()
        });
        let mut full = HashMap::new();
        for (id, name, floor, head, settings) in bounded {
            let (max_bytes, max_age_ms) = (settings.max_bytes, settings.max_age_ms);
            if settings.on_full == OnFull::DropOldest {
                self.drop_oldest(id, &name, floor, head, max_bytes, max_age_ms, now);
                continue;
            }
            let Ok((bytes, oldest)) = self.store.backlog(id, floor) else {
                continue;
            };
            let age = oldest.map_or(0, |t| now.saturating_sub(t));
            if max_bytes > 0 && bytes >= max_bytes {
                full.insert(id, format!(
                    "channel {name:?} holds {bytes} bytes not yet committed by every consumer; its max_bytes is {max_bytes}"
                ));
            } else if max_age_ms > 0 && age >= max_age_ms {
                full.insert(id, format!(
                    "the oldest message of channel {name:?} not yet committed by every consumer is {age} ms old; its max_age_ms is {max_age_ms}"
                ));
            }
        }
        *self.full_channels.lock().expect("full lock") = full;
        let high_water = self.config.disk_high_water_percent;
        let disk = if high_water < 100 {
            match rustix::fs::statvfs(&self.config.data) {
                Ok(st) if st.f_blocks > 0 => {
                    let used = st.f_blocks.saturating_sub(st.f_bavail);
                    let percent = used.saturating_mul(100) / st.f_blocks;
                    (percent >= u64::from(high_water)).then(|| {
                        format!(
                            "the filesystem of {} is {percent}% full; disk_high_water_percent is {high_water}",
                            self.config.data.display()
                        )
                    })
                }
                _ => None,
            }
        } else {
            None
        };
        *self.disk_full.lock().expect("disk lock") = disk;
    }

    /// Moves every consumer of a drop-oldest channel past what exceeds its bounds, and lets
    /// retention delete it; counts what was dropped.
    #[allow(clippy::too_many_arguments)]
    fn drop_oldest(
        &self,
        id: u64,
        name: &str,
        floor: u64,
        head: u64,
        max_bytes: u64,
        max_age_ms: u64,
        now: u64,
    ) {
        let mut target = floor;
        if max_bytes > 0 {
            match self.store.offset_keeping_bytes(id, floor, max_bytes) {
                Ok(offset) => target = target.max(offset),
                Err(e) => warn!(channel = %name, error = %e, "drop-oldest: index scan failed"),
            }
        }
        if max_age_ms > 0 {
            let newest_too_old = now.saturating_sub(max_age_ms);
            match self
                .store
                .offset_at_time(id, floor, head, newest_too_old + 1)
            {
                Ok(offset) => target = target.max(offset),
                Err(e) => warn!(channel = %name, error = %e, "drop-oldest: index lookup failed"),
            }
        }
        let target = target.min(head);
        if target <= floor {
            return;
        }
        // Every consumer behind the target commits it: durable, so a restart keeps it.
        let records: Vec<Record> = self.store.with_state(|s| {
            s.channel(id).map_or_else(Vec::new, |c| {
                c.consumers
                    .iter()
                    .filter(|(_, &committed)| committed < target)
                    .map(|(consumer, _)| Record::CursorCommitted {
                        channel_id: id,
                        consumer: consumer.clone(),
                        offset: target,
                    })
                    .collect()
            })
        });
        if !records.is_empty() {
            if let Err(e) = self.store.append_blocking(records) {
                warn!(channel = %name, error = %e, "drop-oldest: could not move the consumers");
                return;
            }
        }
        self.forced_floors
            .lock()
            .expect("forced lock")
            .insert(id, target);
        let dropped = target - floor;
        metrics::counter!(m::DROPPED_MESSAGES).increment(dropped);
        warn!(channel = %name, dropped, from = floor, to = target, "drop-oldest: dropped unconsumed messages to stay within the channel's bounds");
    }

    /// The completion of an append that reserved `reserved` bytes of the disk budget:
    /// it releases them and, once the data is durable, moves each channel's head to its
    /// end (consumers waiting there wake), then answers `tx`.
    fn completion(
        &self,
        reserved: u64,
        moved: Vec<(watch::Sender<u64>, u64)>,
        tx: oneshot::Sender<Result<(), Arc<StorageError>>>,
    ) -> directmq_storage::Done {
        let reserved_bytes = self.reserved_bytes.clone();
        reserved_bytes.fetch_add(reserved, Ordering::AcqRel);
        Box::new(move |r| {
            reserved_bytes.fetch_sub(reserved, Ordering::AcqRel);
            if r.is_ok() {
                for (heads, end) in moved {
                    heads.send_if_modified(|h| {
                        let moves = end > *h;
                        *h = (*h).max(end);
                        // With no receiver the change is silent: waking nobody still took
                        // the eight locks of tokio's watch notifier, ~4% of the broker's
                        // CPU with 10,000 channels and no consumer. The value's write lock
                        // is held here, so a session subscribing meanwhile reads the head
                        // (`borrow`, a read lock) after this store; one that already read
                        // it was counted before the lock was taken, and is woken.
                        moves && heads.receiver_count() > 0
                    });
                }
            }
            let _ = tx.send(r);
        })
    }

    /// Whether a batch of `bytes` to `channel_id` may be appended under the bounds.
    fn check_room(&self, channel_id: u64, bytes: u64) -> Result<(), Refusal> {
        self.check_room_for(std::iter::once(channel_id), bytes)
    }

    /// Whether `bytes` more may be stored in the channels `channel_ids`.
    fn check_room_for(
        &self,
        channel_ids: impl Iterator<Item = u64>,
        bytes: u64,
    ) -> Result<(), Refusal> {
        let full = |why: String| {
            Refusal::new(
                ErrorCode::STORAGE_FULL,
                format!("{why}; nothing was stored, retry later"),
            )
        };
        if let Some(why) = self.disk_full.lock().expect("disk lock").clone() {
            return Err(full(why));
        }
        {
            let full_channels = self.full_channels.lock().expect("full lock");
            if !full_channels.is_empty() {
                for id in channel_ids {
                    if let Some(why) = full_channels.get(&id) {
                        return Err(full(why.clone()));
                    }
                }
            }
        }
        let budget = self.config.max_disk_bytes;
        if budget > 0 {
            let reserved = self.reserved_bytes.load(Ordering::Acquire);
            let used = self.store.disk_bytes() + reserved;
            if used + bytes > budget {
                return Err(full(format!(
                    "the log uses {used} of its {budget}-byte max_disk_bytes"
                )));
            }
        }
        Ok(())
    }

    // ---- watch stream (§4.4) ----

    /// The channels under `prefix` that `identity` may see now.
    fn visible_channels(&self, identity: &Principal, prefix: &str) -> Vec<String> {
        let acl = self.acl();
        self.store.with_state(|s| {
            s.channels_with_prefix(prefix)
                .filter(|c| c.durable && self.may_see(&acl, identity, &c.name))
                .map(|c| c.name.clone())
                .collect()
        })
    }

    async fn watch(
        self: Arc<Self>,
        identity: Arc<Principal>,
        prefix: String,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) {
        if let Err(e) = proto::validate_prefix(&prefix) {
            writer
                .fail(
                    ErrorCode::INVALID_CHANNEL_NAME,
                    format!("invalid prefix {prefix:?}: {e}"),
                )
                .await;
            return;
        }
        // Subscribe before listing, so nothing falls between the list and the changes; a
        // change already in the list is harmless to the watcher.
        let mut changes = self.changes.subscribe();
        let existing = |broker: &Broker| {
            Frame::WatchEvent(proto::WatchEvent {
                kind: proto::WatchEventKind::Existing,
                channels: broker.visible_channels(&identity, &prefix),
            })
        };
        if writer.write(&existing(&self)).await.is_err() {
            return;
        }
        metrics::gauge!(m::WATCHERS).increment(1.0);
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let frame = tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => {
                        // Rights are checked at each change, so a revoked right applies at once.
                        if !change.name.starts_with(prefix.as_str())
                            || !self.may_see(&self.acl(), &identity, &change.name)
                        {
                            continue;
                        }
                        Frame::WatchEvent(proto::WatchEvent {
                            kind: change.kind,
                            channels: vec![change.name.to_string()],
                        })
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        debug!(missed, "watcher fell behind; sending the full list again");
                        existing(&self)
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                // The watcher sends nothing after Watch; the stream ending means it left.
                next = reader.next() => match next {
                    Ok(Some(other)) => {
                        writer
                            .fail(
                                ErrorCode::UNEXPECTED_FRAME,
                                format!("a watch stream carries nothing after Watch, got {}", other.name()),
                            )
                            .await;
                        break;
                    }
                    _ => break,
                },
                _ = shutdown.changed() => break,
            };
            if writer.write(&frame).await.is_err() {
                break;
            }
        }
        metrics::gauge!(m::WATCHERS).decrement(1.0);
    }

    // ---- publish stream (§4.2) ----

    async fn publish(
        self: Arc<Self>,
        identity: Arc<Principal>,
        open: proto::OpenPublish,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) {
        let opened = self.open_publish(&identity, &open).await;
        let (channel_id, epoch) = match opened {
            Ok((channel_id, last_sequence, epoch)) => {
                let reply = Frame::PublishOpened(proto::PublishOpened { last_sequence });
                if writer.write(&reply).await.is_err() {
                    return;
                }
                (channel_id, epoch)
            }
            Err(r) => {
                metrics::counter!(m::REFUSED, "op" => "publish", "code" => r.code.name())
                    .increment(1);
                writer.fail(r.code, r.message).await;
                reader.stop(0);
                return;
            }
        };
        // Boxed: the channel allocates a block of 32 slots up front, and with one stream per
        // channel an 80-byte Ack per slot was ~25 MB at 10,000 channels.
        let (acks, pending) = mpsc::channel::<Box<Ack>>(ACKS_IN_FLIGHT);
        let acker = tokio::spawn(write_acks(writer, pending).in_current_span());
        let heads = self.head_sender(channel_id);
        let settings = self.config.channel_settings(&open.channel);
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let batch = match next_publish_frame(&mut reader, &mut shutdown).await {
                Ok(Frame::PublishBatch(batch)) => batch,
                other => {
                    if let Some(r) = refusal_for(other, "PublishBatch") {
                        let _ = acks.send(Box::new(Ack::Refused(0, r))).await;
                    }
                    break;
                }
            };
            let batch_id = batch.batch_id;
            // Rights are read at every batch: one removed by an ACL reload applies now.
            let planned = match self.authorize(&identity, Right::Publish, &open.channel) {
                Err(r) => Err(r),
                Ok(()) => {
                    self.plan_batch(
                        channel_id,
                        &open.producer_id,
                        epoch,
                        batch,
                        &heads,
                        settings,
                    )
                    .await
                }
            };
            if !answer(&acks, batch_id, planned).await {
                break;
            }
        }
        drop(acks);
        reader.stop(0);
        let _ = acker.await;
    }

    /// A publish stream for many channels (§4.2.1): each frame carries batches for several
    /// channels and gets one ack once all of them are durable. Every check that can refuse
    /// a part (names, rights, sizes, sequences) runs before any part is appended, so a
    /// refused frame appended nothing; a storage failure after some parts were queued is
    /// retryable, and the resent frame gets their original offsets as duplicates.
    async fn publish_multi(
        self: Arc<Self>,
        identity: Arc<Principal>,
        open: proto::OpenPublishMulti,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) {
        if let Err(e) = proto::validate_identifier(&open.producer_id) {
            metrics::counter!(m::REFUSED, "op" => "publish", "code" => ErrorCode::INVALID_NAME.name())
                .increment(1);
            writer
                .fail(
                    ErrorCode::INVALID_NAME,
                    format!("invalid producer id {:?}: {e}", open.producer_id),
                )
                .await;
            reader.stop(0);
            return;
        }
        let epoch = self.store.with_state(|s| s.epoch());
        let reply = Frame::PublishOpened(proto::PublishOpened {
            last_sequence: None,
        });
        if writer.write(&reply).await.is_err() {
            return;
        }
        let (acks, pending) = mpsc::channel::<Box<Ack>>(ACKS_IN_FLIGHT);
        let acker = tokio::spawn(write_acks(writer, pending).in_current_span());
        let mut table = Declared::default();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let batch = match next_publish_frame(&mut reader, &mut shutdown).await {
                Ok(Frame::PublishMulti(batch)) => batch,
                other => {
                    if let Some(r) = refusal_for(other, "PublishMulti") {
                        let _ = acks.send(Box::new(Ack::Refused(0, r))).await;
                    }
                    break;
                }
            };
            let batch_id = batch.batch_id;
            let planned = self
                .plan_multi(&identity, &open, epoch, batch, &mut table)
                .await;
            if !answer(&acks, batch_id, planned).await {
                break;
            }
        }
        drop(acks);
        reader.stop(0);
        let _ = acker.await;
    }

    /// Opens the channels a frame declares (`names`, checked by [`Declared::check`]), all at
    /// once, and numbers them on after the stream's `table`: the creations of new ones are
    /// queued together and share a group commit, where opening them one by one waited for an
    /// fsync each (seconds for an agent's first frame to thousands of new shards). A refused
    /// open refuses the frame (the first in declaration order); the other new channels may
    /// have been created meanwhile.
    async fn declare(
        &self,
        identity: &Principal,
        open: &proto::OpenPublishMulti,
        epoch: u64,
        names: Vec<String>,
        table: &mut Declared,
    ) -> Result<(), Refusal> {
        if names.is_empty() {
            return Ok(());
        }
        let opens: Vec<proto::OpenPublish> = names
            .iter()
            .map(|name| proto::OpenPublish {
                channel: name.clone(),
                producer_id: open.producer_id.clone(),
                create: open.create,
            })
            .collect();
        let opened = futures_util::future::join_all(
            opens
                .iter()
                .map(|single| self.open_publish(identity, single)),
        )
        .await;
        // A refusal ends the stream (§4.2.1), so a table left part-extended is never used.
        for (name, result) in names.into_iter().zip(opened) {
            let (id, _, channel_epoch) = result?;
            if channel_epoch != epoch {
                return Err(Refusal::new(
                    ErrorCode::STORAGE_ERROR,
                    "a write failed on the broker; reopen the stream and resend unacknowledged batches",
                ));
            }
            table.names.insert(name.clone());
            table.by_number.push(Resolved {
                id,
                heads: self.head_sender(id),
                settings: self.config.channel_settings(&name),
                name,
                granted_by: None,
            });
        }
        Ok(())
    }

    async fn plan_multi(
        &self,
        identity: &Principal,
        open: &proto::OpenPublishMulti,
        epoch: u64,
        batch: proto::PublishMulti,
        table: &mut Declared,
    ) -> Result<Ack, Refusal> {
        let received = Instant::now();
        // Planned and queued under as few state locks as possible: one for the whole
        // frame, unless a part must first wait for its own earlier copy to become durable
        // (a resend after a reconnect).
        struct Planned {
            id: u64,
            /// Taken when the part is queued (one clone of the sender per part, not two).
            heads: Option<watch::Sender<u64>>,
            durability: Durability,
            incoming: Vec<Incoming>,
            on_disk: u64,
        }
        let proto::PublishMulti {
            batch_id,
            declare,
            parts,
        } = batch;
        // A frame that is malformed by construction is refused before it can create any
        // channel.
        table.check(&declare, &parts)?;
        self.declare(identity, open, epoch, declare, table).await?;
        let mut planned = Vec::with_capacity(parts.len());
        let (mut count, mut bytes, mut frame_on_disk) = (0u64, 0u64, 0u64);
        // Rights are read at every frame: a token revoked or expired, or a right removed by
        // an ACL reload, applies now. A channel's grant is looked up once per ACL, not per
        // part: with thousands of channels on a stream, matching names against the grants
        // was ~3% of the broker's CPU.
        self.check_token(identity)?;
        let acl = self.acl();
        // Every check that can refuse a part runs here, before anything is queued.
        for part in parts {
            let r = &mut table.by_number[part.channel as usize];
            if !r.granted_by.as_ref().is_some_and(|g| Arc::ptr_eq(g, &acl)) {
                granted(&acl, identity, Right::Publish, &r.name)?;
                r.granted_by = Some(acl.clone());
            }
            let (id, heads, settings) = (r.id, r.heads.clone(), r.settings);
            check_sizes(&part.messages, settings.max_message_bytes, &r.name)?;
            if part
                .messages
                .windows(2)
                .any(|w| w[1].sequence <= w[0].sequence)
            {
                return Err(Refusal::new(
                    ErrorCode::INVALID_SEQUENCE,
                    format!(
                        "the sequences for channel {:?} do not strictly increase",
                        r.name
                    ),
                ));
            }
            let part_bytes: u64 = part.messages.iter().map(|m| m.payload.len() as u64).sum();
            let on_disk = on_disk(part_bytes, part.messages.len() as u64);
            frame_on_disk += on_disk;
            count += part.messages.len() as u64;
            bytes += part_bytes;
            planned.push(Planned {
                id,
                heads: Some(heads),
                durability: settings.durability,
                incoming: incoming(part.messages),
                on_disk,
            });
        }
        // The disk budget is checked against the whole frame, and the full channels' list
        // read once for it, not per part. A frame without parts (a barrier) stores nothing.
        if !planned.is_empty() {
            self.check_room_for(planned.iter().map(|p| p.id), frame_on_disk)?;
        }
        metrics::histogram!(m::BATCH_MESSAGES).record(count as f64);
        let mut acks = Vec::with_capacity(planned.len());
        let mut durables = Vec::new();
        let mut appended_total = 0u64;
        let mut next = 0;
        while next < planned.len() || (planned.is_empty() && durables.is_empty()) {
            let (tx, rx) = oneshot::channel();
            let mut records = Vec::new();
            let mut moved: Vec<(watch::Sender<u64>, u64)> = Vec::new();
            let mut reserved = 0u64;
            let mut durability: Option<Durability> = None;
            let mut waits = false;
            let mut failed = None;
            {
                let mut txn = self.store.begin();
                if txn.state().epoch() != epoch {
                    return Err(Refusal::new(
                        ErrorCode::STORAGE_ERROR,
                        "a write failed on the broker; reopen the stream and resend unacknowledged batches",
                    ));
                }
                // A channel deleted since the stream resolved it refuses the frame before
                // any part is planned (the state lock keeps it so until the append).
                if let Some(p) = planned[next..]
                    .iter()
                    .find(|p| txn.state().channel(p.id).is_none_or(|c| c.deleting))
                {
                    let r = Refusal::new(
                        ErrorCode::CHANNEL_NOT_FOUND,
                        format!("channel #{} was deleted", p.id),
                    );
                    if durables.is_empty() && next == 0 {
                        return Err(r);
                    }
                    // Only after a part waited for its own earlier copy: the parts before
                    // it are queued; a retryable refusal makes the client resend them, and
                    // they come back as duplicates.
                    return Err(Refusal::new(ErrorCode::STORAGE_ERROR, r.message));
                }
                // One clock read per append, not per part.
                let now = now_ms();
                while let Some(p) = planned.get_mut(next) {
                    let incoming = std::mem::take(&mut p.incoming);
                    let decision = match engine::plan_publish(
                        txn.state(),
                        p.id,
                        &open.producer_id,
                        incoming,
                        now,
                    ) {
                        Ok(decision) => decision,
                        Err(r) => {
                            // Parts planned before it are queued below all the same.
                            failed = Some(r);
                            break;
                        }
                    };
                    durability = Some(stronger(durability, p.durability));
                    match decision {
                        PublishDecision::Append {
                            record,
                            first_offset,
                            appended,
                            duplicates,
                        } => {
                            if let Some(record) = record {
                                records.push(record);
                                let heads = p.heads.take().expect("a part is queued once");
                                moved.push((heads, first_offset + u64::from(appended)));
                                reserved += p.on_disk;
                            }
                            appended_total += u64::from(appended);
                            acks.push(proto::PartAck {
                                first_offset,
                                appended,
                                duplicates: duplicates
                                    .into_iter()
                                    .map(|(index, offset)| proto::DuplicateAck { index, offset })
                                    .collect(),
                            });
                            next += 1;
                        }
                        PublishDecision::WaitForInFlight(back) => {
                            p.incoming = back;
                            waits = true;
                            break;
                        }
                    }
                }
                let done = self.completion(reserved, moved, tx);
                // With no record: a barrier, done once what is queued before is durable.
                if let Err(e) =
                    txn.append_with(records, durability.unwrap_or(Durability::Fsync), done)
                {
                    self.reserved_bytes.fetch_sub(reserved, Ordering::AcqRel);
                    return Err(self.storage_refusal(&e));
                }
            }
            if let Some(r) = failed {
                return Err(r);
            }
            if waits {
                match rx.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(self.storage_refusal(&e)),
                    Err(_) => return Err(self.storage_refusal(&StorageError::Closed)),
                }
            } else {
                durables.push(rx);
            }
        }
        metrics::counter!(m::PUBLISHED_MESSAGES).increment(appended_total);
        metrics::counter!(m::PUBLISHED_BYTES).increment(bytes);
        metrics::counter!(m::DUPLICATES).increment(count - appended_total);
        Ok(Ack::Multi {
            batch_id,
            parts: acks,
            durables,
            received,
        })
    }

    async fn open_publish(
        &self,
        identity: &Principal,
        open: &proto::OpenPublish,
    ) -> Result<(u64, Option<u64>, u64), Refusal> {
        if let Err(e) = proto::validate_channel_name(&open.channel) {
            return Err(Refusal::new(
                ErrorCode::INVALID_CHANNEL_NAME,
                format!("invalid channel name {:?}: {e}", open.channel),
            ));
        }
        self.authorize(identity, Right::Publish, &open.channel)?;
        if let Err(e) = proto::validate_identifier(&open.producer_id) {
            return Err(Refusal::new(
                ErrorCode::INVALID_NAME,
                format!("invalid producer id {:?}: {e}", open.producer_id),
            ));
        }
        let create = open.create && self.config.auto_create_channels;
        let (id, wait, creating) = {
            let mut txn = self.store.begin();
            let (id, record) =
                engine::resolve_channel(txn.state(), &open.channel, create, now_ms())?;
            let channel = txn.state().channel(id).expect("resolved");
            // Answer from durable state only: a channel another stream is still creating,
            // or this producer's batches still waiting for their fsync, are waited for.
            let pending_producer = channel
                .producers
                .get(open.producer_id.as_str())
                .is_some_and(|p| p.pending_last.is_some());
            let creating = record.is_some();
            let wait = if creating || !channel.durable || pending_producer {
                let (tx, rx) = oneshot::channel();
                txn.append(
                    record.into_iter().collect(),
                    Box::new(move |r| drop(tx.send(r))),
                )
                .map_err(|e| self.storage_refusal(&e))?;
                Some(rx)
            } else {
                None
            };
            (id, wait, creating)
        };
        if let Some(durable) = wait {
            match durable.await {
                Ok(Ok(())) if creating => {
                    self.announce(proto::WatchEventKind::Created, &open.channel);
                }
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.storage_refusal(&e)),
                Err(_) => return Err(self.storage_refusal(&StorageError::Closed)),
            }
        }
        self.store.with_state(|s| {
            let channel = s.channel(id).filter(|c| c.durable).ok_or_else(|| {
                Refusal::new(
                    ErrorCode::STORAGE_ERROR,
                    format!("channel {:?} could not be created; retry", open.channel),
                )
            })?;
            let last = channel
                .producers
                .get(open.producer_id.as_str())
                .and_then(|p| p.durable.last_sequence);
            Ok((id, last, s.epoch()))
        })
    }

    async fn plan_batch(
        &self,
        channel_id: u64,
        producer_id: &str,
        epoch: u64,
        batch: proto::PublishBatch,
        heads: &watch::Sender<u64>,
        settings: ChannelSettings,
    ) -> Result<Ack, Refusal> {
        check_sizes(&batch.messages, settings.max_message_bytes, "the batch")?;
        let received = Instant::now();
        let count = batch.messages.len() as u64;
        let bytes: u64 = batch.messages.iter().map(|m| m.payload.len() as u64).sum();
        metrics::histogram!(m::BATCH_MESSAGES).record(count as f64);
        let on_disk = on_disk(bytes, count);
        self.check_room(channel_id, on_disk)?;
        let mut incoming = incoming(batch.messages);
        loop {
            let (tx, rx) = oneshot::channel();
            let decision = {
                let mut txn = self.store.begin();
                if txn.state().epoch() != epoch {
                    // A write failed since this stream opened: an earlier batch of ours may
                    // be among the dropped ones, so nothing later may be appended before
                    // the client resends from its first unacknowledged batch.
                    return Err(Refusal::new(
                        ErrorCode::STORAGE_ERROR,
                        "a write failed on the broker; reopen the stream and resend unacknowledged batches",
                    ));
                }
                let mut decision =
                    engine::plan_publish(txn.state(), channel_id, producer_id, incoming, now_ms())?;
                if let PublishDecision::Append {
                    record,
                    first_offset,
                    appended,
                    ..
                } = &mut decision
                {
                    let end = *first_offset + u64::from(*appended);
                    let done = self.completion(on_disk, vec![(heads.clone(), end)], tx);
                    // No record: a barrier, acked once what is queued before is durable.
                    if let Err(e) = txn.append_with(
                        record.take().into_iter().collect(),
                        settings.durability,
                        done,
                    ) {
                        // Refused before queueing: `done` was dropped without running.
                        self.reserved_bytes.fetch_sub(on_disk, Ordering::AcqRel);
                        return Err(self.storage_refusal(&e));
                    }
                } else {
                    // A retry of messages still waiting for their fsync.
                    txn.append_with(
                        Vec::new(),
                        settings.durability,
                        Box::new(move |r| drop(tx.send(r))),
                    )
                    .map_err(|e| self.storage_refusal(&e))?;
                }
                decision
            };
            match decision {
                PublishDecision::Append {
                    first_offset,
                    appended,
                    duplicates,
                    ..
                } => {
                    metrics::counter!(m::PUBLISHED_MESSAGES).increment(u64::from(appended));
                    metrics::counter!(m::PUBLISHED_BYTES).increment(bytes);
                    metrics::counter!(m::DUPLICATES).increment(count - u64::from(appended));
                    return Ok(Ack::Pending {
                        ack: proto::PublishAck {
                            batch_id: batch.batch_id,
                            first_offset,
                            appended,
                            duplicates: duplicates
                                .into_iter()
                                .map(|(index, offset)| proto::DuplicateAck { index, offset })
                                .collect(),
                        },
                        durable: rx,
                        received,
                    });
                }
                PublishDecision::WaitForInFlight(back) => match rx.await {
                    Ok(Ok(())) => incoming = back,
                    Ok(Err(e)) => return Err(self.storage_refusal(&e)),
                    Err(_) => return Err(self.storage_refusal(&StorageError::Closed)),
                },
            }
        }
    }

    // ---- consume stream (§4.3) ----

    async fn consume(
        self: Arc<Self>,
        identity: Arc<Principal>,
        sub: proto::Subscribe,
        mut writer: FrameWriter,
        mut reader: FrameReader,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let mut waiting = false;
        let opened = loop {
            // Registered before trying, so a release between the try and the wait is seen.
            let released = self.lease_released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.open_session(&identity, &sub).await {
                Err(r) if r.code == ErrorCode::CONSUMER_BUSY && sub.standby => {
                    if !waiting {
                        waiting = true;
                        metrics::gauge!(m::STANDBYS).increment(1.0);
                        debug!(channel = %sub.channel, consumer = %sub.consumer, "waiting as a standby");
                    }
                    tokio::select! {
                        () = &mut released => {}
                        // The standby's client went away or broke the protocol.
                        _ = reader.next() => break None,
                        _ = shutdown.changed() => break None,
                    }
                }
                other => break Some(other),
            }
        };
        if waiting {
            metrics::gauge!(m::STANDBYS).decrement(1.0);
        }
        let Some(opened) = opened else {
            reader.stop(0);
            return;
        };
        let session = match opened {
            Ok(s) => s,
            Err(r) => {
                metrics::counter!(m::REFUSED, "op" => "consume", "code" => r.code.name())
                    .increment(1);
                writer.fail(r.code, r.message).await;
                reader.stop(0);
                return;
            }
        };
        let Session {
            channel_id,
            next,
            head,
            _lease,
        } = session;
        let mut next = next;
        let mut heads = self.head_sender(channel_id).subscribe();
        let head = (*heads.borrow()).max(head);
        if writer
            .write(&Frame::Subscribed(proto::Subscribed {
                next_offset: next,
                head,
            }))
            .await
            .is_err()
        {
            return;
        }
        let mut last_commit = next;
        let mut credit_messages = u64::from(sub.credit_messages);
        let mut credit_bytes = sub.credit_bytes;
        let (frames_tx, mut frames) = mpsc::channel(64);
        let read_task = tokio::spawn(async move {
            loop {
                let item = reader.next().await;
                let stop = !matches!(item, Ok(Some(_)));
                if frames_tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        let (commits_tx, mut commits) = mpsc::unbounded_channel::<Result<u64, Refusal>>();
        // What was read and not yet delivered; see InHand.
        let mut in_hand = InHand::default();
        // Since when the session has waited for credit with a read in hand.
        let mut hold_since: Option<tokio::time::Instant> = None;
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let head_now = *heads.borrow_and_update();
            let deliverable = credit_messages > 0 && credit_bytes > 0 && next < head_now;
            if deliverable {
                // Rights are read at every delivery: one removed by an ACL reload applies now.
                if let Err(r) = self.authorize(&identity, Right::Consume, &sub.channel) {
                    metrics::counter!(m::REFUSED, "op" => "consume", "code" => r.code.name())
                        .increment(1);
                    writer.fail(r.code, r.message).await;
                    break;
                }
                let max_messages = (credit_messages as usize).min(DELIVER_MESSAGES);
                let max_bytes = credit_bytes.min(DELIVER_BYTES);
                // Carried messages go out only while the channel still holds them: after a
                // deletion or a drop-oldest bound past them, the read below answers as it
                // would have (channel gone, MESSAGES_DROPPED).
                let still_stored = || {
                    self.store.with_state(|s| {
                        s.channel(channel_id)
                            .is_some_and(|c| !c.deleting && c.first_offset <= next)
                    })
                };
                let carried = in_hand.carry.front().is_some_and(|m| m.offset == next);
                if !carried {
                    in_hand.carry.clear();
                    in_hand.buffers.clear();
                }
                // A read ahead starts where what was read (and is carried) ends.
                let ahead_at = in_hand.carry.back().map_or(next, |m| m.offset + 1);
                if in_hand
                    .ahead
                    .as_ref()
                    .is_some_and(|(from, _)| *from != ahead_at)
                {
                    in_hand.ahead = None;
                }
                if (carried || in_hand.ahead.is_some()) && !still_stored() {
                    in_hand.drop_all();
                }
                if in_hand.carry.is_empty() {
                    let read = match in_hand.ahead.take() {
                        Some((_, read)) => read.await,
                        None => {
                            let store = self.store.clone();
                            tokio::task::spawn_blocking(move || {
                                store.read_whole_batches(channel_id, next, max_messages, max_bytes)
                            })
                            .await
                        }
                    };
                    let (read, buffers) = match read {
                        Ok(Ok(read)) => read,
                        Ok(Err(e)) => {
                            warn!(error = %e, channel_id, offset = next, "read failed; ending the session");
                            writer
                                .fail(
                                    ErrorCode::STORAGE_ERROR,
                                    format!("the broker could not read offset {next}: {e}"),
                                )
                                .await;
                            break;
                        }
                        Err(_) => break,
                    };
                    // Only what is durable is delivered, or carried.
                    in_hand
                        .carry
                        .extend(read.into_iter().filter(|m| m.offset < head_now));
                    in_hand.buffers = buffers;
                    in_hand.read_ahead(
                        &self.store,
                        channel_id,
                        credit_messages,
                        credit_bytes,
                        head_now,
                    );
                }
                let mut messages = Vec::with_capacity(in_hand.carry.len().min(max_messages));
                let mut taken_bytes = 0u64;
                while let Some(m) = in_hand.carry.pop_front() {
                    taken_bytes += m.payload.len() as u64;
                    messages.push(m);
                    if messages.len() >= max_messages || taken_bytes >= max_bytes {
                        break;
                    }
                }
                let buffers = if in_hand.carry.is_empty() {
                    std::mem::take(&mut in_hand.buffers)
                } else {
                    // The rest lies in the last batch read: only its buffer is kept.
                    let all = in_hand.buffers.clone();
                    in_hand
                        .buffers
                        .drain(..in_hand.buffers.len().saturating_sub(1));
                    all
                };
                if let Some(first) = messages.first().filter(|m| m.offset > next) {
                    // The batches at `next` are gone (see the MESSAGES_DROPPED case below).
                    writer
                        .fail(
                            ErrorCode::MESSAGES_DROPPED,
                            format!(
                                "offsets {next}..{} are no longer stored; subscribe again to continue",
                                first.offset
                            ),
                        )
                        .await;
                    break;
                }
                if let Some(last) = messages.last() {
                    let bytes: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
                    next = last.offset + 1;
                    credit_messages -= messages.len() as u64;
                    credit_bytes = credit_bytes.saturating_sub(bytes);
                    metrics::counter!(m::DELIVERED_MESSAGES).increment(messages.len() as u64);
                    metrics::counter!(m::DELIVERED_BYTES).increment(bytes);
                    let frame = Frame::Deliver(proto::Deliver {
                        messages: messages
                            .into_iter()
                            .map(|m| proto::DeliveredMessage {
                                offset: m.offset,
                                timestamp_ms: m.timestamp_ms,
                                headers: m.headers,
                                payload: m.payload,
                            })
                            .collect(),
                    });
                    // The payloads go out as slices of the batches read, not copies.
                    if writer.write_backed(&frame, &buffers).await.is_err() {
                        break;
                    }
                    hold_since = None;
                } else {
                    // The head moved but the index has nothing yet at `next`: retention
                    // moved the start, or the channel is gone.
                    let first = self
                        .store
                        .with_state(|s| s.channel(channel_id).map(|c| c.first_offset));
                    match first {
                        Some(first) if first > next => {
                            // What this session was about to deliver is gone (a
                            // drop-oldest bound moved the consumer on, or retention raced a
                            // new consumer). The client subscribes again and continues from
                            // the committed offset; a silent jump would look like a gap.
                            writer
                                .fail(
                                    ErrorCode::MESSAGES_DROPPED,
                                    format!("offsets {next}..{first} are no longer stored; subscribe again to continue"),
                                )
                                .await;
                            break;
                        }
                        Some(_) => {
                            warn!(channel_id, offset = next, "no batch at a durable offset");
                            writer
                                .fail(
                                    ErrorCode::STORAGE_ERROR,
                                    format!("offset {next} is missing from the log"),
                                )
                                .await;
                            break;
                        }
                        None => {
                            writer
                                .fail(
                                    ErrorCode::CHANNEL_NOT_FOUND,
                                    "the channel was deleted".into(),
                                )
                                .await;
                            break;
                        }
                    }
                }
            }
            // Handle what arrived; wait only when there is nothing more to deliver.
            let behind = next < *heads.borrow();
            let more = credit_messages > 0 && credit_bytes > 0 && behind;
            // Out of credit in a catch-up, the read in hand is kept a moment: the consumer
            // is usually about to grant more, and dropping it meant reading the same bytes
            // from the disk again. A wait that goes on drops it, so a stalled consumer pins
            // no buffer.
            let holding = !more && behind && !in_hand.is_empty();
            if holding {
                hold_since.get_or_insert_with(tokio::time::Instant::now);
            } else {
                hold_since = None;
            }
            if !more && !holding {
                in_hand.drop_all();
            }
            let hold_until = hold_since.map(|since| since + HOLD_READ_FOR);
            tokio::select! {
                biased;
                frame = frames.recv() => match frame {
                    Some(Ok(Some(Frame::Credit(c)))) => {
                        credit_messages = credit_messages.saturating_add(u64::from(c.messages));
                        credit_bytes = credit_bytes.saturating_add(c.bytes);
                    }
                    Some(Ok(Some(Frame::Commit(c)))) => {
                        if let Err(r) = self.authorize(&identity, Right::Consume, &sub.channel) {
                            metrics::counter!(m::REFUSED, "op" => "commit", "code" => r.code.name()).increment(1);
                            writer.fail(r.code, r.message).await;
                            break;
                        }
                        if c.offset <= last_commit {
                            // Cumulative: an older commit than one already taken changes nothing.
                            let _ = commits_tx.send(Ok(c.offset));
                        } else if self.commit(channel_id, &sub.consumer, c.offset, commits_tx.clone()) {
                            last_commit = c.offset;
                        }
                    }
                    Some(Ok(Some(other))) => {
                        writer.fail(ErrorCode::UNEXPECTED_FRAME, format!("expected Credit or Commit, got {}", other.name())).await;
                        break;
                    }
                    Some(Err(StreamError::Decode(e))) => {
                        metrics::counter!(m::PROTOCOL_ERRORS, "code" => e.code().name()).increment(1);
                        writer.fail(e.code(), e.to_string()).await;
                        break;
                    }
                    Some(Err(e @ StreamError::SlowFrame(_))) => {
                        metrics::counter!(m::PROTOCOL_ERRORS, "code" => "FRAME_TIMEOUT").increment(1);
                        writer.fail(ErrorCode::FRAME_TIMEOUT, e.to_string()).await;
                        break;
                    }
                    _ => break,
                },
                Some(result) = commits.recv() => {
                    let frame = match result {
                        Ok(offset) => Frame::CommitOk(proto::CommitOk { offset }),
                        Err(r) => {
                            metrics::counter!(m::REFUSED, "op" => "commit", "code" => r.code.name()).increment(1);
                            Frame::Error(proto::ErrorFrame { request_id: 0, code: r.code, message: r.message })
                        }
                    };
                    if writer.write(&frame).await.is_err() {
                        break;
                    }
                }
                () = std::future::ready(()), if more => {}
                () = tokio::time::sleep_until(hold_until.unwrap_or_else(tokio::time::Instant::now)), if hold_until.is_some() => {
                    in_hand.drop_all();
                    hold_since = None;
                }
                changed = heads.changed(), if !more => {
                    let gone = self.store.with_state(|s| s.channel(channel_id).is_none());
                    if changed.is_err() || gone {
                        writer.fail(ErrorCode::CHANNEL_NOT_FOUND, "the channel was deleted".into()).await;
                        break;
                    }
                }
                _ = shutdown.changed() => {
                    writer.fail(ErrorCode::SHUTTING_DOWN, "the broker is shutting down; reconnect".into()).await;
                    break;
                }
                else => break,
            }
        }
        read_task.abort();
    }

    async fn open_session(
        self: &Arc<Self>,
        identity: &Principal,
        sub: &proto::Subscribe,
    ) -> Result<Session, Refusal> {
        self.authorize(identity, Right::Consume, &sub.channel)?;
        let channel_id = self.channel_id(&sub.channel)?;
        let lease = Lease::take(self, channel_id, &sub.consumer).ok_or_else(|| {
            Refusal::new(
                ErrorCode::CONSUMER_BUSY,
                format!(
                    "consumer {:?} on channel {:?} already has an active session; only one may read at a time",
                    sub.consumer, sub.channel
                ),
            )
        })?;
        // Commits (and resets) queued before this session held the lease (by the session
        // it replaces) must be durable before its start is read from the durable cursor;
        // otherwise it would start behind them and its own commits could land after
        // theirs and move the cursor back (found by the engine fuzz target).
        self.append(Vec::new()).await?;
        let start = self.resolve_start(channel_id, sub.start).await?;
        let (next, record, head) = {
            let state_result = self.store.with_state(|s| {
                let c = s.channel(channel_id).ok_or_else(|| {
                    Refusal::new(ErrorCode::CHANNEL_NOT_FOUND, "the channel was deleted")
                })?;
                let (next, record) = engine::plan_subscribe(c, &sub.consumer, start)?;
                Ok::<_, Refusal>((next, record, c.next_offset))
            });
            state_result?
        };
        if let Some(record) = record {
            // The consumer exists (and holds back retention) once this is durable.
            self.append(vec![record]).await?;
        }
        Ok(Session {
            channel_id,
            next,
            head,
            _lease: lease,
        })
    }

    fn commit(
        &self,
        channel_id: u64,
        consumer: &str,
        offset: u64,
        reply: mpsc::UnboundedSender<Result<u64, Refusal>>,
    ) -> bool {
        let mut txn = self.store.begin();
        let planned = match txn.state().channel(channel_id) {
            Some(c) => engine::plan_commit(c, consumer, offset),
            None => Err(Refusal::new(
                ErrorCode::CHANNEL_NOT_FOUND,
                "the channel was deleted",
            )),
        };
        match planned {
            Ok(Some(record)) => {
                self.note_progress(channel_id, consumer);
                let reply2 = reply.clone();
                let refusal = |e: &StorageError| match e {
                    StorageError::Closed => {
                        Refusal::new(ErrorCode::SHUTTING_DOWN, "the broker is shutting down")
                    }
                    e => Refusal::new(
                        ErrorCode::STORAGE_ERROR,
                        format!("the commit could not be stored: {e}"),
                    ),
                };
                let result = txn.append(
                    vec![record],
                    Box::new(move |r| {
                        let _ = reply2.send(r.map(|()| offset).map_err(|e| refusal(&e)));
                    }),
                );
                match result {
                    Ok(()) => true,
                    Err(e) => {
                        let _ = reply.send(Err(refusal(&e)));
                        false
                    }
                }
            }
            Ok(None) => {
                let _ = reply.send(Ok(offset));
                true
            }
            Err(r) => {
                let _ = reply.send(Err(r));
                false
            }
        }
    }
}

/// Who is on a connection: the certificate's common name, or a token's identity and
/// claims.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    pub token: Option<Claims>,
}

/// A channel's info, id, last append time and consumer positions, taken under the lock.
type StatusRow = (proto::ChannelInfo, u64, u64, Vec<(String, u64)>);

struct Session {
    channel_id: u64,
    next: u64,
    head: u64,
    _lease: Lease,
}

/// The exclusive right of one session to read a (channel, consumer); released on drop,
/// that is when the session ends for any reason, including a dead connection.
struct Lease {
    broker: Arc<Broker>,
    key: (u64, String),
}

impl Lease {
    fn take(broker: &Arc<Broker>, channel_id: u64, consumer: &str) -> Option<Lease> {
        let key = (channel_id, consumer.to_owned());
        if !broker
            .sessions
            .lock()
            .expect("sessions lock")
            .insert(key.clone())
        {
            return None;
        }
        Some(Lease {
            broker: broker.clone(),
            key,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.broker
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(&self.key);
        self.broker.lease_released.notify_waiters();
    }
}

fn channel_info(c: &directmq_storage::Channel) -> proto::ChannelInfo {
    proto::ChannelInfo {
        name: c.name.clone(),
        head: c.next_offset,
        first: c.first_offset,
        bytes: c.retained_bytes,
        created_ms: c.created_ms,
    }
}

enum Ack {
    Pending {
        ack: proto::PublishAck,
        durable: oneshot::Receiver<Result<(), Arc<StorageError>>>,
        /// When the batch was read off the stream.
        received: Instant,
    },
    Refused(u64, Refusal),
    /// A [`proto::PublishMulti`]: acked once every part is durable.
    Multi {
        batch_id: u64,
        parts: Vec<proto::PartAck>,
        /// What the frame's parts were queued with; all done: all durable.
        durables: Vec<Durable>,
        received: Instant,
    },
}

/// The durability that satisfies both: fsync over interval, the shorter interval.
fn stronger(a: Option<Durability>, b: Durability) -> Durability {
    match (a, b) {
        (None, b) => b,
        (Some(Durability::Fsync), _) | (_, Durability::Fsync) => Durability::Fsync,
        (Some(Durability::Interval(x)), Durability::Interval(y)) => Durability::Interval(x.min(y)),
    }
}

type Durable = oneshot::Receiver<Result<(), Arc<StorageError>>>;

/// Whether `acl`, and `who`'s token if that is how it came in, grant `right` on `channel`.
/// Whether the token still works (expiry, revocation) is [`Broker::check_token`]'s.
fn granted(acl: &Acl, who: &Principal, right: Right, channel: &str) -> Result<(), Refusal> {
    let token_allows = who.token.as_ref().is_none_or(|t| t.allows(right, channel));
    if token_allows && acl.allows(&who.name, right, channel) {
        Ok(())
    } else {
        Err(Refusal::new(
            ErrorCode::UNAUTHORIZED,
            format!(
                "identity {:?}{} has no {} right on channel {channel:?}",
                who.name,
                if who.token.is_some() {
                    " (by token)"
                } else {
                    ""
                },
                right.as_str()
            ),
        ))
    }
}

/// The channels a multi-channel publish stream's frames declared (§4.2.1).
#[derive(Default)]
struct Declared {
    /// By number, in the order declared.
    by_number: Vec<Resolved>,
    /// Each name once: a stream declares a channel once, so its table grows with the
    /// channels it uses, not with what a client repeats.
    names: HashSet<String>,
}

impl Declared {
    /// Refuses a frame that declares a name again (on this stream or twice in the frame) or
    /// has a part naming a number neither declared before nor by the frame.
    fn check(&self, declare: &[String], parts: &[proto::ChannelBatch]) -> Result<(), Refusal> {
        let malformed = |message: String| Refusal::new(ErrorCode::MALFORMED_FRAME, message);
        let mut seen = HashSet::with_capacity(declare.len());
        for name in declare {
            if self.names.contains(name) || !seen.insert(name.as_str()) {
                return Err(malformed(format!(
                    "channel {name:?} is declared twice on this stream"
                )));
            }
        }
        let known = self.by_number.len() + declare.len();
        if let Some(part) = parts.iter().find(|p| p.channel as usize >= known) {
            return Err(malformed(format!(
                "a part names channel number {}, but the stream has declared {known} channels",
                part.channel
            )));
        }
        Ok(())
    }
}

/// A channel a multi-channel publish stream has resolved once.
struct Resolved {
    id: u64,
    heads: watch::Sender<u64>,
    settings: ChannelSettings,
    name: String,
    /// The ACL that last granted this stream Publish on the channel: a frame looks the
    /// grant up again only once a reload replaced it.
    granted_by: Option<Arc<Acl>>,
}

/// Refuses a batch holding a message over `max` bytes; `what` names it in the message.
fn check_sizes(messages: &[proto::PublishMessage], max: u64, what: &str) -> Result<(), Refusal> {
    match messages
        .iter()
        .enumerate()
        .find(|(_, m)| m.payload.len() as u64 > max)
    {
        Some((i, m)) => Err(Refusal::new(
            ErrorCode::MESSAGE_TOO_LARGE,
            format!(
                "message {i} of {what} has {} bytes; max_message_bytes is {max}",
                m.payload.len()
            ),
        )),
        None => Ok(()),
    }
}

/// What a batch takes on disk, roughly: payloads plus record framing.
fn on_disk(payload_bytes: u64, messages: u64) -> u64 {
    payload_bytes + 64 * messages + 128
}

/// The answer to control request `request_id`.
fn reply(request_id: u64, result: Result<ResponseBody, Refusal>) -> Frame {
    match result {
        Ok(body) => Frame::Response(proto::Response { request_id, body }),
        Err(r) => {
            metrics::counter!(m::REFUSED, "op" => "request", "code" => r.code.name()).increment(1);
            Frame::Error(proto::ErrorFrame {
                request_id,
                code: r.code,
                message: r.message,
            })
        }
    }
}

/// Wire messages as the engine plans them.
fn incoming(messages: Vec<proto::PublishMessage>) -> Vec<Incoming> {
    messages
        .into_iter()
        .map(|m| Incoming {
            sequence: m.sequence,
            message: StoredMessage {
                headers: m.headers,
                payload: m.payload,
            },
        })
        .collect()
}

/// The next frame of a publish stream: `Err(None)` when the stream ended (or broke) with
/// nothing to answer, `Err(Some(refusal))` when the peer must be told why it ends: a
/// decode error, a frame that stalled, a broker shutting down.
async fn next_publish_frame(
    reader: &mut FrameReader,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Frame, Option<Refusal>> {
    let frame = tokio::select! {
        f = reader.next() => f,
        _ = shutdown.changed() => {
            return Err(Some(Refusal::new(ErrorCode::SHUTTING_DOWN, "the broker is shutting down; retry")));
        }
    };
    match frame {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(None),
        Err(StreamError::Decode(e)) => {
            metrics::counter!(m::PROTOCOL_ERRORS, "code" => e.code().name()).increment(1);
            Err(Some(Refusal::new(e.code(), e.to_string())))
        }
        Err(e @ StreamError::SlowFrame(_)) => {
            // A sender that starts a frame and stalls holds no more of the broker.
            metrics::counter!(m::PROTOCOL_ERRORS, "code" => "FRAME_TIMEOUT").increment(1);
            Err(Some(Refusal::new(ErrorCode::FRAME_TIMEOUT, e.to_string())))
        }
        Err(_) => Err(None),
    }
}

/// Queues the answer to a batch for the ack writer; false once the stream must end: the
/// batch was refused (nothing after it is processed on the stream, §4.2) or the writer is
/// gone.
async fn answer(
    acks: &mpsc::Sender<Box<Ack>>,
    batch_id: u64,
    planned: Result<Ack, Refusal>,
) -> bool {
    match planned {
        Ok(ack) => acks.send(Box::new(ack)).await.is_ok(),
        Err(r) => {
            metrics::counter!(m::REFUSED, "op" => "publish", "code" => r.code.name()).increment(1);
            let _ = acks.send(Box::new(Ack::Refused(batch_id, r))).await;
            false
        }
    }
}

/// What ends a publish stream that did not get the `expected` frame kind.
fn refusal_for(got: Result<Frame, Option<Refusal>>, expected: &str) -> Option<Refusal> {
    match got {
        Ok(other) => Some(Refusal::new(
            ErrorCode::UNEXPECTED_FRAME,
            format!("expected {expected}, got {}", other.name()),
        )),
        Err(end) => end,
    }
}

/// The error frame for a batch whose append failed in storage.
fn storage_failure(batch_id: u64, e: &StorageError) -> Frame {
    let (code, message) = if e.is_full() {
        (
            ErrorCode::STORAGE_FULL,
            "the broker's storage is full; nothing was stored, retry later".to_owned(),
        )
    } else if matches!(*e, StorageError::Closed) {
        (
            ErrorCode::SHUTTING_DOWN,
            "the broker is shutting down; retry".to_owned(),
        )
    } else {
        (
            ErrorCode::STORAGE_ERROR,
            format!("the broker could not store the batch: {e}"),
        )
    };
    Frame::Error(proto::ErrorFrame {
        request_id: batch_id,
        code,
        message,
    })
}

/// Writes acks in batch order, each once its batch is durable. After the first failure the
/// stream is finished: nothing later on it was processed.
async fn write_acks(mut writer: FrameWriter, mut pending: mpsc::Receiver<Box<Ack>>) {
    while let Some(ack) = pending.recv().await {
        let frame = match *ack {
            Ack::Pending {
                ack,
                durable,
                received,
            } => match durable.await {
                Ok(Ok(())) => {
                    metrics::histogram!(m::ACK_SECONDS).record(received.elapsed().as_secs_f64());
                    Frame::PublishAck(ack)
                }
                Ok(Err(e)) => {
                    writer.write(&storage_failure(ack.batch_id, &e)).await.ok();
                    writer.finish();
                    return;
                }
                Err(_) => return,
            },
            Ack::Multi {
                batch_id,
                parts,
                durables,
                received,
            } => {
                for durable in durables {
                    match durable.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            writer.write(&storage_failure(batch_id, &e)).await.ok();
                            writer.finish();
                            return;
                        }
                        Err(_) => return,
                    }
                }
                metrics::histogram!(m::ACK_SECONDS).record(received.elapsed().as_secs_f64());
                Frame::PublishMultiAck(proto::PublishMultiAck { batch_id, parts })
            }
            Ack::Refused(batch_id, r) => {
                writer
                    .write(&Frame::Error(proto::ErrorFrame {
                        request_id: batch_id,
                        code: r.code,
                        message: r.message,
                    }))
                    .await
                    .ok();
                writer.finish();
                return;
            }
        };
        if writer.write(&frame).await.is_err() {
            return;
        }
    }
    writer.finish();
}

/// Gives an error frame a moment to leave before the connection closes.
async fn close_after_flush(connection: &quinn::Connection, code: ErrorCode) {
    let _ = tokio::time::timeout(Duration::from_secs(1), connection.closed()).await;
    connection.close(
        quinn::VarInt::from_u32(u32::from(code.0)),
        code.description().as_bytes(),
    );
}
