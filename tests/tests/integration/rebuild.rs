//! Scenario 5 of issue 2: the checkpoint and the batch index hold nothing the segments cannot
//! give back.

use anyhow::{ensure, Context, Result};
use directmq_client::{Client, StartPosition};
use directmq_tests::{client, test_config};

async fn everything(client: &Client) -> Result<Vec<(String, u64, u64, Vec<(u64, Vec<u8>)>)>> {
    let mut out = Vec::new();
    for info in client.list_channels("").await? {
        let mut consumer = client
            .consumer(&info.name, "inspector", StartPosition::Earliest)
            .await?;
        let mut messages = Vec::new();
        while (messages.len() as u64) < info.head {
            let m = consumer.next().await.context("closed")??;
            messages.push((m.offset, m.payload.to_vec()));
        }
        out.push((info.name, info.head, info.first, messages));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_index_rebuilds_channels_messages_cursors_and_sequences() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    for channel in ["dc-a/s1", "dc-a/s2", "dc-b/s1"] {
        for producer in ["p1", "p2"] {
            let p = c.producer(channel, producer).await?;
            for i in 0..150u64 {
                // Sparse sequences, as an agent using its source log position would send.
                let ack = p
                    .enqueue_with(
                        i * 10 + 5,
                        vec![("k".into(), "v".into())],
                        format!("{channel}/{producer}/{i}"),
                    )
                    .await?;
                if i == 149 {
                    ack.await?;
                }
            }
            p.flush().await?;
        }
    }
    let mut consumer = c
        .consumer("dc-a/s1", "dc-b", StartPosition::Earliest)
        .await?;
    for _ in 0..120 {
        consumer.next().await.context("closed")??;
    }
    consumer.commit(120).await?;
    drop(consumer);
    let before = everything(&c).await?;
    let sequences_before = c.last_sequence("dc-a/s2", "p2").await?;
    ensure!(sequences_before == Some(1495));
    c.close().await;
    running.shutdown().await;

    std::fs::remove_dir_all(dir.path().join("index"))?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    let after = everything(&c).await?;
    ensure!(
        before == after,
        "channels or messages differ after the rebuild"
    );
    ensure!(c.last_sequence("dc-a/s2", "p2").await? == sequences_before);
    let mut resumed = c
        .consumer("dc-a/s1", "dc-b", StartPosition::Earliest)
        .await?;
    ensure!(
        resumed.start_offset() == 120,
        "cursor at {}",
        resumed.start_offset()
    );
    ensure!(resumed.next().await.context("closed")??.offset == 120);
    // A retry of a recent sequence is still recognised as a duplicate, with its offset; one
    // older than the remembered runs (sparse sequences take one each) is still a duplicate.
    let p = c.producer("dc-b/s1", "p1").await?;
    ensure!(p.last_sequence() == Some(1495));
    let receipt = p.enqueue_with(1305, vec![], "retry").await?.await?;
    ensure!(
        receipt.duplicate && receipt.offset == Some(130),
        "{receipt:?}"
    );
    let receipt = p.enqueue_with(5, vec![], "retry").await?.await?;
    ensure!(receipt.duplicate && receipt.offset.is_none(), "{receipt:?}");
    ensure!(c.list_channels("dc-b/").await?[0].head == 300);
    running.shutdown().await;
    Ok(())
}
