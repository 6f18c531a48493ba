//! The DirectMQ broker.
//!
//! Two layers, as in quinn and raft-rs: [`engine`] makes every decision (offsets,
//! deduplication, consumer positions, commits, retention) without I/O; [`server`] is the
//! network shell that moves frames, queues what the engine decides into storage and acks
//! only after storage reports the fsync done. It uses `directmq-protocol` for the wire,
//! `directmq-storage` for the log and the client crate's framed-stream helpers.

#![forbid(unsafe_code)]

pub mod acl;
pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod tls;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use config::Config;
pub use server::Broker;

use directmq_client::net;
use tokio::sync::oneshot;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("could not create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The ACL or the token files could not be loaded.
    #[error("{0}")]
    Acl(String),
    #[error("could not open the log: {0}")]
    Storage(#[from] directmq_storage::StorageError),
    #[error("could not listen on {addr} ({what}): {source}; is another broker running there?")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started broker.
#[derive(Debug)]
pub struct Running {
    /// The QUIC address actually bound (useful with port 0).
    pub quic_addr: SocketAddr,
    /// The HTTP address actually bound.
    pub http_addr: SocketAddr,
    pub broker: Arc<Broker>,
    /// Whether development certificates were created by this start.
    pub created_dev_certs: bool,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    http: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Shuts down gracefully and waits until done.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        self.http.abort();
    }

    /// Waits until the broker stops (after [`Running::shutdown`] elsewhere or an error).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Prepares the data directory (development certificates and ACL on first start), opens
/// the log, binds QUIC and HTTP and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    std::fs::create_dir_all(&config.data).map_err(|source| StartError::DataDir {
        path: config.data.clone(),
        source,
    })?;
    let mut created_dev_certs = false;
    if config.cert.is_none() && config.ca.is_empty() {
        created_dev_certs = tls::ensure_dev_certs(&config.certs_dir(), &config.server_names)?;
    }
    let acl_path = config.acl_path();
    if config.acl.is_none() && !acl_path.exists() {
        std::fs::write(&acl_path, acl::DEFAULT_ACL).map_err(|source| StartError::DataDir {
            path: acl_path.clone(),
            source,
        })?;
    }
    let acl = acl::Acl::load(&acl_path).map_err(StartError::Acl)?;
    let keys_path = config.token_keys_path();
    tokens::TokenKeys::create_if_missing(&keys_path).map_err(StartError::Acl)?;
    let token_keys = tokens::TokenKeys::load(&keys_path).map_err(StartError::Acl)?;
    let revocations =
        tokens::Revocations::load(&config.revoked_tokens_path()).map_err(StartError::Acl)?;
    let net_options = config.net_options();
    let server_config = tls::server_config(
        &config.ca_files(),
        &config.cert_path(),
        &config.key_path(),
        &net_options,
        config.allow_tokens,
    )?;
    let socket =
        net::udp_socket(config.listen, net_options.socket_buffer_bytes).map_err(|source| {
            StartError::Bind {
                what: "QUIC",
                addr: config.listen,
                source,
            }
        })?;
    // Kept across restarts so a restarted broker resets its predecessor's connections.
    let reset_secret =
        tokens::load_or_create_secret(&config.data.join("reset-key")).map_err(StartError::Acl)?;
    let endpoint =
        net::server_endpoint(socket, server_config, &reset_secret).map_err(|source| {
            StartError::Bind {
                what: "QUIC",
                addr: config.listen,
                source,
            }
        })?;
    let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
        what: "QUIC",
        addr: config.listen,
        source,
    })?;
    let http_listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|source| StartError::Bind {
            what: "HTTP",
            addr: config.http,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "HTTP",
            addr: config.http,
            source,
        })?;
    let handle = metrics::install();
    metrics::register_all();
    let ready = Arc::new(AtomicBool::new(false));
    let serving: Arc<std::sync::OnceLock<Arc<Broker>>> = Arc::default();
    let refresh: http::Refresh = {
        let serving = serving.clone();
        Arc::new(move || {
            if let Some(broker) = serving.get() {
                broker.refresh_gauges();
            }
        })
    };
    let http = tokio::spawn(http::serve(http_listener, ready.clone(), handle, refresh));
    let data = config.data.clone();
    let store_options = config.store_options();
    let store =
        tokio::task::spawn_blocking(move || directmq_storage::Store::open(&data, store_options))
            .await
            .expect("store open does not panic")?;
    let store = Arc::new(store);
    let broker = Broker::new(config, store, acl, token_keys, revocations);
    let _ = serving.set(broker.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(broker.clone().run(endpoint, async move {
        let _ = rx.await;
    }));
    ready.store(true, Ordering::Release);
    ::metrics::gauge!(metrics::CHANNELS)
        .set(broker.store().with_state(|s| s.channel_count()) as f64);
    Ok(Running {
        quic_addr,
        http_addr,
        broker,
        created_dev_certs,
        shutdown: Some(tx),
        task,
        http,
    })
}
