//! Each algorithm's distribution and weights, through the real balancer.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

async fn tally(addr: std::net::SocketAddr, n: usize) -> (HashMap<String, usize>, Vec<String>) {
    let mut c = Client::connect(addr).await;
    let mut counts = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..n {
        let r = c.get("/status?code=200").await;
        assert_eq!(r.status, 200);
        *counts.entry(r.backend()).or_insert(0) += 1;
        order.push(r.backend());
    }
    (counts, order)
}

#[tokio::test]
async fn round_robin_is_exact_and_smooth_with_weights() {
    let b = backends(3).await;
    let t = Tether::start(&config("round_robin", &[&b[0], &b[1], &b[2]], &[1, 2, 3], ""));
    let (counts, order) = tally(t.addr(), 60).await;
    assert_eq!(counts["app-1"], 10);
    assert_eq!(counts["app-2"], 20);
    assert_eq!(counts["app-3"], 30);
    // Smooth, as NGINX does it: the heaviest backend never gets three in a row.
    for w in order.windows(3) {
        assert!(!(w[0] == w[1] && w[1] == w[2]), "not smooth: {order:?}");
    }
}

#[tokio::test]
async fn round_robin_equal_weights_take_turns() {
    let b = backends(3).await;
    let t = Tether::start(&config("round_robin", &[&b[0], &b[1], &b[2]], &[], ""));
    let (_, order) = tally(t.addr(), 9).await;
    for w in order.chunks(3) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(w, ["app-1", "app-2", "app-3"], "{order:?}");
    }
}

fn within(counts: &HashMap<String, usize>, name: &str, total: usize, share: f64, tolerance: f64) {
    let got = *counts.get(name).unwrap_or(&0) as f64 / total as f64;
    assert!((got - share).abs() <= tolerance, "{name}: share {got:.3}, expected {share:.3} ± {tolerance}: {counts:?}");
}

#[tokio::test]
async fn random_follows_weights() {
    let b = backends(2).await;
    let t = Tether::start(&config("random", &[&b[0], &b[1]], &[1, 3], ""));
    let (counts, _) = tally(t.addr(), 2000).await;
    within(&counts, "app-1", 2000, 0.25, 0.05);
    within(&counts, "app-2", 2000, 0.75, 0.05);
}

#[tokio::test]
async fn p2c_follows_weights_when_idle() {
    let b = backends(2).await;
    let t = Tether::start(&config("p2c", &[&b[0], &b[1]], &[1, 3], ""));
    let (counts, _) = tally(t.addr(), 2000).await;
    within(&counts, "app-1", 2000, 0.25, 0.06);
    within(&counts, "app-2", 2000, 0.75, 0.06);
}

/// Sends `n` slow requests at once, each on its own connection, and counts where they went.
async fn concurrent_slow(t: &Tether, n: usize) -> HashMap<String, usize> {
    let (addr, admin) = (t.addr(), t.admin());
    let mut tasks = Vec::new();
    for i in 1..=n {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.get("/sleep?ms=2000").await.backend()
        }));
        // Let each request reach its backend before the next one is placed.
        let what = format!("{i} requests are in flight");
        wait_until_async(
            &what,
            Duration::from_secs(5),
            || async move { pool_in_flight(admin, "web").await >= i as u64 },
        )
        .await;
    }
    // All were in flight together: none had its answer before the last was placed.
    assert_eq!(pool_in_flight(admin, "web").await, n as u64, "placing the requests took too long");
    let mut counts = HashMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_balances_requests_in_flight_by_weight() {
    let b = backends(2).await;
    let t = Tether::start(&config("least_conn", &[&b[0], &b[1]], &[1, 3], ADMIN));
    let counts = concurrent_slow(&t, 20).await;
    assert_eq!(counts["app-1"], 5, "{counts:?}");
    assert_eq!(counts["app-2"], 15, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_avoids_the_busier_backend() {
    let b = backends(2).await;
    let t = Tether::start(&config("p2c", &[&b[0], &b[1]], &[], ADMIN));
    // With two backends the two choices are both backends: p2c then behaves like
    // least_conn, so concurrent requests split evenly, which random would rarely do.
    let counts = concurrent_slow(&t, 20).await;
    assert_eq!(counts["app-1"], 10, "{counts:?}");
    assert_eq!(counts["app-2"], 10, "{counts:?}");
}
