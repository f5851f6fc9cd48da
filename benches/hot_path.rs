//! Per-request hot paths, each on a pool of three backends.
//!
//! `cargo bench --bench hot_path`. Everything a request brings with it (headers, URI,
//! client address, a sealed cookie, a learned table entry) is prepared before the timed
//! loop; one iteration is the work for one request.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use http::{HeaderMap, HeaderValue, Uri};
use tether::affinity::hash::key_hash128;
use tether::affinity::stick_table::StickTable;
use tether::affinity::token::{KeyRing, Token};
use tether::affinity::Verdict;
use tether::balance::Balancer;
use tether::config::Algorithm;
use tether::pool::Snapshot;

const KEY: &str = "c2Vzc2lvbi1wZXJzaXN0ZW5jZS10ZXN0LWtleS0zMmI=";

/// A short group: 0.5 s warm-up, 2 s measurement, 30 samples.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    g
}

/// One pool `p` of three backends with the given `[pools.p.affinity]` body.
fn snapshot(affinity: &str) -> Snapshot {
    let src = format!(
        r#"[[listeners]]
bind = "127.0.0.1:0"
pool = "p"

[pools.p]
backends = [
  {{ name = "app-1", address = "10.0.0.1:8080" }},
  {{ name = "app-2", address = "10.0.0.2:8080" }},
  {{ name = "app-3", address = "10.0.0.3:8080" }},
]

[pools.p.affinity]
{affinity}
"#
    );
    Snapshot::build(Arc::new(tether::config::parse(&src, "bench.toml").expect("valid bench config")), None)
}

fn balance(c: &mut Criterion) {
    let mut g = group(c, "balance_pick");
    // What the proxy's closures read: health flags and requests in flight per backend.
    let healthy = [AtomicBool::new(true), AtomicBool::new(true), AtomicBool::new(true)];
    let in_flight = [AtomicU32::new(12), AtomicU32::new(9), AtomicU32::new(15)];
    for alg in [Algorithm::RoundRobin, Algorithm::LeastConn, Algorithm::P2c, Algorithm::Random] {
        let b = Balancer::new(alg, &[1, 1, 1]);
        g.bench_function(alg.as_str(), |bench| {
            bench.iter(|| {
                black_box(b.pick(|i| healthy[i].load(Ordering::Relaxed), |i| in_flight[i].load(Ordering::Relaxed)))
            })
        });
    }
    g.finish();
}

fn decide(c: &mut Criterion) {
    let mut g = group(c, "decide");
    let ip: IpAddr = "198.51.100.23".parse().unwrap();
    let uri = Uri::from_static("/shop/cart?item=1021");
    let no_headers = HeaderMap::new();
    let now = tether::time::unix_millis();

    // Cookie hit: the pool's own sealed token, as the browser sends it back.
    let s = snapshot(&format!("keys = [\"cookie\"]\n\n[pools.p.affinity.cookie]\nkeys = [\"{KEY}\"]"));
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let first = a.decide(pool, &no_headers, &uri, ip, now);
    let set_cookie = a.set_cookie(first.issue.as_ref().expect("a new session issues a token"));
    let pair = set_cookie.split(';').next().unwrap();
    assert!(pair.starts_with("tether="), "{set_cookie}");
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, HeaderValue::from_str(&format!("lang=en; {pair}")).unwrap());
    assert_eq!(a.decide(pool, &h, &uri, ip, now).verdict, Verdict::Hit);
    g.bench_function("cookie_hit", |bench| bench.iter(|| black_box(a.decide(pool, black_box(&h), &uri, ip, now))));
    // No key present: a new session is placed and a token issued (random session id).
    g.bench_function("new_session_cookie", |bench| {
        bench.iter(|| black_box(a.decide(pool, black_box(&no_headers), &uri, ip, now)))
    });
    drop(s);

    // Header key, both mappings; the table one is a hit after the first request learned it.
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("user-48213"));
    h.insert(http::header::ACCEPT, HeaderValue::from_static("text/html"));
    for mapping in ["hash", "table"] {
        let s = snapshot(&format!("keys = [\"header:x-user\"]\nmapping = \"{mapping}\""));
        let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
        a.decide(pool, &h, &uri, ip, now);
        assert_eq!(a.decide(pool, &h, &uri, ip, now).verdict, Verdict::Hit);
        g.bench_function(format!("header_{mapping}"), |bench| {
            bench.iter(|| black_box(a.decide(pool, black_box(&h), &uri, ip, now)))
        });
    }

    // Client address in table mode, learned by the first request.
    let s = snapshot("keys = [\"client_ip\"]\nmapping = \"table\"");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    a.decide(pool, &no_headers, &uri, ip, now);
    assert_eq!(a.decide(pool, &no_headers, &uri, ip, now).verdict, Verdict::Hit);
    g.bench_function("client_ip_table", |bench| {
        bench.iter(|| black_box(a.decide(pool, &no_headers, &uri, black_box(ip), now)))
    });

    // Application cookie learned from a backend's response.
    let s = snapshot("keys = [\"app_cookie:JSESSIONID\"]");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let mut response = HeaderMap::new();
    response.insert(http::header::SET_COOKIE, HeaderValue::from_static("JSESSIONID=abc123; Path=/"));
    a.learn(&response, 1);
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, HeaderValue::from_static("theme=dark; JSESSIONID=abc123"));
    let d = a.decide(pool, &h, &uri, ip, now);
    assert_eq!((d.verdict, d.backend), (Verdict::Hit, Some(1)));
    g.bench_function("app_cookie_hit", |bench| bench.iter(|| black_box(a.decide(pool, black_box(&h), &uri, ip, now))));

    // No key present in a header-keyed pool: placement by the pool's balancer only.
    let s = snapshot("keys = [\"header:x-user\"]\nmapping = \"table\"");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    assert_eq!(a.decide(pool, &no_headers, &uri, ip, now).verdict, Verdict::New);
    g.bench_function("new_session_placement", |bench| {
        bench.iter(|| black_box(a.decide(pool, black_box(&no_headers), &uri, ip, now)))
    });
    g.finish();
}

fn token(c: &mut Criterion) {
    let mut g = group(c, "token");
    let ring = KeyRing::from_base64([KEY]).unwrap();
    let now = tether::time::unix_millis() / 1000;
    let t = Token::issue(0x9e37_79b9_7f4a_7c15, now).unwrap();
    let sealed = ring.seal(&t);
    assert_eq!(ring.open(sealed.as_str()), Ok(t));
    g.bench_function("seal", |bench| bench.iter(|| black_box(ring.seal(black_box(&t)))));
    g.bench_function("open", |bench| bench.iter(|| black_box(ring.open(black_box(sealed.as_str())))));
    g.finish();
}

fn stick_table(c: &mut Criterion) {
    let mut g = group(c, "stick_table");
    // The defaults a pool gets: 100 000 entries, 30 min idle, 16 shards; 10 000 learned users.
    let table = StickTable::new(100_000, Duration::from_secs(30 * 60), 16);
    let t0 = table.now();
    for i in 0..10_000u64 {
        table.insert(key_hash128("p", "header", format!("user-{i}").as_bytes()), i % 3, t0);
    }
    let key = key_hash128("p", "header", b"user-4821");
    assert_eq!(table.get(key, table.now()), Some(4821 % 3));
    let now = table.now();
    g.bench_function("get_hit", |bench| bench.iter(|| black_box(table.get(black_box(key), now))));
    g.finish();
}

criterion_group!(benches, balance, decide, token, stick_table);
criterion_main!(benches);
