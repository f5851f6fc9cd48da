//! Proves that sealing and opening tokens does not touch the heap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tether::affinity::token::{Key, KeyRing, OpenError, Token};

/// Counts allocations made by the current thread only, so the test harness's
/// other threads cannot disturb the measurement.
struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc() {
    // `try_with` avoids panicking during thread teardown.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations_during<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    (ALLOCS.with(Cell::get) - before, r)
}

#[test]
fn seal_and_open_do_not_allocate() {
    // Building the ring allocates (a Vec); everything after must not.
    let old = KeyRing::new([Key::from_bytes([1; 32])]).unwrap();
    let ring = KeyRing::new([Key::from_bytes([2; 32]), Key::from_bytes([1; 32])]).unwrap();
    let token = Token { backend: 42, session: [7; 16], issued: 1_700_000_000, last_seen: 1_700_000_500 };

    // The very first seal also covers any lazy RNG initialisation.
    let (n, sealed) = allocations_during(|| ring.seal(&token));
    assert_eq!(n, 0, "seal allocated");
    let (n, opened) = allocations_during(|| ring.open(sealed.as_str()));
    assert_eq!(n, 0, "open allocated");
    assert_eq!(opened, Ok(token));

    // Opening with the second (rotated-out) key, and failure paths.
    let by_old = old.seal(&token);
    let mut tampered = *by_old.as_str().as_bytes().first().unwrap();
    tampered = if tampered == b'A' { b'B' } else { b'A' };
    let (n, results) = allocations_during(|| {
        let a = ring.open(by_old.as_str());
        let b = ring.open("short");
        let mut buf = [0u8; 110];
        buf.copy_from_slice(by_old.as_str().as_bytes());
        buf[50] = if buf[50] == b'x' { b'y' } else { b'x' };
        let c = ring.open(std::str::from_utf8(&buf).unwrap());
        buf.copy_from_slice(by_old.as_str().as_bytes());
        buf[0] = tampered;
        let d = ring.open(std::str::from_utf8(&buf).unwrap());
        (a, b, c, d)
    });
    assert_eq!(n, 0, "open (rotation / failure paths) allocated");
    assert_eq!(results.0, Ok(token));
    assert_eq!(results.1, Err(OpenError::Malformed));
    assert_eq!(results.2, Err(OpenError::Forged));
    assert!(results.3.is_err());

    // Many iterations, for good measure.
    let (n, ()) = allocations_during(|| {
        for i in 0..1000u64 {
            let t = Token { last_seen: token.last_seen + i, ..token };
            let s = ring.seal(&t);
            assert_eq!(ring.open(s.as_str()), Ok(t));
            assert!(t.check(t.last_seen, 60, Some(3600)).is_ok());
        }
    });
    assert_eq!(n, 0);

    // Sanity check that the counter works at all.
    let (n, v) = allocations_during(|| vec![1u8; 10]);
    assert!(n >= 1 && v.len() == 10);
}
