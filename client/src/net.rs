//! QUIC and TLS setup shared by the client and the broker (FACTS.md: 4 MiB socket buffers,
//! a 1 ms ACK delay, windows sized to the bandwidth-delay product).

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Transport tuning shared by both ends.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// UDP socket send and receive buffers.
    pub socket_buffer_bytes: usize,
    /// Per-stream receive window.
    pub stream_window_bytes: u64,
    /// Per-connection receive window.
    pub connection_window_bytes: u64,
    /// Send window per connection.
    pub send_window_bytes: u64,
    /// Streams the peer may open at once (one per channel published or consumed).
    pub max_streams: u32,
    /// A connection with no traffic for this long is closed. Keep-alives run at a third of
    /// it, and at least every [`KEEP_ALIVE_MAX`].
    pub idle_timeout: Duration,
    /// Server side: connections accepted into their handshake at once.
    pub max_handshakes: u32,
}

/// Longest time a connection goes without sending something the peer must acknowledge.
///
/// A connection whose peer was killed and restarted hears so (a stateless reset) only when
/// it next sends; one waiting on answers with nothing of its own in flight sent nothing
/// until its keep-alive, 10 s at a third of the default idle timeout. A ping a second is
/// a packet each way per idle connection.
pub const KEEP_ALIVE_MAX: Duration = Duration::from_secs(1);

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            socket_buffer_bytes: 4 * 1024 * 1024,
            stream_window_bytes: 16 * 1024 * 1024,
            connection_window_bytes: 64 * 1024 * 1024,
            send_window_bytes: 64 * 1024 * 1024,
            max_streams: 20_000,
            idle_timeout: Duration::from_secs(30),
            max_handshakes: 1024,
        }
    }
}

impl NetOptions {
    pub fn transport(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(vint(self.stream_window_bytes))
            .receive_window(vint(self.connection_window_bytes))
            .send_window(self.send_window_bytes)
            .max_concurrent_bidi_streams(self.max_streams.into())
            .max_concurrent_uni_streams(0u32.into())
            .keep_alive_interval(Some((self.idle_timeout / 3).min(KEEP_ALIVE_MAX)))
            .max_idle_timeout(self.idle_timeout.try_into().ok());
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.max_ack_delay(Some(Duration::from_millis(1)));
        t.ack_frequency_config(Some(ack));
        Arc::new(t)
    }
}

fn vint(v: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(v.min((1 << 62) - 1)).expect("bounded above")
}

/// Binds a UDP socket with large buffers (the kernel may cap them at `rmem_max`).
pub fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint on `socket`, optionally accepting connections.
pub fn endpoint(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    endpoint_with(socket, server, quinn::EndpointConfig::default())
}

/// A server endpoint whose stateless-reset key is `reset_secret` (at least 32 bytes, kept
/// across restarts): after a crash and restart, the new process can tell the clients of the
/// old one at once that their connections are gone, instead of their waiting out the idle
/// timeout.
pub fn server_endpoint(
    socket: UdpSocket,
    server: quinn::ServerConfig,
    reset_secret: &[u8],
) -> std::io::Result<quinn::Endpoint> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    // quinn's default connection IDs are validated with a key random per process, so a
    // restarted broker would drop its predecessor's packets as invalid instead of
    // answering them with a reset.
    config.cid_generator(|| Box::new(RandomCids));
    endpoint_with(socket, Some(server), config)
}

/// Connection IDs of 8 random bytes, not tied to the process that issued them.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 8];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random generator works");
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn endpoint_with(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    config: quinn::EndpointConfig,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

/// The crypto provider both ends use (ring, TLS 1.3 only).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, crate::Error> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| crate::Error::Certificates {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(crate::Error::Certificates {
            path: path.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, crate::Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| crate::Error::Certificates {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// A client TLS configuration from a certs folder holding `ca.pem`, `client.pem` and
/// `client.key`.
pub fn client_tls(certs_dir: &Path) -> Result<rustls::ClientConfig, crate::Error> {
    let roots = roots(&certs_dir.join("ca.pem"))?;
    let chain = load_certs(&certs_dir.join("client.pem"))?;
    let key = load_key(&certs_dir.join("client.key"))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| crate::Error::Certificates {
            path: certs_dir.join("client.pem"),
            reason: e.to_string(),
        })?;
    tls.alpn_protocols = vec![directmq_protocol::ALPN.to_vec()];
    Ok(tls)
}

/// TLS for a client that authenticates with a token instead of a certificate: it still
/// verifies the broker against `ca_file`.
pub fn token_tls(ca_file: &Path) -> Result<rustls::ClientConfig, crate::Error> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![directmq_protocol::ALPN.to_vec()];
    Ok(tls)
}

fn roots(ca_file: &Path) -> Result<rustls::RootCertStore, crate::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(ca_file)? {
        roots.add(ca).map_err(|e| crate::Error::Certificates {
            path: ca_file.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}
