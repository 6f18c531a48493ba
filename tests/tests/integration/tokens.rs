//! Issue 5, scenario 4: scoped, expiring tokens as a second way in. A revoked token stops
//! working (also on an open connection, and after a restart), an expired token is refused,
//! a renewed token works past the original expiry.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use directmq_broker::tokens::{Claims, TokenKeys};
use directmq_client::{Client, ClientConfig, StartPosition};
use directmq_protocol::ErrorCode;
use directmq_tests::{client, test_config};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn token_config(addr: SocketAddr, data: &Path, token: &str) -> Result<ClientConfig> {
    let mut config =
        ClientConfig::with_token(&addr.to_string(), &data.join("certs/ca.pem"), token)?;
    config.connect_timeout = Duration::from_secs(5);
    Ok(config)
}

/// Connects with `token` and opens a consumer on `tok/x`: what an agent does first.
async fn use_token(
    addr: SocketAddr,
    data: &Path,
    token: &str,
) -> Result<(), directmq_client::Error> {
    let c = Client::connect(
        token_config(addr, data, token)
            .map_err(|e| directmq_client::Error::Protocol(e.to_string()))?,
    )
    .await?;
    let result = c
        .consumer("tok/x", "dc-b", StartPosition::Earliest)
        .await
        .map(drop);
    c.close().await;
    result
}

fn broker_config(data: &Path) -> Result<directmq_broker::Config> {
    std::fs::write(
        data.join("acl.toml"),
        "[[grant]]\nidentity = \"admin\"\nadmin = [\"\"]\n\
         [[grant]]\nidentity = \"agent\"\nconsume = [\"tok/\"]\npublish = [\"tok/\"]\n",
    )?;
    Ok(directmq_broker::Config {
        allow_tokens: true,
        ..test_config(data)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_expire_renew_and_stay_revoked_across_a_restart() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let running = directmq_broker::start(broker_config(data)?).await?;
    let addr = running.quic_addr;
    let admin = client(addr, data).await?;
    admin.producer("tok/x", "p").await?.send("hello").await?;

    // Issued by an administrator: consume under tok/ only, although the ACL would also let
    // the identity publish there.
    let issued = admin
        .issue_token(
            "agent",
            vec![],
            vec!["tok/".into()],
            vec![],
            Duration::from_secs(3600),
        )
        .await?;
    ensure!(
        issued.token.starts_with("dmq1.") && issued.id.len() == 32,
        "{issued:?}"
    );
    let agent = Client::connect(token_config(addr, data, &issued.token)?).await?;
    ensure!(agent.hello().await?.identity == "agent");
    let mut consumer = agent
        .consumer("tok/x", "dc-b", StartPosition::Earliest)
        .await?;
    ensure!(consumer.next().await.context("closed")??.payload == "hello".as_bytes());
    drop(consumer);
    let err = agent
        .producer("tok/x", "p")
        .await
        .expect_err("not in the token's scope");
    ensure!(
        err.code() == Some(ErrorCode::UNAUTHORIZED) && err.to_string().contains("by token"),
        "{err}"
    );
    // Only what the token and the ACL both allow is listed.
    admin.create_channel("other/y").await?;
    let seen: Vec<String> = agent
        .list_channels("")
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    ensure!(seen == ["tok/x"], "{seen:?}");
    // A token-holder without admin rights issues nothing.
    let err = agent
        .issue_token(
            "agent",
            vec![],
            vec!["tok/".into()],
            vec![],
            Duration::from_secs(60),
        )
        .await
        .expect_err("no admin right");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");

    // Expired: a token whose expiry has passed is refused at the hello.
    let keys = TokenKeys::load(&data.join("token-keys.toml")).map_err(anyhow::Error::msg)?;
    let expired = keys.sign(Claims {
        id: "0123456789abcdef0123456789abcdef".into(),
        sub: "agent".into(),
        publish: vec![],
        consume: vec!["tok/".into()],
        admin: vec![],
        iat: now_ms() - 60_000,
        exp: now_ms() - 1,
        kid: String::new(),
    });
    let err = use_token(addr, data, &expired).await.expect_err("expired");
    ensure!(
        err.code() == Some(ErrorCode::UNAUTHORIZED) && err.to_string().contains("expired"),
        "{err}"
    );
    // Altered: refused.
    let mut altered = issued.token.clone();
    altered.insert(10, 'x');
    ensure!(use_token(addr, data, &altered).await.is_err());

    // Renewed: a short-lived token renewed by its holder works past its original expiry.
    let short = keys.sign(Claims {
        id: "fedcba9876543210fedcba9876543210".into(),
        sub: "agent".into(),
        publish: vec![],
        consume: vec!["tok/".into()],
        admin: vec![],
        iat: now_ms(),
        exp: now_ms() + 500,
        kid: String::new(),
    });
    let holder = Client::connect(token_config(addr, data, &short)?).await?;
    let mut reader = holder
        .consumer("tok/x", "holder", StartPosition::Earliest)
        .await?;
    ensure!(reader.next().await.context("closed")??.offset == 0);
    let renewed = holder
        .renew_token(&short, Duration::from_secs(3600))
        .await?;
    // The agent switches its live client to the renewed token; its consumer carries on.
    holder.set_token(&renewed.token).await;
    ensure!(
        renewed.id == "fedcba9876543210fedcba9876543210",
        "{renewed:?}"
    );
    ensure!(renewed.expires_ms > now_ms() + 3_000_000, "{renewed:?}");
    while now_ms() <= short_expiry(&keys, &short)? {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = use_token(addr, data, &short)
        .await
        .expect_err("past its expiry");
    ensure!(err.to_string().contains("expired"), "{err}");
    use_token(addr, data, &renewed.token).await?;
    // The live client, past the original expiry, still works on the renewed token.
    admin.producer("tok/x", "p").await?.send("later").await?;
    let m = tokio::time::timeout(Duration::from_secs(30), reader.next())
        .await
        .context("the consumer stopped at the original expiry")?
        .context("closed")??;
    ensure!(m.payload == "later".as_bytes(), "{m:?}");
    ensure!(holder.hello().await?.identity == "agent");
    drop(reader);
    holder.close().await;
    // An expired token cannot be renewed.
    let err = admin
        .renew_token(&short, Duration::from_secs(60))
        .await
        .expect_err("expired tokens are not renewed");
    ensure!(err.to_string().contains("expired"), "{err}");

    // Revoked: the open connection loses its rights at its next operation, new connections
    // are refused, renewals of it too.
    admin.revoke_token(&issued.id).await?;
    let err = agent
        .consumer("tok/x", "dc-c", StartPosition::Earliest)
        .await
        .expect_err("revoked");
    ensure!(err.to_string().contains("revoked"), "{err}");
    let err = use_token(addr, data, &issued.token)
        .await
        .expect_err("revoked");
    ensure!(err.to_string().contains("revoked"), "{err}");
    admin.revoke_token(&renewed.token).await?;
    let err = use_token(addr, data, &renewed.token)
        .await
        .expect_err("revoked");
    ensure!(err.to_string().contains("revoked"), "{err}");
    agent.close().await;
    admin.close().await;
    running.shutdown().await;

    // ... and stays revoked after a restart.
    let running = directmq_broker::start(broker_config(data)?).await?;
    let err = use_token(running.quic_addr, data, &issued.token)
        .await
        .expect_err("revoked before the restart");
    ensure!(err.to_string().contains("revoked"), "{err}");
    running.shutdown().await;
    Ok(())
}

fn short_expiry(keys: &TokenKeys, token: &str) -> Result<u64> {
    Ok(keys.verify(token).map_err(anyhow::Error::msg)?.exp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_issues_a_token_that_the_command_line_can_use() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let running = directmq_broker::start(broker_config(data)?).await?;
    let addr = running.quic_addr.to_string();
    let certs = data.join("certs");
    let run = |args: Vec<String>| {
        let mut command = Command::new(crate::directmq_bin());
        command.args(args).env_remove("DIRECTMQ_TOKEN");
        tokio::task::spawn_blocking(move || command.output())
    };
    let out = run(vec![
        "token".into(),
        "issue".into(),
        "--identity".into(),
        "agent".into(),
        "--consume".into(),
        "tok/".into(),
        "--ttl".into(),
        "6h".into(),
        "--broker".into(),
        addr.clone(),
        "--certs".into(),
        certs.to_string_lossy().into_owned(),
    ])
    .await??;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(token.starts_with("dmq1."), "{token}");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("expires"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = client(running.quic_addr, data).await?;
    admin.create_channel("tok/z").await?;
    // --certs supplies only ca.pem here; the token is the credential.
    let only_ca = tempfile::tempdir()?;
    std::fs::copy(certs.join("ca.pem"), only_ca.path().join("ca.pem"))?;
    let out = run(vec![
        "channels".into(),
        "--json".into(),
        "--token".into(),
        token.clone(),
        "--broker".into(),
        addr.clone(),
        "--certs".into(),
        only_ca.path().to_string_lossy().into_owned(),
    ])
    .await??;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(line["name"] == "tok/z", "{line}");
    // A garbled token: one clear sentence and a non-zero exit.
    let out = run(vec![
        "channels".into(),
        "--token".into(),
        "dmq1.nonsense".into(),
        "--broker".into(),
        addr,
        "--certs".into(),
        only_ca.path().to_string_lossy().into_owned(),
    ])
    .await??;
    if out.status.success() {
        bail!("a garbled token was accepted");
    }
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    admin.close().await;
    running.shutdown().await;
    Ok(())
}

/// A multi-channel stream checks its token at every frame, although it looks each channel's
/// grant up only once per ACL: a token revoked while the stream is open stops the next
/// frame, on a channel the stream already published to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_under_an_open_multi_channel_stream_stops_its_next_frame() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let running = directmq_broker::start(broker_config(data)?).await?;
    let addr = running.quic_addr;
    let admin = client(addr, data).await?;
    admin.create_channel("tok/a").await?;
    admin.create_channel("tok/b").await?;
    let issued = admin
        .issue_token(
            "agent",
            vec!["tok/".into()],
            vec![],
            vec![],
            Duration::from_secs(3600),
        )
        .await?;
    let agent = Client::connect(token_config(addr, data, &issued.token)?).await?;
    let producer = agent
        .multi_producer("p", directmq_client::ProducerOptions::default())
        .await?;
    for payload in ["1", "2"] {
        producer.send("tok/a", payload).await?;
        producer.send("tok/b", payload).await?;
    }

    admin.revoke_token(&issued.id).await?;
    let err = producer
        .send("tok/a", "3")
        .await
        .expect_err("the token was revoked");
    ensure!(
        err.code() == Some(ErrorCode::UNAUTHORIZED) && err.to_string().contains("revoked"),
        "{err}"
    );
    let heads: Vec<(String, u64)> = admin
        .list_channels("tok/")
        .await?
        .into_iter()
        .map(|c| (c.name, c.head))
        .collect();
    ensure!(
        heads == [("tok/a".to_string(), 2), ("tok/b".to_string(), 2)],
        "{heads:?}"
    );
    agent.close().await;
    admin.close().await;
    running.shutdown().await;
    Ok(())
}
