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
    buf: BytesMut,
    max_frame_bytes: u64,
    /// A frame must be complete this long after its first byte arrived.
    frame_timeout: Option<std::time::Duration>,
    /// When the first byte of the frame being read arrived.
    frame_started: Option<tokio::time::Instant>,
    /// Bytes received past the end of a frame that `buf` had no room for: the next frames'.
    /// Kept aside instead of growing `buf`, which would copy the whole frame into a buffer
    /// twice its size (a 64 MiB frame into 128 MiB) for the first bytes of the next one.
    pending: std::collections::VecDeque<Bytes>,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, max_frame_bytes: u64) -> FrameReader {
        FrameReader {
            recv,
            // Empty to start: a broker holds one reader per stream, thousands of them for
            // many channels (8 KiB each was 80 MB at 10,000); the buffer grows with the
            // frames that actually arrive, to a whole frame once its header is in.
            buf: BytesMut::new(),
            max_frame_bytes,
            frame_timeout: None,
            frame_started: None,
            pending: std::collections::VecDeque::new(),
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
        if !self.buf.is_empty() {
            // Time this reader was not asked for the frame is not the sender's.
            self.frame_started = Some(tokio::time::Instant::now());
        }
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(Some(frame));
            }
            // next_buffered took what was pending as far as the frame needs.
            if self.buf.len() >= proto::HEADER_LEN {
                // Grow towards the declared size, never far ahead of what came: by at
                // least a step and at most what is buffered already, so a large frame is
                // copied into a few doubling buffers instead of one per step.
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                let total = proto::HEADER_LEN + len as usize;
                let missing = total.saturating_sub(self.buf.len());
                self.buf
                    .reserve(missing.min(RESERVE_STEP.max(self.buf.len())));
            }
            // Many chunks per call: each call locks the connection, and a chunk is one
            // packet's worth (~1.2 KB), so one at a time was a lock per packet. A chunk can
            // be larger (quinn joins what it buffered), so a reader with a small frame limit
            // (a peer not yet authenticated) takes one chunk of at most its limit per read.
            let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
            let read = async {
                if self.max_frame_bytes < MANY_CHUNKS_FROM {
                    let limit = self.max_frame_bytes as usize + proto::HEADER_LEN;
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
                    if self.buf.is_empty() {
                        self.frame_started = Some(tokio::time::Instant::now());
                    }
                    for chunk in &mut chunks[..count] {
                        let chunk = std::mem::take(chunk);
                        if !self.pending.is_empty() {
                            self.pending.push_back(chunk);
                        } else if let Some(rest) = self.fill(chunk) {
                            self.pending.push_back(rest);
                        }
                    }
                }
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(StreamError::Truncated),
            }
        }
    }

    /// The next frame if all of it has already been received, without reading the stream:
    /// what a peer pipelined behind the frame just read.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, StreamError> {
        let frame = loop {
            if let Some(frame) = proto::decode(&mut self.buf, self.max_frame_bytes)? {
                break frame;
            }
            let Some(chunk) = self.pending.pop_front() else {
                return Ok(None);
            };
            if self.buf.is_empty() {
                self.frame_started = Some(tokio::time::Instant::now());
            }
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
        self.frame_started = (!self.buf.is_empty()).then(tokio::time::Instant::now);
        Ok(Some(frame))
    }

    /// Appends received bytes to the frame buffer, except those past the end of a frame
    /// already complete that the buffer has no room for: answered, for [`Self::pending`].
    fn fill(&mut self, mut chunk: Bytes) -> Option<Bytes> {
        if self.buf.len() >= proto::HEADER_LEN {
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            let to_end = (proto::HEADER_LEN + len as usize).saturating_sub(self.buf.len());
            let room = self.buf.capacity() - self.buf.len();
            if chunk.len() > to_end && chunk.len() > room {
                let rest = chunk.split_off(to_end);
                self.buf.extend_from_slice(&chunk);
                return Some(rest);
            }
        }
        self.buf.extend_from_slice(&chunk);
        None
    }

    /// Changes the largest frame accepted (after the hello announced the peer's limit).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u64) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Asks the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
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
