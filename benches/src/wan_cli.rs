//! `directmq-bench wan-proxy`: the WAN impairment proxy (`directmq_benches::wan`) as a
//! command, and its self-test (the proxy's own relay rate on loopback).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use directmq_benches::wan::{self, Impairment, Proxy};
use tokio::time::Instant;

/// Relay UDP (QUIC) between clients and a broker, emulating a WAN link.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
    directmq-bench wan-proxy --listen 127.0.0.1:7443 --upstream 127.0.0.1:7070 --delay-ms 25 --loss 0.02 --reorder 0.01\n  \
    directmq-bench wan-proxy --listen 127.0.0.1:7443 --upstream 127.0.0.1:7070 --delay-ms 25 --cut-after-s 10 --cut-for-s 5\n  \
    directmq-bench wan-proxy --self-test\n  \
    directmq-bench wan-proxy --self-test --delay-ms 25\n\n\
    Probabilities are fractions from 0 to 1 (0.02 is 2%). Every impairment applies to each direction \
    independently; the round trip is twice --delay-ms. Clients connect to --listen instead of the \
    broker (the broker's certificate must cover the name they use: the development certificates \
    cover 127.0.0.1 and localhost). SIGUSR1 toggles a cut of the link (kill -USR1 PID).")]
pub struct WanProxyArgs {
    /// UDP address clients send to (host:port).
    #[arg(long, required_unless_present = "self_test")]
    listen: Option<SocketAddr>,
    /// The broker's QUIC address (host:port).
    #[arg(long, required_unless_present = "self_test")]
    upstream: Option<String>,
    /// One-way delay in milliseconds, each direction (the round trip is twice this).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Each burst's delay varies uniformly within ± this many milliseconds (never reorders).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Probability that a datagram is lost, a fraction (0.02 = 2%).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability that a datagram is held back by --reorder-delay-ms, so that later ones
    /// overtake it (a fraction).
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// How long a reordered datagram is held back, milliseconds.
    #[arg(long, default_value_t = 10.0)]
    reorder_delay_ms: f64,
    /// Probability that a datagram is delivered twice (a fraction).
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Link rate in Mbit/s, each direction (0: unlimited). Datagrams queue for the link.
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// With --rate-mbit: the most milliseconds a datagram may queue; later ones are dropped.
    #[arg(long, default_value_t = 50.0)]
    queue_ms: f64,
    /// The RNG's seed (printed at the start when not given): the same seed makes the same
    /// decisions for the same datagrams.
    #[arg(long)]
    seed: Option<u64>,
    /// Cut the link (drop everything, both ways) this many seconds after the start ...
    #[arg(long, requires = "cut_for_s")]
    cut_after_s: Option<f64>,
    /// ... for this many seconds.
    #[arg(long, requires = "cut_after_s")]
    cut_for_s: Option<f64>,
    /// Cut again every this many seconds (from the start of one cut to the next).
    #[arg(long, requires = "cut_after_s")]
    cut_every_s: Option<f64>,
    /// Print the counters every this many seconds (0: only at the end).
    #[arg(long, default_value_t = 5.0)]
    stats_every_s: f64,
    /// Stop after this many seconds [default: at Ctrl-C].
    #[arg(long)]
    duration_s: Option<f64>,
    /// Measure the proxy's own relay rate instead: a source sends datagrams through a proxy
    /// with the given impairments to a sink, all on loopback in this process, and the MB/s
    /// delivered are reported.
    #[arg(long, conflicts_with_all = ["listen", "upstream", "cut_after_s", "duration_s"])]
    self_test: bool,
    /// Self-test: measured seconds.
    #[arg(long, default_value_t = 3.0, requires = "self_test")]
    self_test_seconds: f64,
    /// Self-test: bytes per datagram (quinn's on loopback once it has probed the path MTU).
    #[arg(long, default_value_t = 1452, requires = "self_test")]
    self_test_datagram: usize,
    /// Self-test: the most unacknowledged MiB [default: 2 + what 1 GB/s keeps in flight over
    /// the round trip]. With a delay the source paces itself at this per round trip.
    #[arg(long, requires = "self_test")]
    self_test_window_mib: Option<f64>,
}

fn ms(name: &str, v: f64) -> Result<Duration> {
    seconds(name, v / 1e3)
}

fn seconds(name: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|_| anyhow!("--{name} must be 0 or more, not {v}"))
}

impl WanProxyArgs {
    fn impairment(&self) -> Result<Impairment> {
        let impairment = Impairment {
            delay: ms("delay-ms", self.delay_ms)?,
            jitter: ms("jitter-ms", self.jitter_ms)?,
            loss: self.loss,
            reorder: self.reorder,
            reorder_delay: ms("reorder-delay-ms", self.reorder_delay_ms)?,
            duplicate: self.duplicate,
            rate_mbit: self.rate_mbit,
            queue: ms("queue-ms", self.queue_ms)?,
        };
        impairment.validate()?;
        Ok(impairment)
    }
}

pub fn run(args: &WanProxyArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    if args.self_test {
        runtime.block_on(self_test(args))
    } else {
        runtime.block_on(serve(args))
    }
}

async fn serve(args: &WanProxyArgs) -> Result<()> {
    let impairment = args.impairment()?;
    let listen = args.listen.context("--listen is required")?;
    let upstream_name = args.upstream.as_deref().context("--upstream is required")?;
    let upstream = upstream_name
        .to_socket_addrs()
        .with_context(|| format!("could not resolve --upstream {upstream_name}"))?
        .next()
        .ok_or_else(|| anyhow!("--upstream {upstream_name} resolves to no address"))?;
    let cut_for = args
        .cut_for_s
        .map(|s| seconds("cut-for-s", s))
        .transpose()?;
    let cut_every = match args.cut_every_s {
        Some(s) if s > 0.0 => Some(seconds("cut-every-s", s)?),
        Some(s) => bail!("--cut-every-s must be more than 0, not {s}"),
        None => None,
    };
    let stats_every = seconds("stats-every-s", args.stats_every_s)?;
    let mut config = wan::Config::new(listen, upstream).both(impairment.clone());
    config.seed = args.seed;
    let proxy = Proxy::start(config).await?;
    eprintln!(
        "directmq-bench wan-proxy: {} → {upstream}, each way: {impairment} (round trip {} ms); \
         seed {} (--seed {} repeats the decisions); SIGUSR1 toggles a cut (pid {})",
        proxy.local_addr(),
        2.0 * args.delay_ms,
        proxy.seed(),
        proxy.seed(),
        std::process::id()
    );
    let start = Instant::now();
    let end = match args.duration_s {
        Some(s) => Some(start + seconds("duration-s", s)?),
        None => None,
    };
    let mut next_cut = match args.cut_after_s {
        Some(s) => Some(start + seconds("cut-after-s", s)?),
        None => None,
    };
    let far = start + Duration::from_secs(100 * 365 * 86_400);
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("could not listen for SIGUSR1")?;
    let mut stats_tick = tokio::time::interval(stats_every.max(Duration::from_millis(100)));
    stats_tick.tick().await;
    let t = |at: Instant| at.duration_since(start).as_secs_f64();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep_until(end.unwrap_or(far)), if end.is_some() => break,
            _ = usr1.recv() => {
                let cut = !proxy.is_cut();
                proxy.set_cut(cut);
                eprintln!(
                    "directmq-bench wan-proxy: {:.1} s: SIGUSR1: link {}",
                    t(Instant::now()),
                    if cut { "cut" } else { "restored" }
                );
            }
            () = tokio::time::sleep_until(next_cut.unwrap_or(far)), if next_cut.is_some() => {
                let now = Instant::now();
                let period = cut_for.unwrap_or_default();
                proxy.cut(period);
                eprintln!(
                    "directmq-bench wan-proxy: {:.1} s: link cut for {:.1} s",
                    t(now),
                    period.as_secs_f64()
                );
                next_cut = cut_every.map(|every| next_cut.unwrap_or(now) + every);
            }
            _ = stats_tick.tick(), if !stats_every.is_zero() => {
                eprintln!("directmq-bench wan-proxy: {:.1} s: {}", t(Instant::now()), proxy.stats());
            }
        }
        if let Some(failure) = proxy.failure() {
            bail!("the proxy stopped relaying: {failure}");
        }
    }
    eprintln!(
        "directmq-bench wan-proxy: stopped after {:.1} s: {}",
        t(Instant::now()),
        proxy.stats()
    );
    Ok(())
}

async fn self_test(args: &WanProxyArgs) -> Result<()> {
    let impairment = args.impairment()?;
    if args.self_test_seconds <= 0.0 || args.self_test_seconds > 600.0 {
        bail!(
            "--self-test-seconds must be more than 0 and at most 600, not {}",
            args.self_test_seconds
        );
    }
    let window_bytes = match args.self_test_window_mib {
        Some(m) if m > 0.0 && m.is_finite() => Some((m * 1024.0 * 1024.0) as usize),
        Some(m) => bail!("--self-test-window-mib must be more than 0, not {m}"),
        None => None,
    };
    let test = wan::SelfTest {
        impairment: impairment.clone(),
        duration: seconds("self-test-seconds", args.self_test_seconds)?,
        datagram: args.self_test_datagram,
        window_bytes,
        seed: args.seed,
    };
    eprintln!(
        "directmq-bench wan-proxy: self-test, {} s of {}-byte datagrams through the proxy on loopback, \
         each way: {impairment}",
        args.self_test_seconds, args.self_test_datagram
    );
    let r = wan::self_test(&test).await?;
    let lost = r.sent_bytes.saturating_sub(r.delivered_bytes) as f64 / r.sent_bytes.max(1) as f64;
    println!(
        "wan-proxy self-test: {:.0} MB/s relayed ({:.0} datagrams/s of {} bytes) over {:.1} s, \
         {:.0} MB/s offered{}; {:.2}% of the bytes sent not delivered (dropped, or in flight at \
         the end); window {:.1} MiB, {} stalls; process CPU {} (source and sink included); seed {}",
        r.delivered_mb_per_sec,
        r.delivered_datagrams_per_sec,
        args.self_test_datagram,
        r.seconds,
        r.offered_mb_per_sec,
        r.pace_mb_per_sec
            .map_or(String::new(), |p| format!(" (paced at most {p:.0} MB/s)")),
        lost * 100.0,
        r.window_bytes as f64 / 1048576.0,
        r.stalls,
        r.cpu_cores
            .map_or("unknown".to_owned(), |c| format!("{c:.2} cores")),
        r.seed
    );
    println!("wan-proxy self-test: proxy: {}", r.stats);
    Ok(())
}
