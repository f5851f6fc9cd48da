//! Binary upgrades without dropping a connection (see "Upgrading a running Tether" in
//! ARCHITECTURE.md). On SIGUSR2 the running process starts its executable again (the file
//! the path it was started from names now, so a binary replaced on disk is the new one)
//! with the same arguments and one end of a unix socket pair, named by `TETHER_UPGRADE_FD`.
//! Over it go every listening socket (`SCM_RIGHTS`: the same socket, not a copy bound
//! anew, so connections waiting in its accept queue are the new process's to accept) with
//! its listener's name and configured address, then the learned state (`warm::to_bytes`).
//! The new process serves with them and answers one byte when it is ready; only then does
//! the old one stop accepting and finish its connections within the grace period. Anything
//! that fails before that leaves the old process serving as before.
//!
//! `tether upgrade --pid PID` is the operator's side: it sends the signal and waits for the
//! outcome, which the old process sends as one datagram to the abstract unix socket
//! `tether-upgrade-<PID>` the command binds.
//!
//! What it deliberately does not do: hand over open client connections (the old process
//! finishes them), or what the old process learns after it sent its state (sessions placed
//! in the few milliseconds before the new one is ready are placed again there).

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{Control, HandedSocket};

/// The environment variable that names, in a new process, its end of the unix socket
/// the old one hands over through.
pub const FD_ENV: &str = "TETHER_UPGRADE_FD";

/// How long the old process waits for the new one to say it is ready: it reads its config,
/// looks up its DNS sources once and restores the state before it serves, all of which
/// is bounded well within this.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a new process that failed gets to exit on its own before it is killed (it
/// flushes its log on the way out, which says why it failed).
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// How long the new process waits for each read of what the old one hands over (it is
/// all written at once, so any wait at all means the old process is gone).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on what a new process accepts over the socket, so that a damaged stream cannot
/// make it allocate without limit: the manifest is a few hundred bytes per listener, and
/// the state about 55 bytes per table entry.
const MAX_MANIFEST: u32 = 16 << 20;
const MAX_STATE: u64 = 4 << 30;

/// The byte the new process answers with once it serves.
const READY: u8 = b'R';

/// What precedes the sockets: which listener each belongs to, in the order they follow.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    sockets: Vec<SocketEntry>,
    state_len: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SocketEntry {
    /// `None`: the admin listener.
    listener: Option<String>,
    bind: SocketAddr,
}

/// The path this process was started from, read at start: `/proc/self/exe` names the
/// replaced file "(deleted)" once a new binary is moved over it, while the path itself
/// then names the new binary.
static EXECUTABLE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Remembers the executable's path; called once at start, before any upgrade.
pub fn remember_executable() {
    EXECUTABLE.get_or_init(|| std::env::current_exe().ok());
}

// === the old process ===

/// Starts the new process and hands it every listening socket and the learned state;
/// returns its process id once it serves. An error leaves this process as it was.
pub async fn hand_over(control: &Control) -> Result<u32, String> {
    let executable = EXECUTABLE
        .get_or_init(|| std::env::current_exe().ok())
        .clone()
        .ok_or("the path of the running executable is unknown")?;
    let sockets = control.handover_sockets();
    let state = crate::warm::to_bytes(control);
    tracing::info!(
        binary = %executable.display(),
        "upgrade: starting the new process and handing it {} listening sockets and {} bytes of state",
        sockets.len(),
        state.len()
    );
    let task = tokio::task::spawn_blocking(move || start_and_hand_over(executable, sockets, state));
    task.await.map_err(|e| format!("the upgrade task failed: {e}"))?
}

/// Spawns `executable` with this process's arguments, sends it the sockets and state and
/// waits for its ready byte. A new process that fails is reaped; one that does not answer
/// in time is killed.
fn start_and_hand_over(executable: PathBuf, sockets: Vec<HandedSocket>, state: Vec<u8>) -> Result<u32, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("cannot make a unix socket pair: {e}"))?;
    let their_fd = theirs.as_raw_fd();
    let mut command = Command::new(&executable);
    // `WATCHDOG_PID` names this process: the new one, which becomes the service's main
    // process, pings systemd's watchdog without it (see `sd_notify::watchdog_interval`).
    command
        .args(std::env::args_os().skip(1))
        .env(FD_ENV, their_fd.to_string())
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl,
    // which is async-signal-safe, on a descriptor the child inherited open.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            // The pair is made close-on-exec; this end alone must survive exec.
            if libc::fcntl(their_fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", executable.display()))?;
    drop(theirs);
    let pid = child.id();
    let fail = |child: &mut std::process::Child, why: String| -> String {
        match reap(child) {
            Some(status) => format!("the new process (pid {pid}) {why}; it ended with {status} (its log says why)"),
            None => format!("the new process (pid {pid}) {why}"),
        }
    };
    if let Err(e) = send(&ours, &sockets, &state) {
        return Err(fail(&mut child, format!("could not be handed the sockets: {e}")));
    }
    drop(sockets);
    let _ = ours.set_read_timeout(Some(READY_TIMEOUT));
    let mut answer = [0u8; 1];
    match (&ours).read(&mut answer) {
        Ok(1) if answer[0] == READY => Ok(pid),
        Ok(_) => Err(fail(&mut child, "failed before it was ready".into())),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(fail(&mut child, format!("was not ready within {READY_TIMEOUT:?}")))
        }
        Err(e) => Err(fail(&mut child, format!("failed before it was ready: {e}"))),
    }
}

/// Ends a new process that failed: it closed its end of the socket and is exiting, so it
/// gets a little while to finish (and write its log, which says why); one that has not
/// ended by then is killed.
fn reap(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + EXIT_WAIT;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Writes the manifest, then each socket as one byte carrying its descriptor, then the
/// state.
fn send(sock: &UnixStream, sockets: &[HandedSocket], state: &[u8]) -> io::Result<()> {
    let manifest = Manifest {
        sockets: sockets.iter().map(|s| SocketEntry { listener: s.listener.clone(), bind: s.bind }).collect(),
        state_len: state.len() as u64,
    };
    let bytes = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
    let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    let mut w = sock;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&bytes)?;
    for s in sockets {
        send_fd(sock, s.fd.as_fd())?;
    }
    w.write_all(state)
}

/// Sends one byte with `fd` attached (`SCM_RIGHTS`).
fn send_fd(sock: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    let byte = [b'F'];
    let mut iov = libc::iovec { iov_base: byte.as_ptr() as *mut libc::c_void, iov_len: 1 };
    // Room for one descriptor's control message, aligned as cmsghdr wants (u64).
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE computes a size from a constant; it touches no memory.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    if space > std::mem::size_of_val(&control) {
        return Err(io::Error::other("control buffer too small"));
    }
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one header and one descriptor
    // (checked above), so CMSG_FIRSTHDR is non-null and the writes stay inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
    }
    // SAFETY: `msg` and everything it points at live across the call.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    match sent {
        1 => Ok(()),
        -1 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("short send")),
    }
}

/// Tells a waiting `tether upgrade` how the upgrade went: `ready <pid>` or `failed <why>`.
/// Nobody waiting (the signal came from `kill`) is not an error.
pub fn report(outcome: &Result<u32, String>) {
    let text = match outcome {
        Ok(pid) => format!("ready {pid}"),
        Err(why) => format!("failed {why}"),
    };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    if let Err(e) = send_abstract(&sock, &reply_name(std::process::id()), &text) {
        tracing::debug!("upgrade: no `tether upgrade` waiting for the outcome: {e}");
    }
}

fn reply_name(pid: u32) -> String {
    format!("tether-upgrade-{pid}")
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &str, text: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(text.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &str, _: &str) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract unix sockets are Linux only"))
}

// === the new process ===

/// What the old process handed over.
pub struct Received {
    /// Traffic listeners' sockets by listener name and configured address, in the order
    /// the old process had them (its workers').
    pub listeners: Vec<(String, SocketAddr, Vec<std::net::TcpListener>)>,
    /// The admin listener's socket and configured address.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    /// The learned state, as `warm::to_bytes` made it.
    pub state: Vec<u8>,
    /// Where the ready byte goes.
    channel: UnixStream,
}

impl Received {
    /// The sockets handed over for listener `name` configured on `bind`, taken (`None`
    /// when there are none: the listener is bound anew).
    pub fn take_listener(&mut self, name: &str, bind: SocketAddr) -> Option<Vec<std::net::TcpListener>> {
        let at = self.listeners.iter().position(|(n, b, _)| n == name && *b == bind)?;
        Some(self.listeners.remove(at).2)
    }

    /// Closes the sockets no listener of the new config took, naming them in the log.
    pub fn close_unused(&mut self) {
        for (name, bind, _) in self.listeners.drain(..) {
            tracing::info!(listener = %name, "upgrade: the handed-over socket for {bind} is not in this config; closed");
        }
    }

    /// Tells the old process this one serves: it stops accepting and finishes its
    /// connections.
    pub fn ready(self) {
        if let Err(e) = (&self.channel).write_all(&[READY]) {
            tracing::warn!("upgrade: cannot tell the old process this one is ready: {e}");
        }
    }
}

/// What the old process hands over, when this process was started by an upgrade
/// (`TETHER_UPGRADE_FD` set): `None` for an ordinary start.
pub fn receive() -> Option<anyhow::Result<Received>> {
    let value = std::env::var_os(FD_ENV)?;
    Some(receive_from(&value.to_string_lossy()))
}

fn receive_from(value: &str) -> anyhow::Result<Received> {
    let fd: RawFd = value.trim().parse().map_err(|_| anyhow::anyhow!("{FD_ENV}={value:?} is not a descriptor"))?;
    anyhow::ensure!(fd > 2 && is_socket(fd), "{FD_ENV}={fd} is not an inherited unix socket");
    // SAFETY: `fd` is open and a socket (checked above), inherited from the old process
    // for this alone; it is taken once, here, and nothing else in this process uses it.
    let channel = unsafe { UnixStream::from_raw_fd(fd) };
    channel.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
    let mut r = &channel;
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    anyhow::ensure!(len <= MAX_MANIFEST, "the manifest is {len} bytes, more than {MAX_MANIFEST}");
    let mut bytes = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut bytes)?;
    anyhow::ensure!(bytes.len() == len as usize, "the manifest was cut short");
    let manifest: Manifest = serde_json::from_slice(&bytes)?;
    anyhow::ensure!(
        manifest.state_len <= MAX_STATE,
        "the state is {} bytes, more than {MAX_STATE}",
        manifest.state_len
    );
    let mut listeners: Vec<(String, SocketAddr, Vec<std::net::TcpListener>)> = Vec::new();
    let mut admin = None;
    for entry in manifest.sockets {
        let socket = std::net::TcpListener::from(recv_fd(&channel)?);
        match entry.listener {
            None => admin = Some((entry.bind, socket)),
            Some(name) => match listeners.iter_mut().find(|(n, b, _)| *n == name && *b == entry.bind) {
                Some((_, _, sockets)) => sockets.push(socket),
                None => listeners.push((name, entry.bind, vec![socket])),
            },
        }
    }
    let mut state = Vec::new();
    r.take(manifest.state_len).read_to_end(&mut state)?;
    anyhow::ensure!(state.len() as u64 == manifest.state_len, "the state was cut short");
    Ok(Received { listeners, admin, state, channel })
}

/// Whether `fd` is an open socket.
fn is_socket(fd: RawFd) -> bool {
    // SAFETY: `stat` is a plain C struct for which all zeroes is valid; fstat only writes
    // it, and fails cleanly on a descriptor that is not open.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

/// Receives one byte with one descriptor attached.
fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` and `control`, which live across the call and are as
    // long as it says. Descriptors arrive close-on-exec.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    match n {
        -1 => return Err(io::Error::last_os_error()),
        0 => return Err(io::ErrorKind::UnexpectedEof.into()),
        _ => {}
    }
    // SAFETY: the kernel filled `msg`'s control part within `control`; CMSG_FIRSTHDR and
    // CMSG_DATA stay within what it says it wrote, and the length is checked before the
    // descriptor is read.
    let fd = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            || (*cmsg).cmsg_len as usize != libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize
        {
            return Err(io::Error::other("expected one descriptor, got none"));
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>())
    };
    // SAFETY: the kernel just installed `fd` in this process for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("the control message was cut short"));
    }
    Ok(fd)
}

// === the command ===

/// `tether upgrade`: signals `pid` to upgrade and waits up to `limit` for the outcome.
/// Returns the new process's id.
pub fn request(pid: u32, limit: Duration) -> anyhow::Result<u32> {
    let target = libc::pid_t::try_from(pid).ok().filter(|p| *p > 0);
    let target = target.ok_or_else(|| anyhow::anyhow!("{pid} is not a process id"))?;
    let sock = bind_abstract(&reply_name(pid))
        .map_err(|e| anyhow::anyhow!("cannot wait for the outcome (is another upgrade of {pid} waiting?): {e}"))?;
    // SAFETY: kill with a positive pid signals that one process; no memory is involved.
    if unsafe { libc::kill(target, libc::SIGUSR2) } != 0 {
        anyhow::bail!("cannot signal process {pid}: {}", io::Error::last_os_error());
    }
    sock.set_read_timeout(Some(limit))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = match sock.recv(&mut buf) {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            anyhow::bail!("process {pid} did not report an upgrade within {limit:?} (is it a Tether?)")
        }
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&buf[..n]);
    if let Some(new) = text.strip_prefix("ready ") {
        return new.trim().parse().map_err(|_| anyhow::anyhow!("unexpected answer: {text}"));
    }
    match text.strip_prefix("failed ") {
        Some(why) => anyhow::bail!("upgrade failed, the old process keeps serving: {why}"),
        None => anyhow::bail!("unexpected answer: {text}"),
    }
}

#[cfg(target_os = "linux")]
fn bind_abstract(name: &str) -> io::Result<UnixDatagram> {
    use std::os::linux::net::SocketAddrExt as _;
    UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?)
}

#[cfg(not(target_os = "linux"))]
fn bind_abstract(_: &str) -> io::Result<UnixDatagram> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract unix sockets are Linux only"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd as _;

    fn handed(listener: Option<&str>, socket: &std::net::TcpListener) -> HandedSocket {
        let bind = "127.0.0.1:0".parse().unwrap();
        HandedSocket { listener: listener.map(str::to_string), bind, fd: socket.as_fd().try_clone_to_owned().unwrap() }
    }

    #[test]
    fn sockets_and_state_arrive_whole_and_are_the_same_sockets() {
        let web: Vec<std::net::TcpListener> =
            (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sockets = vec![handed(Some("web"), &web[0]), handed(Some("web"), &web[1]), handed(None, &admin)];
        let (ours, theirs) = UnixStream::pair().unwrap();
        let state = b"{\"some\": \"state\"}".repeat(1000);
        send(&ours, &sockets, &state).unwrap();
        let mut got = receive_from(&theirs.into_raw_fd().to_string()).unwrap();
        assert_eq!(got.state, state);
        let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(got.take_listener("web", "127.0.0.1:1".parse().unwrap()).is_none(), "matched by address too");
        let web_got = got.take_listener("web", bind).unwrap();
        assert_eq!(web_got.len(), 2);
        for (sent, received) in web.iter().zip(&web_got) {
            // The same socket: a connection made to the one sent is accepted on the one received.
            assert_eq!(sent.local_addr().unwrap(), received.local_addr().unwrap());
            let _client = std::net::TcpStream::connect(sent.local_addr().unwrap()).unwrap();
            received.accept().unwrap();
        }
        let (admin_bind, admin_got) = got.admin.take().unwrap();
        assert_eq!((admin_bind, admin_got.local_addr().unwrap()), (bind, admin.local_addr().unwrap()));
        // The ready byte goes back.
        got.ready();
        let mut answer = [0u8; 1];
        (&ours).read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], READY);
    }

    #[test]
    fn a_damaged_or_cut_stream_is_an_error_not_a_panic() {
        for bytes in [
            &[0xff, 0xff, 0xff, 0xff][..],                  // a manifest too long
            &[0, 0, 0, 5, b'{', b'x'][..],                  // cut short
            &[0, 0, 0, 2, b'{', b'}'][..],                  // not a manifest
            b"\0\0\0\x1d{\"sockets\":[],\"state_len\":99}", // the state cut short
            b"\0\0\0\x42{\"sockets\":[{\"listener\":null,\"bind\":\"127.0.0.1:1\"}],\"state_len\":0}F", // no descriptor
        ] {
            let (ours, theirs) = UnixStream::pair().unwrap();
            (&ours).write_all(bytes).unwrap();
            drop(ours);
            assert!(receive_from(&theirs.into_raw_fd().to_string()).is_err(), "{:?}", String::from_utf8_lossy(bytes));
        }
        for value in ["", "x", "-1", "1", "999999"] {
            assert!(receive_from(value).is_err(), "{value:?}");
        }
    }
}
