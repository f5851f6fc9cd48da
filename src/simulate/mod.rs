//! `tether simulate`: what happens to a pool's sessions if a backend fails, is drained,
//! added or removed, under each persistence strategy, answered by running Tether's own
//! policy code (`affinity::PoolAffinity::decide`, `failover`, `learn`,
//! `recount_sessions`, `balance::Balancer::pick`, the `Backend` health state machine and
//! admin states, `pool::Snapshot` reloads) over synthetic clients, or over the requests of
//! Tether's JSON access log replayed by session pseudonym, in simulated time.
//!
//! [`scenario`] reads the scenario file (its pools through `config`, so a strategy is what
//! Tether would run), [`replay`] streams an access log as requests, [`engine`] runs one
//! strategy, [`report`] renders the numbers as a terminal table and a self-contained HTML
//! page. A run is single-threaded and
//! reproducible: the same scenario and seed give the same report, bit for bit.
//!
//! A strategy is one pool, or a traffic split between pools (a route's `split`, named
//! by its `name`): then Tether's `split::Split::choose` finds each request's pool before
//! that pool's `decide`, on the simulator's clock, and the report counts per pool.
//!
//! It sits above the policy layer and below the entry points; it never touches sockets,
//! the data path (`proxy`, `listener`, `upstream`) or a running server.

pub mod engine;
pub mod replay;
pub mod report;
pub mod scenario;

pub use report::Report;
pub use scenario::Scenario;

/// Runs every strategy of `sc` with `seed` (the scenario's own when `None`), one after the
/// other on this thread, calling `progress(done, total)` in simulated milliseconds over all
/// strategies.
pub fn run(sc: &Scenario, seed: Option<u64>, progress: &mut dyn FnMut(u64, u64)) -> Report {
    let seed = seed.unwrap_or(sc.seed);
    let total = sc.duration_ms * sc.strategies.len() as u64;
    let strategies = sc
        .strategies
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let base = sc.duration_ms * k as u64;
            engine::run(sc, s, seed, &mut |t| progress(base + t, total))
        })
        .collect();
    Report {
        file: sc.file.clone(),
        seed,
        clients: sc.workload.clients,
        replay: sc.workload.replay.as_ref().map(|r| match &r.pool {
            Some(p) => format!("{} (pool {p})", r.shown),
            None => format!("{} (every pool)", r.shown),
        }),
        duration_ms: sc.duration_ms,
        strategies,
    }
}
