//! Deadlines after the response head (issue 11 item 6): a client that stops reading its
//! response is cut off after `client_send`, and an upgraded connection that carries
//! nothing either way is closed after `tunnel_idle`, so that a few such clients cannot hold
//! every connection slot.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Pool `web` of one demo backend that takes one connection at a time, with an admin API.
fn one_slot_config(b: &DemoBackend, timeouts: &str) -> String {
    pool_of(&[("app-1", b.address)], "", &format!("{ADMIN}[timeouts]\n{timeouts}"))
        .replace("\" },", "\", max_connections = 1 },")
}

/// Sends a GET for `/bytes?n={n}` on a new connection and returns the socket unread.
async fn ask_bytes(addr: SocketAddr, n: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /bytes?n={n} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    s
}

/// Reproduction: with `client_send = 1s` and a backend limited to one connection, a client
/// asks for 1 GiB and never reads it. Before the fix Tether's write to it waited for ever:
/// the request stayed in flight and held the backend's only slot. Now the connection is
/// closed about a second after the socket buffers filled, the slot is free again, and the
/// client finds its connection closed when it finally reads. A client that reads slowly
/// but steadily for longer than `client_send` is not cut off.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_client_send() {
    let b = backends(1).await;
    let t = Tether::start(&one_slot_config(&b[0], "client_send = \"1s\"\n"));
    let (addr, admin) = (t.addr(), t.admin());

    // A slow reader: 8 MiB read 128 KiB at a time, 50 ms apart (over 3 s in all).
    let size: usize = 8 << 20;
    let mut slow = ask_bytes(addr, size as u64).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let started = Instant::now();
    let mut paced = 0;
    let whole = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await.expect("bytes within 10 s");
        let n = n.expect("the slow reader's connection stays open");
        assert!(n > 0, "Tether closed the slow reader's connection after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        if let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() >= head + 4 + size {
                break got.len() - head - 4;
            }
        }
        if got.len() - paced >= 128 * 1024 {
            paced = got.len();
            // The client's own pace, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(whole, size);
    assert!(started.elapsed() > Duration::from_secs(2), "the slow reader was not slow: {:?}", started.elapsed());
    wait_until_async("the slow reader's request ended", Duration::from_secs(5), || async {
        in_flight(admin, "web", "app-1").await == 0
    })
    .await;
    drop(slow);

    // A client that never reads.
    let mut stuck = ask_bytes(addr, 1 << 30).await;
    wait_in_flight(admin, "web", "app-1", 1).await;
    let held = Instant::now();
    wait_until_async("the unread request ended", Duration::from_secs(10), || async {
        in_flight(admin, "web", "app-1").await == 0
    })
    .await;
    assert!(held.elapsed() < Duration::from_secs(8), "took {:?}", held.elapsed());

    // The backend's only slot is free: another client is served at once.
    let r = tokio::time::timeout(Duration::from_secs(5), get(addr, "/headers")).await.expect("served within 5 s");
    assert_eq!(r.status, 200, "{}", r.text());

    // The stuck client, reading at last, gets what was buffered and then the end.
    let mut total = 0u64;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stuck.read(&mut buf).await {
                Ok(0) => return "eof",
                Ok(n) => total += n as u64,
                Err(_) => return "reset",
            }
        }
    })
    .await
    .expect("the stuck client's connection was closed");
    assert!(total < 1 << 30, "the whole response came ({end})");
}

/// Reproduction: with `tunnel_idle = 1s`, a WebSocket through Tether exchanges a message
/// every 300 ms for 3 s and stays open, then falls silent. Before the fix the silent
/// tunnel stayed open for ever; now Tether closes it about a second after the last message.
#[tokio::test]
async fn an_idle_tunnel_is_closed_after_tunnel_idle() {
    let addr = websocket_backend().await;
    let cfg = format!(
        "[timeouts]\ntunnel_idle = \"1s\"\n[[listeners]]\nbind = \"127.0.0.1:0\"\npool = \"ws\"\n[pools.ws]\nbackends = [{{ address = \"{addr}\" }}]\n"
    );
    let t = Tether::start(&cfg);
    let stream = TcpStream::connect(t.addr()).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/chat", t.addr()), stream).await.unwrap();
    assert_eq!(resp.status(), 101);

    // Busy for 3 s, three times `tunnel_idle`: the tunnel stays open.
    let started = Instant::now();
    let mut i = 0;
    let mut last_echo = started;
    while started.elapsed() < Duration::from_secs(3) {
        ws.send(Message::text(format!("hi {i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("an echo within 5 s");
        let m = m.expect("the tunnel is open").expect("the tunnel is open");
        assert_eq!(m.to_text().unwrap(), format!("echo: hi {i}"));
        last_echo = Instant::now();
        i += 1;
        // The client's own pace, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Silent: Tether closes the tunnel.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the idle tunnel was closed");
    assert!(matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))), "a message instead of the end: {end:?}");
    let quiet = last_echo.elapsed();
    assert!(quiet >= Duration::from_millis(900), "closed {quiet:?} after the last message, before tunnel_idle");
}
