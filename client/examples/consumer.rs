//! A minimal consumer agent: prints a channel's messages in order as the durable consumer
//! NAME, committing after each one, so a restart continues where it stopped.
//!
//! ```sh
//! cargo run --example consumer -- 127.0.0.1:7070 ./directmq-data/certs dc-a/db1/s1 dc-b
//! ```

use directmq_client::{Client, ClientConfig, StartPosition};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (broker, certs, channel, name) = match (args.next(), args.next(), args.next(), args.next())
    {
        (Some(b), Some(c), Some(ch), Some(n)) => (b, c, ch, n),
        _ => anyhow::bail!("usage: consumer BROKER CERTS_DIR CHANNEL CONSUMER_NAME"),
    };
    let client = Client::connect(ClientConfig::from_certs_dir(&broker, certs.as_ref())?).await?;
    let mut consumer = client
        .consumer(&channel, &name, StartPosition::Earliest)
        .await?;
    while let Some(message) = consumer.next().await {
        let message = message?;
        println!(
            "{} {}",
            message.offset,
            String::from_utf8_lossy(&message.payload)
        );
        // Apply the change here, then commit: at-least-once, in order.
        consumer.commit_nowait(message.offset + 1);
    }
    Ok(())
}
