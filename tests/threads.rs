//! `runtime.threads = N`: N single-threaded runtimes with a socket each per listener
//! (`SO_REUSEPORT`), against the real binary. Which worker served a connection is seen in
//! `tether_worker_connections_accepted_total`; the sockets themselves in `/proc`.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::Request;
use http_body_util::Full;

/// A pool `web` of `backends` that keeps sessions by the demo app's own cookie, which
/// Tether learns into its stick table: state the workers share.
fn sticky_config(backends: &[DemoBackend], extra: &str) -> String {
    let refs: Vec<&DemoBackend> = backends.iter().collect();
    format!(
        "{}\n[pools.web.affinity]\nkeys = [\"app_cookie:demo_visitor\"]\n",
        config("round_robin", &refs, &[], &format!("{ADMIN}{extra}"))
    )
}

/// Connections each worker accepted, by worker index, as the admin's `/metrics` says.
async fn accepted_by_worker(admin: SocketAddr) -> Vec<u64> {
    let text = get(admin, "/metrics").await.text();
    (0..)
        .map_while(|i| {
            let row = format!("tether_worker_connections_accepted_total{{worker=\"{i}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(row.as_str())?.trim().parse().ok())
        })
        .collect()
}

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The inodes of the sockets listening on `port` (any address), from `/proc/net/tcp*`.
fn listening_inodes(port: u16) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(cols[1].rsplit(':').next().unwrap(), 16).unwrap();
            // State 0A is LISTEN; the tenth column is the inode.
            if local_port == port && cols[3] == "0A" {
                inodes.insert(cols[9].parse().unwrap());
            }
        }
    }
    inodes
}

/// The inodes of the sockets process `pid` has open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    fds.filter_map(|fd| {
        let target = std::fs::read_link(fd.ok()?.path()).ok()?;
        target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// Tether's listening sockets on `port`: they must be the process's own, `n` of them.
fn tether_listening(t: &Tether, port: u16, n: usize) -> BTreeSet<u64> {
    let listening = listening_inodes(port);
    assert_eq!(listening.len(), n, "sockets listening on port {port}: {listening:?}");
    let own = socket_inodes(t.child.id());
    assert!(listening.is_subset(&own), "port {port}: {listening:?} are not all Tether's ({own:?})");
    listening
}

#[tokio::test]
async fn two_workers_serve_connections_on_both_and_keep_sessions() {
    let b = backends(3).await;
    let t = Tether::start(&sticky_config(&b, "[runtime]\nthreads = 2\n"));
    let admin = t.admin();

    // Two runtimes of their own, no work-stealing pool. (A thread takes its name as it
    // starts, which a loaded machine may not have got to yet when the listeners are up.)
    let both = || {
        let names = thread_names(t.child.id());
        names.iter().filter(|n| n.starts_with("tether-w")).count() == 2
    };
    poll_until(Duration::from_secs(5), both).await;
    let names = thread_names(t.child.id());
    let workers: BTreeSet<&str> = names.iter().map(String::as_str).filter(|n| n.starts_with("tether-w")).collect();
    assert_eq!(workers, BTreeSet::from(["tether-w0", "tether-w1"]), "threads: {names:?}");
    assert!(!names.iter().any(|n| n.starts_with("tokio-runtime")), "threads: {names:?}");

    // Many connections, 50 at a time, each a fresh connection with one request.
    let addr = t.addr();
    for _ in 0..6 {
        let batch = (0..50).map(|_| async move { get(addr, "/").await.status });
        let statuses = futures_util::future::join_all(batch).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    let accepted = accepted_by_worker(admin).await;
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert_eq!(accepted.iter().sum::<u64>(), 300, "{accepted:?}");
    // The kernel spreads connections by a hash of their addresses: both workers get some
    // (all 300 on one would happen once in 2^299 runs).
    assert!(accepted.iter().all(|n| *n > 0), "connections by worker: {accepted:?}");

    // Sessions learned on one worker's connection hold on every other connection, so on
    // both workers: each visitor comes back on fresh connections and stays on its backend.
    let mut homes = BTreeSet::new();
    for visitor in 0..12 {
        let first = get(addr, "/").await;
        assert_eq!(first.status, 200);
        let cookie = first.headers.get("set-cookie").expect("the demo app sets its cookie").to_str().unwrap();
        let cookie = cookie.split(';').next().unwrap().to_string();
        for round in 0..8 {
            let mut c = Client::connect(addr).await;
            let r = c
                .request(Request::get("/").header("host", "x").header("cookie", &cookie).body(Full::default()).unwrap())
                .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.backend(), first.backend(), "visitor {visitor} moved in round {round}: {}", r.text());
        }
        homes.insert(first.backend());
    }
    assert!(homes.len() > 1, "round robin placed every visitor on {homes:?}");
    let accepted = accepted_by_worker(admin).await;
    assert_eq!(accepted.iter().sum::<u64>(), 300 + 12 * 9, "{accepted:?}");
}

#[tokio::test]
async fn shutdown_waits_for_connections_on_every_worker() {
    let b = backends(1).await;
    let mut t = Tether::start(&sticky_config(&b, "[runtime]\nthreads = 2\nshutdown_grace = \"10s\"\n"));
    let admin = t.admin();
    let addr = t.addr();
    // Slow requests on fresh connections until each worker holds at least one.
    let mut slow = Vec::new();
    for n in 1..=64 {
        slow.push(tokio::spawn(async move { get(addr, "/sleep?ms=1500").await }));
        wait_until_async("the slow request is accepted", Duration::from_secs(5), || async move {
            accepted_by_worker(admin).await.iter().sum::<u64>() >= n
        })
        .await;
        if accepted_by_worker(admin).await.iter().all(|n| *n > 0) {
            break;
        }
    }
    let accepted = accepted_by_worker(admin).await;
    assert!(accepted.len() == 2 && accepted.iter().all(|n| *n > 0), "{accepted:?}");
    wait_in_flight(admin, "web", "app-1", slow.len() as u64).await;

    t.signal("TERM");
    t.wait_log("no longer accepting").await;
    for r in slow {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("slept 1500 ms"), "{}", r.text());
    }
    let status = t.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", t.log());
    assert!(t.log().contains("all connections finished"), "{}", t.log());
}

/// Runs `tether run` with `config` and `--threads threads` until it exits (it must, within
/// ten seconds); returns whether it succeeded and what it logged.
fn run_until_exit(config: &str, threads: usize) -> (bool, String) {
    let scratch = Scratch::new();
    let path = scratch.write("tether.toml", config);
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .args(["--threads", &threads.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        })
    };
    let mut status = None;
    let exited = poll_until_blocking(Duration::from_secs(10), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tether kept running with threads = {threads}:\n{}", log.lock().unwrap());
    }
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    (status.unwrap().success(), log)
}

#[tokio::test]
async fn a_port_held_by_another_process_with_so_reuseport_is_an_error() {
    // This test process holds the port the way a second Tether would: SO_REUSEPORT, and
    // listening, as the same user.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.set_reuseaddr(true).unwrap();
    held.set_reuseport(true).unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let held = held.listen(16).unwrap();
    let address = held.local_addr().unwrap();
    let b = backends(1).await;
    let config = config("round_robin", &[&b[0]], &[], "").replace("127.0.0.1:0", &address.to_string());
    for threads in [1, 2] {
        let (ok, log) = run_until_exit(&config, threads);
        assert!(!ok, "threads = {threads}: tether started on a port another process holds:\n{log}");
        let wanted = format!("listener \"web\": cannot bind {address}");
        assert!(log.contains(&wanted), "threads = {threads}: no {wanted:?} in:\n{log}");
        assert!(log.contains("in use"), "threads = {threads}: the error does not say why:\n{log}");
    }
    // Nobody joined the port: only the holder listens on it.
    assert_eq!(listening_inodes(address.port()).len(), 1);
}

#[tokio::test]
async fn a_reload_keeps_the_sockets_of_a_listener_it_keeps_and_moves_the_others() {
    let b = backends(2).await;
    let extra = "[runtime]\nthreads = 2\n";
    let refs: Vec<&DemoBackend> = b.iter().collect();
    let t = Tether::start(&config("round_robin", &refs, &[1, 1], extra));
    let port = t.addr().port();
    let before = tether_listening(&t, port, 2);
    let mut old = Client::connect(t.addr()).await;
    assert_eq!(old.get("/").await.status, 200);

    // A change unrelated to the listener keeps both its sockets, and so their queues.
    reload(&t, &config("round_robin", &refs, &[1, 3], extra), "config reloaded").await;
    assert!(t.log().contains("weight 1 -> 3"), "{}", t.log());
    assert_eq!(tether_listening(&t, port, 2), before, "the reload replaced the sockets");
    assert_eq!(old.get("/").await.status, 200, "a connection from before the reload");
    assert_eq!(get(t.addr(), "/").await.status, 200);

    // A listener that moves gets two new sockets; the old ones close.
    let moved = config("round_robin", &refs, &[1, 3], extra).replace("127.0.0.1:0", "127.0.0.2:0");
    reload(&t, &moved, "moved from 127.0.0.1:0 to 127.0.0.2:0").await;
    let new_addr: SocketAddr = t
        .log()
        .lines()
        .filter_map(|l| l.split("listening on ").nth(1)?.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap();
    assert_eq!(new_addr.ip().to_string(), "127.0.0.2");
    let after = tether_listening(&t, new_addr.port(), 2);
    assert!(after.is_disjoint(&before), "{after:?} {before:?}");
    wait_until("the old sockets are closed", Duration::from_secs(5), || listening_inodes(port).is_empty()).await;
    assert_eq!(get(new_addr, "/").await.status, 200);
    assert_eq!(old.get("/").await.status, 200, "a connection from before the move");
}
