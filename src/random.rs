//! Cheap per-thread randomness for spreading load and jitter: not for secrets (tokens use
//! the system random source).

use std::cell::Cell;

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

/// A per-thread seed; balancing needs spread, not secrecy, so the address of a local and
/// the clock are enough.
fn seed() -> u64 {
    let local = 0u8;
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (t ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// Restarts this thread's generator from `seed`, so that what follows on this thread is
/// reproducible draw for draw. Only the simulator calls it, on the thread that runs a
/// simulation (the proxy's threads keep their clock-derived seeds); [`random_below`] is
/// unchanged by it.
pub fn reseed(seed: u64) {
    // xorshift's state must not be 0; SplitMix64's finaliser spreads nearby seeds apart.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    RNG.with(|s| s.set((z ^ (z >> 31)) | 1));
}

/// A uniform number below `n` from a per-thread xorshift64* generator.
pub fn random_below(n: usize) -> usize {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        // Multiply-shift maps the 64-bit draw onto 0..n without the bias of a modulo.
        ((u128::from(x.wrapping_mul(0x2545_F491_4F6C_DD1D)) * n as u128) >> 64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_below_stays_in_range() {
        for n in [1usize, 2, 7, 1000] {
            for _ in 0..1000 {
                assert!(random_below(n) < n);
            }
        }
    }

    #[test]
    fn reseeding_repeats_the_draws() {
        reseed(7);
        let a: Vec<usize> = (0..32).map(|_| random_below(1000)).collect();
        reseed(7);
        let b: Vec<usize> = (0..32).map(|_| random_below(1000)).collect();
        reseed(8);
        let c: Vec<usize> = (0..32).map(|_| random_below(1000)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
