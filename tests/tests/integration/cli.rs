//! Scenario 6 of issue 2: the newcomer's first three commands.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::directmq_bin;
use anyhow::{ensure, Context, Result};
use directmq_tests::ChildBroker;

#[test]
fn serve_publish_consume_work_from_a_fresh_directory() -> Result<()> {
    let cwd = tempfile::tempdir()?;
    // `serve` with its default data directory (./directmq-data in the working directory);
    // only the ports differ from the defaults, because tests bind port 0.
    let broker = ChildBroker::start_in(&directmq_bin(), cwd.path())?;
    ensure!(cwd.path().join("directmq-data/certs/client.pem").exists());
    ensure!(cwd.path().join("directmq-data/acl.toml").exists());
    let broker_addr = broker.quic.to_string();

    let mut publish = Command::new(directmq_bin())
        .args(["publish", "--channel", "t", "--broker", &broker_addr])
        .current_dir(cwd.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    publish.stdin.take().expect("piped").write_all(b"hi\n")?;
    let out = publish.wait_with_output()?;
    ensure!(
        out.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(directmq_bin())
        .args([
            "consume",
            "--channel",
            "t",
            "--consumer",
            "c",
            "--from",
            "earliest",
            "--count",
            "1",
            "--json",
            "--broker",
            &broker_addr,
        ])
        .current_dir(cwd.path())
        .output()?;
    ensure!(
        out.status.success(),
        "consume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        line["channel"] == "t" && line["offset"] == 0 && line["payload"] == "hi",
        "{line}"
    );
    ensure!(
        line["timestamp_ms"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "{line}"
    );

    // Errors are one sentence on stderr and a non-zero exit.
    let out = Command::new(directmq_bin())
        .args([
            "consume",
            "--channel",
            "missing",
            "--consumer",
            "c",
            "--broker",
            &broker_addr,
        ])
        .current_dir(cwd.path())
        .output()?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("does not exist") && out.stdout.is_empty(),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_in_sync_returns_once_every_starting_head_is_committed() -> Result<()> {
    use std::io::{BufRead, BufReader};
    use std::time::Duration;

    use anyhow::Context;
    use directmq_client::StartPosition;
    use directmq_tests::{client, test_config};

    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let c = client(running.quic_addr, dir.path()).await?;
    for channel in ["dc-a/s1", "dc-a/s2"] {
        let p = c.producer(channel, "p").await?;
        for i in 0..3 {
            p.send(format!("m{i}")).await?;
        }
    }
    let s1 = c
        .consumer("dc-a/s1", "dc-b", StartPosition::Earliest)
        .await?;
    s1.commit(3).await?;
    let s2 = c
        .consumer("dc-a/s2", "dc-b", StartPosition::Earliest)
        .await?;
    s2.commit(1).await?;
    let (addr, certs) = (running.quic_addr.to_string(), dir.path().join("certs"));
    let args = move |timeout: &str| {
        let mut cmd = Command::new(directmq_bin());
        cmd.args([
            "wait-in-sync",
            "--consumer",
            "dc-b",
            "--prefix",
            "dc-a/",
            "--timeout",
            timeout,
        ])
        .arg("--broker")
        .arg(&addr)
        .arg("--certs")
        .arg(&certs);
        cmd
    };

    // Behind: it times out and says by how much.
    let mut behind = args("1s");
    let out = tokio::task::spawn_blocking(move || behind.output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    ensure!(
        stderr.contains("still 2 messages behind on 1 channel(s) (most on dc-a/s2)"),
        "{stderr}"
    );

    // A waiter takes the heads when it starts; messages published later are not awaited.
    let mut waiter = args("60s").stderr(Stdio::piped()).spawn()?;
    let stderr = waiter.stderr.take().context("piped")?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let lines = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("waiting for consumer") {
                let _ = started_tx.send(());
            }
            all.push(line);
        }
        all
    });
    tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(30))).await??;
    let p = c.producer("dc-a/s2", "p").await?;
    p.send("after the barrier").await?;
    s2.commit(3).await?;
    let status = tokio::task::spawn_blocking(move || waiter.wait()).await??;
    let lines = lines.join().expect("reader thread");
    ensure!(status.success(), "{lines:?}");
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("is in sync on 2 channel(s)")),
        "{lines:?}"
    );
    running.shutdown().await;
    Ok(())
}

/// Issue 4: `directmq publish` survives a broker restart in the middle of its input; it
/// reconnects by itself, finishes, and `--json` lists every ack, none twice.
#[test]
fn publish_finishes_across_a_broker_restart_and_lists_every_ack() -> Result<()> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let mut broker = ChildBroker::start(&directmq_bin(), dir.path(), None)?;
    let addr = broker.quic;
    let mut publish = Command::new(directmq_bin())
        .args(["publish", "--channel", "restart/a", "--json"])
        .arg("--broker")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = publish.stdin.take().expect("piped");
    let mut acks = std::io::BufReader::new(publish.stdout.take().expect("piped")).lines();
    for i in 0..500 {
        writeln!(stdin, "line {i}")?;
    }
    stdin.flush()?;
    // Wait until the first half is acked, so the restart falls between the halves...
    let mut lines = Vec::new();
    while lines.len() < 500 {
        lines.push(acks.next().context("publish ended early")??);
    }
    // ...then SIGKILL the broker while the CLI holds its connection, and restart it.
    broker.kill();
    let mut broker = ChildBroker::start(&directmq_bin(), dir.path(), Some(addr))?;
    for i in 500..1000 {
        writeln!(stdin, "line {i}")?;
    }
    drop(stdin);
    for line in acks {
        lines.push(line?);
    }
    let out = publish.wait_with_output()?;
    ensure!(
        out.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(lines.len() == 1000, "{} acks", lines.len());
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        ensure!(
            v["sequence"] == i as u64 && v["offset"] == i as u64,
            "ack {i}: {line}"
        );
    }
    // The log holds each line once.
    let out = Command::new(directmq_bin())
        .args(["channels", "--json", "--prefix", "restart/"])
        .arg("--broker")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["head"] == 1000, "{v}");
    ensure!(broker.terminate()?);
    Ok(())
}
