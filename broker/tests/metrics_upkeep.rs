//! The broker's metrics recorder lets go of histogram samples without being scraped. Its own
//! test binary: it counts every live heap byte of the process.

// The one unsafe code in the workspace: a global allocator that forwards to the system's and
// counts bytes, because nothing else shows what the recorder holds (rendering `/metrics`
// would fold the samples itself).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

#[test]
fn histogram_samples_are_let_go_without_a_scrape() {
    // The first fold comes two seconds after installing, normally long after the samples
    // are recorded.
    let every = Duration::from_secs(2);
    let installed = Instant::now();
    let _handle = directmq_broker::metrics::install_with_upkeep(every);
    let histogram = metrics::histogram!(directmq_broker::metrics::ACK_SECONDS);
    histogram.record(0.001);
    let before = live();
    for i in 0..1_000_000u32 {
        histogram.record(f64::from(i % 1000) * 1e-6);
    }
    let held = live() - before;
    if installed.elapsed() < every {
        // The samples are visible to this count (so the wait below can fail).
        assert!(
            held > 4_000_000,
            "a million samples should be held until they are folded, not {held} bytes"
        );
    }
    // No scrape comes; the samples must still go, within a bounded wait, while the load goes
    // on (the recorder frees what it folded on later recordings: crossbeam-epoch garbage).
    let deadline = Instant::now() + Duration::from_secs(30);
    while live() - before > 1_000_000 {
        assert!(
            Instant::now() < deadline,
            "{} bytes of samples still held 30 s later: nothing folds histograms",
            live() - before
        );
        for i in 0..100u32 {
            histogram.record(f64::from(i) * 1e-6);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
