//! Load-balancing algorithms: which backend of a pool takes a new request or session.
//!
//! A [`Balancer`] is built once per pool snapshot, off the request path, from the
//! backends' weights. Picking reads that table and a few atomics, takes no lock and
//! allocates nothing. The caller says which backends are eligible right now and what
//! each one's load is (requests in flight) through two closures, so this module knows
//! nothing of sockets, health checks or hyper and is tested as plain code.
//!
//! It does not decide affinity: a request that already belongs to a session is routed by
//! `affinity` and only falls back to a balancer when its session must be placed.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Algorithm;
use crate::random::random_below;

/// Spread positions tried for the turn of an ineligible backend before walking on
/// ([`Balancer::walk`]): with a tenth of the weight ineligible, 1 turn in 10^5 is walked.
const SPREAD_TRIES: u32 = 4;

/// SplitMix64's finaliser: consecutive inputs land far apart.
fn spread(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How a pool chooses among its eligible backends.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    /// Weight of each backend for new work; 0 means "takes no new work" (draining, disabled).
    weights: Vec<u32>,
    /// One period of NGINX's smooth weighted round robin over `weights`, as backend indices.
    /// Round robin walks it with one shared counter; `random` and `p2c` sample it at random
    /// positions, which is a weighted draw without any per-request arithmetic over weights.
    sequence: Vec<u16>,
    next: AtomicUsize,
}

impl Balancer {
    /// Builds the tables for `weights` (index = backend index).
    pub fn new(algorithm: Algorithm, weights: &[u32]) -> Balancer {
        assert!(weights.len() <= usize::from(u16::MAX), "too many backends in one pool");
        Balancer { algorithm, weights: weights.to_vec(), sequence: smooth_sequence(weights), next: AtomicUsize::new(0) }
    }

    /// Picks a backend among those for which `eligible` is true, using `load` (requests in
    /// flight) for the load-aware algorithms. `None` when no backend with a non-zero weight
    /// is eligible.
    pub fn pick(&self, eligible: impl Fn(usize) -> bool, load: impl Fn(usize) -> u32) -> Option<usize> {
        if self.sequence.is_empty() {
            return None;
        }
        match self.algorithm {
            Algorithm::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                self.walk(start, &eligible)
            }
            // A draw over all of `usize`, not just the period's positions: `walk` hashes it
            // for a spread position when the one it lands on is ineligible.
            Algorithm::Random => self.walk(random_below(usize::MAX), &eligible),
            Algorithm::LeastConn => self.least_loaded(&eligible, &load),
            Algorithm::P2c => {
                let a = self.walk(random_below(usize::MAX), &eligible)?;
                // The second draw excludes the first so that the two choices are distinct
                // whenever two eligible backends exist.
                let b = self.walk(random_below(usize::MAX), &|i| i != a && eligible(i));
                match b {
                    Some(b) if self.lighter(b, a, &load) => Some(b),
                    _ => Some(a),
                }
            }
        }
    }

    /// The backend at position `start` of the sequence when it is eligible. When it is
    /// not, its turn goes to the backend at a position spread over the period by a hash of
    /// `start` (up to [`SPREAD_TRIES`] of them), and only then to the first eligible one
    /// after the last: walking on from `start` itself would hand every turn of an
    /// ineligible backend to the one after it in the sequence, so that with equal weights
    /// one neighbour of a failed backend took all of its share (twice the load of the
    /// others; `tether simulate` showed it). Spread positions share the turns out in
    /// proportion to the eligible backends' weights. Deterministic in `start`.
    fn walk(&self, start: usize, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.sequence.len();
        let at = |p: usize| usize::from(self.sequence[p % n]);
        let first = at(start);
        if eligible(first) {
            return Some(first);
        }
        let mut p = start as u64;
        for _ in 0..SPREAD_TRIES {
            p = spread(p);
            let i = at(p as usize);
            if eligible(i) {
                return Some(i);
            }
        }
        let from = p as usize % n;
        (1..=n).map(|k| at(from + k)).find(|&i| eligible(i))
    }

    /// Weighted least load: the smallest `load / weight`, ties broken by a rotating start
    /// so that idle backends share the work instead of the first one taking all of it.
    fn least_loaded(&self, eligible: &impl Fn(usize) -> bool, load: &impl Fn(usize) -> u32) -> Option<usize> {
        let n = self.weights.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if self.weights[i] == 0 || !eligible(i) {
                continue;
            }
            best = match best {
                Some(b) if !self.lighter(i, b, load) => Some(b),
                _ => Some(i),
            };
        }
        best
    }

    /// True when backend `a` carries strictly less load per unit of weight than `b`.
    fn lighter(&self, a: usize, b: usize, load: &impl Fn(usize) -> u32) -> bool {
        let (la, lb) = (u64::from(load(a)), u64::from(load(b)));
        let (wa, wb) = (u64::from(self.weights[a].max(1)), u64::from(self.weights[b].max(1)));
        la * wb < lb * wa
    }
}

/// One period of smooth weighted round robin (the algorithm NGINX uses): every step each
/// backend gains its weight, the one with the highest running total is chosen and loses
/// the sum of all weights. The period is `sum / gcd` steps long and interleaves heavy and
/// light backends instead of sending bursts to the heavy one.
pub fn smooth_sequence(weights: &[u32]) -> Vec<u16> {
    let g = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let reduced: Vec<i64> = weights.iter().map(|&w| i64::from(w / g)).collect();
    let total: i64 = reduced.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = usize::MAX;
        for (i, &w) in reduced.iter().enumerate() {
            if w == 0 {
                continue;
            }
            current[i] += w;
            if best == usize::MAX || current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        sequence.push(best as u16);
    }
    sequence
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(b: &Balancer, n: usize, picks: usize, eligible: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[b.pick(&eligible, |_| 0).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_sequence_interleaves_like_nginx() {
        // NGINX's documented example: weights 5, 1, 1 give a a b a c a a, not a a a a a b c.
        let s = smooth_sequence(&[5, 1, 1]);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_sequence(&[2, 2]), vec![0, 1]);
        assert_eq!(smooth_sequence(&[0, 3]), vec![1]);
        assert!(smooth_sequence(&[0, 0]).is_empty());
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let b = Balancer::new(Algorithm::RoundRobin, &[1, 2, 3]);
        assert_eq!(counts(&b, 3, 600, |_| true), vec![100, 200, 300]);
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let b = Balancer::new(Algorithm::RoundRobin, &[1, 1, 1]);
        let c = counts(&b, 3, 300, |i| i != 1);
        assert_eq!(c[1], 0);
        assert_eq!(c[0] + c[2], 300);
        assert!(b.pick(|_| false, |_| 0).is_none());
    }

    /// Reproduction (found by `tether simulate`): with one of ten equal backends down,
    /// round robin gave all of its turns to the backend after it in the sequence, which
    /// then took 2/10 of new work while the others took 1/10. Now the others share it.
    #[test]
    fn an_ineligible_backends_share_is_spread_over_the_others() {
        for alg in [Algorithm::RoundRobin, Algorithm::Random] {
            let b = Balancer::new(alg, &[1; 10]);
            let c = counts(&b, 10, 90_000, |i| i != 3);
            assert_eq!(c[3], 0, "{alg:?}");
            for (i, &n) in c.iter().enumerate().filter(|(i, _)| *i != 3) {
                assert!((9_400..=10_600).contains(&n), "{alg:?}: backend {i} took {n} of 90000: {c:?}");
            }
        }
        // By weight: with backend 0 (weight 2) down, 1 and 2 keep their 1 : 3.
        let b = Balancer::new(Algorithm::RoundRobin, &[2, 1, 3]);
        let c = counts(&b, 3, 60_000, |i| i != 0);
        assert!((14_000..=16_000).contains(&c[1]) && c[1] + c[2] == 60_000, "{c:?}");
    }

    #[test]
    fn zero_weight_takes_no_new_work() {
        for alg in [Algorithm::RoundRobin, Algorithm::Random, Algorithm::LeastConn, Algorithm::P2c] {
            let b = Balancer::new(alg, &[1, 0, 1]);
            let c = counts(&b, 3, 1000, |_| true);
            assert_eq!(c[1], 0, "{alg:?}");
        }
    }

    #[test]
    fn random_is_weighted() {
        let b = Balancer::new(Algorithm::Random, &[1, 3]);
        let c = counts(&b, 2, 40_000, |_| true);
        let share = c[1] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let b = Balancer::new(Algorithm::LeastConn, &[1, 1, 2]);
        let load = [3u32, 1, 3];
        // Per unit of weight: 3, 1, 1.5 → backend 1.
        assert_eq!(b.pick(|_| true, |i| load[i]), Some(1));
        let load = [3u32, 4, 3];
        // 3, 4, 1.5 → backend 2.
        assert_eq!(b.pick(|_| true, |i| load[i]), Some(2));
        // Ties rotate rather than always choosing the first.
        let seen: std::collections::HashSet<usize> = (0..6).map(|_| b.pick(|_| true, |_| 0).unwrap()).collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn p2c_never_picks_the_heavier_of_two() {
        let b = Balancer::new(Algorithm::P2c, &[1, 1]);
        let load = [10u32, 0];
        for _ in 0..200 {
            assert_eq!(b.pick(|_| true, |i| load[i]), Some(1));
        }
        // With three backends the most loaded one can only win when drawn twice, which the
        // distinct second draw forbids.
        let b = Balancer::new(Algorithm::P2c, &[1, 1, 1]);
        let load = [0u32, 5, 9];
        for _ in 0..500 {
            assert_ne!(b.pick(|_| true, |i| load[i]), Some(2));
        }
    }
}
