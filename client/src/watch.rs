//! Discovery: watching a channel-name prefix for channels created and deleted, across
//! reconnects.

use std::collections::BTreeSet;
use std::time::Duration;

use directmq_protocol::{self as proto, Frame, WatchEventKind};
use tokio::sync::mpsc;

use crate::stream::{self, Incoming};
use crate::{Client, Error, FrameWriter};

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelChange {
    /// The channel exists now: every channel that already existed when the watch started
    /// is reported once as created, then each one created later.
    Created(String),
    /// The channel was deleted.
    Deleted(String),
}

/// Tells of channels created and deleted under a prefix. After a reconnect it compares the
/// broker's list with what it had reported and reports the difference, so a change made
/// while disconnected is not missed and none is reported twice.
#[derive(Debug)]
pub struct Watcher {
    changes: mpsc::Receiver<Result<ChannelChange, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    pub(crate) async fn open(client: Client, prefix: &str) -> Result<Watcher, Error> {
        let (tx, changes) = mpsc::channel(1024);
        let mut task = Task {
            client,
            prefix: prefix.to_owned(),
            known: BTreeSet::new(),
            changes: tx,
            writer: None,
        };
        // The first list is awaited here, so a refused watch fails the call.
        let incoming = task.open().await?;
        let task = tokio::spawn(task.run(incoming));
        Ok(Watcher { changes, task })
    }

    /// The next change; `None` once the watch ended after an error was returned.
    pub async fn next(&mut self) -> Option<Result<ChannelChange, Error>> {
        self.changes.recv().await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Task {
    client: Client,
    prefix: String,
    /// Every channel reported as existing.
    known: BTreeSet<String>,
    changes: mpsc::Sender<Result<ChannelChange, Error>>,
    /// Held open: the client sends nothing after Watch, and finishing its side would end
    /// the watch.
    writer: Option<FrameWriter>,
}

impl Task {
    /// Opens the watch stream and reports the difference between its first list and what
    /// was reported before.
    async fn open(&mut self) -> Result<Incoming, Error> {
        let first = Frame::Watch(proto::Watch {
            prefix: self.prefix.clone(),
        });
        let (writer, reader, answer, _) = stream::open(&self.client, first, "watch").await?;
        let Frame::WatchEvent(event) = answer else {
            return Err(Error::Protocol(format!(
                "expected WatchEvent, got {}",
                answer.name()
            )));
        };
        if event.kind != WatchEventKind::Existing {
            return Err(Error::Protocol(format!(
                "a watch starts with the existing channels, got {:?}",
                event.kind
            )));
        }
        self.apply(event).await;
        self.writer = Some(writer);
        Ok(Incoming::spawn(reader, 16, "watch"))
    }

    async fn run(mut self, mut incoming: Incoming) {
        let mut backoff = Duration::from_millis(20);
        loop {
            match incoming.frames.recv().await {
                Some(Ok(Frame::WatchEvent(event))) => self.apply(event).await,
                Some(Ok(Frame::Error(e))) => {
                    let _ = self.changes.send(Err(Error::from_frame(e))).await;
                    return;
                }
                Some(Ok(other)) => {
                    let e =
                        Error::Protocol(format!("unexpected {} on a watch stream", other.name()));
                    let _ = self.changes.send(Err(e)).await;
                    return;
                }
                Some(Err(_)) | None => loop {
                    if self.changes.is_closed() {
                        return;
                    }
                    match self.open().await {
                        Ok(reopened) => {
                            incoming = reopened;
                            backoff = Duration::from_millis(20);
                            break;
                        }
                        Err(e) if e.is_transient() => {
                            tracing::debug!(error = %e, "watch stream unavailable; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                        Err(e) => {
                            let _ = self.changes.send(Err(e)).await;
                            return;
                        }
                    }
                },
            }
            if self.changes.is_closed() {
                return;
            }
        }
    }

    async fn apply(&mut self, event: proto::WatchEvent) {
        let mut out = Vec::new();
        match event.kind {
            WatchEventKind::Existing => {
                let now: BTreeSet<String> = event.channels.into_iter().collect();
                for gone in self.known.difference(&now) {
                    out.push(ChannelChange::Deleted(gone.clone()));
                }
                for new in now.difference(&self.known) {
                    out.push(ChannelChange::Created(new.clone()));
                }
                self.known = now;
            }
            WatchEventKind::Created => {
                for name in event.channels {
                    if self.known.insert(name.clone()) {
                        out.push(ChannelChange::Created(name));
                    }
                }
            }
            WatchEventKind::Deleted => {
                for name in event.channels {
                    if self.known.remove(&name) {
                        out.push(ChannelChange::Deleted(name));
                    }
                }
            }
        }
        for change in out {
            if self.changes.send(Ok(change)).await.is_err() {
                return;
            }
        }
    }
}
