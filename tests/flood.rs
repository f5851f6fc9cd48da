//! A million distinct keys, sent as fast as this machine allows: client addresses (behind a
//! trusted proxy), header values and forged cookies. Tether's memory must stay under a
//! bound computed from the configured capacities, and clients with an established session
//! must keep their backend throughout.
//!
//! Not part of `cargo test` (it takes minutes in a debug build); CI runs it with
//! `cargo test --release --test flood -- --ignored --nocapture`. `TETHER_FLOOD_N` sets the
//! number of flood requests (default 1,000,000).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

/// Pin table capacity: each of the pool's two pin tables holds this many.
const CAPACITY: u64 = 20_000;
/// Live token sessions are tracked in a table of at least 100,000 entries.
const SESSIONS: u64 = 100_000;
/// Clients with an established session (a table-mapped `x-user` key seen twice).
const VIPS: usize = 50;
const CONNECTIONS: usize = 32;

fn request(addr: std::net::SocketAddr, headers: &[(&str, String)]) -> Request<Full<Bytes>> {
    let mut r = Request::get("/").header("host", addr.to_string());
    for (k, v) in headers {
        r = r.header(*k, v.as_str());
    }
    r.body(Full::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by CI with --release --ignored"]
async fn a_million_new_keys_cost_bounded_memory_and_no_established_session() {
    let n: u64 = std::env::var("TETHER_FLOOD_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let b = backends(3).await;
    let refs: Vec<&DemoBackend> = b.iter().collect();
    let cfg = format!(
        "{}\n[pools.web.affinity]\nkeys = [\"cookie\", \"header:x-user\", \"client_ip\"]\nmapping = \"table\"\n\
         [pools.web.affinity.table]\ncapacity = {CAPACITY}\n\
         [pools.web.affinity.cookie]\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\n",
        config("round_robin", &refs, &[], "[access_log]\nformat = \"off\"\n")
    )
    .replace("pool = \"web\"\n", "pool = \"web\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n");
    let t = Tether::start(&cfg);
    let addr = t.addr();

    // The established sessions: each VIP's key is seen twice before the flood.
    let mut c = Client::connect(addr).await;
    let mut homes = Vec::new();
    for i in 0..VIPS {
        let h = [("x-user", format!("vip-{i}"))];
        let home = c.request(request(addr, &h)).await.backend();
        assert_eq!(c.request(request(addr, &h)).await.backend(), home);
        homes.push(home);
    }
    let (baseline, _) = t.memory_kib();

    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..CONNECTIONS as u64)
        .map(|w| {
            let (sent, failed) = (sent.clone(), failed.clone());
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                let mut k = w;
                while k < n {
                    // One new key of each kind in turn; nothing else identifies the client.
                    let h = match k % 3 {
                        0 => ("x-forwarded-for", format!("10.{}.{}.{}", (k >> 16) & 255, (k >> 8) & 255, k & 255)),
                        1 => ("x-user", format!("flood-{k}")),
                        _ => ("cookie", format!("tether={}", forged(k))),
                    };
                    match c.try_request(request(addr, &[h])).await {
                        Ok(r) if r.status == 200 => {}
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            c = Client::connect(addr).await;
                        }
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    k += CONNECTIONS as u64;
                }
            })
        })
        .collect();

    // While the flood runs: every established session keeps its backend, and memory is
    // sampled.
    let started = Instant::now();
    let checker = {
        let (done, homes) = (done.clone(), homes.clone());
        tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let mut rounds = 0u64;
            while !done.load(Ordering::Relaxed) {
                for (i, home) in homes.iter().enumerate() {
                    let r = c.request(request(addr, &[("x-user", format!("vip-{i}"))])).await;
                    assert_eq!(&r.backend(), home, "vip-{i} lost its backend during the flood");
                }
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rounds
        })
    };
    for f in flooders {
        f.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let rounds = checker.await.unwrap();
    let elapsed = started.elapsed();
    let (rss, peak) = t.memory_kib();

    // Two pin tables and the session table at about 100 B an entry (160 allowed), the
    // flood's connections at 64 KiB each, and 16 MiB for allocator slack.
    let bound = baseline + (2 * CAPACITY + SESSIONS) * 160 / 1024 + CONNECTIONS as u64 * 64 + 16 * 1024;
    let total = sent.load(Ordering::Relaxed);
    println!(
        "flood: {total} requests in {:.1} s ({:.0}/s), {} failed; {rounds} rounds of {VIPS} established sessions all kept; \
         RSS baseline {baseline} KiB, after {rss} KiB, peak {peak} KiB, bound {bound} KiB",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(total, n);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "flood requests failed");
    assert!(rounds >= 1, "the established sessions were never checked during the flood");
    assert!(peak <= bound, "peak RSS {peak} KiB over the bound of {bound} KiB");
    // A new connection: the first one sat idle through the flood, which on a busy machine
    // can outlast `client_idle`. What is checked is the sessions, not that connection.
    let mut c = Client::connect(addr).await;
    for (i, home) in homes.iter().enumerate() {
        let r = c.request(request(addr, &[("x-user", format!("vip-{i}"))])).await;
        assert_eq!(&r.backend(), home, "vip-{i} lost its backend after the flood");
    }
}

/// A cookie value shaped like Tether's token (110 base64url characters) that does not open.
fn forged(k: u64) -> String {
    let mut s = format!("{k:020}");
    while s.len() < 110 {
        s.push_str("AbCdEfGhIj");
    }
    s.truncate(110);
    s
}
