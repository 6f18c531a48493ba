//! Scenario 6 of issue 2: the newcomer's first three commands.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::directmq_bin;
use anyhow::{ensure, Result};
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
