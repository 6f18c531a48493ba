//! `--probe`: the machine's own limits, measured next to the result.
//!
//! - the disk: append `block`-sized writes, each followed by `fdatasync`, to a fresh file in
//!   the data directory's filesystem, for about a second and a half (and at most 512 MiB);
//! - QUIC: one connection on loopback, one stream, bulk bytes for about a second, with the
//!   product's own socket buffers, transport settings and crypto provider
//!   (`directmq_client::net`).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use directmq_client::net::{self, NetOptions};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How long each disk probe writes.
const DISK_SECONDS: f64 = 1.5;
/// The most each disk probe writes.
const DISK_MAX_BYTES: u64 = 512 * 1024 * 1024;
/// How long the QUIC sender writes, and the most it writes.
const QUIC_SECONDS: f64 = 1.0;
const QUIC_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// The whole QUIC probe, connection set-up included, must end within this.
const QUIC_LIMIT: Duration = Duration::from_secs(20);
const QUIC_CHUNK: usize = 1024 * 1024;

/// What the probes measured, MB/s (10^6 bytes).
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub disk_64kib_mb_per_sec: f64,
    pub disk_1mib_mb_per_sec: f64,
    pub quic_mb_per_sec: f64,
}

/// Runs every probe; `dir` is in the filesystem to measure.
pub async fn run(dir: &Path) -> Result<Probe> {
    let d = dir.to_owned();
    let disk_64kib = tokio::task::spawn_blocking(move || disk(&d, 64 * 1024))
        .await
        .context("the disk probe panicked")??;
    let d = dir.to_owned();
    let disk_1mib = tokio::task::spawn_blocking(move || disk(&d, 1024 * 1024))
        .await
        .context("the disk probe panicked")??;
    let quic = tokio::time::timeout(QUIC_LIMIT, quic())
        .await
        .map_err(|_| anyhow!("the QUIC probe took over {} s", QUIC_LIMIT.as_secs()))??;
    Ok(Probe {
        disk_64kib_mb_per_sec: disk_64kib,
        disk_1mib_mb_per_sec: disk_1mib,
        quic_mb_per_sec: quic,
    })
}

/// fdatasync'd append bandwidth with `block`-byte writes, MB/s.
pub fn disk(dir: &Path, block: usize) -> Result<f64> {
    let path = dir.join(format!(
        ".directmq-bench-probe-{}-{block}",
        std::process::id()
    ));
    // Removed however this function ends.
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("could not create the probe file {}", path.display()))?;
    let _remove = Remove(&path);
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ block as u64;
    let data: Vec<u8> = (0..block)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let start = Instant::now();
    let mut written = 0u64;
    let max_writes = DISK_MAX_BYTES / block as u64;
    for _ in 0..max_writes {
        file.write_all(&data)
            .with_context(|| format!("could not write the probe file {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("could not fdatasync {}", path.display()))?;
        written += block as u64;
        if start.elapsed().as_secs_f64() >= DISK_SECONDS {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    Ok(written as f64 / seconds / 1e6)
}

/// One QUIC stream on loopback, bulk, MB/s as the receiver saw it complete.
pub async fn quic() -> Result<f64> {
    let options = NetOptions::default();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .context("could not make a self-signed certificate")?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    const ALPN: &[u8] = b"directmq-bench-probe";

    let mut server_tls = rustls::ServerConfig::builder_with_provider(net::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
    ));
    server_config.transport_config(options.transport());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(net::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    client_config.transport_config(options.transport());

    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = net::endpoint(
        net::udp_socket(loopback, options.socket_buffer_bytes)?,
        Some(server_config),
    )?;
    let server_addr = server.local_addr()?;
    let client = net::endpoint(
        net::udp_socket(loopback, options.socket_buffer_bytes)?,
        None,
    )?;

    // The receiver: counts bytes until the stream ends, then answers with one byte.
    let receiver = {
        let server = server.clone();
        tokio::spawn(async move {
            let incoming = server
                .accept()
                .await
                .ok_or_else(|| anyhow!("the probe server closed"))?;
            let connection = incoming.await?;
            let (mut send, mut recv) = connection.accept_bi().await?;
            let mut received = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                received += chunk.bytes.len() as u64;
            }
            send.write_all(&[1]).await?;
            send.finish()?;
            // Let the reply reach the client before the connection is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            anyhow::Ok(received)
        })
    };

    let connection = client
        .connect_with(client_config, server_addr, "localhost")?
        .await
        .context("the probe could not connect over QUIC on loopback")?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let chunk = vec![0x5Au8; QUIC_CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < QUIC_MAX_BYTES && start.elapsed().as_secs_f64() < QUIC_SECONDS {
        send.write_all(&chunk).await?;
        sent += QUIC_CHUNK as u64;
    }
    send.finish()?;
    let mut reply = [0u8; 1];
    recv.read_exact(&mut reply)
        .await
        .context("the probe receiver did not answer")?;
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let received = receiver.await.context("the probe receiver panicked")??;
    if received != sent {
        return Err(anyhow!(
            "the QUIC probe sent {sent} bytes but {received} arrived"
        ));
    }
    connection.close(0u32.into(), b"done");
    client.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    Ok(received as f64 / seconds / 1e6)
}
