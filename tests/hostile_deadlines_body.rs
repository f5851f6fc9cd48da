//! Issue 11 item 6: nothing bounded a connection once the response head was sent, so a
//! few clients (or backends) that stop sending a body mid-way held every
//! `max_connections` slot for good. A request body waits at most `client_body` for each
//! next piece, a response body at most `backend_body`; a body that keeps coming, however
//! slowly, is not cut.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Pieces of a body sent after its first 10 bytes, each `GAP` after the last: together
/// longer than the 500ms limit, each well within it.
const PIECES: usize = 5;
const GAP: Duration = Duration::from_millis(200);

/// Reads from `s` until the peer closes or errors; `None` if it still has not after 5s.
async fn read_until_closed(s: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(5), read).await.is_ok();
    ended.then(|| String::from_utf8_lossy(&out).into_owned())
}

/// Reproduction (03bbd3a): a client sends the head of a 1000-byte upload to an endpoint
/// that reads it (`/echo`), some of the body, then nothing: its request held its
/// `max_connections = 1` slot, so no other client was served, for as long as it liked.
#[tokio::test]
async fn stalled_upload_is_cut_after_client_body_and_frees_its_slot() {
    let b = backends(1).await;
    let cfg = pool_of(&[("app-1", b[0].address)], "queue_timeout = \"1s\"", ADMIN)
        .replace("\" },", "\", max_connections = 1 },")
        + "[timeouts]\nclient_body = \"500ms\"\n";
    let t = Tether::start(&cfg);
    let admin = t.admin();

    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789").await.unwrap();
    // A slow upload that keeps coming is not cut: each piece is within `client_body`.
    for i in 0..PIECES {
        tokio::time::sleep(GAP).await;
        s.write_all(format!("piece-{i}:").as_bytes()).await.unwrap();
    }
    // Then nothing more: Tether ends the request (a 4xx, or a response cut short).
    let out = read_until_closed(&mut s).await.unwrap_or_else(|| panic!("the stalled upload still holds:\n{}", t.log()));
    assert!(out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.1 4"), "{out}");
    if out.starts_with("HTTP/1.1 200") {
        assert!(out.contains(&format!("piece-{}:", PIECES - 1)), "the slow part was cut: {out}");
    }
    wait_until_async("the stalled upload has ended", Duration::from_secs(5), || async move {
        in_flight(admin, "web", "app-1").await == 0
    })
    .await;
    // The slot is free: another client is served while the first one's socket is open.
    let r = get(t.addr(), "/status?code=200").await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(s);
}

/// A backend that answers any request with a 100-byte body, sends 10 bytes of it, then
/// `PIECES` more pieces `GAP` apart, and then nothing, holding the connection open; it
/// reports on `closed` when Tether closes its end.
fn stalling_backend() -> (SocketAddr, mpsc::Receiver<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, closed) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
                for i in 0..PIECES {
                    std::thread::sleep(GAP);
                    let _ = s.write_all(format!("piece-{i}:").as_bytes());
                }
                // Hold the connection until Tether closes it.
                let mut rest = [0u8; 1024];
                while matches!(s.read(&mut rest), Ok(n) if n > 0) {}
                let _ = tx.send(());
            });
        }
    });
    (addr, closed)
}

/// Reproduction (03bbd3a): a backend that sends a response head and part of its body,
/// then nothing, held the client's connection and the backend's in-flight count forever.
#[tokio::test]
async fn stalled_response_body_is_cut_after_backend_body() {
    let (backend, closed) = stalling_backend();
    let cfg = pool_of(&[("app-1", backend)], "", ADMIN) + "[timeouts]\nbackend_body = \"500ms\"\n";
    let t = Tether::start(&cfg);
    let admin = t.admin();

    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let out =
        read_until_closed(&mut s).await.unwrap_or_else(|| panic!("the stalled response still holds:\n{}", t.log()));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The slow part came through: each piece was within `backend_body`.
    assert!(out.contains(&format!("0123456789piece-0:piece-1:piece-2:piece-3:piece-{}:", PIECES - 1)), "{out}");
    wait_until_async("the stalled response has ended", Duration::from_secs(5), || async move {
        in_flight(admin, "web", "app-1").await == 0
    })
    .await;
    // The backend's connection is closed, not kept for reuse.
    assert!(
        tokio::task::spawn_blocking(move || closed.recv_timeout(Duration::from_secs(5)).is_ok()).await.unwrap(),
        "the backend connection was kept open"
    );
}
