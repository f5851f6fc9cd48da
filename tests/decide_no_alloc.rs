//! `PoolAffinity::decide` must not touch the heap when a request's session is found.
//!
//! A counting global allocator counts allocations per thread (the test harness runs
//! tests on several threads, and only the current thread's calls are of interest).
//! Each case warms its path up once, then counts allocations across 1000 decisions.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Uri};
use tether::affinity::{Decision, Verdict};
use tether::pool::Snapshot;

struct PerThreadCounter;

thread_local! {
    // A const initialiser with no destructor: reading it never allocates or registers anything.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: the allocator may run while this thread's locals are being torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for PerThreadCounter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: PerThreadCounter = PerThreadCounter;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const KEY: &str = "c2Vzc2lvbi1wZXJzaXN0ZW5jZS10ZXN0LWtleS0zMmI=";
const CALLS: usize = 1000;

/// One pool `p` of three backends with the given `[pools.p.affinity]` body.
fn snapshot(affinity: &str) -> Snapshot {
    let src = format!(
        r#"[[listeners]]
bind = "127.0.0.1:0"
pool = "p"

[pools.p]
backends = [
  {{ name = "app-1", address = "127.0.0.1:9001" }},
  {{ name = "app-2", address = "127.0.0.1:9002" }},
  {{ name = "app-3", address = "127.0.0.1:9003" }},
]

[pools.p.affinity]
{affinity}
"#
    );
    Snapshot::build(Arc::new(tether::config::parse(&src, "no_alloc.toml").expect("valid config")), None)
}

fn client() -> IpAddr {
    "198.51.100.23".parse().unwrap()
}

fn now_ms() -> u64 {
    tether::time::unix_millis()
}

/// Warms the path up with one decision, then asserts that `CALLS` more allocate nothing
/// and all hit the same backend.
fn assert_hits_without_allocating(s: &Snapshot, headers: &HeaderMap, uri: &Uri, ip: IpAddr, now: u64) {
    let pool = &s.pools[0];
    let a = pool.affinity.as_ref().expect("pool has affinity");
    let warm = a.decide(pool, headers, uri, ip, now);
    assert_eq!(warm.verdict, Verdict::Hit, "warm-up was not a hit: {warm:?}");
    assert!(warm.issue.is_none(), "warm-up wants a Set-Cookie: {warm:?}");

    let mut same = true;
    let before = allocations();
    for _ in 0..CALLS {
        let d: Decision = a.decide(pool, headers, uri, ip, now);
        same &= d.verdict == Verdict::Hit && d.backend == warm.backend && d.issue.is_none();
        std::hint::black_box(&d);
    }
    let n = allocations() - before;
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
    let s = snapshot(&format!("keys = [\"cookie\"]\n\n[pools.p.affinity.cookie]\nkeys = [\"{KEY}\"]"));
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let uri = Uri::from_static("/account");
    let now = now_ms();
    // A first request gets a token; the browser sends it back as `Cookie: tether=...`.
    let first = a.decide(pool, &HeaderMap::new(), &uri, client(), now);
    assert_eq!(first.verdict, Verdict::New);
    let set_cookie = a.set_cookie(first.issue.as_ref().expect("a new cookie session issues a token"));
    let pair = set_cookie.split(';').next().unwrap();
    assert!(pair.starts_with("tether="), "{set_cookie}");
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, HeaderValue::from_str(&format!("lang=en; {pair}")).unwrap());
    // Same `now` as the issue: the token is fresh, so no refresh is due.
    assert_hits_without_allocating(&s, &h, &uri, client(), now);
}

#[test]
fn header_hash_hit() {
    let s = snapshot("keys = [\"header:x-user\"]\nmapping = \"hash\"");
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("user-48213"));
    assert_hits_without_allocating(&s, &h, &Uri::from_static("/cart"), client(), now_ms());
}

#[test]
fn header_table_hit() {
    let s = snapshot("keys = [\"header:x-user\"]\nmapping = \"table\"");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("user-48213"));
    let uri = Uri::from_static("/cart");
    // The first request is placed and learned into the stick table.
    assert_eq!(a.decide(pool, &h, &uri, client(), now_ms()).verdict, Verdict::New);
    assert_hits_without_allocating(&s, &h, &uri, client(), now_ms());
}

#[test]
fn client_ip_table_hit() {
    let s = snapshot("keys = [\"client_ip\"]\nmapping = \"table\"");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let h = HeaderMap::new();
    let uri = Uri::from_static("/");
    assert_eq!(a.decide(pool, &h, &uri, client(), now_ms()).verdict, Verdict::New);
    assert_hits_without_allocating(&s, &h, &uri, client(), now_ms());
}

#[test]
fn app_cookie_hit() {
    let s = snapshot("keys = [\"app_cookie:JSESSIONID\"]");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    // Backend 2 answered with its session cookie; the balancer learns it.
    let mut response = HeaderMap::new();
    response.insert(http::header::SET_COOKIE, HeaderValue::from_static("JSESSIONID=abc123; Path=/"));
    a.learn(&response, 2);
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, HeaderValue::from_static("theme=dark; JSESSIONID=abc123"));
    let uri = Uri::from_static("/shop/checkout");
    assert_eq!(a.decide(pool, &h, &uri, client(), now_ms()).backend, Some(2));
    assert_hits_without_allocating(&s, &h, &uri, client(), now_ms());
}

#[test]
fn counter_sees_allocations_inside_decide() {
    // Control: learning many new keys grows the stick table's slab and index, which
    // allocates inside `decide`; the counter must see that.
    let s = snapshot("keys = [\"header:x-user\"]\nmapping = \"table\"");
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let uri = Uri::from_static("/");
    let requests: Vec<HeaderMap> = (0..CALLS)
        .map(|i| {
            let mut h = HeaderMap::new();
            h.insert("x-user", HeaderValue::from_str(&format!("user-{i}")).unwrap());
            h
        })
        .collect();
    let before = allocations();
    for h in &requests {
        std::hint::black_box(a.decide(pool, h, &uri, client(), now_ms()));
    }
    assert!(allocations() - before > 0, "the counter missed the stick table's growth");
}
