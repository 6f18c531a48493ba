//! What publish and consume streams share: opening with a first frame and its answer, and
//! reading frames on a task of their own so a `select!` loop never cancels a half-read frame.

use directmq_protocol::Frame;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::{Client, Error, FrameReader, FrameWriter};

/// Opens a stream, sends `first` and returns the broker's answer; an error frame becomes
/// `Err`. Also returns the broker's largest message size. A connection lost on the way (a
/// broker restart) is retried like any reconnect, within the client's `reconnect_for`.
pub(crate) async fn open(
    client: &Client,
    first: Frame,
    what: &'static str,
) -> Result<(FrameWriter, FrameReader, Frame, u64), Error> {
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        match open_once(client, first.clone(), what).await {
            Err(e) if e.is_transient() => {
                let limit = client.reconnect_limit();
                if limit.is_some_and(|l| started.elapsed() >= l) {
                    return Err(e);
                }
                tracing::debug!(error = %e, what, "opening a stream failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn open_once(
    client: &Client,
    first: Frame,
    what: &'static str,
) -> Result<(FrameWriter, FrameReader, Frame, u64), Error> {
    let (mut writer, mut reader, max_message_bytes) = client.open_stream().await?;
    writer.write(&first).await?;
    match reader.next().await? {
        Some(Frame::Error(e)) => Err(Error::from_frame(e)),
        Some(answer) => Ok((writer, reader, answer, max_message_bytes)),
        None => Err(Error::Connection(format!(
            "the broker closed the {what} stream"
        ))),
    }
}

/// Frames read by a background task; the last item is the error that ended the stream.
/// Dropping it stops the task.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) frames: mpsc::Receiver<Result<Frame, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Incoming {
    pub(crate) fn spawn(mut reader: FrameReader, capacity: usize, what: &'static str) -> Incoming {
        let (tx, frames) = mpsc::channel(capacity);
        let task = tokio::spawn(async move {
            loop {
                let item = match reader.next().await {
                    Ok(Some(frame)) => Ok(frame),
                    Ok(None) => Err(Error::Connection(format!(
                        "the broker closed the {what} stream"
                    ))),
                    Err(e) => Err(e.into()),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        Incoming { frames, task }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}
