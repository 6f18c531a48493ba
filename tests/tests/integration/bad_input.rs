//! Scenario 4 of issue 2: malformed frames, oversized frames, a wrong protocol version,
//! invalid channel names and too-large messages each get a clear error, and the broker
//! keeps serving everyone else.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use directmq_client::{net, FrameReader, FrameWriter, StartPosition};
use directmq_protocol::{self as proto, ErrorCode, Frame};
use directmq_tests::{client, test_config};

/// A QUIC connection made by hand, to send what the client library never would.
pub(crate) async fn raw_connection(addr: SocketAddr, data: &Path) -> Result<quinn::Connection> {
    raw_connection_alpn(addr, data, proto::ALPN).await
}

/// [`raw_connection`] offering only `alpn` in the TLS handshake.
async fn raw_connection_alpn(
    addr: SocketAddr,
    data: &Path,
    alpn: &[u8],
) -> Result<quinn::Connection> {
    let mut tls = net::client_tls(&data.join("certs"))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    Ok(endpoint.connect(addr, "127.0.0.1")?.await?)
}

/// Opens the control stream and says hello with `version`.
pub(crate) async fn hello(
    conn: &quinn::Connection,
    version: u16,
) -> Result<(FrameWriter, FrameReader, Option<Frame>)> {
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv, 1 << 30);
    writer
        .write(&Frame::Hello(proto::Hello {
            version,
            client: "test".into(),
            token: None,
        }))
        .await?;
    let reply = tokio::time::timeout(std::time::Duration::from_secs(30), reader.next())
        .await
        .context("no answer to the hello within 30 s")??;
    Ok((writer, reader, reply))
}

/// Sends raw bytes on a new stream and returns the broker's error frame.
pub(crate) async fn error_for(conn: &quinn::Connection, bytes: &[u8]) -> Result<proto::ErrorFrame> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    let mut reader = FrameReader::new(recv, 1 << 30);
    match reader.next().await? {
        Some(Frame::Error(e)) => {
            // The offending stream is closed after the error.
            ensure!(
                reader.next().await?.is_none(),
                "the stream stays open after a fatal error"
            );
            Ok(e)
        }
        other => bail!("expected an error frame, got {other:?}"),
    }
}

fn header(len: u32, kind: u8, meta_len: u32) -> Vec<u8> {
    let mut h = len.to_be_bytes().to_vec();
    h.push(kind);
    h.extend_from_slice(&meta_len.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_broker_keeps_serving() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.max_message_bytes = 4096;
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;

    // A healthy client that must be unaffected by everything below.
    let good = client(addr, dir.path()).await?;
    let producer = good.producer("healthy", "p").await?;
    producer.send("before").await?;

    // Wrong protocol version: refused during the hello.
    let conn = raw_connection(addr, dir.path()).await?;
    let future = proto::PROTOCOL_VERSION + 1;
    match hello(&conn, future).await?.2 {
        Some(Frame::Error(e)) => {
            ensure!(e.code == ErrorCode::UNSUPPORTED_VERSION, "{e:?}");
            ensure!(
                e.message
                    .contains(&format!("version {}", proto::PROTOCOL_VERSION))
                    && e.message.contains(&format!("version {future}")),
                "{}",
                e.message
            );
        }
        other => bail!("expected UNSUPPORTED_VERSION, got {other:?}"),
    }
    // A client of an older protocol (its own ALPN, its own version) completes the handshake
    // and is told to upgrade, where a failed handshake would look like a network fault to
    // it; its ALPN alone is refused even with the current version in its hello.
    for version in [1, proto::PROTOCOL_VERSION] {
        let conn = raw_connection_alpn(addr, dir.path(), b"directmq/1").await?;
        match hello(&conn, version).await?.2 {
            Some(Frame::Error(e)) => ensure!(
                e.code == ErrorCode::UNSUPPORTED_VERSION
                    && e.message.contains("upgrade the client"),
                "{e:?}"
            ),
            other => bail!("expected UNSUPPORTED_VERSION, got {other:?}"),
        }
    }
    // An ALPN the broker never spoke fails the handshake.
    ensure!(
        raw_connection_alpn(addr, dir.path(), b"directmq/0")
            .await
            .is_err(),
        "a handshake with an unknown ALPN succeeded"
    );

    let conn = raw_connection(addr, dir.path()).await?;
    let (_control_w, _control_r, reply) = hello(&conn, proto::PROTOCOL_VERSION).await?;
    ensure!(matches!(reply, Some(Frame::HelloOk(_))), "{reply:?}");

    // A malformed frame: a valid header around meta that is not bincode of OpenPublish.
    let mut bytes = header(5, proto::kind::OPEN_PUBLISH, 5);
    bytes.extend_from_slice(&[0xff; 5]);
    let e = error_for(&conn, &bytes).await?;
    ensure!(e.code == ErrorCode::MALFORMED_FRAME, "{e:?}");

    // An oversized frame is refused from its header alone.
    let e = error_for(&conn, &header(u32::MAX, proto::kind::PUBLISH_BATCH, 10)).await?;
    ensure!(e.code == ErrorCode::FRAME_TOO_LARGE, "{e:?}");
    ensure!(e.message.contains("exceeds"), "{}", e.message);

    // An unknown frame kind.
    let e = error_for(&conn, &header(0, 99, 0)).await?;
    ensure!(e.code == ErrorCode::UNKNOWN_FRAME_KIND, "{e:?}");

    // An invalid channel name.
    let err = good
        .producer("dc-a//bad name", "p")
        .await
        .expect_err("invalid name");
    ensure!(err.code() == Some(ErrorCode::INVALID_CHANNEL_NAME), "{err}");
    ensure!(err.to_string().contains("invalid channel name"), "{err}");
    let err = good
        .consumer("healthy", "bad/consumer", StartPosition::Earliest)
        .await
        .expect_err("invalid consumer name");
    ensure!(err.code() == Some(ErrorCode::INVALID_NAME), "{err}");

    // A message over max_message_bytes: the client library refuses it locally...
    let err = producer.send(vec![0u8; 5000]).await.expect_err("too large");
    ensure!(
        matches!(
            err,
            directmq_client::Error::MessageTooLarge {
                size: 5000,
                max: 4096
            }
        ),
        "{err}"
    );
    // ...and the broker refuses it from a client that does not check.
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv, 1 << 30);
    w.write(&Frame::OpenPublish(proto::OpenPublish {
        channel: "healthy".into(),
        producer_id: "raw".into(),
        create: true,
    }))
    .await?;
    ensure!(matches!(r.next().await?, Some(Frame::PublishOpened(_))));
    w.write(&Frame::PublishBatch(proto::PublishBatch {
        batch_id: 7,
        messages: vec![proto::PublishMessage {
            sequence: 1,
            headers: vec![],
            payload: Bytes::from(vec![1u8; 5000]),
        }],
    }))
    .await?;
    match r.next().await? {
        Some(Frame::Error(e)) => {
            ensure!(
                e.code == ErrorCode::MESSAGE_TOO_LARGE && e.request_id == 7,
                "{e:?}"
            );
            ensure!(e.message.contains("max_message_bytes"), "{}", e.message);
        }
        other => bail!("expected MESSAGE_TOO_LARGE, got {other:?}"),
    }

    // A stream that starts with the wrong frame.
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let mut r = FrameReader::new(recv, 1 << 30);
    w.write(&Frame::Commit(proto::Commit { offset: 1 })).await?;
    match r.next().await? {
        Some(Frame::Error(e)) => ensure!(e.code == ErrorCode::UNEXPECTED_FRAME, "{e:?}"),
        other => bail!("expected UNEXPECTED_FRAME, got {other:?}"),
    }

    // Nothing was stored by the refused requests, and everyone else is still served.
    producer.send("after").await?;
    let mut consumer = good
        .consumer("healthy", "c", StartPosition::Earliest)
        .await?;
    let a = consumer.next().await.context("closed")??;
    let b = consumer.next().await.context("closed")??;
    ensure!(a.payload == "before".as_bytes() && b.payload == "after".as_bytes());
    ensure!(
        good.list_channels("")
            .await?
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            == ["healthy"]
    );
    let info = &good.list_channels("healthy").await?[0];
    ensure!(info.head == 2, "head {}", info.head);
    running.shutdown().await;
    Ok(())
}
