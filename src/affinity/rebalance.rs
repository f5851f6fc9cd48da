//! Rebalancing idle sessions (`[pools.NAME.affinity.rebalance]`): what a pool needs to move
//! a session off a backend that holds more than its share, and only a session that is idle.
//!
//! [`Activity`] knows, per session identity ([`Decision::identity`](super::Decision::identity)),
//! how many of its requests are in flight (an open tunnel is a request that has not ended)
//! and when the last one ended, to the millisecond: the token's last-seen stamp is written
//! only every quarter of the cookie's idle timeout, so it cannot tell a session idle for a
//! minute from one that sent a request a second ago. An [`Active`] guard, held by the data
//! path for the life of a request, is what counts a request in flight; its `Drop` ends it,
//! so a request cannot leak an in-flight count however it ends.
//!
//! [`Bucket`] bounds the rate of moves. Which session moves where is decided in
//! [`PoolAffinity::decide`](super::PoolAffinity::decide); this module only answers "is this
//! session idle" and "may one more move happen now". A pool without rebalancing has neither
//! (no table, no lock on its requests).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Shards of the activity table: enough that two workers rarely wait on each other.
const SHARDS: usize = 16;

/// A session's requests as [`Activity`] sees them.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Unix milliseconds when its last request began or ended.
    last_ms: u64,
    /// Requests (and tunnels) of the session not yet ended.
    in_flight: u32,
}

/// The keys are session ids and key hashes, already uniformly random: their low 64 bits
/// are a hash as good as any, and cheaper than SipHash.
#[derive(Default)]
struct LowBits(u64);

impl Hasher for LowBits {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

type Map = HashMap<u128, Seen, BuildHasherDefault<LowBits>>;

#[derive(Debug, Default)]
struct Shard {
    map: Map,
    /// When the shard last dropped its idle entries because it was full.
    swept_ms: u64,
}

/// The precise activity of a pool's sessions, bounded in memory: at most `capacity`
/// sessions are tracked, and a session idle for `idle` with nothing in flight is dropped
/// when room is needed (its absence then means "idle", which it is).
#[derive(Debug)]
pub struct Activity {
    shards: [Mutex<Shard>; SHARDS],
    per_shard: usize,
    /// Unix milliseconds since which every request of the pool has been seen; 0 until the
    /// first. A session absent from the table is idle only once `idle` has passed since.
    since_ms: AtomicU64,
    /// Requests in flight that a full shard turned away without recording: while there
    /// are any, a session absent from the table may be one of theirs.
    unrecorded: AtomicU64,
    /// When (Unix milliseconds) the last unrecorded request ended: a session absent from
    /// the table may have been active until then.
    blind_until_ms: AtomicU64,
}

impl Activity {
    pub fn new(capacity: usize) -> Activity {
        Activity {
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            since_ms: AtomicU64::new(0),
            unrecorded: AtomicU64::new(0),
            blind_until_ms: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u128) -> MutexGuard<'_, Shard> {
        self.shards[(id >> 124) as usize % SHARDS].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The first time the table is used, it starts watching.
    fn watch(&self, now_ms: u64) {
        if self.since_ms.load(Ordering::Relaxed) == 0 {
            let _ = self.since_ms.compare_exchange(0, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// A request of session `id` begins at `now_ms`; whether it was recorded. Give it
    /// back to [`end`](Self::end) with that answer.
    pub fn begin(&self, id: u128, now_ms: u64, idle: Duration) -> bool {
        self.watch(now_ms);
        let mut shard = self.shard(id);
        if let Some(seen) = shard.map.get_mut(&id) {
            seen.in_flight += 1;
            seen.last_ms = seen.last_ms.max(now_ms);
            return true;
        }
        if shard.map.len() >= self.per_shard && !self.make_room(&mut shard, now_ms, idle) {
            // Not recorded: any session the table does not know may be this one, active
            // while it is in flight and for `idle` after it ends.
            self.unrecorded.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        shard.map.insert(id, Seen { last_ms: now_ms, in_flight: 1 });
        true
    }

    /// A request of session `id` ended at `now_ms`; `recorded` is what
    /// [`begin`](Self::begin) answered.
    pub fn end(&self, id: u128, now_ms: u64, recorded: bool) {
        if !recorded {
            self.blind_until_ms.fetch_max(now_ms, Ordering::Relaxed);
            self.unrecorded.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut shard = self.shard(id);
        if let Some(seen) = shard.map.get_mut(&id) {
            seen.in_flight = seen.in_flight.saturating_sub(1);
            seen.last_ms = seen.last_ms.max(now_ms);
        }
    }

    /// Drops the shard's idle entries, at most once per `idle / 4` (a full shard of busy
    /// sessions must not cost a scan per request). Whether there is room now.
    fn make_room(&self, shard: &mut Shard, now_ms: u64, idle: Duration) -> bool {
        if now_ms.saturating_sub(shard.swept_ms) >= idle_ms(idle) / 4 {
            shard.swept_ms = now_ms;
            shard.map.retain(|_, s| s.in_flight > 0 || now_ms.saturating_sub(s.last_ms) < idle_ms(idle));
        }
        shard.map.len() < self.per_shard
    }

    /// How long (in milliseconds) session `id` has been idle at `now_ms`, if it has nothing
    /// in flight and no request within `idle`: `None` for an active session. A session the
    /// table does not know is idle only if the table has watched for `idle` and recorded
    /// every request since (the answer is then how long it has watched: a lower bound).
    pub fn idle_for(&self, id: u128, now_ms: u64, idle: Duration) -> Option<u64> {
        self.watch(now_ms);
        let idle = idle_ms(idle);
        if let Some(seen) = self.shard(id).map.get(&id) {
            let quiet = now_ms.saturating_sub(seen.last_ms);
            return (seen.in_flight == 0 && quiet >= idle).then_some(quiet);
        }
        let since = self.since_ms.load(Ordering::Relaxed).max(self.blind_until_ms.load(Ordering::Relaxed));
        let quiet = now_ms.checked_sub(since)?;
        (quiet >= idle && self.unrecorded.load(Ordering::Relaxed) == 0).then_some(quiet)
    }

    /// How many sessions are tracked.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn idle_ms(idle: Duration) -> u64 {
    idle.as_millis() as u64
}

/// One request of a session, counted in flight in its pool's [`Activity`] until dropped.
#[derive(Debug)]
pub struct Active {
    activity: Arc<Activity>,
    id: u128,
    recorded: bool,
}

impl Active {
    /// Begins a request of session `id` (see [`Activity::begin`]).
    pub fn begin(activity: &Arc<Activity>, id: u128, now_ms: u64, idle: Duration) -> Active {
        let recorded = activity.begin(id, now_ms, idle);
        Active { activity: activity.clone(), id, recorded }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.activity.end(self.id, crate::time::unix_millis(), self.recorded);
    }
}

/// A token bucket: at most `rate` moves a second, and a burst of at most `rate`.
#[derive(Debug, Default)]
pub struct Bucket {
    inner: Mutex<BucketState>,
}

#[derive(Debug, Default)]
struct BucketState {
    /// Tokens in thousandths, so a slow rate refills without floating point.
    milli_tokens: u64,
    refilled_ms: u64,
    started: bool,
}

impl Bucket {
    /// Takes a token if there is one at `now_ms`, refilling at `rate` a second.
    pub fn take(&self, rate: u32, now_ms: u64) -> bool {
        let mut b = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let full = u64::from(rate) * 1000;
        if !b.started {
            *b = BucketState { milli_tokens: full, refilled_ms: now_ms, started: true };
        }
        let elapsed = now_ms.saturating_sub(b.refilled_ms);
        b.milli_tokens = (b.milli_tokens + elapsed.saturating_mul(u64::from(rate))).min(full);
        b.refilled_ms = b.refilled_ms.max(now_ms);
        if b.milli_tokens < 1000 {
            return false;
        }
        b.milli_tokens -= 1000;
        true
    }
}

/// A pool's rebalancing state, carried across reloads while the pool keeps rebalancing on.
#[derive(Debug)]
pub struct Rebalancer {
    pub activity: Arc<Activity>,
    pub bucket: Bucket,
    /// When the last move was logged (Unix milliseconds): one line a second at most.
    logged_ms: AtomicU64,
}

impl Rebalancer {
    pub fn new(capacity: usize) -> Rebalancer {
        Rebalancer {
            activity: Arc::new(Activity::new(capacity)),
            bucket: Bucket::default(),
            logged_ms: AtomicU64::new(0),
        }
    }

    /// Whether a move at `now_ms` may be logged: the first of each second. Moves are rate
    /// bound anyway; this keeps a high `max_per_second` from flooding the log.
    pub fn may_log(&self, now_ms: u64) -> bool {
        let last = self.logged_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= 1000
            && self.logged_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_millis(300);

    #[test]
    fn a_session_is_idle_only_with_nothing_in_flight_and_no_request_within_idle() {
        let a = Activity::new(1000);
        assert!(a.begin(7, 10_000, IDLE));
        // In flight: never idle, however long it takes.
        assert_eq!(a.idle_for(7, 10_000, IDLE), None);
        assert_eq!(a.idle_for(7, 60_000, IDLE), None);
        a.end(7, 60_000, true);
        assert_eq!(a.idle_for(7, 60_299, IDLE), None);
        assert_eq!(a.idle_for(7, 60_300, IDLE), Some(300));
        // Two requests at once: idle only after both ended.
        a.begin(7, 61_000, IDLE);
        a.begin(7, 61_000, IDLE);
        a.end(7, 61_100, true);
        assert_eq!(a.idle_for(7, 70_000, IDLE), None);
        a.end(7, 61_200, true);
        assert_eq!(a.idle_for(7, 70_000, IDLE), Some(8_800));
    }

    #[test]
    fn an_unknown_session_is_idle_only_after_the_table_watched_for_idle() {
        let a = Activity::new(1000);
        assert_eq!(a.idle_for(1, 5_000, IDLE), None, "the table has only started watching");
        assert_eq!(a.idle_for(1, 5_299, IDLE), None);
        assert_eq!(a.idle_for(1, 5_300, IDLE), Some(300));
    }

    #[test]
    fn a_full_table_makes_room_from_idle_sessions_and_is_blind_while_it_cannot() {
        // One entry per shard: sessions 0 and 1 share shard 0 (the top bits pick it).
        let a = Activity::new(SHARDS);
        assert!(a.begin(0, 1_000, IDLE));
        assert!(!a.begin(1, 1_000, IDLE), "no room: session 0 is in flight");
        // An unrecorded session in flight: any unknown session may be it.
        assert_eq!(a.idle_for(2, 9_000, IDLE), None);
        a.end(1, 9_000, false);
        assert_eq!(a.idle_for(2, 9_299, IDLE), None);
        assert_eq!(a.idle_for(2, 9_300, IDLE), Some(300));
        // Once session 0 has been idle for `idle`, it makes room for another.
        a.end(0, 9_000, true);
        assert!(a.begin(1, 9_400, IDLE));
        assert_eq!(a.len(), 1);
        assert_eq!(a.idle_for(1, 9_500, IDLE), None);
    }

    #[test]
    fn the_bucket_allows_a_burst_of_rate_then_rate_a_second() {
        let b = Bucket::default();
        let taken = (0..10).filter(|_| b.take(2, 1_000)).count();
        assert_eq!(taken, 2);
        assert!(!b.take(2, 1_499));
        assert!(b.take(2, 1_500));
        assert!(!b.take(2, 1_500));
        // A long pause refills no more than the burst.
        let taken = (0..10).filter(|_| b.take(2, 100_000)).count();
        assert_eq!(taken, 2);
    }

    #[test]
    fn the_guard_ends_its_request_when_dropped() {
        let a = Arc::new(Activity::new(100));
        let now = crate::time::unix_millis();
        let guard = Active::begin(&a, 9, now, IDLE);
        assert_eq!(a.idle_for(9, now + 10_000, IDLE), None);
        drop(guard);
        assert!(a.idle_for(9, now + 10_000, IDLE).is_some());
    }
}
