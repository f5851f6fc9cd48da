//! Measures the heap footprint of a stick table holding 1,000,000 entries.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Duration;

use tether::affinity::hash::key_hash128;
use tether::affinity::stick_table::{StickTable, Tick};

/// Tracks live heap bytes and the peak, process-wide. This file holds a
/// single test so no other test thread allocates concurrently.
struct CountingAlloc;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by as isize, Relaxed) + by as isize;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        grew(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn one_million_entries_memory() {
    const N: u64 = 1_000_000;
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);

    let table = StickTable::new(N as usize, Duration::from_secs(3600), 16);
    let empty = LIVE.load(Relaxed) - base;
    for i in 0..N {
        let key = key_hash128("pool", "cookie:sid", &i.to_le_bytes());
        table.insert(key, i % 50, Tick::from_secs(0));
    }
    let full = LIVE.load(Relaxed) - base;
    let peak = PEAK.load(Relaxed) - base;
    assert_eq!(table.len() as u64 + table.stats().evictions, N);

    eprintln!(
        "stick table: empty {empty} B; {} entries: {full} B live ({:.1} MiB, {:.1} B/entry), \
         peak during growth {:.1} MiB, evictions {}",
        table.len(),
        full as f64 / MIB,
        full as f64 / table.len() as f64,
        peak as f64 / MIB,
        table.stats().evictions,
    );
    assert!(empty < 64 * 1024, "construction must not pre-size: {empty} B");
    assert!((full as f64) < 200.0 * MIB, "{full} B");
}
