//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016), plus the bounded
//! load cap of Mirrokni, Thorup and Zadimoghaddam ("Consistent Hashing with
//! Bounded Loads", SODA 2018).
//!
//! Each backend gets a permutation of the `M` table slots from two fixed-seed
//! hashes of its backend id (`offset = h1 % M`, `skip = h2 % (M - 1) + 1`;
//! `M` is prime, so every skip generates a full permutation). Backends take
//! turns claiming their next free preferred slot until the table is full.
//! Weights are honoured by letting a backend take a turn in round `r` only
//! while it holds fewer than `r × weight / max_weight` slots, so slot counts
//! are proportional to weight and weight 0 gets no slots.
//!
//! The table depends only on the ordered list of `(backend_id, weight)`, so
//! every instance given the same list builds the same table.
//! **The seeds below are frozen**: changing them remaps every key.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of the hash giving a backend's starting offset. Frozen: ASCII
/// "MglvOffs" read as big-endian u64.
pub const OFFSET_SEED: u64 = 0x4d67_6c76_4f66_6673;
/// Seed of the hash giving a backend's skip. Frozen: ASCII "MglvSkip".
pub const SKIP_SEED: u64 = 0x4d67_6c76_536b_6970;

/// Default table size, used while it is at least 100 × the backend count.
pub const DEFAULT_TABLE_SIZE: usize = 65_537;

const EMPTY: u32 = u32::MAX;

/// A Maglev lookup table over a list of weighted backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Maglev {
    /// Slot → index into the backend list given to [`Maglev::new`], or
    /// `EMPTY` when no backend has a positive weight.
    table: Vec<u32>,
    backends: usize,
    /// Number of backends with positive weight.
    weighted: usize,
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The table size for `n` backends: 65537 when that is at least `100 × n`,
/// otherwise the smallest prime at least `100 × n`.
pub fn table_size(n: usize) -> usize {
    let want = n.saturating_mul(100);
    if want <= DEFAULT_TABLE_SIZE {
        return DEFAULT_TABLE_SIZE;
    }
    let mut m = want;
    while !is_prime(m) {
        m += 1;
    }
    m
}

impl Maglev {
    /// Builds the table for `(backend_id, weight)` pairs. Lookups return
    /// indices into `backends`. Backends with weight 0 receive no slots.
    ///
    /// # Panics
    /// If there are more than `u32::MAX - 1` backends.
    pub fn new(backends: &[(u64, u32)]) -> Maglev {
        assert!(backends.len() < EMPTY as usize, "too many backends");
        let m = table_size(backends.len());
        let mut table = vec![EMPTY; m];
        let max_weight = u64::from(backends.iter().map(|b| b.1).max().unwrap_or(0));
        let weighted = backends.iter().filter(|b| b.1 > 0).count();
        if max_weight == 0 {
            return Maglev { table, backends: backends.len(), weighted: 0 };
        }

        // Per backend: current position in its permutation, its skip, and
        // the number of slots it holds.
        struct Walk {
            pos: usize,
            skip: usize,
            weight: u64,
            count: u64,
        }
        let mut walks: Vec<Walk> = backends
            .iter()
            .map(|&(id, weight)| {
                let bytes = id.to_le_bytes();
                Walk {
                    pos: (xxh3_64_with_seed(&bytes, OFFSET_SEED) % m as u64) as usize,
                    skip: (xxh3_64_with_seed(&bytes, SKIP_SEED) % (m as u64 - 1)) as usize + 1,
                    weight: u64::from(weight),
                    count: 0,
                }
            })
            .collect();

        let mut filled = 0;
        let mut round: u64 = 0;
        'fill: loop {
            round += 1;
            for (i, w) in walks.iter_mut().enumerate() {
                // Take a turn only while below the weighted share for this
                // round; the heaviest backend takes every turn, so each round
                // fills at least one slot.
                if w.weight == 0 || w.count * max_weight >= round * w.weight {
                    continue;
                }
                // Every slot this backend skips is already taken, and a
                // free slot exists, so this terminates within M steps.
                while table[w.pos] != EMPTY {
                    w.pos += w.skip;
                    if w.pos >= m {
                        w.pos -= m;
                    }
                }
                table[w.pos] = i as u32;
                w.count += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev { table, backends: backends.len(), weighted }
    }

    /// The table size `M` (a prime).
    #[cfg(test)]
    pub fn table_size(&self) -> usize {
        self.table.len()
    }

    /// Number of table slots held by each backend, by input index.
    #[cfg(test)]
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.backends];
        if self.weighted > 0 {
            for &b in &self.table {
                counts[b as usize] += 1;
            }
        }
        counts
    }

    /// The backend (index into the input list) owning `key_hash`'s slot, or
    /// `None` when no backend has a positive weight.
    pub fn lookup(&self, key_hash: u64) -> Option<usize> {
        let b = self.table[(key_hash % self.table.len() as u64) as usize];
        (b != EMPTY).then_some(b as usize)
    }

    /// Like [`lookup`](Self::lookup), but probes forward from the key's slot
    /// until it reaches a backend for which `eligible` returns true (e.g.
    /// healthy, or `load[i] < cap` for bounded loads). Returns `None` when
    /// no backend is eligible. At most `M` probes; `eligible` is called at
    /// most once per distinct backend for the first 128 backends.
    pub fn lookup_with(&self, key_hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        if self.weighted == 0 {
            return None;
        }
        let m = self.table.len();
        let mut slot = (key_hash % m as u64) as usize;
        // Backends (with index < 128) already found ineligible.
        let mut rejected: u128 = 0;
        let mut rejected_count = 0;
        let mut last = EMPTY;
        for _ in 0..m {
            let b = self.table[slot];
            if b != last {
                last = b;
                let bit = 1u128.checked_shl(b).unwrap_or(0);
                if rejected & bit == 0 {
                    if eligible(b as usize) {
                        return Some(b as usize);
                    }
                    if bit != 0 {
                        rejected |= bit;
                        rejected_count += 1;
                        if rejected_count == self.weighted {
                            return None;
                        }
                    }
                }
            }
            slot += 1;
            if slot == m {
                slot = 0;
            }
        }
        None
    }
}

/// The bounded-load cap: `ceil(factor × (total_load + 1) / n_backends)`.
///
/// With `total_load` requests (or sessions) currently assigned, a new one
/// may go to backend `i` only if `load[i] < cap`; use
/// [`Maglev::lookup_with`] with that predicate. `factor` (`1 + ε`, e.g.
/// 1.25) bounds every backend's load at `factor` × the average. Returns 0
/// when there are no backends. Assumes equal weights.
pub fn bounded_cap(total_load: u64, n_backends: usize, factor: f64) -> u64 {
    if n_backends == 0 {
        return 0;
    }
    let cap = (factor * (total_load as f64 + 1.0) / n_backends as f64).ceil();
    // Never below 1, so an idle pool always accepts.
    (cap as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::super::hash::{backend_id, key_hash};
    use super::*;

    fn pool(names: &[&str]) -> Vec<(u64, u32)> {
        names.iter().map(|n| (backend_id("pool", n), 1)).collect()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    fn keys(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|i| key_hash("pool", "test", &i.to_le_bytes()))
    }

    #[test]
    fn table_sizes() {
        assert_eq!(table_size(0), 65_537);
        assert_eq!(table_size(1), 65_537);
        assert_eq!(table_size(655), 65_537);
        assert_eq!(table_size(656), 65_609);
        assert_eq!(table_size(1000), 100_003);
        assert!(is_prime(65_537) && is_prime(65_609) && is_prime(100_003));
        assert!(!is_prime(1) && !is_prime(65_600) && !is_prime(25));
    }

    #[test]
    fn golden_table_prefix() {
        let m = Maglev::new(&pool(&["a", "b", "c"]));
        assert_eq!(m.table_size(), 65_537);
        let prefix: Vec<u32> = m.table[..24].to_vec();
        // Cross-checked against an independent Python implementation of the
        // same algorithm over the reference C xxhash.
        assert_eq!(prefix, [1, 0, 1, 2, 0, 2, 0, 2, 1, 1, 1, 2, 2, 0, 0, 1, 2, 0, 2, 0, 1, 1, 1, 0],);
        // Deterministic across builds.
        assert_eq!(Maglev::new(&pool(&["a", "b", "c"])), m);

        let mut weighted = pool(&["a", "b", "c"]);
        weighted[1].1 = 2;
        weighted[2].1 = 3;
        let w = Maglev::new(&weighted);
        assert_eq!(w.table[..24], [1, 0, 1, 2, 0, 2, 2, 2, 1, 1, 1, 2, 2, 2, 0, 1, 2, 0, 2, 2, 2, 1, 1, 1],);
        assert_eq!(w.slot_counts(), [10_923, 21_846, 32_768]);
    }

    #[test]
    fn empty_and_zero_weight() {
        let none = Maglev::new(&[]);
        assert_eq!(none.lookup(42), None);
        assert_eq!(none.lookup_with(42, |_| true), None);
        let zero = Maglev::new(&[(1, 0), (2, 0)]);
        assert_eq!(zero.lookup(42), None);
        assert_eq!(zero.slot_counts(), [0, 0]);
        let some = Maglev::new(&[(1, 0), (2, 3), (3, 0)]);
        assert_eq!(some.slot_counts(), [0, 65_537, 0]);
        assert!(keys(1000).all(|k| some.lookup(k) == Some(1)));
    }

    #[test]
    fn equal_weights_balance() {
        let backends: Vec<(u64, u32)> = names(7).iter().map(|n| (backend_id("pool", n), 1)).collect();
        let m = Maglev::new(&backends);
        let slots = m.slot_counts();
        let (lo, hi) = (slots.iter().min().unwrap(), slots.iter().max().unwrap());
        assert!(hi - lo <= 1, "{slots:?}");
        let mut hits = [0u32; 7];
        for k in keys(100_000) {
            hits[m.lookup(k).unwrap()] += 1;
        }
        let expected = 100_000.0 / 7.0;
        for h in hits {
            assert!((f64::from(h) / expected - 1.0).abs() < 0.04, "{hits:?}");
        }
    }

    #[test]
    fn weights_are_proportional() {
        let backends =
            vec![(backend_id("pool", "w1"), 1), (backend_id("pool", "w2"), 2), (backend_id("pool", "w3"), 3)];
        let m = Maglev::new(&backends);
        let slots = m.slot_counts();
        let unit = m.table_size() as f64 / 6.0;
        for (i, &s) in slots.iter().enumerate() {
            let want = unit * (i + 1) as f64;
            assert!((s as f64 / want - 1.0).abs() < 0.01, "{slots:?}");
        }
        let mut hits = [0u32; 3];
        for k in keys(100_000) {
            hits[m.lookup(k).unwrap()] += 1;
        }
        for (i, &h) in hits.iter().enumerate() {
            let want = 100_000.0 / 6.0 * (i + 1) as f64;
            assert!((f64::from(h) / want - 1.0).abs() < 0.04, "{hits:?}");
        }
    }

    /// Fraction of keys whose backend (by id) differs between two tables.
    fn moved(a: (&Maglev, &[(u64, u32)]), b: (&Maglev, &[(u64, u32)])) -> f64 {
        let n = 100_000u64;
        let changed = keys(n).filter(|&k| a.1[a.0.lookup(k).unwrap()].0 != b.1[b.0.lookup(k).unwrap()].0).count();
        changed as f64 / n as f64
    }

    #[test]
    fn removing_a_backend_remaps_about_one_nth() {
        for n in [5usize, 10, 20] {
            let all: Vec<(u64, u32)> = names(n).iter().map(|s| (backend_id("pool", s), 1)).collect();
            let full = Maglev::new(&all);
            let mut fewer = all.clone();
            fewer.remove(n / 2);
            let reduced = Maglev::new(&fewer);
            let f = moved((&full, &all), (&reduced, &fewer));
            let ideal = 1.0 / n as f64;
            eprintln!("remove 1 of {n}: moved {f:.4} (ideal {ideal:.4})");
            assert!(f >= ideal * 0.9 && f <= ideal + 0.03, "n={n}: moved {f}");
        }
    }

    #[test]
    fn adding_a_backend_remaps_about_one_nth() {
        for n in [5usize, 10, 20] {
            let before: Vec<(u64, u32)> = names(n).iter().map(|s| (backend_id("pool", s), 1)).collect();
            let mut after = before.clone();
            after.push((backend_id("pool", "newcomer"), 1));
            let a = Maglev::new(&before);
            let b = Maglev::new(&after);
            let f = moved((&a, &before), (&b, &after));
            let ideal = 1.0 / (n + 1) as f64;
            eprintln!("add 1 to {n}: moved {f:.4} (ideal {ideal:.4})");
            assert!(f >= ideal * 0.9 && f <= ideal + 0.03, "n={n}: moved {f}");
        }
    }

    #[test]
    fn lookup_with_skips_ineligible() {
        let backends = pool(&["a", "b", "c", "d"]);
        let m = Maglev::new(&backends);
        for k in keys(10_000) {
            let home = m.lookup(k).unwrap();
            assert_eq!(m.lookup_with(k, |_| true), Some(home));
            let alt = m.lookup_with(k, |i| i != home).unwrap();
            assert_ne!(alt, home);
            // Keys of healthy backends stay put when another backend fails.
            if home != 0 {
                assert_eq!(m.lookup_with(k, |i| i != 0), Some(home));
            }
            assert_eq!(m.lookup_with(k, |i| i == 3), Some(3));
        }
        assert_eq!(m.lookup_with(7, |_| false), None);
    }

    #[test]
    fn lookup_with_many_backends_and_none_eligible() {
        // More than 128 backends exercises the unbounded probe path.
        let backends: Vec<(u64, u32)> = names(200).iter().map(|s| (backend_id("pool", s), 1)).collect();
        let m = Maglev::new(&backends);
        assert_eq!(m.table_size(), 65_537);
        assert_eq!(m.lookup_with(99, |_| false), None);
        assert_eq!(m.lookup_with(99, |i| i == 199), Some(199));
        assert_eq!(m.lookup_with(99, |i| i == 5), Some(5));
    }

    #[test]
    fn bounded_cap_formula() {
        assert_eq!(bounded_cap(0, 4, 1.25), 1);
        assert_eq!(bounded_cap(99, 4, 1.25), 32); // 1.25 * 100 / 4 = 31.25
        assert_eq!(bounded_cap(99, 4, 1.0), 25);
        assert_eq!(bounded_cap(10, 0, 1.25), 0);
    }

    #[test]
    fn bounded_load_holds() {
        let backends = pool(&["a", "b", "c", "d", "e", "f", "g", "h"]);
        let m = Maglev::new(&backends);
        let factor = 1.25;
        let mut load = [0u64; 8];
        let mut total = 0u64;
        // Skewed keys: many repeats of a few hot keys plus a uniform tail.
        for (i, k) in keys(10_000).enumerate() {
            let k = if i % 3 == 0 { 12_345 } else { k };
            let cap = bounded_cap(total, backends.len(), factor);
            let b = m.lookup_with(k, |i| load[i] < cap).unwrap();
            load[b] += 1;
            total += 1;
            assert!(load[b] <= cap);
        }
        let cap = bounded_cap(total - 1, backends.len(), factor);
        let max = *load.iter().max().unwrap();
        assert!(max <= cap, "max {max} cap {cap} loads {load:?}");
        // The hot key forced spill-over, yet nobody exceeds 1.25 × average.
        assert!(max as f64 <= 1.25 * 10_000.0 / 8.0 + 1.0);
    }
}
