//! Frame types (§4–§5). Wire types stay wire types: the broker and client convert them to
//! their own domain types at the boundary.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// Message headers: small string keys with byte values, in publish order.
pub type Headers = Vec<(String, Bytes)>;

/// One frame on any DirectMQ stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Client → broker, first frame of the control stream (§3).
    Hello(Hello),
    /// Broker → client, answer to [`Hello`].
    HelloOk(HelloOk),
    /// Either direction: something failed (§6).
    Error(ErrorFrame),
    /// Client → broker on the control stream (§4.1).
    Request(Request),
    /// Broker → client on the control stream.
    Response(Response),
    /// Client → broker, first frame of a publish stream (§4.2).
    OpenPublish(OpenPublish),
    /// Broker → client, the publish stream is ready.
    PublishOpened(PublishOpened),
    /// Client → broker, messages to append.
    PublishBatch(PublishBatch),
    /// Broker → client, a batch is durable.
    PublishAck(PublishAck),
    /// Client → broker, first frame of a multi-channel publish stream (§4.2.1).
    OpenPublishMulti(OpenPublishMulti),
    /// Client → broker, batches for several channels in one frame.
    PublishMulti(PublishMulti),
    /// Broker → client, every part of a [`PublishMulti`] is durable.
    PublishMultiAck(PublishMultiAck),
    /// Client → broker, first frame of a consume stream (§4.3).
    Subscribe(Subscribe),
    /// Broker → client, the consume stream is ready.
    Subscribed(Subscribed),
    /// Broker → client, messages in offset order.
    Deliver(Deliver),
    /// Client → broker, permission to send more.
    Credit(Credit),
    /// Client → broker, cumulative commit.
    Commit(Commit),
    /// Broker → client, a commit is durable.
    CommitOk(CommitOk),
    /// Client → broker, first frame of a watch stream (§4.4).
    Watch(Watch),
    /// Broker → client on a watch stream: channels that exist, appeared or went away.
    WatchEvent(WatchEvent),
}

/// First frame of a connection's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub version: u16,
    /// Free text naming the client software, for logs.
    pub client: String,
    /// A signed token (§3), for a client that connects without a certificate.
    pub token: Option<String>,
}

/// The broker accepts the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    pub version: u16,
    /// Free text naming the broker software, for logs.
    pub server: String,
    /// The identity the broker authenticated (the certificate's common name).
    pub identity: String,
    /// Largest payload the broker accepts.
    pub max_message_bytes: u64,
    /// Largest frame the broker accepts.
    pub max_frame_bytes: u64,
}

/// An error. `request_id` names the failed request on the control stream, 0 elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub request_id: u64,
    pub code: ErrorCode,
    pub message: String,
}

/// Where a new durable consumer starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartPosition {
    /// The first retained message.
    Earliest,
    /// The next message appended after the consumer is created.
    Latest,
    /// An explicit offset (clamped to the retained range).
    Offset(u64),
    /// The first retained message appended at or after this broker time (ms since the
    /// Unix epoch); the head when there is none.
    Timestamp(u64),
}

/// A control-stream request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub request_id: u64,
    pub body: RequestBody,
}

/// What a control-stream request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RequestBody {
    CreateChannel {
        name: String,
    },
    DeleteChannel {
        name: String,
    },
    ListChannels {
        prefix: String,
    },
    Status {
        prefix: String,
    },
    LastSequence {
        channel: String,
        producer_id: String,
    },
    ResetConsumer {
        channel: String,
        consumer: String,
        to: StartPosition,
    },
    /// Signs a token for `identity` with rights on prefixes, valid for `ttl_ms`.
    IssueToken {
        identity: String,
        publish: Vec<String>,
        consume: Vec<String>,
        admin: Vec<String>,
        ttl_ms: u64,
    },
    /// A new token with the same id and rights, valid for `ttl_ms` from now; the old one
    /// must not have expired or been revoked.
    RenewToken {
        token: String,
        ttl_ms: u64,
    },
    /// Revokes a token (and every renewal of it) by the token or its id, for good.
    RevokeToken {
        token_or_id: String,
    },
}

/// A control-stream response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub request_id: u64,
    pub body: ResponseBody,
}

/// The answer to a [`RequestBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ResponseBody {
    Done,
    Channels(Vec<ChannelInfo>),
    Status(Vec<ChannelStatus>),
    LastSequence(Option<u64>),
    Token(TokenIssued),
}

/// A signed token and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIssued {
    pub token: String,
    /// Shared by the token and its renewals; what revocation names.
    pub id: String,
    /// Broker time after which the token is refused, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// One channel in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub name: String,
    /// Offset the next message will get.
    pub head: u64,
    /// Offset of the first retained message.
    pub first: u64,
    /// Payload bytes retained.
    pub bytes: u64,
    pub created_ms: u64,
}

/// A channel and its consumers, with lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    pub channel: ChannelInfo,
    /// Broker time of the newest message, 0 when empty.
    pub last_append_ms: u64,
    pub consumers: Vec<ConsumerStatus>,
}

/// One durable consumer's position and lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    pub name: String,
    /// Next offset the consumer will read (everything below is committed).
    pub committed: u64,
    pub lag_messages: u64,
    pub lag_bytes: u64,
    /// Age of the oldest uncommitted message in milliseconds, 0 when caught up.
    pub lag_ms: u64,
    /// Whether a session is connected now.
    pub active: bool,
    /// Lag above zero and no commit progress for the broker's `stalled_after_ms`.
    pub stalled: bool,
}

/// Opens a publish stream for one channel and producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenPublish {
    pub channel: String,
    pub producer_id: String,
    /// Create the channel if it does not exist (when the broker allows it).
    pub create: bool,
}

/// The publish stream is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOpened {
    /// The last sequence the broker appended for this producer on this channel.
    pub last_sequence: Option<u64>,
}

/// A message as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishMessage {
    /// Strictly increasing per (producer, channel).
    pub sequence: u64,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Messages to append, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishBatch {
    /// Chosen by the client; echoed in the ack.
    pub batch_id: u64,
    pub messages: Vec<PublishMessage>,
}

/// A message of a batch that was already appended before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateAck {
    /// Index of the message in its batch.
    pub index: u32,
    /// Where the original is stored, when the broker still remembers it.
    pub offset: Option<u64>,
}

/// A batch is durable. The messages not listed in `duplicates` got consecutive offsets
/// from `first_offset`, in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAck {
    pub batch_id: u64,
    pub first_offset: u64,
    pub appended: u32,
    pub duplicates: Vec<DuplicateAck>,
}

/// Opens a publish stream that carries batches for any number of channels as one
/// producer id: one frame and one ack for many channels' batches (§4.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenPublishMulti {
    pub producer_id: String,
    /// Create a channel on its first part if it does not exist.
    pub create: bool,
}

/// One channel's batch inside a [`PublishMulti`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelBatch {
    /// The channel by its number on this stream: the stream's frames declare names
    /// ([`PublishMulti::declare`]), numbered from 0 in the order declared.
    pub channel: u32,
    pub messages: Vec<PublishMessage>,
}

/// Batches for several channels, appended part after part (a channel may have several
/// parts; the client library sends one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishMulti {
    pub batch_id: u64,
    /// Channel names numbered on this stream from here on, before the parts are read: the
    /// first gets the number after the last one declared before (0 on a new stream). A part
    /// then names its channel by number instead of by name, so a frame of thousands of
    /// one-message parts does not carry, and the broker does not look up, a name per part.
    pub declare: Vec<String>,
    pub parts: Vec<ChannelBatch>,
}

/// What one part of a [`PublishMulti`] got, as a [`PublishAck`] says for a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartAck {
    pub first_offset: u64,
    pub appended: u32,
    pub duplicates: Vec<DuplicateAck>,
}

/// Every part of batch `batch_id` is durable; `parts` in the order they were sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishMultiAck {
    pub batch_id: u64,
    pub parts: Vec<PartAck>,
}

/// Opens a consume stream for one durable consumer on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    pub channel: String,
    pub consumer: String,
    /// Used only when the consumer does not exist yet.
    pub start: StartPosition,
    pub credit_messages: u32,
    pub credit_bytes: u64,
    /// When another session holds the consumer: wait as its standby and take over once it
    /// ends (instead of `CONSUMER_BUSY`).
    pub standby: bool,
}

/// The consume stream is ready; delivery starts at `next_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    pub next_offset: u64,
    pub head: u64,
}

/// A message as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredMessage {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Messages in offset order, without gaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    pub messages: Vec<DeliveredMessage>,
}

/// Adds to the broker's allowance for this stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub messages: u32,
    pub bytes: u64,
}

/// Commits every offset below `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub offset: u64,
}

/// The commit is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOk {
    pub offset: u64,
}

/// Opens a watch stream: the broker answers with a [`WatchEventKind::Existing`] event
/// listing the channels under `prefix` the identity may see, then one event per change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub prefix: String,
}

/// What a [`WatchEvent`] says of its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEventKind {
    /// Every channel under the prefix now; replaces whatever the watcher knew (sent first,
    /// and again whenever the broker could not keep up with the changes).
    Existing,
    /// These channels were created.
    Created,
    /// These channels were deleted.
    Deleted,
}

/// Channels created, deleted or existing under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    pub channels: Vec<String>,
}

impl Frame {
    /// The frame kind byte (§2).
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::HelloOk(_) => kind::HELLO_OK,
            Frame::Error(_) => kind::ERROR,
            Frame::Request(_) => kind::REQUEST,
            Frame::Response(_) => kind::RESPONSE,
            Frame::OpenPublish(_) => kind::OPEN_PUBLISH,
            Frame::PublishOpened(_) => kind::PUBLISH_OPENED,
            Frame::PublishBatch(_) => kind::PUBLISH_BATCH,
            Frame::PublishAck(_) => kind::PUBLISH_ACK,
            Frame::OpenPublishMulti(_) => kind::OPEN_PUBLISH_MULTI,
            Frame::PublishMulti(_) => kind::PUBLISH_MULTI,
            Frame::PublishMultiAck(_) => kind::PUBLISH_MULTI_ACK,
            Frame::Subscribe(_) => kind::SUBSCRIBE,
            Frame::Subscribed(_) => kind::SUBSCRIBED,
            Frame::Deliver(_) => kind::DELIVER,
            Frame::Credit(_) => kind::CREDIT,
            Frame::Commit(_) => kind::COMMIT,
            Frame::CommitOk(_) => kind::COMMIT_OK,
            Frame::Watch(_) => kind::WATCH,
            Frame::WatchEvent(_) => kind::WATCH_EVENT,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        kind::name(self.kind())
    }
}

/// Frame kind bytes (§2). Numbers are a wire contract.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_OK: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const REQUEST: u8 = 4;
    pub const RESPONSE: u8 = 5;
    pub const OPEN_PUBLISH: u8 = 10;
    pub const PUBLISH_OPENED: u8 = 11;
    pub const PUBLISH_BATCH: u8 = 12;
    pub const PUBLISH_ACK: u8 = 13;
    pub const OPEN_PUBLISH_MULTI: u8 = 14;
    pub const PUBLISH_MULTI: u8 = 15;
    pub const PUBLISH_MULTI_ACK: u8 = 16;
    pub const SUBSCRIBE: u8 = 20;
    pub const SUBSCRIBED: u8 = 21;
    pub const DELIVER: u8 = 22;
    pub const CREDIT: u8 = 23;
    pub const COMMIT: u8 = 24;
    pub const COMMIT_OK: u8 = 25;
    pub const WATCH: u8 = 30;
    pub const WATCH_EVENT: u8 = 31;

    /// Name of a kind byte, `"unknown"` if none.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            HELLO => "Hello",
            HELLO_OK => "HelloOk",
            ERROR => "Error",
            REQUEST => "Request",
            RESPONSE => "Response",
            OPEN_PUBLISH => "OpenPublish",
            PUBLISH_OPENED => "PublishOpened",
            PUBLISH_BATCH => "PublishBatch",
            PUBLISH_ACK => "PublishAck",
            OPEN_PUBLISH_MULTI => "OpenPublishMulti",
            PUBLISH_MULTI => "PublishMulti",
            PUBLISH_MULTI_ACK => "PublishMultiAck",
            SUBSCRIBE => "Subscribe",
            SUBSCRIBED => "Subscribed",
            DELIVER => "Deliver",
            CREDIT => "Credit",
            COMMIT => "Commit",
            COMMIT_OK => "CommitOk",
            WATCH => "Watch",
            WATCH_EVENT => "WatchEvent",
            _ => "unknown",
        }
    }
}
