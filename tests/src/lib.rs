//! Test harness: brokers in this process or as child processes (for SIGKILL), on
//! `127.0.0.1:0` with generated certificates and temporary data directories.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use directmq_broker::config::Config;
use directmq_client::{Client, ClientConfig};

/// A config for a test broker: loopback, port 0, small segments so retention and rolling
/// happen in tests.
pub fn test_config(data: &Path) -> Config {
    Config {
        data: data.to_owned(),
        listen: "127.0.0.1:0".parse().expect("literal"),
        http: "127.0.0.1:0".parse().expect("literal"),
        segment_bytes: 8 * 1024 * 1024,
        ..Config::default()
    }
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A client of the broker at `addr` using the dev certificates in `data/certs`. It gives up
/// reconnecting after 60 s so a broken test fails instead of hanging.
pub async fn client(addr: SocketAddr, data: &Path) -> Result<Client> {
    Ok(Client::connect(client_config(addr, data)?).await?)
}

pub fn client_config(addr: SocketAddr, data: &Path) -> Result<ClientConfig> {
    let mut config = ClientConfig::from_certs_dir(&addr.to_string(), &data.join("certs"))?;
    config.reconnect_for = Some(Duration::from_secs(60));
    Ok(config)
}

/// The deterministic payload of message `seq` from `producer` on `channel`, `len` bytes:
/// a test can regenerate it to compare byte for byte.
pub fn payload(channel: u32, producer: u32, seq: u64, len: usize) -> Bytes {
    let mut x =
        (u64::from(channel) << 48) ^ (u64::from(producer) << 40) ^ seq ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // xorshift64*: cheap, and different for every (channel, producer, seq).
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        out.extend_from_slice(&v.to_le_bytes()[..(len - out.len()).min(8)]);
    }
    Bytes::from(out)
}

/// A broker running as a child process of the test, so it can be killed with SIGKILL.
#[derive(Debug)]
pub struct ChildBroker {
    child: Option<Child>,
    /// The broker's stderr, line by line (the first 10,000 lines).
    log: Arc<Mutex<Vec<String>>>,
    pub data: PathBuf,
    pub quic: SocketAddr,
    pub http: SocketAddr,
}

impl ChildBroker {
    /// Starts `directmq serve` on `data`. With `quic` unset it binds port 0 and reads the
    /// address the broker prints; a restart passes the previous address to keep it.
    pub fn start(bin: &Path, data: &Path, quic: Option<SocketAddr>) -> Result<ChildBroker> {
        ChildBroker::start_args(bin, data, quic, &[])
    }

    /// [`ChildBroker::start`] with more `serve` arguments (such as `--config FILE`).
    pub fn start_args(
        bin: &Path,
        data: &Path,
        quic: Option<SocketAddr>,
        serve_args: &[&str],
    ) -> Result<ChildBroker> {
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(serve_args);
        ChildBroker::spawn(command, data, quic)
    }

    /// Starts `directmq [global_args] serve --data DATA [serve_args]` with `env` set.
    pub fn start_with(
        bin: &Path,
        data: &Path,
        global_args: &[&str],
        serve_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ChildBroker> {
        let mut command = Command::new(bin);
        command
            .args(global_args)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(serve_args);
        for (k, v) in env {
            command.env(k, v);
        }
        ChildBroker::spawn(command, data, None)
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What the broker wrote to stderr so far, line by line.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Starts `directmq serve` with its default data directory inside `cwd`.
    pub fn start_in(bin: &Path, cwd: &Path) -> Result<ChildBroker> {
        let mut command = Command::new(bin);
        command.arg("serve").current_dir(cwd);
        ChildBroker::spawn(command, &cwd.join("directmq-data"), None)
    }

    fn spawn(mut command: Command, data: &Path, quic: Option<SocketAddr>) -> Result<ChildBroker> {
        let listen = quic.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
        if command.get_envs().all(|(k, _)| k != "RUST_LOG") {
            command.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        }
        let mut child = command
            .arg("--listen")
            .arg(&listen)
            .arg("--http")
            .arg("127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the broker binary")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                {
                    let mut log = log2.lock().expect("log lock");
                    if log.len() < 10_000 {
                        log.push(line.clone());
                    }
                }
                if !sent && line.contains("directmq serving QUIC on") {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                if std::env::var_os("DIRECTMQ_TEST_BROKER_LOG").is_some() {
                    eprintln!("[broker] {line}");
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                bail!("the broker did not report readiness within 60 s");
            }
        };
        let addr_after = |marker: &str| -> Result<SocketAddr> {
            let rest = line
                .split(marker)
                .nth(1)
                .context("address in the readiness line")?;
            Ok(rest.split_whitespace().next().context("address")?.parse()?)
        };
        Ok(ChildBroker {
            log,
            quic: addr_after("QUIC on ")?,
            http: addr_after("HTTP on ")?,
            child: Some(child),
            data: data.to_owned(),
        })
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (a name, such as "STOP" or "CONT") to the broker.
    pub fn signal(&self, signal: &str) -> Result<()> {
        // Never `kill 0`: that would signal the test's whole process group.
        let Some(child) = &self.child else {
            bail!("no broker to send SIG{signal} to");
        };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()?;
        ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// SIGTERM (graceful shutdown), then wait; returns whether it exited successfully.
    pub fn terminate(&mut self) -> Result<bool> {
        if self.child.is_none() {
            return Ok(false);
        }
        self.signal("TERM")?;
        let mut child = self.child.take().expect("checked above");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send((status, child));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((status, _)) => Ok(status?.success()),
            Err(_) => bail!("the broker did not stop within 30 s of SIGTERM"),
        }
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
