//! The request path's hot spots must not touch the heap: sealing and opening tokens, and
//! `PoolAffinity::decide` when a request's session is found.
//!
//! The shared counting allocator counts allocations per thread (the test harness runs
//! tests on several threads, and only the current thread's calls are of interest). Each
//! decide case warms its path up once, then counts allocations across 1000 decisions.

#[path = "support/alloc.rs"]
mod alloc;
#[path = "support/fixture.rs"]
mod fixture;

use http::{HeaderMap, HeaderValue, Uri};
use tether::affinity::keys::http_set_cookies;
use tether::affinity::token::{Key, KeyRing, OpenError, Token, Version};
use tether::affinity::verdict::Verdict;
use tether::affinity::{H1Keys, HttpKeys, RequestKeys};
use tether::config::{KeySource, Mapping, TokenVersion};

use alloc::{allocations, allocations_during};
use fixture::{affinity, client, h1_request, header, parse_h1, Fixture};

const CALLS: usize = 1000;

fn now_ms() -> u64 {
    tether::time::unix_millis()
}

/// Warms the path up with one decision, then asserts that `CALLS` more allocate nothing
/// and all hit the same backend.
fn assert_hits_without_allocating(f: &Fixture, headers: &HeaderMap, uri: &Uri, now: u64) {
    assert_keys_hit_without_allocating(f, &HttpKeys::new(headers, uri), now);
}

/// The same for a request read through any [`RequestKeys`].
fn assert_keys_hit_without_allocating(f: &Fixture, request: &impl RequestKeys, now: u64) {
    let warm = f.decide_keys(request, client(), now);
    assert_eq!(warm.verdict, Verdict::Hit, "warm-up was not a hit: {warm:?}");
    assert!(warm.issue.is_none(), "warm-up wants a Set-Cookie: {warm:?}");
    let (n, same) = allocations_during(|| {
        let mut same = true;
        for _ in 0..CALLS {
            let d = f.decide_keys(request, client(), now);
            same &= d.verdict == Verdict::Hit && d.target == warm.target && d.issue.is_none();
            std::hint::black_box(&d);
        }
        same
    });
    assert!(same, "some decisions were not hits on the warm-up's backend without a Set-Cookie");
    assert_eq!(n, 0, "{n} allocations in {CALLS} decisions");
}

#[test]
fn counter_sees_this_threads_allocations() {
    let before = allocations();
    let v = std::hint::black_box(vec![0u8; 64]);
    assert!(allocations() - before >= 1 && v.len() == 64);
}

#[test]
fn cookie_hit_without_refresh() {
    let f = Fixture::new(fixture::cookie());
    let uri = Uri::from_static("/account");
    let now = now_ms();
    // A first request gets a token; the browser sends it back as `Cookie: tether=...`.
    let first = f.decide(&HeaderMap::new(), &uri, client(), now);
    assert_eq!(first.verdict, Verdict::New);
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, f.cookie_header(&first));
    // Same `now` as the issue: the token is fresh, so no refresh is due.
    assert_hits_without_allocating(&f, &h, &uri, now);
}

/// The same request as raw HTTP/1.1 bytes read by Tether's codec: Tether's cookie in the
/// second `Cookie` field, the target in absolute form. The head is parsed once; deciding
/// over it allocates nothing.
#[test]
fn cookie_hit_over_an_h1_head() {
    for version in [TokenVersion::V1, TokenVersion::V2] {
        let mut a = fixture::cookie();
        a.cookie.token_version = version;
        let f = Fixture::new(a);
        let now = now_ms();
        let first = f.decide(&HeaderMap::new(), &Uri::from_static("/account"), client(), now);
        let cookie = f.cookie_header(&first);
        let tether = cookie.to_str().unwrap().split("; ").nth(1).unwrap();
        let bytes = h1_request(
            "http://shop.example/account?x=1",
            &[("cookie", "lang=en"), ("Accept", "*/*"), ("COOKIE", &format!("a=1; {tether}"))],
        );
        let head = parse_h1(&bytes);
        assert_keys_hit_without_allocating(&f, &H1Keys::new(&bytes, &head), now);
    }
}

/// The same with a pool issuing version 2 tokens.
#[test]
fn cookie_hit_without_refresh_v2() {
    let mut a = fixture::cookie();
    a.cookie.token_version = TokenVersion::V2;
    let f = Fixture::new(a);
    let uri = Uri::from_static("/account");
    let now = now_ms();
    let first = f.decide(&HeaderMap::new(), &uri, client(), now);
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, f.cookie_header(&first));
    assert_eq!(h[http::header::COOKIE].len(), "lang=en; tether=".len() + Version::V2.str_len());
    assert_hits_without_allocating(&f, &h, &uri, now);
}

#[test]
fn seal_and_open_v2_do_not_allocate() {
    let old = KeyRing::new([Key::from_bytes([1; 32])]).unwrap();
    let ring = KeyRing::new([Key::from_bytes([2; 32]), Key::from_bytes([1; 32])]).unwrap();
    let token = Token { backend: 42, pool: Some(7), session: [7; 16], issued: 1_700_000_000, last_seen: 1_700_000_500 };
    let (n, sealed) = allocations_during(|| ring.seal_as(Version::V2, &token));
    assert_eq!(n, 0, "seal v2 allocated");
    assert_eq!(sealed.as_str().len(), Version::V2.str_len());
    let (n, opened) = allocations_during(|| ring.open(sealed.as_str()));
    assert_eq!((n, opened), (0, Ok(token)), "open v2");

    // The rotated-out key, a tampered token and a truncated one.
    let by_old = old.seal_as(Version::V2, &token);
    let (n, results) = allocations_during(|| {
        let a = ring.open(by_old.as_str());
        let mut buf = [0u8; 104];
        buf.copy_from_slice(by_old.as_str().as_bytes());
        buf[50] = if buf[50] == b'x' { b'y' } else { b'x' };
        let b = ring.open(std::str::from_utf8(&buf).unwrap());
        let c = ring.open(&by_old.as_str()[..100]);
        (a, b, c)
    });
    assert_eq!(n, 0, "open v2 (rotation / failure paths) allocated");
    assert_eq!(results, (Ok(token), Err(OpenError::Forged), Err(OpenError::Malformed)));

    let (n, ()) = allocations_during(|| {
        for i in 0..1000u64 {
            let t = Token { last_seen: token.last_seen + i, ..token };
            let s = ring.seal_as(Version::V2, &t);
            assert_eq!(ring.open(s.as_str()), Ok(t));
        }
    });
    assert_eq!(n, 0);
}

#[test]
fn header_hash_hit() {
    let f = Fixture::new(affinity(vec![KeySource::Header("x-user".into())], Mapping::Hash));
    assert_hits_without_allocating(&f, &header("x-user", "user-48213"), &Uri::from_static("/cart"), now_ms());
}

#[test]
fn header_table_hit() {
    let f = Fixture::new(affinity(vec![KeySource::Header("x-user".into())], Mapping::Table));
    let h = header("x-user", "user-48213");
    let uri = Uri::from_static("/cart");
    // The first request is placed and learned into the stick table.
    assert_eq!(f.decide(&h, &uri, client(), now_ms()).verdict, Verdict::New);
    assert_hits_without_allocating(&f, &h, &uri, now_ms());
}

#[test]
fn client_ip_table_hit() {
    let f = Fixture::new(affinity(vec![KeySource::ClientIp], Mapping::Table));
    let (h, uri) = (HeaderMap::new(), Uri::from_static("/"));
    assert_eq!(f.decide(&h, &uri, client(), now_ms()).verdict, Verdict::New);
    assert_hits_without_allocating(&f, &h, &uri, now_ms());
}

#[test]
fn app_cookie_hit() {
    let f = Fixture::new(affinity(vec![KeySource::AppCookie("JSESSIONID".into())], Mapping::Table));
    // Backend 2 answered with its session cookie; the balancer learns it.
    let mut response = HeaderMap::new();
    response.insert(http::header::SET_COOKIE, HeaderValue::from_static("JSESSIONID=abc123; Path=/"));
    f.affinity.learn(http_set_cookies(&response), 2);
    let h = header("cookie", "theme=dark; JSESSIONID=abc123");
    let uri = Uri::from_static("/shop/checkout");
    assert_eq!(f.decide(&h, &uri, client(), now_ms()).backend(), Some(2));
    assert_hits_without_allocating(&f, &h, &uri, now_ms());
}

#[test]
fn counter_sees_allocations_inside_decide() {
    // Control: learning many new keys grows the stick table's slab and index, which
    // allocates inside `decide`; the counter must see that.
    let f = Fixture::new(affinity(vec![KeySource::Header("x-user".into())], Mapping::Table));
    let uri = Uri::from_static("/");
    let requests: Vec<HeaderMap> = (0..CALLS).map(|i| header("x-user", &format!("user-{i}"))).collect();
    let (n, ()) = allocations_during(|| {
        for h in &requests {
            std::hint::black_box(f.decide(h, &uri, client(), now_ms()));
        }
    });
    assert!(n > 0, "the counter missed the stick table's growth");
}

#[test]
fn seal_and_open_do_not_allocate() {
    // Building the ring allocates (a Vec); everything after must not.
    let old = KeyRing::new([Key::from_bytes([1; 32])]).unwrap();
    let ring = KeyRing::new([Key::from_bytes([2; 32]), Key::from_bytes([1; 32])]).unwrap();
    let token = Token { backend: 42, pool: None, session: [7; 16], issued: 1_700_000_000, last_seen: 1_700_000_500 };

    // The very first seal also covers any lazy RNG initialisation.
    let (n, sealed) = allocations_during(|| ring.seal(&token));
    assert_eq!(n, 0, "seal allocated");
    let (n, opened) = allocations_during(|| ring.open(sealed.as_str()));
    assert_eq!(n, 0, "open allocated");
    assert_eq!(opened, Ok(token));

    // Opening with the second (rotated-out) key, and failure paths.
    let by_old = old.seal(&token);
    let mut tampered = *by_old.as_str().as_bytes().first().unwrap();
    tampered = if tampered == b'A' { b'B' } else { b'A' };
    let (n, results) = allocations_during(|| {
        let a = ring.open(by_old.as_str());
        let b = ring.open("short");
        let mut buf = [0u8; 110];
        buf.copy_from_slice(by_old.as_str().as_bytes());
        buf[50] = if buf[50] == b'x' { b'y' } else { b'x' };
        let c = ring.open(std::str::from_utf8(&buf).unwrap());
        buf.copy_from_slice(by_old.as_str().as_bytes());
        buf[0] = tampered;
        let d = ring.open(std::str::from_utf8(&buf).unwrap());
        (a, b, c, d)
    });
    assert_eq!(n, 0, "open (rotation / failure paths) allocated");
    assert_eq!(results.0, Ok(token));
    assert_eq!(results.1, Err(OpenError::Malformed));
    assert_eq!(results.2, Err(OpenError::Forged));
    assert!(results.3.is_err());

    // Many iterations, for good measure.
    let (n, ()) = allocations_during(|| {
        for i in 0..1000u64 {
            let t = Token { last_seen: token.last_seen + i, ..token };
            let s = ring.seal(&t);
            assert_eq!(ring.open(s.as_str()), Ok(t));
            assert!(t.check(t.last_seen, 60, Some(3600), 60).is_ok());
        }
    });
    assert_eq!(n, 0);

    // Sanity check that the counter works at all.
    let (n, v) = allocations_during(|| vec![1u8; 10]);
    assert!(n >= 1 && v.len() == 10);
}
