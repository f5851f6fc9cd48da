//! The retry budget: retries may be at most a share of a pool's requests, so that in an
//! outage they cannot multiply the load.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Retries may be at most a share of requests, so that in an outage they cannot multiply
/// the load. Every request deposits its share of a retry; a retry withdraws a whole one.
#[derive(Debug)]
pub struct RetryBudget {
    /// In thousandths of a retry.
    balance: AtomicI64,
    /// Requests moved to another backend, for metrics.
    pub retries: AtomicU64,
}

/// A burst of retries always allowed, so a quiet pool can still retry.
const BUDGET_FLOOR: i64 = 10_000;
const BUDGET_CAP: i64 = 1_000_000;

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { balance: AtomicI64::new(BUDGET_FLOOR), retries: AtomicU64::new(0) }
    }
}

impl RetryBudget {
    pub fn deposit(&self, share: f64) {
        let add = (share * 1000.0) as i64;
        if add > 0 && self.balance.load(Ordering::Relaxed) < BUDGET_CAP {
            self.balance.fetch_add(add, Ordering::Relaxed);
        }
    }

    pub fn withdraw(&self) -> bool {
        let ok = self.balance.fetch_sub(1000, Ordering::Relaxed) >= 1000;
        if !ok {
            self.balance.fetch_add(1000, Ordering::Relaxed);
        }
        ok
    }

    /// Tops the balance up to the floor, once a second.
    pub fn refill(&self) {
        let b = self.balance.load(Ordering::Relaxed);
        if b < BUDGET_FLOOR {
            self.balance.fetch_add((BUDGET_FLOOR - b) / 10, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_the_share_and_a_floor() {
        let b = RetryBudget { balance: AtomicI64::new(0), retries: AtomicU64::new(0) };
        for _ in 0..100 {
            b.deposit(0.2);
        }
        let mut granted = 0;
        while b.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 20);
        let b = RetryBudget::default();
        let mut granted = 0;
        while b.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 10);
    }
}
