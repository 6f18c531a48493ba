//! A minimal producer agent: publishes each line of stdin to a channel, using the line
//! number as the sequence, so re-running it over the same input stores nothing twice.
//!
//! ```sh
//! cargo run --example producer -- 127.0.0.1:7070 ./directmq-data/certs dc-a/db1/s1 < changes.txt
//! ```

use std::io::BufRead;

use directmq_client::{Client, ClientConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (broker, certs, channel) = match (args.next(), args.next(), args.next()) {
        (Some(b), Some(c), Some(ch)) => (b, c, ch),
        _ => anyhow::bail!("usage: producer BROKER CERTS_DIR CHANNEL < input"),
    };
    let client = Client::connect(ClientConfig::from_certs_dir(&broker, certs.as_ref())?).await?;
    let producer = client.producer(&channel, "example-producer").await?;
    // Resume after what the broker already has: the sequence is the line number.
    let resume_after = producer.last_sequence();
    let mut acks = Vec::new();
    for (line_number, line) in std::io::stdin().lock().lines().enumerate() {
        let sequence = line_number as u64;
        if resume_after.is_some_and(|last| sequence <= last) {
            continue;
        }
        acks.push(producer.enqueue_with(sequence, vec![], line?).await?);
    }
    let mut stored = 0;
    for ack in acks {
        let receipt = ack.await?;
        stored += usize::from(!receipt.duplicate);
    }
    eprintln!("stored {stored} new messages on {channel}");
    client.close().await;
    Ok(())
}
