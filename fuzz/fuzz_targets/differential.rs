//! Tether's request head parser beside hyper's (the parser of today's data path and of
//! most Rust servers): when Tether accepts a head that hyper refuses, or the two frame
//! its body differently, this fails, unless the case is listed in `allowed` with the
//! reason. Tether refusing what hyper accepts is fine: it is meant to be stricter.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body::Body as _;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tether::h1::request::{parse, Body, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What hyper made of the first request: method, target, and body length (`None`:
/// chunked).
type Seen = (String, String, Option<u64>);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap())
}

/// Serves `data` to a hyper HTTP/1 server over an in-memory pipe.
fn hyper_sees(data: &[u8]) -> Option<Seen> {
    let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
    let record = seen.clone();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut slot = record.lock().unwrap();
            if slot.is_none() {
                let len = req.body().size_hint().exact();
                *slot = Some((req.method().to_string(), req.uri().to_string(), len));
            }
            async { Ok::<_, std::convert::Infallible>(hyper::Response::new(String::new())) }
        });
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), service);
        let talk = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(conn, talk) }).await;
    });
    let seen = seen.lock().unwrap().take();
    seen
}

/// Heads Tether accepts and hyper refuses on purpose, with the reason.
fn allowed(_data: &[u8]) -> Option<&'static str> {
    None
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_head: 16 * 1024, max_target: 8 * 1024 };
    let Ok(Some(head)) = parse(data, &limits) else { return };
    if allowed(data).is_some() {
        return;
    }
    let Some((method, target, length)) = hyper_sees(data) else {
        panic!("Tether accepts a head hyper refuses: {:?}", String::from_utf8_lossy(&data[..head.len]));
    };
    assert_eq!(method.as_bytes(), head.method_name.of(data), "method");
    let ours = match head.body {
        Body::None => Some(0),
        Body::Length(n) => Some(n),
        Body::Chunked => None,
    };
    assert_eq!(ours, length, "body framing of {:?} (target {target})", String::from_utf8_lossy(&data[..head.len]));
});
