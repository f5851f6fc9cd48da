//! Binary upgrades (`tether upgrade`, SIGUSR2): under load, not one request fails while the
//! new process takes over the old one's listening sockets; learned sessions and an admin
//! drain carry over; a new process that fails leaves the old one serving.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// Kills the new process a test's upgrade started (the `Tether` guard owns only the old
/// one) when the test ends, however it ends.
struct Pid(u32);

impl Drop for Pid {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-KILL").arg(self.0.to_string()).status();
    }
}

/// Runs `tether upgrade --pid` on `t`: its exit status, stdout and stderr.
async fn upgrade(t: &Tether) -> (bool, String, String) {
    upgrade_pid(t.child.id()).await
}

/// Runs `tether upgrade --pid PID`: its exit status, stdout and stderr.
async fn upgrade_pid(pid: u32) -> (bool, String, String) {
    let pid = pid.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin()).args(["upgrade", "--pid", &pid, "--timeout", "30"]).output().unwrap()
    })
    .await
    .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Waits for the old process to exit after an upgrade, and asserts it exited 0.
async fn wait_old_exit(t: &mut Tether) {
    let mut status = None;
    let exited = poll_until(Duration::from_secs(30), || {
        status = t.child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(exited, "the old process did not exit:\n{}", t.log());
    assert!(status.unwrap().success(), "the old process failed: {status:?}\n{}", t.log());
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Requests that failed in a way a client may not see during an upgrade: refused,
    /// reset, cut short, a status other than 200, a body that is not the backend's.
    failures: Mutex<Vec<String>>,
    /// Idle keep-alive connections the server closed between two requests: the client
    /// found it closed before sending, or its next request got no byte of a response on
    /// the reused connection. An HTTP client retries such a request on a new connection,
    /// and so do these; the retry must succeed.
    closed_between_requests: AtomicU64,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// One request on `sender`: `Ok` when it got a whole 200 from a backend; `Err(true)` when
/// it failed before any byte of a response, `Err(false)` with the failure after.
async fn one(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    close: bool,
) -> Result<(), (bool, String)> {
    let mut req = Request::get("/").header("host", addr.to_string());
    if close {
        req = req.header("connection", "close");
    }
    let resp = sender.send_request(req.body(Full::default()).unwrap()).await.map_err(|e| (true, format!("{e:?}")))?;
    let status = resp.status();
    let backend = resp.headers().get("x-backend").map(|v| v.to_str().unwrap_or("").to_string()).unwrap_or_default();
    let body = resp.into_body().collect().await.map_err(|e| (false, format!("body cut short: {e:?}")))?.to_bytes();
    if status != 200 || !backend.starts_with("app-") || !String::from_utf8_lossy(&body).contains(&backend) {
        return Err((
            false,
            format!("status {status}, backend {backend:?}, body {:?}", String::from_utf8_lossy(&body)),
        ));
    }
    Ok(())
}

/// A new connection, ready to send on.
async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Requests on a new connection each, until `stop`.
async fn fresh_connections(addr: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let result = match connect(addr).await {
            Ok(mut sender) => one(&mut sender, addr, true).await.map_err(|(_, e)| e),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tally.fail(format!("new connection: {e}"));
                0
            }
        };
    }
}

/// Requests on one keep-alive connection after another, until `stop`.
async fn keep_alive(addr: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut conn: Option<(http1::SendRequest<Full<Bytes>>, bool)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (mut sender, reused) = match conn.take() {
            Some(c) => c,
            None => match connect(addr).await {
                Ok(s) => (s, false),
                Err(e) => {
                    tally.fail(format!("keep-alive: {e}"));
                    continue;
                }
            },
        };
        if sender.ready().await.is_err() {
            // Closed by the server while idle, before this request was sent.
            tally.closed_between_requests.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match one(&mut sender, addr, false).await {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                conn = Some((sender, true));
            }
            // No byte of a response on a reused connection: it was closed between requests.
            Err((true, _)) if reused => {
                tally.closed_between_requests.fetch_add(1, Ordering::Relaxed);
            }
            Err((_, e)) => tally.fail(format!("keep-alive (reused: {reused}): {e}")),
        }
    }
}

/// The connections a Tether's workers accepted, from its metrics.
async fn accepted(admin: SocketAddr) -> u64 {
    let text = get(admin, "/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with("tether_worker_connections_accepted_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_fails_no_request() {
    let b = backends(2).await;
    let refs: Vec<&DemoBackend> = b.iter().collect();
    let mut t = Tether::start_with(&config("round_robin", &refs, &[], ADMIN), &["--threads", "2"]);
    let (addr, admin) = (t.addr(), t.admin());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..8 {
        let (tally, stop) = (tally.clone(), stop.clone());
        load.push(if i % 2 == 0 {
            tokio::spawn(fresh_connections(addr, tally, stop))
        } else {
            tokio::spawn(keep_alive(addr, tally, stop))
        });
    }
    wait_until("the old process served 200 requests", Duration::from_secs(20), || {
        tally.ok.load(Ordering::Relaxed) >= 200
    })
    .await;

    let (ok, stdout, stderr) = upgrade(&t).await;
    assert!(ok, "tether upgrade failed: {stderr}\n{}", t.log());
    let _new = Pid(stdout.trim().parse().expect("tether upgrade prints the new pid"));
    wait_old_exit(&mut t).await;
    // The load goes on against the new process alone.
    let after_exit = tally.ok.load(Ordering::Relaxed);
    wait_until("the new process served 200 requests", Duration::from_secs(20), || {
        tally.ok.load(Ordering::Relaxed) >= after_exit + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let failures = tally.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} requests failed: {failures:#?}\n{}", failures.len(), t.log());
    // The admin listener was handed over too: the new process answers on it, and its
    // workers accepted the connections since.
    assert!(accepted(admin).await > 0);
    assert!(t.log().contains("upgrade: serving; the old process stops accepting"), "{}", t.log());
    eprintln!(
        "{} requests served, none failed; {} idle keep-alive connections closed between requests",
        tally.ok.load(Ordering::Relaxed),
        tally.closed_between_requests.load(Ordering::Relaxed)
    );
}

async fn call(admin: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let mut c = Client::connect(admin).await;
    let r = Request::builder().method(method).uri(path).header("host", admin.to_string());
    let resp = c.request(r.body(Full::default()).unwrap()).await;
    (resp.status.as_u16(), serde_json::from_slice(&resp.body).unwrap_or(Value::Null))
}

fn user(u: &str) -> Request<Full<Bytes>> {
    Request::get("/").header("host", "shop.example").header("x-user", u).body(Full::default()).unwrap()
}

fn admin_state(pools: &Value, name: &str) -> String {
    let b = pools["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap();
    b["admin_state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_learned_sessions_and_the_drain() {
    let b = backends(3).await;
    let refs: Vec<&DemoBackend> = b.iter().collect();
    // Placed at random, so a new process that forgot the table would not place them again.
    let cfg = format!(
        "{}\n[pools.web.affinity]\nkeys = [\"header:x-user\"]\nmapping = \"table\"\n",
        config("random", &refs, &[], ADMIN)
    );
    let mut t = Tether::start(&cfg);
    let (addr, admin) = (t.addr(), t.admin());
    let mut c = Client::connect(addr).await;
    let mut homes = Vec::new();
    for i in 0..30 {
        let u = format!("user-{i}");
        homes.push((u.clone(), c.request(user(&u)).await.backend()));
    }
    drop(c);
    let (s, v) = call(admin, "POST", "/api/pools/web/backends/app-1/drain").await;
    assert_eq!((s, v["admin_state"].as_str()), (200, Some("draining")), "{v}");

    let (ok, stdout, stderr) = upgrade(&t).await;
    assert!(ok, "tether upgrade failed: {stderr}\n{}", t.log());
    let new = Pid(stdout.trim().parse().unwrap());
    wait_old_exit(&mut t).await;
    assert!(t.log().contains("upgrade: restored 30 table entries and 1 admin overrides"), "{}", t.log());

    assert_eq!(admin_state(&admin_json(admin, "/api/pools/web").await, "app-1"), "draining");
    let mut c = Client::connect(addr).await;
    for (u, home) in homes.iter().rev() {
        assert_eq!(&c.request(user(u)).await.backend(), home, "session {u} moved in the upgrade");
    }
    for i in 0..30 {
        let r = c.request(user(&format!("new-{i}"))).await;
        assert_ne!(r.backend(), "app-1", "a drained backend took a new session after the upgrade");
    }
    drop(c);

    // And again, from the process the first upgrade started (not the test's child).
    let (ok, stdout, stderr) = upgrade_pid(new.0).await;
    assert!(ok, "the second upgrade failed: {stderr}\n{}", t.log());
    let newer = Pid(stdout.trim().parse().unwrap());
    assert_ne!(newer.0, new.0);
    let gone = || {
        // Exited, or a zombie nobody reaps (its parent, the test's child, is gone).
        std::fs::read_to_string(format!("/proc/{}/stat", new.0))
            .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
    };
    wait_until("the first new process exited", Duration::from_secs(30), gone).await;
    assert_eq!(admin_state(&admin_json(admin, "/api/pools/web").await, "app-1"), "draining");
    let mut c = Client::connect(addr).await;
    for (u, home) in &homes {
        assert_eq!(&c.request(user(u)).await.backend(), home, "session {u} moved in the second upgrade");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_leaves_the_old_one_serving() {
    let b = backends(1).await;
    let refs: Vec<&DemoBackend> = b.iter().collect();
    let mut t = Tether::start(&config("round_robin", &refs, &[], ADMIN));
    let addr = t.addr();
    assert_eq!(get(addr, "/").await.status, 200);
    // The config no longer parses: the new process started by the upgrade cannot serve.
    std::fs::write(&t.config, "[[listeners]\nthis is not toml").unwrap();
    let mut c = Client::connect(addr).await;
    let (ok, _, stderr) = upgrade(&t).await;
    assert!(!ok, "the upgrade was reported as done:\n{}", t.log());
    assert!(stderr.contains("upgrade failed, the old process keeps serving"), "{stderr}");
    t.wait_log("upgrade failed, this process keeps serving").await;
    assert!(t.log().contains("invalid config"), "{}", t.log());
    // The old process still runs and serves, on a new connection and on one open before.
    assert!(t.child.try_wait().unwrap().is_none(), "the old process exited:\n{}", t.log());
    assert_eq!(get(addr, "/").await.status, 200);
    assert_eq!(c.get("/").await.status, 200);
}
