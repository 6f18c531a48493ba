//! Issue 5, scenario 3: rotating the server certificate, adding a CA and removing a right
//! while the broker runs, each observed by a client, with no acked message lost; a broken
//! file leaves the old material in force; SIGHUP reloads too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use directmq_broker::tls;
use directmq_client::{net, Client, ClientConfig, StartPosition};
use directmq_protocol::ErrorCode;
use directmq_tests::{client, test_config, ChildBroker};
use rustls::pki_types::CertificateDer;

/// Replaces `path` the way deployment tools do: write aside, then rename over.
fn replace(path: &Path, contents: &[u8]) -> Result<()> {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents)?;
    std::fs::rename(&aside, path)?;
    Ok(())
}

fn config_from(addr: SocketAddr, certs: &Path) -> Result<ClientConfig> {
    let mut config = ClientConfig::from_certs_dir(&addr.to_string(), certs)?;
    config.connect_timeout = Duration::from_secs(5);
    config.reconnect_for = None;
    Ok(config)
}

/// The certificate the broker presents to a new connection.
async fn presented_certificate(addr: SocketAddr, certs: &Path) -> Result<Vec<u8>> {
    let tls = net::client_tls(certs)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint.connect(addr, "127.0.0.1")?.await?;
    let chain = conn
        .peer_identity()
        .context("no peer identity")?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("unexpected identity type"))?;
    let leaf = chain.first().context("empty chain")?.as_ref().to_vec();
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(leaf)
}

/// Retries `check` until it returns true: reloads are picked up by the broker's file
/// watch within a few of its 50 ms polls. Bounded at 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not observed within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_cas_and_rights_rotate_without_a_restart_and_nothing_acked_is_lost(
) -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let data = dir.path();
    let certs = data.join("certs");
    let config = directmq_broker::Config {
        reload_interval_ms: 50,
        ..test_config(data)
    };
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;
    let admin = client(addr, data).await?;

    // Publishing runs through every rotation below.
    let producer = admin.producer("rot/a", "p").await?;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let publishing = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..20_000u64 {
            if stop_rx.try_recv().is_ok() {
                break;
            }
            let receipt = producer.send(format!("m{i}")).await?;
            acked.push((i, receipt.offset.context("offset")?));
        }
        Ok::<_, anyhow::Error>(acked)
    });

    // 1. A new server certificate: new connections get it.
    let before = presented_certificate(addr, &certs).await?;
    let fresh = tempfile::tempdir()?;
    tls::issue_server(
        &certs,
        fresh.path(),
        &["127.0.0.1".into(), "rotated.example".into()],
        30,
    )?;
    let new_pem = std::fs::read(fresh.path().join("server.pem"))?;
    let new_der = net::load_certs(&fresh.path().join("server.pem"))?[0]
        .as_ref()
        .to_vec();
    ensure!(new_der != before);
    replace(
        &certs.join("server.key"),
        &std::fs::read(fresh.path().join("server.key"))?,
    )?;
    replace(&certs.join("server.pem"), &new_pem)?;
    eventually("the new server certificate", || {
        let certs = certs.clone();
        let new_der = new_der.clone();
        async move { Ok(presented_certificate(addr, &certs).await? == new_der) }
    })
    .await?;

    // 2. A second CA: its clients are refused, then accepted once it is in the CA file.
    let other_ca = tempfile::tempdir()?;
    tls::create_ca(other_ca.path(), "second CA", 30)?;
    let other_client = tempfile::tempdir()?;
    tls::issue_client(other_ca.path(), other_client.path(), "admin", 30)?;
    // It verifies the server with our CA.
    std::fs::copy(certs.join("ca.pem"), other_client.path().join("ca.pem"))?;
    let refused = Client::connect(config_from(addr, other_client.path())?).await;
    let refused = match refused {
        Ok(c) => c.list_channels("").await.map(drop),
        Err(e) => Err(e),
    };
    ensure!(refused.is_err(), "a client of an unknown CA was accepted");
    let mut bundle = std::fs::read(certs.join("ca.pem"))?;
    bundle.extend_from_slice(&std::fs::read(other_ca.path().join("ca.pem"))?);
    replace(&certs.join("ca.pem"), &bundle)?;
    eventually("a client of the added CA", || {
        let certs = other_client.path().to_owned();
        async move {
            let Ok(c) = Client::connect(config_from(addr, &certs)?).await else {
                return Ok(false);
            };
            let ok = c.list_channels("").await.is_ok();
            c.close().await;
            Ok(ok)
        }
    })
    .await?;

    // 3. A right removed: the open connection loses it at its next operation.
    let agent_certs = tempfile::tempdir()?;
    tls::issue_client(&certs, agent_certs.path(), "agent", 30)?;
    let acl_path = data.join("acl.toml");
    let granting = "[[grant]]\nidentity = \"admin\"\nadmin = [\"\"]\n\
                    [[grant]]\nidentity = \"agent\"\npublish = [\"agents/\"]\nconsume = [\"agents/\"]\n";
    replace(&acl_path, granting.as_bytes())?;
    let agent = Client::connect(config_from(addr, agent_certs.path())?).await?;
    let agent_producer = eventually_producer(&agent, "agents/x").await?;
    agent_producer.send("allowed").await?;
    let revoking = "[[grant]]\nidentity = \"admin\"\nadmin = [\"\"]\n\
                    [[grant]]\nidentity = \"agent\"\nconsume = [\"agents/\"]\n";
    replace(&acl_path, revoking.as_bytes())?;
    let mut sent = 0;
    let err = loop {
        match agent_producer.send(format!("after {sent}")).await {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        ensure!(sent < 100_000, "the removed right never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");
    // What it may still do, it still does, on the same connection.
    let mut reader = agent
        .consumer("agents/x", "r", StartPosition::Earliest)
        .await?;
    ensure!(reader.next().await.context("closed")??.payload == "allowed".as_bytes());
    drop(reader);

    // 4. A broken ACL is rejected; the previous one stays in force.
    replace(&acl_path, b"[[grant]]\nidentity = \n")?;
    let report = running.broker.reload();
    let err = report.acl.clone().expect_err("a broken ACL must not load");
    ensure!(err.contains("acl.toml") && err.contains("invalid"), "{err}");
    ensure!(report.tls.is_ok(), "{report:?}");
    admin.list_channels("").await?;
    let err = agent
        .producer("agents/y", "p")
        .await
        .expect_err("still no publish right");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");
    // A broken certificate file likewise: the previous certificate is still presented.
    replace(&certs.join("server.pem"), b"not a certificate")?;
    let report = running.broker.reload();
    ensure!(report.tls.is_err(), "{report:?}");
    ensure!(presented_certificate(addr, &certs).await? == new_der);

    // Nothing acked was lost through all of it.
    let _ = stop_tx.send(());
    let acked = publishing.await??;
    ensure!(
        acked.len() > 10,
        "too little was published: {}",
        acked.len()
    );
    let mut consumer = admin
        .consumer("rot/a", "check", StartPosition::Earliest)
        .await?;
    for (i, offset) in &acked {
        let m = consumer.next().await.context("closed")??;
        ensure!(
            m.offset == *offset && m.payload == format!("m{i}").as_bytes(),
            "{m:?}"
        );
    }
    drop(consumer);
    agent.close().await;
    admin.close().await;
    running.shutdown().await;
    Ok(())
}

/// The ACL granting the right may not be loaded yet when the test first asks.
async fn eventually_producer(c: &Client, channel: &str) -> Result<directmq_client::Producer> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.producer(channel, "p").await {
            Ok(p) => return Ok(p),
            Err(e)
                if e.code() == Some(ErrorCode::UNAUTHORIZED)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[test]
fn sighup_reloads_the_acl() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // File watching off: only the signal can reload.
    let config = dir.path().join("directmq.toml");
    std::fs::write(&config, "reload_interval_ms = 0\n")?;
    let config = config.to_string_lossy().into_owned();
    let mut broker = ChildBroker::start_with(
        &crate::directmq_bin(),
        dir.path(),
        &[],
        &["--config", &config],
        &[],
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let c = client(broker.quic, dir.path()).await?;
        c.create_channel("hup/a").await?;
        // Take admin's rights away; with no watch, nothing changes until SIGHUP.
        replace(
            &dir.path().join("acl.toml"),
            b"[[grant]]\nidentity = \"admin\"\nconsume = [\"\"]\n",
        )?;
        c.create_channel("hup/b").await?;
        let status = std::process::Command::new("kill")
            .args(["-HUP", &broker.pid().to_string()])
            .status()?;
        ensure!(status.success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut created = 2;
        loop {
            match c.create_channel(&format!("hup/c{created}")).await {
                Err(e) if e.code() == Some(ErrorCode::UNAUTHORIZED) => break,
                Ok(()) => created += 1,
                Err(e) => return Err(e.into()),
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "SIGHUP did not reload"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Still consuming: the connection and the remaining right survive.
        ensure!(c.list_channels("hup/").await?.len() == created);
        c.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    ensure!(broker.terminate()?, "graceful stop after the reload");
    Ok(())
}
