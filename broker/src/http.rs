//! The HTTP side: `GET /health` and `GET /metrics` (SPEC §4). Deliberately tiny: one request
//! per connection, bounded header size, no keep-alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs before each `/metrics` render, to set gauges computed on demand.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// Serves until the listener fails or the task is dropped.
pub async fn serve(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    metrics: PrometheusHandle,
    refresh: Refresh,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ready = ready.clone();
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                handle(stream, &ready, &metrics, &refresh),
            )
            .await;
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    ready: &AtomicBool,
    metrics: &PrometheusHandle,
    refresh: &Refresh,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "headers too large\n",
            )
            .await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/health") if ready.load(Ordering::Acquire) => {
            respond(&mut stream, "200 OK", "text/plain", "ok\n").await
        }
        ("GET", "/health") => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "starting\n",
            )
            .await
        }
        ("GET", "/metrics") => {
            // Lag gauges read the index; keep that off the runtime's worker threads.
            let refresh = refresh.clone();
            let _ = tokio::task::spawn_blocking(move || refresh()).await;
            let body = metrics.render();
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "use GET\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
