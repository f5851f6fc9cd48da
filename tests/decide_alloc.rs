//! The affinity hot path allocates nothing: `PoolAffinity::decide` on every kind of hit,
//! counted by a global allocator that counts this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Uri};
use tether::affinity::Verdict;
use tether::config;
use tether::pool::Snapshot;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations(f: impl FnMut()) -> usize {
    let mut f = f;
    let before = ALLOCS.with(Cell::get);
    for _ in 0..1000 {
        f();
    }
    ALLOCS.with(Cell::get) - before
}

fn snapshot(affinity: &str) -> Snapshot {
    let src = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [\n\
         {{ name = \"a\", address = \"127.0.0.1:1\" }}, {{ name = \"b\", address = \"127.0.0.1:2\" }},\n\
         {{ name = \"c\", address = \"127.0.0.1:3\" }}]\n[pools.p.affinity]\n{affinity}\n"
    );
    Snapshot::build(Arc::new(config::parse(&src, "t.toml").unwrap()), None)
}

#[test]
fn decide_allocates_nothing_on_hits() {
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let uri = Uri::from_static("/cart?item=7&sid=s-19");
    let now = tether::time::unix_millis();
    let mut checked = Vec::new();

    let s = snapshot(
        "keys = [\"cookie\"]\n[pools.p.affinity.cookie]\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]",
    );
    let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
    let first = a.decide(pool, &HeaderMap::new(), &uri, ip, now);
    let set = a.set_cookie(first.issue.as_ref().unwrap());
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_str(set.split(';').next().unwrap()).unwrap());
    assert_eq!(a.decide(pool, &h, &uri, ip, now).verdict, Verdict::Hit);
    checked.push(("cookie", allocations(|| assert_eq!(a.decide(pool, &h, &uri, ip, now).verdict, Verdict::Hit))));

    for (keys, headers) in [
        ("keys = [\"header:x-user\"]\nmapping = \"hash\"", vec![("x-user", "u-1")]),
        ("keys = [\"header:x-user\"]\nmapping = \"table\"", vec![("x-user", "u-1")]),
        ("keys = [\"query:sid\"]\nmapping = \"table\"", vec![]),
        ("keys = [\"client_ip\"]\nmapping = \"table\"", vec![]),
        ("keys = [\"client_ip\"]\nmapping = \"hash\"", vec![]),
        ("keys = [\"app_cookie:JSESSIONID\"]", vec![("cookie", "a=1; JSESSIONID=77AB")]),
    ] {
        let s = snapshot(keys);
        let (pool, a) = (&s.pools[0], s.pools[0].affinity.as_ref().unwrap());
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(k, HeaderValue::from_static(v));
        }
        if keys.contains("app_cookie") {
            let mut resp = HeaderMap::new();
            resp.insert("set-cookie", HeaderValue::from_static("JSESSIONID=77AB; Path=/"));
            a.learn(&resp, 2);
        } else {
            a.decide(pool, &h, &uri, ip, now);
        }
        assert_eq!(a.decide(pool, &h, &uri, ip, now).verdict, Verdict::Hit, "{keys}");
        checked.push((keys, allocations(|| assert_eq!(a.decide(pool, &h, &uri, ip, now).verdict, Verdict::Hit))));
    }
    for (what, n) in &checked {
        assert_eq!(*n, 0, "{what}: {n} allocations in 1000 hits");
    }
}
