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
}
