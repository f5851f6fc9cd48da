//! The per-request hot paths: balancer pick and affinity lookup-plus-pick.
//!
//! `cargo bench --bench hot_paths`. Everything a request would bring (headers, URI,
//! client address) is built outside the timed loop; each iteration is one request's
//! worth of work on a pool of three backends.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Uri};
use tether::affinity::token::{Key, KeyRing, Token};
use tether::balance::Balancer;
use tether::config::{self, Algorithm};
use tether::pool::Snapshot;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// A snapshot with one pool `p` of three backends and the given affinity section.
fn snapshot(affinity: &str) -> Snapshot {
    let src = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [\n\
         {{ name = \"a\", address = \"127.0.0.1:1\" }}, {{ name = \"b\", address = \"127.0.0.1:2\" }},\n\
         {{ name = \"c\", address = \"127.0.0.1:3\" }}]\n[pools.p.affinity]\n{affinity}\n"
    );
    Snapshot::build(Arc::new(config::parse(&src, "bench.toml").unwrap()), None)
}

fn now_ms() -> u64 {
    tether::time::unix_millis()
}

fn balancers(c: &mut Criterion) {
    let mut g = c.benchmark_group("balance");
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(30);
    for alg in [Algorithm::RoundRobin, Algorithm::LeastConn, Algorithm::P2c, Algorithm::Random] {
        let b = Balancer::new(alg, &[3, 2, 1]);
        let load = [4u32, 7, 1];
        g.bench_function(alg.as_str(), |bench| bench.iter(|| black_box(b.pick(|_| true, |i| load[i]))));
    }
    g.finish();
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("affinity_decide");
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(30);
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let uri = Uri::from_static("/cart?item=7");

    // Cookie: a valid token, as a browser sends it back.
    let s = snapshot(&format!("keys = [\"cookie\"]\n[pools.p.affinity.cookie]\nkeys = [\"{KEY}\"]"));
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let first = a.decide(pool, &HeaderMap::new(), &uri, ip, now_ms());
    let set = a.set_cookie(first.issue.as_ref().unwrap());
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_str(&format!("sid=abc; {}", set.split(';').next().unwrap())).unwrap());
    g.bench_function("cookie_hit", |bench| bench.iter(|| black_box(a.decide(pool, &h, &uri, ip, now_ms()))));
    g.bench_function("new_session_with_cookie", |bench| {
        let empty = HeaderMap::new();
        bench.iter(|| black_box(a.decide(pool, &empty, &uri, ip, now_ms())))
    });

    for mapping in ["hash", "table"] {
        let s = snapshot(&format!("keys = [\"header:x-user\"]\nmapping = \"{mapping}\""));
        let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("user-4711"));
        a.decide(pool, &h, &uri, ip, now_ms());
        g.bench_function(format!("header_{mapping}_hit"), |bench| {
            bench.iter(|| black_box(a.decide(pool, &h, &uri, ip, now_ms())))
        });
    }

    let s = snapshot("keys = [\"client_ip\"]");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let empty = HeaderMap::new();
    a.decide(pool, &empty, &uri, ip, now_ms());
    g.bench_function("client_ip_table_hit", |bench| {
        bench.iter(|| black_box(a.decide(pool, &empty, &uri, ip, now_ms())))
    });

    let s = snapshot("keys = [\"app_cookie:JSESSIONID\"]");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let mut resp = HeaderMap::new();
    resp.insert("set-cookie", HeaderValue::from_static("JSESSIONID=8F3A21C0; Path=/; HttpOnly"));
    a.learn(&resp, 1);
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_static("theme=dark; JSESSIONID=8F3A21C0"));
    g.bench_function("app_cookie_hit", |bench| bench.iter(|| black_box(a.decide(pool, &h, &uri, ip, now_ms()))));
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("token");
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(30);
    let ring = KeyRing::new([Key::from_base64(KEY).unwrap()]).unwrap();
    let t = Token { backend: 42, session: [7; 16], issued: 1_795_000_000, last_seen: 1_795_000_100 };
    let sealed = ring.seal(&t);
    g.bench_function("seal", |bench| bench.iter(|| black_box(ring.seal(black_box(&t)))));
    g.bench_function("open", |bench| bench.iter(|| black_box(ring.open(black_box(sealed.as_str())))));
    g.finish();
}

criterion_group!(benches, balancers, decide, tokens);
criterion_main!(benches);
