//! Framed reading and writing on QUIC streams, shared by the client and the broker.

use bytes::{Bytes, BytesMut};
use directmq_protocol::{self as proto, DecodeError, Frame};

/// Why a stream could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("the peer sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("reading the stream failed: {}", read_reason(.0))]
    Read(#[from] quinn::ReadError),
    #[error("writing the stream failed: {}", write_reason(.0))]
    Write(#[from] quinn::WriteError),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error("a frame took longer than {0:?} to arrive")]
    SlowFrame(std::time::Duration),
}

/// quinn says only "connection lost"; why it was lost (a refused certificate, a timeout)
/// is what the reader of the error needs.
fn read_reason(e: &quinn::ReadError) -> String {
    match e {
        quinn::ReadError::ConnectionLost(why) => format!("connection lost: {why}"),
        other => other.to_string(),
    }
}

/// As [`read_reason`], for writes.
fn write_reason(e: &quinn::WriteError) -> String {
    match e {
        quinn::WriteError::ConnectionLost(why) => format!("connection lost: {why}"),
        other => other.to_string(),
    }
}

/// Buffer grown at most this much (or as much as is already buffered, whichever is more)
/// ahead of the bytes actually received, so a header that declares a large frame costs
/// little until its bytes arrive: at most twice what was received, plus this.
const RESERVE_STEP: usize = 4 * 1024 * 1024;

/// Chunks taken from the stream per read.
const READ_CHUNKS: usize = 32;

/// Readers with a frame limit below this take one chunk (of at most the limit) per read.
const MANY_CHUNKS_FROM: u64 = 1024 * 1024;

/// Reads whole frames from a receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    frames: Assembler,
    /// A frame must be complete this long after its first byte arrived.
    frame_timeout: Option<std::time::Duration>,
    /// When the first byte of the frame being read arrived.
    frame_started: Option<tokio::time::Instant>,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, max_frame_bytes: u64) -> FrameReader {
        FrameReader {
            recv,
            frames: Assembler::new(max_frame_bytes),
            frame_timeout: None,
            frame_started: None,
        }
    }

    /// Fails [`FrameReader::next`] with [`StreamError::SlowFrame`] when a frame is not
    /// complete `timeout` after its first byte arrived (a sender that starts a frame and
    /// stalls). Waiting between frames is not limited.
    pub fn with_frame_timeout(mut self, timeout: std::time::Duration) -> FrameReader {
        self.frame_timeout = Some(timeout);
        self
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between frames.
    /// Cancel-safe: bytes already read stay buffered.
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        if self.frames.in_frame() {
            // Time this reader was not asked for the frame is not the sender's.
            self.frame_started = Some(tokio::time::Instant::now());
        }
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(Some(frame));
            }
            // Many chunks per call: each call locks the connection, and a chunk is one
            // packet's worth (~1.2 KB), so one at a time was a lock per packet. A chunk can
            // be larger (quinn joins what it buffered), so a reader with a small frame limit
            // (a peer not yet authenticated) takes one chunk of at most its limit per read.
            let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
            let max_frame_bytes = self.frames.max_frame_bytes;
            let read = async {
                if max_frame_bytes < MANY_CHUNKS_FROM {
                    let limit = max_frame_bytes as usize + proto::HEADER_LEN;
                    Ok(self.recv.read_chunk(limit, true).await?.map(|chunk| {
                        chunks[0] = chunk.bytes;
                        1
                    }))
                } else {
                    self.recv.read_chunks(&mut chunks).await
                }
            };
            let count = match (self.frame_timeout, self.frame_started) {
                (Some(limit), Some(started)) => {
                    match tokio::time::timeout_at(started + limit, read).await {
                        Ok(count) => count?,
                        Err(_) => return Err(StreamError::SlowFrame(limit)),
                    }
                }
                _ => read.await?,
            };
            match count {
                Some(count) => {
                    if !self.frames.in_frame() {
                        self.frame_started = Some(tokio::time::Instant::now());
                    }
                    for chunk in &mut chunks[..count] {
                        self.frames.push(std::mem::take(chunk));
                    }
                }
                None if !self.frames.in_frame() => return Ok(None),
                None => return Err(StreamError::Truncated),
            }
        }
    }

    /// The next frame if all of it has already been received, without reading the stream:
    /// what a peer pipelined behind the frame just read.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, StreamError> {
        let started = self.frames.in_frame();
        let frame = self.frames.frame()?;
        if frame.is_some() {
            self.frame_started = self.frames.in_frame().then(tokio::time::Instant::now);
        } else if !started && self.frames.in_frame() {
            // The first bytes of a frame were waiting behind the last one.
            self.frame_started = Some(tokio::time::Instant::now());
        }
        Ok(frame)
    }

    /// Changes the largest frame accepted (after the hello announced the peer's limit).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u64) {
        self.frames.max_frame_bytes = max_frame_bytes;
    }

    /// Asks the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Joins the chunks a stream arrives in into whole frames.
#[derive(Debug)]
struct Assembler {
    /// The frame being received (and, while there is room, the first bytes of the next).
    buf: BytesMut,
    /// Bytes received past the end of a frame that `buf` had no room for: the next frames'.
    /// Kept aside instead of growing `buf`, which would copy the whole frame into a buffer
    /// twice its size (a 64 MiB frame into 128 MiB) for the first bytes of the next one.
    pending: std::collections::VecDeque<Bytes>,
    max_frame_bytes: u64,
}

impl Assembler {
    fn new(max_frame_bytes: u64) -> Assembler {
        Assembler {
            // Empty to start: a broker holds one reader per stream, thousands of them for
            // many channels (8 KiB each was 80 MB at 10,000); the buffer grows with the
            // frames that actually arrive, to a whole frame once its header is in.
            buf: BytesMut::new(),
            pending: std::collections::VecDeque::new(),
            max_frame_bytes,
        }
    }

    /// Some bytes of a frame not yet complete are buffered.
    fn in_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Takes bytes received, in order.
    fn push(&mut self, chunk: Bytes) {
        if !self.pending.is_empty() {
            self.pending.push_back(chunk);
        } else if let Some(rest) = self.fill(chunk) {
            self.pending.push_back(rest);
        }
    }

    /// The next frame, if all of it has been received.
    fn frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let frame = loop {
            if let Some(frame) = proto::decode(&mut self.buf, self.max_frame_bytes)? {
                break frame;
            }
            let Some(chunk) = self.pending.pop_front() else {
                return Ok(None);
            };
            if let Some(rest) = self.fill(chunk) {
                self.pending.push_front(rest);
            }
        };
        if self.buf.is_empty() {
            // Let the allocation go with the frame's payloads instead of keeping it for the
            // next frame: an idle stream then holds no buffer (thousands of channels), and
            // the next frame's allocation is sized to it anyway.
            self.buf = BytesMut::new();
        }
        Ok(Some(frame))
    }

    /// Appends received bytes to the frame buffer, except those past the end of a frame
    /// already complete that the buffer has no room for: answered, for [`Self::pending`].
    ///
    /// Once the frame's header is in, the buffer is grown towards the frame's size before
    /// the bytes are copied: one allocation a frame, and every byte copied once. Growing by
    /// the chunk instead reallocated (and copied again) a frame's first bytes several times
    /// per read of many chunks: ~5% of a consumer's catch-up (profiled).
    fn fill(&mut self, mut chunk: Bytes) -> Option<Bytes> {
        let buffered = self.buf.len();
        if buffered + chunk.len() < proto::HEADER_LEN {
            self.buf.extend_from_slice(&chunk);
            return None;
        }
        let mut header = [0u8; 4];
        for (i, byte) in header.iter_mut().enumerate() {
            *byte = if i < buffered {
                self.buf[i]
            } else {
                chunk[i - buffered]
            };
        }
        // A length past the limit is refused by the decoder right after: grow for no more.
        let len = u64::from(u32::from_be_bytes(header)).min(self.max_frame_bytes) as usize;
        let to_end = (proto::HEADER_LEN + len).saturating_sub(buffered);
        let room = self.buf.capacity() - buffered;
        if chunk.len() > to_end && chunk.len() > room {
            let rest = chunk.split_off(to_end);
            self.reserve_towards(to_end, chunk.len());
            self.buf.extend_from_slice(&chunk);
            return Some(rest);
        }
        if chunk.len() > room {
            self.reserve_towards(to_end, chunk.len());
        }
        self.buf.extend_from_slice(&chunk);
        None
    }

    /// Grows the buffer towards `missing` more bytes of the frame, never far ahead of what
    /// came: by at least [`RESERVE_STEP`] (or the `arriving` chunk) and at most what is
    /// buffered already, so a header that declares a large frame costs little until its
    /// bytes arrive, and a large frame is copied into a few doubling buffers instead of one
    /// per step.
    fn reserve_towards(&mut self, missing: usize, arriving: usize) {
        self.buf
            .reserve(missing.min(RESERVE_STEP.max(self.buf.len()).max(arriving)));
    }
}

/// Writes frames to a send stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    chunks: Vec<Bytes>,
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> FrameWriter {
        FrameWriter {
            send,
            chunks: Vec::new(),
        }
    }

    pub async fn write(&mut self, frame: &Frame) -> Result<(), StreamError> {
        self.chunks.clear();
        proto::encode_chunks(frame, &mut self.chunks);
        self.send.write_all_chunks(&mut self.chunks).await?;
        Ok(())
    }

    /// [`FrameWriter::write`] for a frame whose payloads are slices of `backing`: payloads
    /// side by side in one buffer go out as one slice of it, uncopied
    /// ([`proto::encode_chunks_backed`]).
    pub async fn write_backed(
        &mut self,
        frame: &Frame,
        backing: &[Bytes],
    ) -> Result<(), StreamError> {
        self.chunks.clear();
        proto::encode_chunks_backed(frame, backing, &mut self.chunks);
        self.send.write_all_chunks(&mut self.chunks).await?;
        Ok(())
    }

    /// Sends an error frame, then finishes the stream.
    pub async fn fail(&mut self, code: proto::ErrorCode, message: String) {
        let frame = Frame::Error(proto::ErrorFrame {
            request_id: 0,
            code,
            message,
        });
        let _ = self.write(&frame).await;
        self.finish();
    }

    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(offset: u64, sizes: &[usize]) -> Frame {
        Frame::Deliver(proto::Deliver {
            messages: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| proto::DeliveredMessage {
                    offset: offset + i as u64,
                    timestamp_ms: 7,
                    headers: vec![("k".into(), Bytes::from_static(b"v"))],
                    payload: Bytes::from(vec![(offset + i as u64) as u8; size]),
                })
                .collect(),
        })
    }

    fn encoded(frames: &[Frame]) -> Bytes {
        let mut out = BytesMut::new();
        for frame in frames {
            proto::encode(frame, &mut out);
        }
        out.freeze()
    }

    /// Pushes `stream` cut into chunks of the sizes `cut` gives, taking frames as they
    /// complete.
    fn reassemble(stream: &Bytes, mut cut: impl FnMut() -> usize) -> Vec<Frame> {
        let mut frames = Assembler::new(1 << 30);
        let mut out = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let len = cut().clamp(1, stream.len() - at);
            frames.push(stream.slice(at..at + len));
            at += len;
            while let Some(frame) = frames.frame().expect("valid frames") {
                out.push(frame);
            }
        }
        assert!(!frames.in_frame(), "bytes left over");
        out
    }

    #[test]
    fn frames_come_out_whole_however_the_stream_is_cut() {
        let sent = vec![
            deliver(0, &[1, 1024, 0]),
            deliver(3, &[100_000]),
            Frame::Credit(proto::Credit {
                messages: 5,
                bytes: 6,
            }),
            deliver(4, &[3; 700]),
            deliver(704, &[600_000]),
            deliver(705, &[2]),
        ];
        let stream = encoded(&sent);
        for size in [1, 2, 8, 9, 10, 1200, 65_536, stream.len()] {
            assert_eq!(reassemble(&stream, || size), sent, "chunks of {size}");
        }
        // Uneven cuts: a fixed-seed generator, so a failure repeats.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..20 {
            let largest = [16, 1500, 70_000, 3_000_000][round % 4];
            let mut cut = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % largest) as usize + 1
            };
            assert_eq!(reassemble(&stream, &mut cut), sent, "round {round}");
        }
    }

    #[test]
    fn a_frame_is_copied_into_one_buffer_sized_to_it() {
        let frame = deliver(0, &[300_000]);
        let stream = encoded(std::slice::from_ref(&frame));
        let mut frames = Assembler::new(1 << 30);
        // The header split over two chunks, then the rest a packet's worth at a time.
        frames.push(stream.slice(..3));
        frames.push(stream.slice(3..1200));
        let capacity = frames.buf.capacity();
        assert!(capacity >= stream.len(), "{capacity} < {}", stream.len());
        let mut at = 1200;
        while at < stream.len() {
            let end = (at + 1200).min(stream.len());
            frames.push(stream.slice(at..end));
            assert_eq!(frames.buf.capacity(), capacity, "regrown at {at}");
            at = end;
        }
        assert_eq!(frames.frame().unwrap(), Some(frame));
    }

    #[test]
    fn a_large_frame_grows_its_buffer_with_what_arrives() {
        let frame = deliver(0, &[20 * 1024 * 1024]);
        let stream = encoded(std::slice::from_ref(&frame));
        let mut frames = Assembler::new(1 << 30);
        frames.push(stream.slice(..1200));
        // Not the whole 20 MiB on the word of a header: a step past what came.
        let first = frames.buf.capacity();
        assert!(first <= RESERVE_STEP + 1200, "{first}");
        let mut grown = 0;
        let mut capacity = first;
        for at in (1200..stream.len()).step_by(64 * 1024) {
            frames.push(stream.slice(at..(at + 64 * 1024).min(stream.len())));
            if frames.buf.capacity() != capacity {
                grown += 1;
                capacity = frames.buf.capacity();
            }
        }
        assert!(grown <= 4, "grown {grown} times");
        assert_eq!(frames.frame().unwrap(), Some(frame));
    }

    #[test]
    fn a_header_past_the_limit_is_refused_without_growing_for_it() {
        let mut header = BytesMut::new();
        header.extend_from_slice(&(1u32 << 30).to_be_bytes());
        header.extend_from_slice(&[0; proto::HEADER_LEN - 4]);
        header.extend_from_slice(&[0; 100]);
        let mut frames = Assembler::new(4096);
        frames.push(header.freeze());
        assert!(
            frames.buf.capacity() < 64 * 1024,
            "{}",
            frames.buf.capacity()
        );
        assert!(frames.frame().is_err());
    }

    #[test]
    fn a_lost_connection_says_why() {
        let lost = quinn::ConnectionError::TimedOut;
        let write = StreamError::from(quinn::WriteError::ConnectionLost(lost.clone()));
        assert_eq!(
            write.to_string(),
            format!("writing the stream failed: connection lost: {lost}")
        );
        let read = StreamError::from(quinn::ReadError::ConnectionLost(lost.clone()));
        assert_eq!(
            read.to_string(),
            format!("reading the stream failed: connection lost: {lost}")
        );
        assert!(write.to_string().contains("timed out"), "{write}");
    }
}
