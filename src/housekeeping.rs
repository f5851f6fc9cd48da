//! Once a second, off the request path: each part's periodic bookkeeping, called in one
//! place. Expired affinity entries go and every backend's live sessions are recounted
//! (what bounded load and drains go by), traffic splits' expired keys go, request rates
//! are sampled, retry budgets are topped up, the progress of every drain is logged when
//! it changes, and relays to a backend whose drain is over (`drain_timeout`) are told to
//! close.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::AdminState;
use crate::pool::Pool;
use crate::state::Shared;

/// Runs the once-a-second sweep until shutdown.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut drains = DrainReport::default();
    // The first tick a second from now, not at once: a rate over no time is meaningless.
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let snapshot = shared.snapshot.load_full();
        let elapsed = last_tick.elapsed();
        last_tick = Instant::now();
        for pool in &snapshot.pools {
            pool.retry_budget.refill();
            for b in &pool.backends {
                b.metrics.sample_rate(b.requests.load(std::sync::atomic::Ordering::Relaxed), elapsed);
            }
            if let Some(a) = &pool.affinity {
                a.recount_sessions(&pool.backends);
                drains.report(pool);
                if let Some(t) = a.cfg.drain_timeout {
                    let now_ms = crate::time::unix_millis();
                    for b in pool.backends.iter().filter(|b| b.drain_over(t, now_ms)) {
                        // Relays still open to it close (those that opened since the last
                        // sweep included).
                        b.cut.notify_waiters();
                    }
                }
            }
        }
        for split in snapshot.listeners.iter().flat_map(|l| l.splits()) {
            split.sweep();
        }
    }
}

/// The session count last logged for each draining backend.
#[derive(Default)]
struct DrainReport {
    reported: HashMap<(Arc<str>, String), u32>,
}

impl DrainReport {
    fn report(&mut self, pool: &Pool) {
        for b in &pool.backends {
            let n = b.sessions();
            let key = (pool.name.clone(), b.name.clone());
            if b.admin_state() != AdminState::Draining {
                self.reported.remove(&key);
            } else if self.reported.get(&key) != Some(&n) {
                tracing::info!(pool = %pool.name, backend = %b.name, "draining: {n} sessions still pinned");
                self.reported.insert(key, n);
            }
        }
    }
}
