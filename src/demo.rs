//! `tether demo`: three small stateful web apps and a balancer in front of them, so that a
//! newcomer sees in one command what Tether does. The demo backends are also the real
//! backend servers of the integration tests.
//!
//! Each demo backend keeps a per-visitor counter in its own memory (the visitor is known by
//! its own `demo_visitor` cookie), so a client that is not kept on one backend visibly
//! loses its count. It also serves a few endpoints that tests need: `/echo` streams the
//! request body back, `/headers` shows the request as the backend received it,
//! `/bytes?n=N` streams N bytes, `/sleep?ms=N` answers late, `/status?code=N` answers with
//! that status.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// A running demo backend.
#[derive(Debug)]
pub struct DemoBackend {
    pub name: String,
    pub address: SocketAddr,
    stop: watch::Sender<bool>,
}

impl DemoBackend {
    /// Starts a demo backend on `address` (port 0 picks a free one).
    pub async fn start(name: &str, address: SocketAddr) -> std::io::Result<DemoBackend> {
        DemoBackend::start_with(name, address, None).await
    }

    /// Starts a demo backend that serves over TLS with `tls` (the tests' backends for
    /// pools that reach their backends over TLS).
    pub async fn start_tls(
        name: &str,
        address: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<DemoBackend> {
        DemoBackend::start_with(name, address, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(
        name: &str,
        address: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<DemoBackend> {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let app =
            Arc::new(App { name: name.to_string(), visitors: Mutex::new(HashMap::new()), ids: AtomicU64::new(1) });
        tokio::spawn(accept(listener, app, tls, stopped));
        Ok(DemoBackend { name: name.to_string(), address, stop })
    }

    /// Stops accepting and closes every open connection, as a crashed server would.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

struct App {
    name: String,
    visitors: Mutex<HashMap<u64, u64>>,
    ids: AtomicU64,
}

async fn accept(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut stopped = stopped.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| serve(req, app.clone(), peer));
            let http = hyper::server::conn::http1::Builder::new();
            let served = async {
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                    Some(tls) => {
                        let Ok(stream) = tls.accept(stream).await else { return };
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
            };
            tokio::select! {
                _ = served => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<BoxBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn serve(req: Request<Incoming>, app: Arc<App>, peer: SocketAddr) -> Result<Response<BoxBody>, Infallible> {
    let mut response = match req.uri().path() {
        "/echo" => {
            let mut r = Response::new(req.into_body().boxed_unsync());
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            r
        }
        "/headers" => {
            let mut s = format!("{} {} {:?}\npeer: {peer}\n", req.method(), req.uri(), req.version());
            for (k, v) in req.headers() {
                s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            text(StatusCode::OK, s)
        }
        "/bytes" => {
            let n = query_u64(&req, "n").unwrap_or(1024);
            let mut r = Response::new(Generated { left: n }.boxed_unsync());
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            r
        }
        "/sleep" => {
            let ms = query_u64(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("{} slept {ms} ms\n", app.name))
        }
        "/status" => {
            let code = query_u64(&req, "code").and_then(|c| StatusCode::from_u16(c as u16).ok());
            let code = code.unwrap_or(StatusCode::OK);
            text(code, format!("{} answered {code}\n", app.name))
        }
        _ => visit(&req, &app),
    };
    response
        .headers_mut()
        .insert("x-backend", HeaderValue::from_str(&app.name).expect("backend names are header-safe"));
    Ok(response)
}

/// The demo app proper: count this visitor's visits to this backend.
fn visit(req: &Request<Incoming>, app: &App) -> Response<BoxBody> {
    let known = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| u64::from_str_radix(c.trim().strip_prefix("demo_visitor=")?, 16).ok());
    let mut visitors = app.visitors.lock().unwrap_or_else(|e| e.into_inner());
    let (id, new) = match known.filter(|id| visitors.contains_key(id)) {
        Some(id) => (id, false),
        None => {
            // Unguessable enough for a demo: a random hash mixed with a sequence number.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(app.ids.fetch_add(1, Ordering::Relaxed));
            (h.finish() >> 16, true)
        }
    };
    let count = visitors.entry(id).or_insert(0);
    *count += 1;
    let mut body = if new && known.is_some() {
        format!("{}: I do not know you, so this is your first visit here (visitor {id:x}); your count on another backend is lost\n", app.name)
    } else {
        format!("{}: visit number {} from visitor {id:x}\n", app.name, count)
    };
    if let Some(why) = req.headers().get("tether-session-repinned").and_then(|v| v.to_str().ok()) {
        body.push_str(&format!(
            "{}: Tether moved your session here ({why}); a real app would restore it from its store\n",
            app.name
        ));
    }
    let mut r = text(StatusCode::OK, body);
    if new {
        let cookie = format!("demo_visitor={id:x}; Path=/; HttpOnly; SameSite=Lax");
        r.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("cookie is ASCII"));
    }
    r
}

/// A body of `left` bytes, made up as it is sent, in 64 KiB chunks.
struct Generated {
    left: u64,
}

static CHUNK: [u8; 64 * 1024] = {
    let mut c = [0u8; 64 * 1024];
    let mut i = 0;
    while i < c.len() {
        c[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    c
};

impl Body for Generated {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// The demo's HTTPS: the port, and the certificate and key files (see [`certificate`]).
pub struct DemoTls<'a> {
    pub port: u16,
    pub cert: &'a std::path::Path,
    pub key: &'a std::path::Path,
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, made now, written as PEM into
/// `dir` (`demo.pem`, `demo.key`); its paths.
pub fn certificate(dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let cert = params.self_signed(&key)?;
    std::fs::create_dir_all(dir)?;
    let (cert_path, key_path) = (dir.join("demo.pem"), dir.join("demo.key"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// The config `tether demo` runs: three backends, round robin for new sessions, and
/// Tether's own cookie to keep each visitor on its backend; with `tls`, the same pool
/// also behind an HTTPS listener.
pub fn config_text(port: u16, backend_ports: [u16; 3], admin_port: u16, tls: Option<&DemoTls<'_>>) -> String {
    let https = tls.map_or_else(String::new, |t| {
        format!(
            "\n[[listeners]]\nname = \"demo-tls\"\nbind = \"127.0.0.1:{}\"\nprotocol = \"https\"\npool = \"demo\"\n\
             [[listeners.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            t.port,
            t.cert.display(),
            t.key.display()
        )
    });
    format!(
        r#"# The embedded demo config.
[admin]
bind = "127.0.0.1:{admin_port}"

[[listeners]]
name = "demo"
bind = "127.0.0.1:{port}"
pool = "demo"
{https}
[pools.demo]
algorithm = "round_robin"
backends = [
  {{ name = "app-1", address = "127.0.0.1:{}" }},
  {{ name = "app-2", address = "127.0.0.1:{}" }},
  {{ name = "app-3", address = "127.0.0.1:{}" }},
]

[pools.demo.affinity]
keys = ["cookie"]

[pools.demo.affinity.cookie]
name = "tether"
idle_timeout = "30m"
"#,
        backend_ports[0], backend_ports[1], backend_ports[2]
    )
}
