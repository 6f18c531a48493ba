//! A WAN impairment proxy: a UDP relay between QUIC clients and a broker that emulates a
//! datacenter link, because the kernel's netem is not available on the development machines.
//!
//! Each client gets its own upstream socket, so the broker sees one peer per client and many
//! clients work at once. Impairments apply independently in each direction, in the order a
//! datagram meets them on a real link: a cut (everything dropped, datagrams already on the
//! way included), random loss, the rate limit (a token bucket whose queue is bounded in
//! time: a datagram that would wait longer is dropped), the one-way delay with jitter, then
//! reordering (a datagram held back so later ones overtake it) and duplication. Jitter alone
//! never reorders: a datagram leaves no earlier than the one before it, as on a real path
//! through one queue; reordering is its own probability.
//!
//! It must relay far faster than what it emulates, so that it is never what a benchmark
//! measures (`directmq-bench wan-proxy --self-test` reports its rate):
//! - it reads and writes with the kernel's UDP segmentation offloads (GRO/GSO, through
//!   `quinn::udp`, as quinn itself does), so one system call moves up to 64 datagrams;
//! - decisions are made per datagram, but consecutive datagrams that leave within the same
//!   millisecond stay one buffer and one write;
//! - delayed datagrams wait in one sorted queue per direction served by one timer task, not
//!   a task and a timer per datagram;
//! - a datagram is copied once, into a shared arena, and only when it has to wait.
//!
//! The decisions ([`Link`], [`TokenBucket`], [`DelayQueue`]) are plain code without I/O and
//! are unit-tested below. The RNG is seeded ([`Proxy::seed`]): the same sequence of datagrams
//! meets the same fate.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// Datagrams due within this of the first of a run leave together, in one write: tokio's
/// timer has a resolution of 1 ms anyway.
const COALESCE: Duration = Duration::from_millis(1);
/// The smallest receive slot: a datagram, or with GRO a run of them, is at most 64 KiB.
const SLOT_MIN: usize = 64 * 1024;
/// Receive slots filled per system call (recvmmsg).
const SLOTS: usize = if BATCH_SIZE < 8 { BATCH_SIZE } else { 8 };
/// The arena chunk that datagrams waiting in a queue are copied into.
const ARENA: usize = 1024 * 1024;
/// How often sessions are checked for idleness.
const SWEEP: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// Configuration

/// What one direction of the link does to datagrams.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// One-way delay (the round trip is the sum of both directions').
    pub delay: Duration,
    /// Each burst's delay varies uniformly within ±`jitter` (never below zero). Jitter never
    /// reorders by itself.
    pub jitter: Duration,
    /// Probability, 0 to 1, that a datagram is lost.
    pub loss: f64,
    /// Probability, 0 to 1, that a datagram is held back by `reorder_delay` so that later
    /// ones overtake it.
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Probability, 0 to 1, that a datagram is delivered twice.
    pub duplicate: f64,
    /// Link rate in Mbit/s (10^6 bits); 0: unlimited.
    pub rate_mbit: f64,
    /// With a rate: the most a datagram may wait for the link; one that would wait longer is
    /// dropped (a bounded queue, as in a switch).
    pub queue: Duration,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(10),
            duplicate: 0.0,
            rate_mbit: 0.0,
            queue: Duration::from_millis(50),
        }
    }
}

impl Impairment {
    /// A link that only delays, by `delay` each way.
    pub fn delay(delay: Duration) -> Impairment {
        Impairment {
            delay,
            ..Impairment::default()
        }
    }

    /// Checks the probabilities and the rate.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("loss", self.loss),
            ("reorder", self.reorder),
            ("duplicate", self.duplicate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bail!("{name} is a probability from 0 to 1 (2% is 0.02), not {p}");
            }
        }
        if !self.rate_mbit.is_finite() || self.rate_mbit < 0.0 {
            bail!(
                "the rate is Mbit/s, 0 for unlimited, not {}",
                self.rate_mbit
            );
        }
        Ok(())
    }

    /// Bytes per second the rate allows (0: unlimited).
    pub fn rate_bytes_per_sec(&self) -> f64 {
        self.rate_mbit * 1e6 / 8.0
    }

    /// No delay, jitter or rate: datagrams that are not held back leave as they arrive.
    fn transparent(&self) -> bool {
        self.delay.is_zero() && self.jitter.is_zero() && self.rate_mbit == 0.0
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| num(d.as_secs_f64() * 1e3);
        let pct = |p: f64| num(p * 100.0);
        write!(f, "delay {} ms", ms(self.delay))?;
        if !self.jitter.is_zero() {
            write!(f, " ± {} ms", ms(self.jitter))?;
        }
        write!(
            f,
            ", loss {}%, reorder {}% (held back {} ms), duplicate {}%",
            pct(self.loss),
            pct(self.reorder),
            ms(self.reorder_delay),
            pct(self.duplicate)
        )?;
        if self.rate_mbit > 0.0 {
            write!(
                f,
                ", rate {} Mbit/s (queue ≤ {} ms)",
                num(self.rate_mbit),
                ms(self.queue)
            )
        } else {
            write!(f, ", rate unlimited")
        }
    }
}

/// `x` with at most three decimals and no trailing zeros.
fn num(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Where the proxy listens and relays to, and what it does to the datagrams.
#[derive(Debug, Clone)]
pub struct Config {
    /// Clients send here.
    pub listen: SocketAddr,
    /// The broker's QUIC address.
    pub upstream: SocketAddr,
    /// Client → upstream.
    pub up: Impairment,
    /// Upstream → client.
    pub down: Impairment,
    /// The RNG's seed; `None`: from the clock (see [`Proxy::seed`]).
    pub seed: Option<u64>,
    /// Send and receive buffers of every socket (the kernel caps them at `rmem_max`).
    pub socket_buffer_bytes: usize,
    /// Clients relayed at once; datagrams from more are dropped.
    pub max_sessions: usize,
    /// A client not heard from, and not sent to, for this long loses its upstream socket.
    pub session_idle: Duration,
    /// The most bytes waiting in each direction's queue; more are dropped.
    pub max_queued_bytes: usize,
}

impl Config {
    /// A transparent proxy from `listen` to `upstream`.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Config {
        Config {
            listen,
            upstream,
            up: Impairment::default(),
            down: Impairment::default(),
            seed: None,
            socket_buffer_bytes: 4 * 1024 * 1024,
            max_sessions: 1024,
            session_idle: Duration::from_secs(120),
            max_queued_bytes: 256 * 1024 * 1024,
        }
    }

    /// The same impairment in both directions.
    pub fn both(mut self, impairment: Impairment) -> Config {
        self.up = impairment.clone();
        self.down = impairment;
        self
    }

    pub fn seed(mut self, seed: u64) -> Config {
        self.seed = Some(seed);
        self
    }
}

// ---------------------------------------------------------------------------------------
// Decisions (no I/O)

/// A token bucket with a FIFO queue bounded in waiting time: a datagram leaves at once while
/// tokens cover it, otherwise when the tokens it needs (after those queued ahead of it) have
/// accrued at the rate; if that is more than `max_wait` away it is dropped and takes nothing.
/// Tokens go negative for queued datagrams, which keeps departures in arrival order.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    bytes_per_sec: f64,
    burst: f64,
    max_wait: Duration,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(bytes_per_sec: f64, burst_bytes: f64, max_wait: Duration, now: Instant) -> Self {
        TokenBucket {
            bytes_per_sec,
            burst: burst_bytes,
            max_wait,
            tokens: burst_bytes,
            last: now,
        }
    }

    /// When a datagram of `bytes` arriving at `now` has left the link, or `None`: dropped.
    pub fn admit(&mut self, now: Instant, bytes: usize) -> Option<Instant> {
        let now = now.max(self.last);
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() * self.bytes_per_sec)
            .min(self.burst);
        self.last = now;
        let after = self.tokens - bytes as f64;
        if after >= 0.0 {
            self.tokens = after;
            return Some(now);
        }
        let wait = Duration::from_secs_f64(-after / self.bytes_per_sec);
        if wait > self.max_wait {
            return None;
        }
        self.tokens = after;
        Some(now + wait)
    }
}

/// Items ordered by due time, first in first out among equal times.
#[derive(Debug)]
pub struct DelayQueue<T> {
    heap: BinaryHeap<Keyed<T>>,
    next_seq: u64,
}

#[derive(Debug)]
struct Keyed<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Keyed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}

impl<T> Eq for Keyed<T> {}

impl<T> PartialOrd for Keyed<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Keyed<T> {
    /// Reversed: `BinaryHeap` pops the greatest, and the earliest must come first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl<T> Default for DelayQueue<T> {
    fn default() -> Self {
        DelayQueue {
            heap: BinaryHeap::new(),
            next_seq: 0,
        }
    }
}

impl<T> DelayQueue<T> {
    pub fn new() -> Self {
        DelayQueue::default()
    }

    pub fn push(&mut self, due: Instant, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Keyed { due, seq, item });
    }

    /// When the earliest item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|k| k.due)
    }

    /// The earliest item, if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_due()? <= now {
            self.heap.pop().map(|k| k.item)
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// Part of a received buffer and when it leaves: whole datagrams of the buffer's stride
/// (the last may be shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub range: Range<usize>,
    pub due: Instant,
    /// Leaves as it arrived, without waiting in the queue (a transparent link).
    pub immediate: bool,
}

/// One direction's decisions: loss, rate, delay, jitter, reordering, duplication.
#[derive(Debug)]
pub struct Link {
    impairment: Impairment,
    transparent: bool,
    rng: StdRng,
    bucket: Option<TokenBucket>,
    /// The due time of the last datagram not held back: the next leaves no earlier.
    floor: Option<Instant>,
    counters: Arc<Counters>,
}

/// A run of consecutive datagrams that leave together.
struct Run {
    start: usize,
    end: usize,
    first_due: Instant,
    due: Instant,
    immediate: bool,
}

fn close(run: &mut Option<Run>, out: &mut Vec<Piece>) {
    if let Some(r) = run.take() {
        out.push(Piece {
            range: r.start..r.end,
            due: r.due,
            immediate: r.immediate,
        });
    }
}

fn chance(rng: &mut StdRng, p: f64) -> bool {
    p > 0.0 && rng.gen::<f64>() < p
}

impl Link {
    pub fn new(impairment: Impairment, seed: u64, now: Instant) -> Link {
        let bucket = (impairment.rate_mbit > 0.0).then(|| {
            let rate = impairment.rate_bytes_per_sec();
            // A millisecond's worth (the timer's resolution), and at least two datagrams.
            TokenBucket::new(rate, (rate / 1e3).max(3000.0), impairment.queue, now)
        });
        Link {
            transparent: impairment.transparent(),
            impairment,
            rng: StdRng::seed_from_u64(seed),
            bucket,
            floor: None,
            counters: Arc::default(),
        }
    }

    /// What this direction did so far.
    pub fn stats(&self) -> DirStats {
        self.counters.snapshot()
    }

    /// Decides the fate of `len` bytes received at `now`: datagrams of `stride` bytes (the
    /// last may be shorter; GRO delivers runs like this). Appends what leaves, and when, to
    /// `out`, in the order to send; what is not in `out` was dropped.
    pub fn admit(&mut self, now: Instant, len: usize, stride: usize, out: &mut Vec<Piece>) {
        let stride = if stride == 0 || stride > len {
            len.max(1)
        } else {
            stride
        };
        let imp = &self.impairment;
        let (loss, reorder, duplicate, held) =
            (imp.loss, imp.reorder, imp.duplicate, imp.reorder_delay);
        // Jitter per burst: the datagrams of one read arrived back to back.
        let delay = if imp.jitter.is_zero() {
            imp.delay
        } else {
            let j = imp.jitter.as_nanos() as i64;
            let d = imp.delay.as_nanos() as i64 + self.rng.gen_range(-j..=j);
            Duration::from_nanos(d.max(0) as u64)
        };
        let c = &self.counters;
        let mut run: Option<Run> = None;
        let mut start = 0;
        loop {
            let end = (start + stride).min(len);
            let bytes = end - start;
            add(&c.received_packets, 1);
            add(&c.received_bytes, bytes as u64);
            // Always draw all three, so timing does not shift later decisions.
            let (lose, hold, twice) = (
                chance(&mut self.rng, loss),
                chance(&mut self.rng, reorder),
                chance(&mut self.rng, duplicate),
            );
            let departs = if lose {
                None
            } else {
                match &mut self.bucket {
                    Some(bucket) => {
                        let departs = bucket.admit(now, bytes);
                        if departs.is_none() {
                            add(&c.rate_dropped, 1);
                        }
                        departs
                    }
                    None => Some(now),
                }
            };
            if lose {
                add(&c.lost, 1);
            }
            match departs {
                None => close(&mut run, out),
                Some(departs) => {
                    let natural = departs + delay;
                    let due = self.floor.map_or(natural, |f| f.max(natural));
                    if hold {
                        add(&c.reordered, 1);
                        close(&mut run, out);
                        let piece = Piece {
                            range: start..end,
                            due: due + held,
                            immediate: false,
                        };
                        if twice {
                            add(&c.duplicated, 1);
                            out.push(piece.clone());
                        }
                        out.push(piece);
                    } else {
                        self.floor = Some(due);
                        let immediate = self.transparent && due <= now;
                        match &mut run {
                            Some(r)
                                if r.immediate == immediate
                                    && due.duration_since(r.first_due) <= COALESCE =>
                            {
                                r.end = end;
                                r.due = due;
                            }
                            _ => {
                                close(&mut run, out);
                                run = Some(Run {
                                    start,
                                    end,
                                    first_due: due,
                                    due,
                                    immediate,
                                });
                            }
                        }
                        if twice {
                            add(&c.duplicated, 1);
                            close(&mut run, out);
                            out.push(Piece {
                                range: start..end,
                                due,
                                immediate,
                            });
                        }
                    }
                }
            }
            start = end;
            if start >= len {
                break;
            }
        }
        close(&mut run, out);
    }
}

// ---------------------------------------------------------------------------------------
// Counters

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct Counters {
    received_packets: AtomicU64,
    received_bytes: AtomicU64,
    sent_packets: AtomicU64,
    sent_bytes: AtomicU64,
    lost: AtomicU64,
    reordered: AtomicU64,
    duplicated: AtomicU64,
    rate_dropped: AtomicU64,
    cut_dropped: AtomicU64,
    overflow_dropped: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirStats {
            received_packets: get(&self.received_packets),
            received_bytes: get(&self.received_bytes),
            sent_packets: get(&self.sent_packets),
            sent_bytes: get(&self.sent_bytes),
            lost: get(&self.lost),
            reordered: get(&self.reordered),
            duplicated: get(&self.duplicated),
            rate_dropped: get(&self.rate_dropped),
            cut_dropped: get(&self.cut_dropped),
            overflow_dropped: get(&self.overflow_dropped),
        }
    }
}

/// What one direction did, in datagrams (and bytes where said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirStats {
    pub received_packets: u64,
    pub received_bytes: u64,
    pub sent_packets: u64,
    pub sent_bytes: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicated: u64,
    /// Would have waited longer than the rate limit's queue allows.
    pub rate_dropped: u64,
    /// Arrived, or were due to leave, while the link was cut.
    pub cut_dropped: u64,
    /// The direction's queue held `max_queued_bytes` already.
    pub overflow_dropped: u64,
}

impl fmt::Display for DirStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "in {} datagrams ({:.1} MB), out {} ({:.1} MB); lost {}, reordered {}, duplicated {}, \
             cut {}, over rate {}, over queue {}",
            self.received_packets,
            self.received_bytes as f64 / 1e6,
            self.sent_packets,
            self.sent_bytes as f64 / 1e6,
            self.lost,
            self.reordered,
            self.duplicated,
            self.cut_dropped,
            self.rate_dropped,
            self.overflow_dropped,
        )
    }
}

/// What the proxy did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client → upstream.
    pub up: DirStats,
    /// Upstream → client.
    pub down: DirStats,
    /// Clients relayed now.
    pub sessions: u64,
    /// Datagrams from clients beyond `max_sessions`, dropped.
    pub refused: u64,
    /// Socket errors seen (and survived).
    pub io_errors: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client→upstream: {}; upstream→client: {}; sessions {}",
            self.up, self.down, self.sessions
        )?;
        if self.refused > 0 {
            write!(
                f,
                ", {} datagrams refused (too many sessions)",
                self.refused
            )?;
        }
        if self.io_errors > 0 {
            write!(f, ", {} socket errors", self.io_errors)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Sockets

/// A UDP socket with quinn's offloads (GRO, GSO, ECN).
#[derive(Debug)]
struct Socket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl Socket {
    /// Must run inside a tokio runtime.
    fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<Socket> {
        let socket = directmq_client::net::udp_socket(addr, buffer_bytes)?;
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        Ok(Socket {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// How big one receive slot must be: a GRO run of full-size Ethernet datagrams.
    fn slot(&self) -> usize {
        SLOT_MIN.max(self.state.gro_segments() * 1500)
    }

    /// Receives into `buf`'s slots; returns how many were filled.
    async fn recv(&self, buf: &mut RecvBuf) -> io::Result<usize> {
        let slot = buf.slot;
        let RecvBuf { data, meta, .. } = buf;
        let mut chunks = data.chunks_mut(slot).map(IoSliceMut::new);
        let mut iovs: [IoSliceMut<'_>; SLOTS] =
            std::array::from_fn(|_| chunks.next().expect("the buffer holds SLOTS slots"));
        self.io
            .async_io(Interest::READABLE, || {
                self.state
                    .recv((&self.io).into(), &mut iovs[..], &mut meta[..])
            })
            .await
    }

    /// Sends `data`, datagrams of `stride` bytes (the last may be shorter), with as few
    /// writes as GSO allows; waits while the socket buffer is full. Returns the datagrams.
    async fn send(
        &self,
        to: SocketAddr,
        ecn: Option<EcnCodepoint>,
        data: &[u8],
        stride: usize,
    ) -> u64 {
        let stride = stride.clamp(1, data.len().max(1));
        let per_write = stride * self.state.max_gso_segments().max(1);
        let mut start = 0;
        loop {
            let end = (start + per_write).min(data.len());
            let contents = &data[start..end];
            let transmit = Transmit {
                destination: to,
                ecn,
                contents,
                segment_size: (contents.len() > stride).then_some(stride),
                src_ip: None,
            };
            // `UdpSocketState::send` reports only WouldBlock (which `async_io` waits out);
            // other errors are logged by quinn-udp and the datagrams are gone, as on a wire.
            let _ = self
                .io
                .async_io(Interest::WRITABLE, || {
                    self.state.send((&self.io).into(), &transmit)
                })
                .await;
            start = end;
            if start >= data.len() {
                break;
            }
        }
        datagrams(data.len(), stride)
    }
}

/// How many datagrams `len` bytes of `stride`-byte datagrams are (an empty one is one).
fn datagrams(len: usize, stride: usize) -> u64 {
    if len == 0 || stride == 0 {
        1
    } else {
        len.div_ceil(stride) as u64
    }
}

/// A reader's receive buffer: `SLOTS` slots, one datagram or GRO run each.
struct RecvBuf {
    data: Box<[u8]>,
    meta: [RecvMeta; SLOTS],
    slot: usize,
}

impl RecvBuf {
    fn new(slot: usize) -> RecvBuf {
        RecvBuf {
            data: vec![0; slot * SLOTS].into_boxed_slice(),
            meta: [RecvMeta::default(); SLOTS],
            slot,
        }
    }

    /// The bytes and metadata of slot `i`.
    fn message(&self, i: usize) -> (&[u8], &RecvMeta) {
        let meta = &self.meta[i];
        let start = i * self.slot;
        (&self.data[start..start + meta.len.min(self.slot)], meta)
    }
}

/// Where datagrams that must wait are copied: one allocation per MiB, not per datagram.
#[derive(Default)]
struct Arena(BytesMut);

impl Arena {
    fn copy(&mut self, data: &[u8]) -> Bytes {
        if self.0.capacity() - self.0.len() < data.len() {
            self.0 = BytesMut::with_capacity(ARENA.max(data.len()));
        }
        self.0.extend_from_slice(data);
        self.0.split().freeze()
    }
}

/// What a reader keeps between reads.
#[derive(Default)]
struct Scratch {
    pieces: Vec<Piece>,
    arena: Arena,
}

// ---------------------------------------------------------------------------------------
// The relay

/// Datagrams waiting to leave.
#[derive(Debug)]
struct Out {
    socket: Arc<Socket>,
    to: SocketAddr,
    ecn: Option<EcnCodepoint>,
    stride: usize,
    data: Bytes,
}

#[derive(Debug)]
struct Pending {
    link: Link,
    queue: DelayQueue<Out>,
    queued_bytes: usize,
}

/// One direction: its decisions and queue, and the timer task's wake-up.
#[derive(Debug)]
struct Direction {
    pending: Mutex<Pending>,
    wake: Notify,
    counters: Arc<Counters>,
    max_queued_bytes: usize,
}

impl Direction {
    fn new(link: Link, max_queued_bytes: usize) -> Direction {
        Direction {
            counters: link.counters.clone(),
            pending: Mutex::new(Pending {
                link,
                queue: DelayQueue::new(),
                queued_bytes: 0,
            }),
            wake: Notify::new(),
            max_queued_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it; a poisoned lock still holds consistent counters.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The cut: a switch, and a deadline (nanoseconds after `base`).
#[derive(Debug)]
struct Control {
    base: Instant,
    cut: AtomicBool,
    cut_until_ns: AtomicU64,
}

impl Control {
    fn since_base(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn is_cut(&self, now: Instant) -> bool {
        self.cut.load(Ordering::Relaxed)
            || self.since_base(now) < self.cut_until_ns.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Shared {
    listen: Arc<Socket>,
    upstream: SocketAddr,
    up: Direction,
    down: Direction,
    control: Control,
    socket_buffer_bytes: usize,
    max_sessions: usize,
    session_idle: Duration,
    sessions: AtomicU64,
    refused: AtomicU64,
    io_errors: AtomicU64,
    /// The error that stopped a reader, if one did.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.control.since_base(Instant::now()) / 1_000_000
    }

    /// Whether a reader survives `e` (counted), or must stop (recorded).
    fn survive(&self, e: &io::Error, what: &str) -> bool {
        add(&self.io_errors, 1);
        match e.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted => true,
            _ => {
                let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
                failure.get_or_insert_with(|| format!("{what}: {e}"));
                false
            }
        }
    }
}

/// A UDP relay that emulates a WAN link; see the module documentation. Its tasks stop when
/// it is dropped.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    seed: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Binds `config.listen` and starts relaying (on the current tokio runtime).
    pub async fn start(config: Config) -> Result<Proxy> {
        config
            .up
            .validate()
            .context("the client → upstream impairment")?;
        config
            .down
            .validate()
            .context("the upstream → client impairment")?;
        let seed = config.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()).rotate_left(32)
        });
        let mut seeds = StdRng::seed_from_u64(seed);
        let now = Instant::now();
        let listen = Socket::bind(config.listen, config.socket_buffer_bytes)
            .with_context(|| format!("could not bind the proxy's UDP socket {}", config.listen))?;
        let local_addr = listen.local_addr()?;
        let shared = Arc::new(Shared {
            listen: Arc::new(listen),
            upstream: config.upstream,
            up: Direction::new(
                Link::new(config.up.clone(), seeds.gen(), now),
                config.max_queued_bytes,
            ),
            down: Direction::new(
                Link::new(config.down.clone(), seeds.gen(), now),
                config.max_queued_bytes,
            ),
            control: Control {
                base: now,
                cut: AtomicBool::new(false),
                cut_until_ns: AtomicU64::new(0),
            },
            socket_buffer_bytes: config.socket_buffer_bytes,
            max_sessions: config.max_sessions,
            session_idle: config.session_idle,
            sessions: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
            failure: Mutex::new(None),
        });
        let tasks = vec![
            tokio::spawn(listener(shared.clone())),
            tokio::spawn(timer(shared.clone(), true)),
            tokio::spawn(timer(shared.clone(), false)),
        ];
        Ok(Proxy {
            shared,
            local_addr,
            seed,
            tasks,
        })
    }

    /// Where clients send.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The RNG's seed: pass it back in [`Config::seed`] to repeat the decisions.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Cuts the link (everything dropped both ways, also datagrams already on the way) until
    /// `set_cut(false)`, or restores it (also ending a [`Proxy::cut`]).
    pub fn set_cut(&self, cut: bool) {
        let control = &self.shared.control;
        control.cut.store(cut, Ordering::Relaxed);
        if !cut {
            control.cut_until_ns.store(0, Ordering::Relaxed);
        }
    }

    /// Cuts the link from now for `period`; it comes back by itself.
    pub fn cut(&self, period: Duration) {
        let control = &self.shared.control;
        let until = control.since_base(Instant::now() + period);
        control.cut_until_ns.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether the link is cut now.
    pub fn is_cut(&self) -> bool {
        self.shared.control.is_cut(Instant::now())
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            up: s.up.counters.snapshot(),
            down: s.down.counters.snapshot(),
            sessions: s.sessions.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            io_errors: s.io_errors.load(Ordering::Relaxed),
        }
    }

    /// The socket error that stopped relaying, if one did.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The listener owns the session readers (a JoinSet), so they stop with it.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A received buffer's way through one direction: sent at once, queued, or dropped.
#[allow(clippy::too_many_arguments)]
async fn forward(
    dir: &Direction,
    control: &Control,
    scratch: &mut Scratch,
    data: &[u8],
    stride: usize,
    ecn: Option<EcnCodepoint>,
    socket: &Arc<Socket>,
    to: SocketAddr,
) {
    let c = &dir.counters;
    if control.is_cut(Instant::now()) {
        let n = datagrams(data.len(), stride);
        add(&c.received_packets, n);
        add(&c.received_bytes, data.len() as u64);
        add(&c.cut_dropped, n);
        return;
    }
    let Scratch { pieces, arena } = scratch;
    pieces.clear();
    let mut wake = false;
    {
        let mut guard = dir.lock();
        let Pending {
            link,
            queue,
            queued_bytes,
        } = &mut *guard;
        link.admit(Instant::now(), data.len(), stride, pieces);
        for piece in pieces.iter().filter(|p| !p.immediate) {
            let bytes = &data[piece.range.clone()];
            if *queued_bytes + bytes.len() > dir.max_queued_bytes {
                add(&c.overflow_dropped, datagrams(bytes.len(), stride));
                continue;
            }
            wake |= queue.next_due().is_none_or(|first| piece.due < first);
            *queued_bytes += bytes.len();
            queue.push(
                piece.due,
                Out {
                    socket: socket.clone(),
                    to,
                    ecn,
                    stride,
                    data: arena.copy(bytes),
                },
            );
        }
    }
    if wake {
        dir.wake.notify_one();
    }
    for piece in pieces.iter().filter(|p| p.immediate) {
        let bytes = &data[piece.range.clone()];
        let n = socket.send(to, ecn, bytes, stride).await;
        add(&c.sent_packets, n);
        add(&c.sent_bytes, bytes.len() as u64);
    }
}

/// Sends each direction's queued datagrams when due.
async fn timer(shared: Arc<Shared>, up: bool) {
    let dir = if up { &shared.up } else { &shared.down };
    let c = &dir.counters;
    let mut due = Vec::new();
    loop {
        let next = {
            let mut pending = dir.lock();
            let now = Instant::now();
            while let Some(out) = pending.queue.pop_due(now) {
                pending.queued_bytes -= out.data.len();
                due.push(out);
            }
            pending.queue.next_due()
        };
        let cut = shared.control.is_cut(Instant::now());
        for out in due.drain(..) {
            if cut {
                add(&c.cut_dropped, datagrams(out.data.len(), out.stride));
            } else {
                let n = out
                    .socket
                    .send(out.to, out.ecn, &out.data, out.stride)
                    .await;
                add(&c.sent_packets, n);
                add(&c.sent_bytes, out.data.len() as u64);
            }
        }
        match next {
            Some(t) => {
                tokio::select! {
                    () = tokio::time::sleep_until(t.into()) => {}
                    () = dir.wake.notified() => {}
                }
            }
            None => dir.wake.notified().await,
        }
    }
}

/// A client's upstream socket and its reader.
struct Session {
    upstream: Arc<Socket>,
    last_seen_ms: Arc<AtomicU64>,
    reader: AbortHandle,
}

/// Reads the listening socket: opens sessions, relays client → upstream, ends idle sessions.
async fn listener(shared: Arc<Shared>) {
    let mut buf = RecvBuf::new(shared.listen.slot());
    let mut scratch = Scratch::default();
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut readers = JoinSet::new();
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let filled = tokio::select! {
            r = shared.listen.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(e) if shared.survive(&e, "receiving from clients") => continue,
                Err(_) => return,
            },
            _ = sweep.tick() => {
                let now = shared.now_ms();
                let idle = shared.session_idle.as_millis() as u64;
                sessions.retain(|_, s| {
                    let keep = now.saturating_sub(s.last_seen_ms.load(Ordering::Relaxed)) < idle;
                    if !keep {
                        s.reader.abort();
                    }
                    keep
                });
                while readers.try_join_next().is_some() {}
                shared.sessions.store(sessions.len() as u64, Ordering::Relaxed);
                continue;
            }
        };
        let now_ms = shared.now_ms();
        for i in 0..filled {
            let (data, meta) = buf.message(i);
            let client = meta.addr;
            if !sessions.contains_key(&client) {
                if sessions.len() >= shared.max_sessions {
                    add(&shared.refused, datagrams(data.len(), meta.stride));
                    continue;
                }
                match open_session(&shared, &mut readers, client) {
                    Ok(session) => {
                        sessions.insert(client, session);
                        shared
                            .sessions
                            .store(sessions.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        add(&shared.io_errors, 1);
                        let mut failure = shared.failure.lock().unwrap_or_else(|e| e.into_inner());
                        failure.get_or_insert_with(|| format!("opening an upstream socket: {e}"));
                        continue;
                    }
                }
            }
            let session = &sessions[&client];
            session.last_seen_ms.store(now_ms, Ordering::Relaxed);
            forward(
                &shared.up,
                &shared.control,
                &mut scratch,
                data,
                meta.stride,
                meta.ecn,
                &session.upstream,
                shared.upstream,
            )
            .await;
        }
    }
}

fn open_session(
    shared: &Arc<Shared>,
    readers: &mut JoinSet<()>,
    client: SocketAddr,
) -> io::Result<Session> {
    let bind = if shared.upstream.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let upstream = Arc::new(Socket::bind(bind, shared.socket_buffer_bytes)?);
    let last_seen_ms = Arc::new(AtomicU64::new(shared.now_ms()));
    let reader = readers.spawn(session_reader(
        shared.clone(),
        upstream.clone(),
        client,
        last_seen_ms.clone(),
    ));
    Ok(Session {
        upstream,
        last_seen_ms,
        reader,
    })
}

/// Reads one session's upstream socket and relays upstream → client.
async fn session_reader(
    shared: Arc<Shared>,
    upstream: Arc<Socket>,
    client: SocketAddr,
    last_seen_ms: Arc<AtomicU64>,
) {
    let mut buf = RecvBuf::new(upstream.slot());
    let mut scratch = Scratch::default();
    loop {
        let filled = match upstream.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) if shared.survive(&e, "receiving from upstream") => continue,
            Err(_) => return,
        };
        last_seen_ms.store(shared.now_ms(), Ordering::Relaxed);
        for i in 0..filled {
            let (data, meta) = buf.message(i);
            if meta.addr != shared.upstream {
                continue;
            }
            forward(
                &shared.down,
                &shared.control,
                &mut scratch,
                data,
                meta.stride,
                meta.ecn,
                &shared.listen,
                client,
            )
            .await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Self-test: the proxy's own relay rate

/// A self-test: a source sends datagrams through a proxy to a sink on loopback, with at most
/// `window_bytes` unacknowledged (the sink acknowledges the bytes it received back through
/// the proxy). With a delay the source paces itself at the window per round trip, in
/// millisecond bursts, as QUIC paces: an unpaced window would leave the proxy as one burst a
/// delay later and overflow the sink's socket buffer, which measures the sink, not the proxy.
#[derive(Debug, Clone)]
pub struct SelfTest {
    pub impairment: Impairment,
    pub duration: Duration,
    /// Bytes per datagram (quinn sends 1452 on loopback once it has probed the path MTU).
    pub datagram: usize,
    /// `None`: 2 MiB plus what 1 GB/s keeps in flight over the round trip.
    pub window_bytes: Option<usize>,
    pub seed: Option<u64>,
}

/// What a self-test measured. Rates are MB/s (10^6 bytes).
#[derive(Debug, Clone)]
pub struct SelfTestResult {
    /// Measured seconds (after a warm-up of a round trip and 200 ms).
    pub seconds: f64,
    pub delivered_mb_per_sec: f64,
    pub delivered_datagrams_per_sec: f64,
    pub sent_bytes: u64,
    pub delivered_bytes: u64,
    /// What the source offered, MB/s.
    pub offered_mb_per_sec: f64,
    /// The pace the source kept to, MB/s (`None`: unpaced, no delay).
    pub pace_mb_per_sec: Option<f64>,
    /// Times the source waited a round trip for acknowledgements in vain.
    pub stalls: u64,
    /// The whole process's CPU over the measured time, in cores (source and sink included).
    pub cpu_cores: Option<f64>,
    pub window_bytes: usize,
    pub stats: Stats,
    pub seed: u64,
}

/// Runs a self-test on the current tokio runtime.
pub async fn self_test(test: &SelfTest) -> Result<SelfTestResult> {
    let datagram = test.datagram.clamp(8, 65_000);
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let buffers = 4 * 1024 * 1024;
    let sink = Arc::new(Socket::bind(loopback, buffers).context("binding the sink")?);
    let source = Arc::new(Socket::bind(loopback, buffers).context("binding the source")?);
    let mut config = Config::new(loopback, sink.local_addr()?).both(test.impairment.clone());
    config.seed = test.seed;
    let proxy = Proxy::start(config).await?;
    let rtt = test.impairment.delay * 2;
    let window = test
        .window_bytes
        .unwrap_or(2 * 1024 * 1024 + (rtt.as_secs_f64() * 1e9) as usize)
        .max(datagram);

    // The sink counts bytes and acknowledges the total after every read.
    let delivered = Arc::new(AtomicU64::new(0));
    let sink_task = {
        let (sink, delivered) = (sink.clone(), delivered.clone());
        tokio::spawn(async move {
            let mut buf = RecvBuf::new(sink.slot());
            let mut total = 0u64;
            loop {
                let Ok(filled) = sink.recv(&mut buf).await else {
                    break;
                };
                let mut peer = None;
                for i in 0..filled {
                    let (data, meta) = buf.message(i);
                    total += data.len() as u64;
                    peer = Some(meta.addr);
                }
                delivered.store(total, Ordering::Relaxed);
                if let Some(peer) = peer {
                    sink.send(peer, None, &total.to_le_bytes(), 8).await;
                }
            }
        })
    };
    // The source's acknowledgement reader.
    let acked = Arc::new(AtomicU64::new(0));
    let ack_arrived = Arc::new(Notify::new());
    let ack_task = {
        let (source, acked, ack_arrived) = (source.clone(), acked.clone(), ack_arrived.clone());
        tokio::spawn(async move {
            let mut buf = RecvBuf::new(source.slot());
            loop {
                let Ok(filled) = source.recv(&mut buf).await else {
                    break;
                };
                for i in 0..filled {
                    let (data, _) = buf.message(i);
                    // GRO may join acks: the last 8 bytes are the latest.
                    if let Some(last) = data.len().checked_sub(8).map(|s| &data[s..]) {
                        let n = u64::from_le_bytes(last.try_into().expect("8 bytes"));
                        acked.fetch_max(n, Ordering::Relaxed);
                    }
                }
                ack_arrived.notify_one();
            }
        })
    };

    let per_write = source
        .state
        .max_gso_segments()
        .clamp(1, 64)
        .min(65_000 / datagram)
        .max(1);
    let payload = vec![0xa5u8; datagram * per_write];
    let to = proxy.local_addr();
    let start = Instant::now();
    let warm = start + rtt + Duration::from_millis(200);
    let end = warm + test.duration;
    // Bytes sent longer than this ago have arrived or are lost.
    let settle = rtt + Duration::from_millis(30);
    let pace = (!rtt.is_zero()).then(|| window as f64 / rtt.as_secs_f64());
    let mut history: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let (mut sent, mut settled_sent, mut stalls) = (0u64, 0u64, 0u64);
    let mut paced_until = start;
    let mut at_warm: Option<(u64, u64, Option<f64>)> = None;
    loop {
        let now = Instant::now();
        if at_warm.is_none() && now >= warm {
            at_warm = Some((
                delivered.load(Ordering::Relaxed),
                sent,
                process_cpu_seconds(),
            ));
        }
        if now >= end {
            break;
        }
        // Acknowledgements count bytes delivered; what was sent a round trip ago and is not
        // acknowledged is lost and no longer in flight.
        while history
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > settle)
        {
            settled_sent = history.pop_front().expect("non-empty").1;
        }
        let acked_now = acked.load(Ordering::Relaxed);
        let lost = settled_sent.saturating_sub(acked_now);
        let in_flight = sent.saturating_sub(acked_now + lost);
        if in_flight + payload.len() as u64 > window as u64 {
            let waited = tokio::time::timeout(settle, ack_arrived.notified()).await;
            stalls += u64::from(waited.is_err());
            continue;
        }
        if let Some(rate) = pace {
            if paced_until > now + Duration::from_millis(1) {
                tokio::time::sleep_until(paced_until.into()).await;
                continue;
            }
            // Up to 2 ms of credit: the timer oversleeps by up to a millisecond.
            let floor = now.checked_sub(2 * COALESCE).unwrap_or(now);
            paced_until =
                paced_until.max(floor) + Duration::from_secs_f64(payload.len() as f64 / rate);
        }
        source.send(to, None, &payload, datagram).await;
        sent += payload.len() as u64;
        history.push_back((now, sent));
    }
    let seconds = end.duration_since(warm).as_secs_f64();
    let (delivered_at_warm, sent_at_warm, cpu_at_warm) = at_warm.unwrap_or((0, 0, None));
    let delivered_bytes = delivered.load(Ordering::Relaxed);
    let cpu_cores = match (cpu_at_warm, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some((b - a) / seconds),
        _ => None,
    };
    sink_task.abort();
    ack_task.abort();
    let measured = delivered_bytes.saturating_sub(delivered_at_warm) as f64;
    Ok(SelfTestResult {
        seconds,
        delivered_mb_per_sec: measured / seconds / 1e6,
        delivered_datagrams_per_sec: measured / datagram as f64 / seconds,
        offered_mb_per_sec: (sent - sent_at_warm) as f64 / seconds / 1e6,
        pace_mb_per_sec: pace.map(|p| p / 1e6),
        sent_bytes: sent,
        delivered_bytes,
        stalls,
        cpu_cores,
        window_bytes: window,
        stats: proxy.stats(),
        seed: proxy.seed(),
    })
}

/// This process's user + system CPU seconds (Linux; `None` elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pieces(link: &mut Link, now: Instant, len: usize, stride: usize) -> Vec<Piece> {
        let mut out = Vec::new();
        link.admit(now, len, stride, &mut out);
        out
    }

    #[test]
    fn a_token_bucket_passes_its_burst_then_queues_at_the_rate_and_drops_beyond_the_queue() {
        let t0 = Instant::now();
        // 1 MB/s: 1,000 bytes take 1 ms; a burst of 2,000 bytes; at most 3 ms of waiting.
        let mut b = TokenBucket::new(1e6, 2000.0, 3 * MS, t0);
        assert_eq!(b.admit(t0, 1000), Some(t0));
        assert_eq!(b.admit(t0, 1000), Some(t0));
        let close = |got: Option<Instant>, want: Instant| {
            let got = got.expect("admitted");
            assert!(
                got.max(want) - got.min(want) < Duration::from_micros(1),
                "{got:?} vs {want:?}"
            );
        };
        close(b.admit(t0, 1000), t0 + MS);
        close(b.admit(t0, 1000), t0 + 2 * MS);
        close(b.admit(t0, 1000), t0 + 3 * MS);
        // A fourth millisecond of waiting is over the queue: dropped, and it takes nothing.
        assert_eq!(b.admit(t0, 1000), None);
        close(b.admit(t0 + MS, 1000), t0 + 4 * MS);
        // Long idle refills only up to the burst.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(later, 2000), Some(later));
        close(b.admit(later, 500), later + MS / 2);
    }

    #[test]
    fn departures_from_a_token_bucket_never_go_backwards() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(125e6, 125_000.0, 50 * MS, t0);
        let mut last = t0;
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 7);
            if let Some(t) = b.admit(now, 1452) {
                assert!(t >= last && t >= now);
                last = t;
            }
        }
        assert!(last > t0 + 10 * MS, "1 Gbit/s must have queued: {last:?}");
    }

    #[test]
    fn a_delay_queue_pops_in_due_order_first_in_first_out_among_equals() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new();
        q.push(t0 + 5 * MS, "c");
        q.push(t0 + MS, "a");
        q.push(t0 + 5 * MS, "d");
        q.push(t0 + 3 * MS, "b");
        q.push(t0 + 5 * MS, "e");
        assert_eq!(q.len(), 5);
        assert_eq!(q.next_due(), Some(t0 + MS));
        assert_eq!(q.pop_due(t0), None);
        assert_eq!(q.pop_due(t0 + 4 * MS), Some("a"));
        assert_eq!(q.pop_due(t0 + 4 * MS), Some("b"));
        assert_eq!(q.pop_due(t0 + 4 * MS), None);
        let rest: Vec<_> = std::iter::from_fn(|| q.pop_due(t0 + 5 * MS)).collect();
        assert_eq!(rest, ["c", "d", "e"]);
        assert!(q.is_empty() && q.next_due().is_none());
    }

    #[test]
    fn a_transparent_link_sends_a_whole_burst_at_once_as_one_piece() {
        let t0 = Instant::now();
        let mut link = Link::new(Impairment::default(), 1, t0);
        let out = pieces(&mut link, t0, 10 * 1452 - 100, 1452);
        assert_eq!(
            out,
            [Piece {
                range: 0..10 * 1452 - 100,
                due: t0,
                immediate: true
            }]
        );
        let s = link.stats();
        assert_eq!((s.received_packets, s.received_bytes), (10, 14_420));
        // An empty datagram is one datagram.
        assert_eq!(pieces(&mut link, t0, 0, 0).len(), 1);
    }

    #[test]
    fn a_delayed_link_keeps_a_burst_together_and_never_delivers_out_of_order() {
        let t0 = Instant::now();
        let imp = Impairment {
            delay: 25 * MS,
            jitter: 5 * MS,
            ..Impairment::default()
        };
        let mut link = Link::new(imp, 7, t0);
        let mut last = t0;
        for i in 0..1000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            let out = pieces(&mut link, now, 20 * 1452, 1452);
            assert_eq!(out.len(), 1, "one burst, one piece");
            let p = &out[0];
            assert!(!p.immediate && p.range == (0..20 * 1452));
            assert!(p.due >= now + 20 * MS && p.due <= now + 30 * MS + MS);
            assert!(p.due >= last, "jitter reordered burst {i}");
            last = p.due;
        }
    }

    #[test]
    fn loss_drops_about_the_given_fraction_and_splits_bursts_around_the_lost() {
        let t0 = Instant::now();
        let imp = Impairment {
            delay: 10 * MS,
            loss: 0.02,
            ..Impairment::default()
        };
        let mut link = Link::new(imp, 42, t0);
        let mut kept = 0u64;
        for _ in 0..5_000 {
            for p in pieces(&mut link, t0, 40 * 1000, 1000) {
                assert_eq!(p.range.start % 1000, 0, "pieces are whole datagrams");
                kept += p.range.len().div_ceil(1000) as u64;
            }
        }
        let s = link.stats();
        assert_eq!(s.received_packets, 200_000);
        assert_eq!(kept + s.lost, 200_000);
        let rate = s.lost as f64 / 200_000.0;
        assert!((0.018..0.022).contains(&rate), "loss {rate}");
    }

    #[test]
    fn the_same_seed_makes_the_same_decisions() {
        let t0 = Instant::now();
        let imp = Impairment {
            delay: 25 * MS,
            jitter: 2 * MS,
            loss: 0.05,
            reorder: 0.05,
            duplicate: 0.05,
            ..Impairment::default()
        };
        let run = |seed| {
            let mut link = Link::new(imp.clone(), seed, t0);
            (0..200)
                .flat_map(|i| pieces(&mut link, t0 + i * MS, 30 * 1200, 1200))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn a_reordered_datagram_is_held_back_so_later_ones_overtake_it() {
        let t0 = Instant::now();
        let imp = Impairment {
            delay: 5 * MS,
            reorder: 1.0,
            reorder_delay: 10 * MS,
            ..Impairment::default()
        };
        let mut link = Link::new(imp, 3, t0);
        let held = pieces(&mut link, t0, 1000, 1000);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].due, t0 + 15 * MS);
        // Held-back datagrams do not hold back those after them.
        link.impairment.reorder = 0.0;
        let next = pieces(&mut link, t0 + MS, 1000, 1000);
        assert_eq!(next[0].due, t0 + 6 * MS);
        assert!(next[0].due < held[0].due);
        assert_eq!(link.stats().reordered, 1);
    }

    #[test]
    fn a_duplicated_datagram_leaves_twice() {
        let t0 = Instant::now();
        let imp = Impairment {
            duplicate: 1.0,
            ..Impairment::default()
        };
        let mut link = Link::new(imp, 5, t0);
        let out = pieces(&mut link, t0, 3 * 100, 100);
        let ranges: Vec<_> = out.iter().map(|p| p.range.clone()).collect();
        assert_eq!(
            ranges,
            [0..100, 0..100, 100..200, 100..200, 200..300, 200..300]
        );
        assert!(out.iter().all(|p| p.immediate));
        assert_eq!(link.stats().duplicated, 3);
    }

    #[test]
    fn a_rate_limited_link_paces_a_burst_and_drops_what_overflows_its_queue() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1 MB/s; a 1,000-byte datagram every millisecond; 5 ms of queue.
        let imp = Impairment {
            rate_mbit: 8.0,
            queue: 5 * MS,
            ..Impairment::default()
        };
        let mut link = Link::new(imp, 1, t0);
        let out = pieces(&mut link, t0, 20 * 1000, 1000);
        // The burst allowance (3,000 bytes) leaves at once; the next five queue a
        // millisecond apart; the rest would wait longer than 5 ms.
        let sent: usize = out.iter().map(|p| p.range.len()).sum();
        assert_eq!(sent, 8 * 1000, "{out:?}");
        assert!(out.windows(2).all(|w| w[0].due <= w[1].due));
        assert!(out.len() >= 3, "paced, not one write: {out:?}");
        assert_eq!(link.stats().rate_dropped, 12);
        assert!(out.iter().all(|p| !p.immediate));
    }

    #[test]
    fn probabilities_outside_zero_to_one_are_refused_with_a_hint() {
        let imp = Impairment {
            loss: 2.0,
            ..Impairment::default()
        };
        let e = imp.validate().expect_err("2 is not a probability");
        assert!(e.to_string().contains("0.02"), "{e}");
        assert!(Impairment {
            rate_mbit: -1.0,
            ..Impairment::default()
        }
        .validate()
        .is_err());
    }

    /// An echo server on loopback: what it receives it sends back.
    async fn echo() -> Result<(SocketAddr, JoinHandle<()>)> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let task = tokio::spawn(async move {
            let mut buf = vec![0; 65_536];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        Ok((addr, task))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_proxy_relays_both_ways_with_the_delay_and_drops_everything_while_cut() -> Result<()>
    {
        let (upstream, echo_task) = echo().await?;
        let config = Config::new("127.0.0.1:0".parse()?, upstream)
            .both(Impairment::delay(10 * MS))
            .seed(1);
        let proxy = Proxy::start(config).await?;
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let mut buf = [0u8; 64];
        for i in 0..5u8 {
            let sent = Instant::now();
            client.send_to(&[i; 10], proxy.local_addr()).await?;
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                    .await
                    .context("no echo through the proxy within 5 s")??;
            assert_eq!((n, from, buf[0]), (10, proxy.local_addr(), i));
            assert!(sent.elapsed() >= 20 * MS, "a round trip is two delays");
        }
        // Cut: the datagram is counted as dropped and nothing comes back.
        proxy.set_cut(true);
        assert!(proxy.is_cut());
        client.send_to(&[9; 10], proxy.local_addr()).await?;
        let mut dropped = false;
        for _ in 0..500 {
            if proxy.stats().up.cut_dropped == 1 {
                dropped = true;
                break;
            }
            tokio::time::sleep(MS).await;
        }
        assert!(
            dropped,
            "the proxy did not see the datagram: {}",
            proxy.stats()
        );
        proxy.set_cut(false);
        // The link is back: the next datagram goes through (and the cut one never does).
        client.send_to(&[7; 10], proxy.local_addr()).await?;
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .context("no echo after the cut ended")??;
        assert_eq!((n, buf[0]), (10, 7));
        let s = proxy.stats();
        assert_eq!(
            (s.up.sent_packets, s.down.sent_packets, s.sessions),
            (6, 6, 1)
        );
        echo_task.abort();
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_self_test_moves_data_through_the_proxy() -> Result<()> {
        let result = self_test(&SelfTest {
            impairment: Impairment::default(),
            duration: Duration::from_millis(300),
            datagram: 1452,
            window_bytes: None,
            seed: Some(1),
        })
        .await?;
        assert!(result.delivered_mb_per_sec > 1.0, "{result:?}");
        assert!(result.stats.up.sent_packets > 0 && result.stats.down.sent_packets > 0);
        Ok(())
    }
}
