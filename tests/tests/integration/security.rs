//! SPEC §3 over real QUIC handshakes: certificates from the configured CA only, and ACL
//! rights on channel-name prefixes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use directmq_broker::tls::{self, Validity};
use directmq_client::{net, Client, ClientConfig, StartPosition};
use directmq_protocol::ErrorCode;
use directmq_tests::{client, test_config};

fn config_from(addr: std::net::SocketAddr, certs: &Path) -> Result<ClientConfig> {
    let mut config = ClientConfig::from_certs_dir(&addr.to_string(), certs)?;
    config.connect_timeout = Duration::from_secs(5);
    Ok(config)
}

/// Connects and lists channels: a refused client fails at one of the two.
async fn try_use(config: ClientConfig) -> Result<(), directmq_client::Error> {
    let client = Client::connect(config).await?;
    client.list_channels("").await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_from_the_ca_are_refused() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let running = directmq_broker::start(test_config(dir.path())).await?;
    let addr = running.quic_addr;
    let good = client(addr, dir.path()).await?;
    let ca_dir = dir.path().join("certs");

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for ca in net::load_certs(&ca_dir.join("ca.pem"))? {
        roots.add(ca)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(net::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![directmq_protocol::ALPN.to_vec()];
    let mut config = config_from(addr, &ca_dir)?;
    config.tls = Arc::new(tls);
    let err = try_use(config).await.expect_err("no certificate");
    ensure!(
        err.to_string().to_lowercase().contains("certificate"),
        "unclear: {err}"
    );
    eprintln!("refused as expected: {err}");

    // A certificate from another CA.
    let other = tempfile::tempdir()?;
    tls::create_ca(other.path(), "another CA", 30)?;
    tls::issue_client(other.path(), other.path(), "admin", 30)?;
    let mut config = config_from(addr, other.path())?;
    // It trusts our server, only its own certificate is foreign.
    let trusting = tempfile::tempdir()?;
    std::fs::copy(
        other.path().join("client.pem"),
        trusting.path().join("client.pem"),
    )?;
    std::fs::copy(
        other.path().join("client.key"),
        trusting.path().join("client.key"),
    )?;
    std::fs::copy(ca_dir.join("ca.pem"), trusting.path().join("ca.pem"))?;
    config.tls = Arc::new(net::client_tls(trusting.path())?);
    let err = try_use(config).await.expect_err("foreign CA");
    ensure!(
        err.to_string().to_lowercase().contains("certificate"),
        "unclear: {err}"
    );
    eprintln!("refused as expected: {err}");

    // An expired certificate from the right CA.
    let expired = tempfile::tempdir()?;
    let now = time::OffsetDateTime::now_utc();
    tls::issue_client_valid(
        &ca_dir,
        expired.path(),
        "admin",
        Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        },
    )?;
    let err = try_use(config_from(addr, expired.path())?)
        .await
        .expect_err("expired");
    ensure!(
        err.to_string().to_lowercase().contains("certificate"),
        "unclear: {err}"
    );
    eprintln!("refused as expected: {err}");

    // A certificate from the right CA that is not valid yet.
    let early = tempfile::tempdir()?;
    tls::issue_client_valid(
        &ca_dir,
        early.path(),
        "admin",
        Validity {
            not_before: now + time::Duration::days(1),
            not_after: now + time::Duration::days(10),
        },
    )?;
    let err = try_use(config_from(addr, early.path())?)
        .await
        .expect_err("not yet valid");
    ensure!(
        err.to_string().to_lowercase().contains("certificate"),
        "unclear: {err}"
    );
    eprintln!("refused as expected: {err}");

    // The broker serves everyone else throughout.
    let p = good.producer("still/serving", "p").await?;
    ensure!(p.send("ok").await?.offset == Some(0));
    running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_get_only_the_rights_their_acl_grants() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let acl = dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        r#"
[[grant]]
identity = "dc-a-agent"
publish = ["dc-a/"]
[[grant]]
identity = "dc-b-agent"
consume = ["dc-a/"]
[[grant]]
identity = "admin"
admin = [""]
"#,
    )?;
    let mut config = test_config(dir.path());
    config.acl = Some(acl);
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;
    let ca_dir = dir.path().join("certs");
    let issue = |identity: &str| -> Result<tempfile::TempDir> {
        let out = tempfile::tempdir()?;
        tls::issue_client(&ca_dir, out.path(), identity, 1)?;
        Ok(out)
    };
    let (publisher_certs, reader_certs, stranger_certs) =
        (issue("dc-a-agent")?, issue("dc-b-agent")?, issue("nobody")?);
    let admin = client(addr, dir.path()).await?;
    admin.create_channel("dc-b/x").await?;

    let publisher = Client::connect(config_from(addr, publisher_certs.path())?).await?;
    ensure!(publisher.hello().await?.identity == "dc-a-agent");
    publisher.producer("dc-a/x", "p").await?.send("m").await?;
    let err = publisher
        .producer("dc-b/x", "p")
        .await
        .expect_err("no publish right on dc-b/");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");
    ensure!(
        err.to_string().contains("dc-a-agent") && err.to_string().contains("publish"),
        "{err}"
    );
    let err = publisher
        .consumer("dc-a/x", "c", StartPosition::Earliest)
        .await
        .expect_err("no consume right");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");
    let seen: Vec<String> = publisher
        .list_channels("")
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    ensure!(
        !seen.iter().any(|n| n.starts_with("dc-b/")),
        "sees {seen:?}"
    );
    let err = publisher
        .delete_channel("dc-a/x")
        .await
        .expect_err("no admin right");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");
    // The connection stays usable for what is allowed.
    publisher.producer("dc-a/y", "p").await?.send("m").await?;

    let reader = Client::connect(config_from(addr, reader_certs.path())?).await?;
    let mut consumer = reader
        .consumer("dc-a/x", "dc-b", StartPosition::Earliest)
        .await?;
    ensure!(consumer.next().await.context("closed")??.payload == "m".as_bytes());
    let seen: Vec<String> = reader
        .list_channels("")
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    ensure!(seen == ["dc-a/x", "dc-a/y"], "sees {seen:?}");
    let err = reader
        .producer("dc-a/x", "p")
        .await
        .expect_err("no publish right");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");

    // An identity the ACL does not name may do nothing, and sees nothing.
    let stranger = Client::connect(config_from(addr, stranger_certs.path())?).await?;
    ensure!(stranger.list_channels("").await?.is_empty());
    let err = stranger
        .producer("dc-a/x", "p")
        .await
        .expect_err("nothing granted");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");
    running.shutdown().await;
    Ok(())
}

/// A multi-channel stream looks each channel's grant up once per ACL, not per frame; a
/// reload that takes a right away still applies at the stream's next frame, and one that
/// leaves a right in place keeps it working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_right_removed_by_a_reload_applies_to_an_open_multi_channel_stream() -> Result<()> {
    directmq_tests::init_logging();
    let dir = tempfile::tempdir()?;
    let acl = dir.path().join("acl.toml");
    let grants = |publish: &str| {
        format!(
            "[[grant]]\nidentity = \"admin\"\nadmin = [\"\"]\n\
             [[grant]]\nidentity = \"agent\"\npublish = [{publish}]\n"
        )
    };
    std::fs::write(&acl, grants("\"a/\", \"b/\""))?;
    let mut config = test_config(dir.path());
    config.acl = Some(acl.clone());
    let running = directmq_broker::start(config).await?;
    let addr = running.quic_addr;
    let admin = client(addr, dir.path()).await?;
    admin.create_channel("a/x").await?;
    admin.create_channel("b/x").await?;
    let agent_certs = tempfile::tempdir()?;
    tls::issue_client(&dir.path().join("certs"), agent_certs.path(), "agent", 1)?;
    let agent = Client::connect(config_from(addr, agent_certs.path())?).await?;
    let producer = agent
        .multi_producer("p", directmq_client::ProducerOptions::default())
        .await?;
    // Two frames on each channel under the first ACL: the second uses the kept grant.
    for payload in ["1", "2"] {
        producer.send("a/x", payload).await?;
        producer.send("b/x", payload).await?;
    }

    std::fs::write(&acl, grants("\"a/\""))?;
    let report = running.broker.reload();
    ensure!(report.acl.is_ok(), "{report:?}");
    producer.send("a/x", "3").await?;
    let err = producer
        .send("b/x", "3")
        .await
        .expect_err("the reload took the publish right on b/ away");
    ensure!(err.code() == Some(ErrorCode::UNAUTHORIZED), "{err}");
    ensure!(err.to_string().contains("b/x"), "{err}");

    // What was acknowledged is stored; the refused message is not.
    for (channel, want) in [("a/x", &["1", "2", "3"][..]), ("b/x", &["1", "2"][..])] {
        let mut consumer = admin
            .consumer(channel, "check", StartPosition::Earliest)
            .await?;
        for payload in want {
            let m = consumer.next().await.context("closed")??;
            ensure!(m.payload == payload.as_bytes(), "{channel}: {m:?}");
        }
        let head = admin.list_channels(channel).await?;
        ensure!(
            head.iter()
                .any(|c| c.name == channel && c.head == want.len() as u64),
            "{channel}: {head:?}"
        );
    }
    running.shutdown().await;
    Ok(())
}
