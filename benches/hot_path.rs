//! Per-request hot paths, each on a pool of three backends.
//!
//! `cargo bench --bench hot_path`. Everything a request brings with it (headers, URI,
//! client address, a sealed cookie, a learned table entry) is prepared before the timed
//! loop; one iteration is the work for one request. The pools come from the same fixture
//! as the allocation tests (`tests/support/fixture.rs`).

#[path = "../tests/support/alloc.rs"]
mod alloc;
#[path = "../tests/support/fixture.rs"]
mod fixture;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use http::{HeaderMap, HeaderValue, Uri};
use tether::affinity::hash::key_hash128;
use tether::affinity::keys::http_set_cookies;
use tether::affinity::stick_table::StickTable;
use tether::affinity::token::{KeyRing, Token, Version};
use tether::affinity::verdict::Verdict;
use tether::affinity::H1Keys;
use tether::balance::Balancer;
use tether::config::{Algorithm, KeySource, Mapping, TokenVersion};

use fixture::{affinity, client, h1_request, header, parse_h1, Fixture, KEY};

/// A short group: 0.5 s warm-up, 2 s measurement, 30 samples.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    g
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
    let ip = client();
    let uri = Uri::from_static("/shop/cart?item=1021");
    let no_headers = HeaderMap::new();
    let now = tether::time::unix_millis();

    // Cookie hit: the pool's own sealed token, as the browser sends it back.
    let f = Fixture::new(fixture::cookie());
    let first = f.decide(&no_headers, &uri, ip, now);
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, f.cookie_header(&first));
    assert_hit_allocates_nothing(&f, &h, &uri, now);
    g.bench_function("cookie_hit", |bench| bench.iter(|| black_box(f.decide(black_box(&h), &uri, ip, now))));
    // The same request as a head of Tether's HTTP/1 codec (parsed once, before the loop).
    let bytes = h1_request(&uri.to_string(), &[("Cookie", h[http::header::COOKIE].to_str().unwrap())]);
    let head = parse_h1(&bytes);
    let keys = H1Keys::new(&bytes, &head);
    assert_eq!(alloc::allocations_during(|| f.decide_keys(&keys, ip, now)).0, 0);
    g.bench_function("cookie_hit_h1", |bench| bench.iter(|| black_box(f.decide_keys(black_box(&keys), ip, now))));
    // The same with a pool issuing version 2 tokens (AES-256-GCM-SIV).
    let mut v2 = fixture::cookie();
    v2.cookie.token_version = TokenVersion::V2;
    let f2 = Fixture::new(v2);
    let mut h2 = HeaderMap::new();
    h2.insert(http::header::COOKIE, f2.cookie_header(&f2.decide(&no_headers, &uri, ip, now)));
    assert_eq!(h2[http::header::COOKIE].len(), "lang=en; tether=".len() + Version::V2.str_len());
    assert_hit_allocates_nothing(&f2, &h2, &uri, now);
    g.bench_function("cookie_hit_v2", |bench| bench.iter(|| black_box(f2.decide(black_box(&h2), &uri, ip, now))));
    // A forged token (one character of a real one changed, so it still decodes and the
    // cipher has to refuse it): counted `invalid`, and the client gets a new session and
    // token. What a flood of forged cookies costs per request.
    let forged = forge(h2[http::header::COOKIE].to_str().unwrap());
    let mut hf = HeaderMap::new();
    hf.insert(http::header::COOKIE, HeaderValue::from_str(&forged).unwrap());
    assert_eq!(f2.decide(&hf, &uri, ip, now).verdict, Verdict::Invalid);
    g.bench_function("cookie_forged_v2", |bench| bench.iter(|| black_box(f2.decide(black_box(&hf), &uri, ip, now))));
    // No key present: a new session is placed and a token issued (random session id).
    g.bench_function("new_session_cookie", |bench| {
        bench.iter(|| black_box(f.decide(black_box(&no_headers), &uri, ip, now)))
    });

    // Header key, both mappings; the table one is a hit after the first request learned it.
    let mut h = header("x-user", "user-48213");
    h.insert(http::header::ACCEPT, HeaderValue::from_static("text/html"));
    for mapping in [Mapping::Hash, Mapping::Table] {
        let f = Fixture::new(affinity(vec![KeySource::Header("x-user".into())], mapping));
        f.decide(&h, &uri, ip, now);
        assert_hit_allocates_nothing(&f, &h, &uri, now);
        let name = if mapping == Mapping::Hash { "header_hash" } else { "header_table" };
        g.bench_function(name, |bench| bench.iter(|| black_box(f.decide(black_box(&h), &uri, ip, now))));
    }

    // Client address in table mode, learned by the first request.
    let f = Fixture::new(affinity(vec![KeySource::ClientIp], Mapping::Table));
    f.decide(&no_headers, &uri, ip, now);
    assert_hit_allocates_nothing(&f, &no_headers, &uri, now);
    g.bench_function("client_ip_table", |bench| {
        bench.iter(|| black_box(f.decide(&no_headers, &uri, black_box(ip), now)))
    });

    // Application cookie learned from a backend's response.
    let f = Fixture::new(affinity(vec![KeySource::AppCookie("JSESSIONID".into())], Mapping::Table));
    let mut response = HeaderMap::new();
    response.insert(http::header::SET_COOKIE, HeaderValue::from_static("JSESSIONID=abc123; Path=/"));
    f.affinity.learn(http_set_cookies(&response), 1);
    let h = header("cookie", "theme=dark; JSESSIONID=abc123");
    assert_eq!(f.decide(&h, &uri, ip, now).backend(), Some(1));
    assert_hit_allocates_nothing(&f, &h, &uri, now);
    g.bench_function("app_cookie_hit", |bench| bench.iter(|| black_box(f.decide(black_box(&h), &uri, ip, now))));

    // No key present in a header-keyed pool: placement by the pool's balancer only.
    let f = Fixture::new(affinity(vec![KeySource::Header("x-user".into())], Mapping::Table));
    assert_eq!(f.decide(&no_headers, &uri, ip, now).verdict, Verdict::New);
    g.bench_function("new_session_placement", |bench| {
        bench.iter(|| black_box(f.decide(black_box(&no_headers), &uri, ip, now)))
    });
    g.finish();
}

/// `text` with one base64 character near its end changed (`A` to `B`, anything else to
/// `A`): still well-formed, no longer what was sealed.
fn forge(text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    let i = b.len() - 5;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

/// What is timed as a hit must be one, and allocate nothing (the allocation tests' claim,
/// checked again on the benches' own inputs).
fn assert_hit_allocates_nothing(f: &Fixture, h: &HeaderMap, uri: &Uri, now: u64) {
    let (n, d) = alloc::allocations_during(|| f.decide(h, uri, client(), now));
    assert_eq!((d.verdict, n), (Verdict::Hit, 0), "{d:?}");
}

fn token(c: &mut Criterion) {
    let mut g = group(c, "token");
    let ring = KeyRing::from_base64([KEY]).unwrap();
    let now = tether::time::unix_millis() / 1000;
    let t = Token { pool: Some(0x5bd1_e995_0000_0001), ..Token::issue(0x9e37_79b9_7f4a_7c15, now).unwrap() };
    for (version, name) in [(Version::V1, "v1"), (Version::V2, "v2")] {
        let sealed = ring.seal_as(version, &t);
        let want = if version == Version::V1 { Token { pool: None, ..t } } else { t };
        assert_eq!(ring.open(sealed.as_str()), Ok(want));
        g.bench_function(format!("seal_{name}"), |bench| {
            bench.iter(|| black_box(ring.seal_as(version, black_box(&t))))
        });
        g.bench_function(format!("open_{name}"), |bench| {
            bench.iter(|| black_box(ring.open(black_box(sealed.as_str()))))
        });
        // A miss of the open cache: 16384 distinct sealed tokens, opened in turn (sixteen
        // a set on average, which the 2-way cache visited in this order all but never hits).
        let many: Vec<String> = (0..16_384u64)
            .map(|i| ring.seal_as(version, &Token { backend: t.backend ^ i, ..t }).as_str().to_owned())
            .collect();
        let mut next = 0;
        g.bench_function(format!("open_miss_{name}"), |bench| {
            bench.iter(|| {
                next = (next + 1) % many.len();
                black_box(ring.open(black_box(&many[next])))
            })
        });
        // A forged token: the open that fails (a miss of the open cache, every time).
        let forged = forge(sealed.as_str());
        assert!(ring.open(&forged).is_err());
        g.bench_function(format!("open_forged_{name}"), |bench| {
            bench.iter(|| black_box(ring.open(black_box(&forged))))
        });
    }
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
