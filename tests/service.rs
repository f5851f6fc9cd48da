//! Running as a service: the sd_notify protocol as systemd's `Type=notify` sees it, over a
//! socket the test binds (READY=1 once serving, RELOADING=1 then READY=1 around a SIGHUP
//! whether the reload is accepted or rejected, STOPPING=1 on SIGTERM, MAINPID moved by an
//! upgrade), and the unit file in `packaging/`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// How long any one notification may take to come.
const WAIT: Duration = Duration::from_secs(20);

/// A `tether run` started with `NOTIFY_SOCKET` set to `socket`, its log collected.
struct Notified {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Notified {
    fn start(config: &Path, socket: &str) -> Notified {
        Notified::start_env(config, socket, &[])
    }

    /// [`start`](Self::start) with more environment variables.
    fn start_env(config: &Path, socket: &str, env: &[(&str, String)]) -> Notified {
        let mut child = Command::new(bin())
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", socket)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tether");
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Notified { child, log }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next datagram on `socket`, as text (panics after `WAIT`, with the log).
fn next(socket: &UnixDatagram, t: &Notified) -> String {
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification within {WAIT:?} ({e}):\n{}", t.log()),
    }
}

/// The value of `NAME=` in a notification.
fn field<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
}

/// The listener address a READY=1's status names (`serving: web on 127.0.0.1:PORT`).
fn serving_address(ready: &str) -> SocketAddr {
    let status = field(ready, "STATUS").unwrap_or_else(|| panic!("no STATUS in {ready:?}"));
    status.split(" on ").nth(1).and_then(|a| a.split([',', ' ']).next()?.parse().ok()).expect(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_reloading_and_stopping_are_notified() {
    let b = backends(1).await;
    let scratch = Scratch::new();
    let good = config("round_robin", &[&b[0]], &[], "");
    let path = scratch.write("tether.toml", &good);
    let socket_path = scratch.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let t = Notified::start(&path, socket_path.to_str().unwrap());

    // Ready once the listener is bound and serving, from the main process.
    let ready = next(&socket, &t);
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(field(&ready, "MAINPID"), Some(t.child.id().to_string().as_str()), "{ready:?}");
    let addr = serving_address(&ready);
    let r = get(addr, "/").await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, b[0].name.clone()));

    // An accepted reload: RELOADING=1 with the monotonic time it began, then READY=1.
    t.signal("HUP");
    let reloading = next(&socket, &t);
    assert_eq!(field(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let usec: u64 = field(&reloading, "MONOTONIC_USEC").and_then(|u| u.parse().ok()).expect(&reloading);
    assert!(usec > 0);
    let ready = next(&socket, &t);
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    // The log line comes through Tether's log writer thread and this test's reader of
    // its standard error, so it may follow the datagram: awaited.
    assert!(poll_until(WAIT, || t.log().contains("config reloaded")).await, "{}", t.log());

    // A rejected reload is notified the same way: the running config serves on.
    scratch.write("tether.toml", "[runtime]\nthreads = 0\n");
    t.signal("HUP");
    let reloading = next(&socket, &t);
    assert_eq!(field(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let ready = next(&socket, &t);
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert!(field(&ready, "STATUS").is_some_and(|s| s.contains("rejected")), "{ready:?}");
    assert_eq!(get(addr, "/").await.status, 200);

    // Graceful shutdown begins with STOPPING=1.
    t.signal("TERM");
    let stopping = next(&socket, &t);
    assert_eq!(field(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    let mut t = t;
    assert!(poll_until_blocking(WAIT, || t.child.try_wait().unwrap().is_some()), "{}", t.log());
}

/// `WatchdogSec=` in the unit: systemd sets `WATCHDOG_USEC` (and `WATCHDOG_PID`), and
/// Tether says `WATCHDOG=1` twice an interval while every worker runtime answers: with one
/// runtime and with two workers beside the control plane's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_while_every_worker_answers() {
    let b = backends(1).await;
    for threads in [1, 2] {
        let scratch = Scratch::new();
        let extra = format!("[runtime]\nthreads = {threads}\n");
        let path = scratch.write("tether.toml", &config("round_robin", &[&b[0]], &[], &extra));
        let socket_path = scratch.0.join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        // No WATCHDOG_PID (a test cannot know the pid before the spawn): the interval is
        // then for whoever reads it, as systemd's sd_watchdog_enabled reads it.
        let t = Notified::start_env(&path, socket_path.to_str().unwrap(), &[("WATCHDOG_USEC", "200000".into())]);
        let ready = next(&socket, &t);
        assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
        for _ in 0..3 {
            let ping = next(&socket, &t);
            assert_eq!(ping, "WATCHDOG=1", "threads = {threads}: {}", t.log());
        }
        assert_eq!(get(serving_address(&ready), "/").await.status, 200);
    }
}

/// A `WATCHDOG_PID` that names another process (an environment inherited by a child,
/// say) is not this process's watchdog: no ping, only the other notifications.
#[test]
fn a_watchdog_for_another_process_is_not_fed() {
    let scratch = Scratch::new();
    let path = scratch.write("tether.toml", "[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pools.p]\nbackends = [{ name = \"a\", address = \"127.0.0.1:1\" }]\n");
    let socket_path = scratch.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let env = [("WATCHDOG_USEC", "20000".to_string()), ("WATCHDOG_PID", "1".to_string())];
    let t = Notified::start_env(&path, socket_path.to_str().unwrap(), &env);
    let ready = next(&socket, &t);
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    // Three reloads' notifications come next, with no WATCHDOG=1 among them, though a ping
    // would be due every 10 ms all the while (each round spawns `kill` and has Tether read
    // and check its config: tens of milliseconds in all).
    for _ in 0..3 {
        t.signal("HUP");
        let reloading = next(&socket, &t);
        assert_eq!(field(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
        let ready = next(&socket, &t);
        assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    }
}

#[tokio::test]
async fn an_abstract_socket_is_notified_and_a_missing_one_is_not_fatal() {
    use std::os::linux::net::SocketAddrExt as _;
    let b = backends(1).await;
    let scratch = Scratch::new();
    let path = scratch.write("tether.toml", &config("round_robin", &[&b[0]], &[], ""));

    let name = format!("tether-service-test-{}", std::process::id());
    let socket = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    let t = Notified::start(&path, &format!("@{name}"));
    let ready = next(&socket, &t);
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(get(serving_address(&ready), "/").await.status, 200);

    // A socket that is not there: Tether serves anyway.
    let gone = scratch.0.join("nobody-listens.sock");
    let t = Notified::start(&path, gone.to_str().unwrap());
    let found =
        || t.log().lines().find_map(|l| l.split("listening on ").nth(1)?.split_whitespace().next()?.parse().ok());
    assert!(poll_until(WAIT, || found().is_some()).await, "{}", t.log());
    let addr: SocketAddr = found().unwrap();
    assert_eq!(get(addr, "/").await.status, 200, "{}", t.log());
}

#[test]
fn the_unit_file_is_a_notify_service_that_reloads_with_sighup() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/tether.service")).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for wanted in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "StateDirectory=tether",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
    ] {
        assert!(lines.contains(&wanted), "the unit file lacks {wanted:?}");
    }
    // systemd's own check, where systemd is installed, on a copy naming the built binary
    // (it checks that the commands exist).
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else { return };
    if !out.status.success() {
        return;
    }
    let scratch = Scratch::new();
    let copy = scratch.write("tether.service", &unit.replace("/usr/local/bin/tether", bin()));
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}

/// A binary upgrade (`tether upgrade`): the new process says READY=1 with its own pid as
/// MAINPID (heard under the unit's `NotifyAccess=all`), and the old one, which exits as a
/// mere child, never says STOPPING=1: to systemd the service goes on.
#[tokio::test]
async fn an_upgrade_moves_mainpid_to_the_new_process() {
    let b = backends(1).await;
    let scratch = Scratch::new();
    let path = scratch.write("tether.toml", &config("round_robin", &[&b[0]], &[], ""));
    let socket_path = scratch.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut t = Notified::start(&path, socket_path.to_str().unwrap());
    let ready = next(&socket, &t);
    assert_eq!(field(&ready, "MAINPID"), Some(t.child.id().to_string().as_str()), "{ready:?}");

    let pid = t.child.id().to_string();
    let out = Command::new(bin()).args(["upgrade", "--pid", &pid]).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), t.log());
    let new_pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg("-KILL").arg(&self.0).status();
        }
    }
    let _new = Kill(new_pid.clone());
    let ready = next(&socket, &t);
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(field(&ready, "MAINPID"), Some(new_pid.as_str()), "{ready:?}");
    assert_eq!(get(serving_address(&ready), "/").await.status, 200);
    assert!(poll_until_blocking(WAIT, || t.child.try_wait().unwrap().is_some()), "{}", t.log());
    // Whatever the old process sent is queued by now: no STOPPING=1 among it.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        let message = String::from_utf8_lossy(&buf[..n]);
        assert!(field(&message, "STOPPING").is_none(), "the old process said {message:?}");
    }
}
