//! Health, failover and hot reload under load: backends die, hang and come back, and the
//! config changes, while clients keep their sessions.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::Request;
use http_body_util::Full;

const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

fn sticky_pool(health: &str) -> String {
    format!("[pools.web.affinity]\nkeys = [\"cookie\"]\n[pools.web.affinity.cookie]\nkeys = [\"{KEY}\"]\n{health}")
}

/// What the clients of a load run saw.
#[derive(Default)]
struct Seen {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
    /// Per client: the backends it was served by, in order, without repeats.
    homes: Mutex<HashMap<usize, Vec<String>>>,
}

/// Waits until the clients have had `n` answers, however long the machine takes (within
/// reason): the tests count requests, not seconds.
async fn until_answered(seen: &Seen, n: usize) {
    let what = format!("the clients have {n} answers");
    wait_until(&what, Duration::from_secs(300), || seen.ok.load(Ordering::Relaxed) >= n).await;
}

/// `clients` keep-alive clients, each with its own cookie, sending GETs until `stop`.
fn load(
    addr: std::net::SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|id| {
            let (stop, seen) = (stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                let mut jar: HashMap<String, String> = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut req = Request::get("/").header("host", "shop.example");
                    if !jar.is_empty() {
                        let v: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        req = req.header("cookie", v.join("; "));
                    }
                    match c.try_request(req.body(Full::default()).unwrap()).await {
                        Ok(r) if r.status == 200 => {
                            seen.ok.fetch_add(1, Ordering::Relaxed);
                            for v in r.headers.get_all("set-cookie") {
                                let pair = v.to_str().unwrap().split(';').next().unwrap();
                                let (k, v) = pair.split_once('=').unwrap();
                                jar.insert(k.to_string(), v.to_string());
                            }
                            let mut homes = seen.homes.lock().unwrap();
                            let h = homes.entry(id).or_default();
                            if h.last() != Some(&r.backend()) {
                                h.push(r.backend());
                            }
                        }
                        Ok(r) => seen.failed.lock().unwrap().push(format!("client {id}: {} {}", r.status, r.text())),
                        Err(e) => {
                            seen.failed.lock().unwrap().push(format!("client {id}: {e}"));
                            c = Client::connect(addr).await;
                        }
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_backend_under_load_fails_no_request_and_repins_each_session_once() {
    let mut b: Vec<BackendProcess> = (1..=3).map(|i| BackendProcess::start(&format!("app-{i}"))).collect();
    let list: Vec<(&str, std::net::SocketAddr)> = b.iter().map(|x| (x.name.as_str(), x.address)).collect();
    let health = "[pools.web.health]\ncheck = \"http\"\npath = \"/status?code=200\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\n";
    let t =
        Tether::start(&format!("{}{}", pool_of(&list, "", "[access_log]\nformat = \"off\"\n"), sticky_pool(health)));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let tasks = load(t.addr(), 200, stop.clone(), seen.clone());
    until_answered(&seen, 5_000).await;
    let before_kill = seen.ok.load(Ordering::Relaxed);
    b[1].kill();
    // Long enough for the checks to find the backend down, and tens of thousands in all.
    until_answered(&seen, 20_000).await;
    t.wait_log("backend is DOWN").await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let failed = seen.failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), failed.first());
    let total = seen.ok.load(Ordering::Relaxed);
    eprintln!("{total} requests, {before_kill} before the kill");
    let homes = seen.homes.lock().unwrap().clone();
    assert_eq!(homes.len(), 200, "every client was served");
    let mut moved = 0;
    for (id, h) in homes.iter() {
        match h.as_slice() {
            [_] => {}
            [from, to] if from == "app-2" && to != "app-2" => moved += 1,
            other => panic!("client {id} moved more than once or off a live backend: {other:?}"),
        }
    }
    assert!(moved >= 50, "only {moved} sessions were on the killed backend");
    t.wait_log("backend is DOWN").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_reloads_under_load_fail_nothing_and_move_no_session() {
    let b = backends(3).await;
    let list: Vec<(&str, std::net::SocketAddr)> = b.iter().map(|x| (x.name.as_str(), x.address)).collect();
    let web = format!("{}{}", pool_of(&list, "", "[access_log]\nformat = \"off\"\n"), sticky_pool(""));
    // Two configs that differ only in a pool nobody routes to.
    let other = |w: u32| {
        format!("{web}\n[pools.other]\nbackends = [{{ name = \"x\", address = \"127.0.0.1:9\", weight = {w} }}]\n")
    };
    let t = Tether::start(&other(1));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let tasks = load(t.addr(), 200, stop.clone(), seen.clone());
    until_answered(&seen, 2_000).await;
    for i in 0..5 {
        reload(&t, &other(2 + i % 2), "config reloaded").await;
        let at = seen.ok.load(Ordering::Relaxed);
        until_answered(&seen, at + 2_000).await;
    }
    until_answered(&seen, 20_000).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let failed = seen.failed.lock().unwrap();
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
    let homes = seen.homes.lock().unwrap();
    assert_eq!(homes.len(), 200, "every client was served");
    for (id, h) in homes.iter() {
        assert_eq!(h.len(), 1, "client {id} moved across reloads: {h:?}");
    }
    assert!(t.log().contains("reload: pool \"other\": backend \"x\": weight 1 -> 2"), "{}", t.log());
}

#[tokio::test]
async fn a_broken_config_is_rejected_with_its_location_and_traffic_goes_on() {
    let b = backends(2).await;
    let list: Vec<(&str, std::net::SocketAddr)> = b.iter().map(|x| (x.name.as_str(), x.address)).collect();
    let good = pool_of(&list, "", "");
    let t = Tether::start(&good);
    let mut c = Client::connect(t.addr()).await;
    assert_eq!(c.get("/").await.status, 200);
    let broken = good.replace("[pools.web]\n", "[pools.web]\nalgorithm = \"fastest\"\n");
    let line = broken.lines().position(|l| l.contains("fastest")).unwrap() + 1;
    reload(&t, &broken, "reload rejected").await;
    let want = format!("{}:{line}:13: pool \"web\": algorithm \"fastest\" is not known", t.config.display());
    assert!(t.log().contains(&want), "wanted {want:?} in:\n{}", t.log());
    // The running config stays: same connection, same round robin over both backends.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = c.get("/").await;
        assert_eq!(r.status, 200);
        seen.insert(r.backend());
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn a_hanging_backend_is_ejected_after_the_requests_it_swallowed() {
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let b = backends(1).await;
    let cfg =
        pool_of(&[("hang", hang_addr), ("app-1", b[0].address)], "", "[timeouts]\nbackend_response = \"300ms\"\n")
            + "[pools.web.health]\ncheck = \"tcp\"\ninterval = \"1m\"\neject_after = 2\neject_time = \"1m\"\n";
    let t = Tether::start(&cfg);
    let mut c = Client::connect(t.addr()).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let r = c.get("/").await;
        statuses.push(r.status.as_u16());
        if r.status == 200 {
            assert_eq!(r.backend(), "app-1");
        }
    }
    // Round robin sent two requests to the hanging backend before it was ejected.
    assert_eq!(statuses.iter().filter(|s| **s == 504).count(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 18, "{statuses:?}");
    t.wait_log("backend is DOWN: ejected for 60s after 2 consecutive failures").await;
}

#[tokio::test]
async fn active_checks_take_a_backend_down_and_bring_it_back() {
    let mut b = backends(2).await;
    let list: Vec<(&str, std::net::SocketAddr)> = b.iter().map(|x| (x.name.as_str(), x.address)).collect();
    let health = "[pools.web.health]\npath = \"/status?code=204\"\nexpect_status = \"204\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\neject_after = 0\n";
    let t = Tether::start(&(pool_of(&list, "", "") + health));
    let address = b[0].address;
    b[0].stop();
    t.wait_log("backend=app-1").await;
    t.wait_log("backend is DOWN: 2 checks failed").await;
    let mut c = Client::connect(t.addr()).await;
    for _ in 0..6 {
        assert_eq!(c.get("/").await.backend(), "app-2");
    }
    b[0] = DemoBackend::start("app-1", address).await.unwrap();
    t.wait_log("backend is UP: 2 checks passed").await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(c.get("/").await.backend());
    }
    assert_eq!(seen.len(), 2, "app-1 should take traffic again");
    // One transition each way, logged once.
    assert_eq!(t.log().matches("backend is DOWN").count(), 1);
    assert_eq!(t.log().matches("backend is UP").count(), 1);
}

#[tokio::test]
async fn a_failing_body_check_and_panic_mode() {
    let b = backends(2).await;
    let list: Vec<(&str, std::net::SocketAddr)> = b.iter().map(|x| (x.name.as_str(), x.address)).collect();
    // Every backend fails its check: the body never contains "ready".
    let health = "[pools.web.health]\npath = \"/status?code=200\"\nexpect_body = \"ready\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\n";
    let t = Tether::start(&(pool_of(&list, "", "") + health));
    t.wait_log_count("backend is DOWN", 2).await;
    let r = get(t.addr(), "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["tether-error"], "no-backend");
    assert!(t.log().contains("body does not contain \"ready\""), "{}", t.log());
    let t = Tether::start(&(pool_of(&list, "panic_mode = true", "") + health));
    t.wait_log_count("backend is DOWN", 2).await;
    assert_eq!(t.log().matches("backend is DOWN").count(), 2);
    assert_eq!(get(t.addr(), "/").await.status, 200, "panic mode sends to a down backend rather than fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_queue_then_503() {
    let b = backends(1).await;
    let cfg = pool_of(&[("app-1", b[0].address)], "queue_timeout = \"300ms\"", ADMIN)
        .replace("\" },", "\", max_connections = 1 },");
    let t = Tether::start(&cfg);
    let addr = t.addr();
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=1000").await.status });
    // The slow request holds the only connection slot.
    wait_in_flight(t.admin(), "web", "app-1", 1).await;
    let r = get(addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["tether-error"], "queue-timeout");
    assert_eq!(slow.await.unwrap(), 200);
    // With no room in the queue at all, the wait is not even tried.
    let cfg = pool_of(&[("app-1", b[0].address)], "queue_timeout = \"3s\"\nmax_queue = 0", ADMIN)
        .replace("\" },", "\", max_connections = 1 },");
    let t = Tether::start(&cfg);
    let addr = t.addr();
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=1000").await.status });
    wait_in_flight(t.admin(), "web", "app-1", 1).await;
    let start = std::time::Instant::now();
    let r = get(addr, "/").await;
    assert_eq!((r.status.as_u16(), r.headers["tether-error"].to_str().unwrap()), (503, "queue-full"));
    // Refused without the wait: a queued request would have had the slot and a 200 when
    // the slow one ended, or a queue-timeout after 3 s.
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    assert_eq!(slow.await.unwrap(), 200);
    // A request that fits in the queue waits for the slot and is served.
    let cfg = pool_of(&[("app-1", b[0].address)], "queue_timeout = \"3s\"", ADMIN)
        .replace("\" },", "\", max_connections = 1 },");
    let t = Tether::start(&cfg);
    let addr = t.addr();
    let slow_sent = std::time::Instant::now();
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=500").await.status });
    wait_in_flight(t.admin(), "web", "app-1", 1).await;
    assert_eq!(get(addr, "/").await.status, 200);
    // The slot frees when the slow request is answered, no sooner than 500 ms after it was sent.
    assert!(slow_sent.elapsed() >= Duration::from_millis(500), "the second request did not wait for the slot");
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn reload_adds_and_removes_listeners() {
    let b = backends(1).await;
    let one = pool_of(&[("app-1", b[0].address)], "", "");
    let t = Tether::start(&one);
    let first = t.addr();
    let two = one.replace(
        "[pools.web]",
        "[[listeners]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n[pools.web]",
    );
    reload(&t, &two, "config reloaded").await;
    assert!(t.log().contains("reload: listener \"second\" added"), "{}", t.log());
    let second: std::net::SocketAddr = t
        .log()
        .lines()
        .filter(|l| l.contains("listener=second"))
        .find_map(|l| l.split("listening on ").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert_eq!(get(second, "/").await.status, 200);
    assert_eq!(get(first, "/").await.status, 200);
    // Drop the first listener: its port closes, the second carries on.
    let only_second = two.replacen("[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n", "", 1);
    reload(&t, &only_second, "listener closed").await;
    wait_until_async("the removed listener refuses connections", Duration::from_secs(5), || async move {
        tokio::net::TcpStream::connect(first).await.is_err()
    })
    .await;
    assert_eq!(get(second, "/").await.status, 200);
}
