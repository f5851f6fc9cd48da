//! Telling a service manager (systemd) how Tether is doing: the sd_notify protocol, one
//! datagram of `NAME=value` lines sent to the unix socket `NOTIFY_SOCKET` names (a name
//! starting with `@` is in the abstract namespace). It is what `Type=notify` waits for:
//! `READY=1` once every listener is bound and serving, `RELOADING=1` with
//! `MONOTONIC_USEC=` when a reload starts and `READY=1` when it is done, `STOPPING=1` when
//! graceful shutdown starts.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent. A socket that is gone
//! or a send that fails is logged at debug level and otherwise ignored: a service
//! manager's bookkeeping never stops Tether from serving. No crate: a datagram on
//! `UnixDatagram` is the whole protocol.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `NAME=value` lines) to the service manager, if there
/// is one. Returns whether a datagram went out.
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else { return false };
    match send(&socket.to_string_lossy(), state) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("sd_notify: cannot send to {}: {e}", socket.to_string_lossy());
            false
        }
    }
}

/// `READY=1` with the process id and a status line.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nMAINPID={}\nSTATUS={status}", std::process::id()))
}

/// `RELOADING=1` with the monotonic time it began, as `Type=notify-reload` asks.
pub fn reloading() -> bool {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration", monotonic_usec()))
}

/// `STOPPING=1`.
/// The watchdog's interval when systemd asks for one (`WatchdogSec=`: `WATCHDOG_USEC` set,
/// and `WATCHDOG_PID`, if set, naming this process); `None` otherwise. Tether then owes a
/// `WATCHDOG=1` at least this often, or systemd counts it as hung.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    std::env::var_os(NOTIFY_SOCKET)?;
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// Tells systemd's watchdog that Tether is alive.
pub fn watchdog() -> bool {
    notify("WATCHDOG=1")
}

pub fn stopping() -> bool {
    notify("STOPPING=1\nSTATUS=shutting down: finishing open connections")
}

fn send(socket: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = socket.strip_prefix('@') {
        send_abstract(&sock, name, state)
    } else {
        sock.send_to(state.as_bytes(), socket).map(|_| ())
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &str, state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &str, _: &str) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract unix sockets are Linux only"))
}

/// Microseconds on `CLOCK_MONOTONIC`, the clock `MONOTONIC_USEC` is read on.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid `timespec` for the call to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000).saturating_add(ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_a_datagram_to_a_path_and_to_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("tether-sd-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt as _;
            let name = format!("tether-sd-notify-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let listener = UnixDatagram::bind_addr(&addr).unwrap();
            send(&format!("@{name}"), "STOPPING=1").unwrap();
            let n = listener.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"STOPPING=1");
        }
    }

    #[test]
    fn a_missing_socket_is_not_an_error_for_the_caller() {
        assert!(send("/nonexistent/tether/notify.sock", "READY=1").is_err());
        assert!(monotonic_usec() > 0);
    }
}
