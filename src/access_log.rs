//! The access log: one line per request, written by a dedicated thread.
//!
//! A request formats its own line (text or JSON) when it ends, then hands it to a
//! [`LineWriter`], whose thread batches lines so that a burst costs one write system call
//! and a request never waits on the disk. If the writer falls behind (a slow disk, a
//! standard output nobody reads), at most [`QUEUE`] lines wait in memory; further lines
//! are dropped and counted (`tether_access_log_dropped_total`) rather than slow requests or
//! grow memory without bound. A line carries at most [`MAX_URI`] bytes of the request URI.
//!
//! A request that belongs to a session carries the session's pseudonym (`session=`): its
//! identity (the session id of Tether's token, or the hash of its table or hashed key)
//! encrypted with AES-256 under the log's key and cut to 64 bits. One session has one
//! pseudonym in every line, so its requests can be followed (and replayed) through a log,
//! which still reveals no session id or key: without the key a pseudonym cannot be traced
//! back, nor computed from a guessed cookie or address. The key is
//! `access_log.session_key` (so that restarts and every instance of a fleet agree), or a
//! random one for the process.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use http::Version;

use crate::config::{self, LogFormat};
use crate::line_writer::LineWriter;

/// Lines waiting for the writer thread at most. With URIs cut to [`MAX_URI`], a full queue
/// holds some 40 MiB at worst, and a few MiB for ordinary requests.
pub const QUEUE: usize = 8192;

/// The most bytes of a request URI a log line carries; a longer URI (hyper accepts 64 KiB)
/// is cut there and marked with `...`.
pub const MAX_URI: usize = 4096;

/// Where finished requests are reported.
#[derive(Debug)]
pub struct AccessLog {
    format: LogFormat,
    /// `None` when the log is off.
    out: Option<LineWriter>,
    /// What makes session pseudonyms; `None` when the log is off.
    pseudonyms: Option<aes::Aes256>,
}

/// Everything known about one request when it ends.
#[derive(Debug)]
pub struct Record<'a> {
    pub start_millis: u64,
    pub client: SocketAddr,
    pub listener: &'a str,
    pub method: &'a str,
    /// The request target as the client sent it.
    pub uri: &'a str,
    /// `HTTP/1.1` and the like ([`version`] names hyper's versions).
    pub version: &'a str,
    pub status: u16,
    pub pool: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub upstream: Option<Duration>,
    pub total: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Why Tether answered itself, or why the response was cut short.
    pub error: Option<&'a str>,
    /// The affinity verdict (`hit`, `new`, `repin:down`...), `-` without affinity.
    pub affinity: &'a str,
    /// The pseudonym of the session the request belongs to ([`AccessLog::pseudonym`]).
    pub session: Option<u64>,
}

impl AccessLog {
    /// Opens the log and starts its writer thread; `Off` writes nothing and starts nothing.
    pub fn open(cfg: &config::AccessLog) -> io::Result<AccessLog> {
        if cfg.format == LogFormat::Off {
            return Ok(AccessLog { format: LogFormat::Off, out: None, pseudonyms: None });
        }
        let out: Box<dyn Write + Send> = match &cfg.path {
            None => Box::new(io::stdout()),
            Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        };
        let key = match &cfg.session_key {
            Some(k) => {
                crate::affinity::token::Key::from_base64(k).map_err(|e| io::Error::other(e.to_string()))?.bytes()
            }
            None => {
                let mut k = [0u8; 32];
                getrandom::fill(&mut k).map_err(|e| io::Error::other(e.to_string()))?;
                k
            }
        };
        AccessLog::start(cfg.format, out, QUEUE, key)
    }

    /// A log writing to `out` from its own thread, with room for `queue` waiting lines.
    fn start(format: LogFormat, out: Box<dyn Write + Send>, queue: usize, key: [u8; 32]) -> io::Result<AccessLog> {
        let writer = LineWriter::start("access-log", out, queue, false)?;
        Ok(AccessLog { format, out: Some(writer), pseudonyms: Some(aes::Aes256::new(&key.into())) })
    }

    /// The pseudonym of a session `identity` (see the module documentation); `None` when
    /// the log is off, so a request without a log line computes nothing.
    pub fn pseudonym(&self, identity: Option<[u8; 16]>) -> Option<u64> {
        let (cipher, identity) = (self.pseudonyms.as_ref()?, identity?);
        let mut block = identity.into();
        cipher.encrypt_block(&mut block);
        let bytes: [u8; 16] = block.into();
        Some(u64::from_le_bytes(bytes[..8].try_into().expect("8 of 16 bytes")))
    }

    /// Lines dropped so far because the writer had fallen [`QUEUE`] lines behind.
    pub fn dropped(&self) -> u64 {
        self.out.as_ref().map_or(0, LineWriter::dropped)
    }

    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    pub fn write(&self, r: &Record<'_>) {
        let Some(out) = &self.out else { return };
        // Room for the whole line up front: a doubled buffer would double what the queue holds.
        let uri = r.uri.len().min(MAX_URI);
        let mut line = String::with_capacity(384 + uri);
        match self.format {
            LogFormat::Json => format_json(&mut line, r),
            _ => format_text(&mut line, r),
        }
        line.push('\n');
        // Never waits for the writer: a request that ends must not block on the disk.
        out.send(line.into_bytes());
    }
}

/// The text of an HTTP version, as access log lines carry it.
pub fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// `2026-11-23T10:04:05.123Z 127.0.0.1:51234 web "GET /cart HTTP/1.1" 200 pool=shop
/// backend=app-1 upstream_ms=1.204 total_ms=1.391 bytes_in=0 bytes_out=512`
pub fn format_text(s: &mut String, r: &Record<'_>) {
    crate::time::write_rfc3339(s, r.start_millis);
    let _ = write!(s, " {} {} \"{} ", r.client, r.listener, r.method);
    push_uri(s, r.uri, false);
    let _ =
        write!(s, " {}\" {} pool={} backend={}", r.version, r.status, r.pool.unwrap_or("-"), r.backend.unwrap_or("-"));
    match r.upstream {
        Some(u) => {
            let _ = write!(s, " upstream_ms={:.3}", millis(u));
        }
        None => s.push_str(" upstream_ms=-"),
    }
    let _ = write!(
        s,
        " total_ms={:.3} bytes_in={} bytes_out={} affinity={}",
        millis(r.total),
        r.bytes_in,
        r.bytes_out,
        r.affinity
    );
    match r.session {
        Some(p) => {
            let _ = write!(s, " session={p:016x}");
        }
        None => s.push_str(" session=-"),
    }
    if let Some(e) = r.error {
        let _ = write!(s, " error={e}");
    }
}

pub fn format_json(s: &mut String, r: &Record<'_>) {
    s.push_str("{\"time\":\"");
    crate::time::write_rfc3339(s, r.start_millis);
    let _ = write!(s, "\",\"client\":\"{}\",\"listener\":", r.client);
    push_json_str(s, r.listener);
    let _ = write!(s, ",\"method\":");
    push_json_str(s, r.method);
    s.push_str(",\"uri\":\"");
    push_uri(s, r.uri, true);
    s.push('"');
    let _ = write!(s, ",\"protocol\":\"{}\",\"status\":{}", r.version, r.status);
    s.push_str(",\"pool\":");
    push_json_opt(s, r.pool);
    s.push_str(",\"backend\":");
    push_json_opt(s, r.backend);
    match r.upstream {
        Some(u) => {
            let _ = write!(s, ",\"upstream_ms\":{:.3}", millis(u));
        }
        None => s.push_str(",\"upstream_ms\":null"),
    }
    let _ = write!(s, ",\"total_ms\":{:.3},\"bytes_in\":{},\"bytes_out\":{}", millis(r.total), r.bytes_in, r.bytes_out);
    s.push_str(",\"affinity\":");
    push_json_str(s, r.affinity);
    match r.session {
        Some(p) => {
            let _ = write!(s, ",\"session\":\"{p:016x}\"");
        }
        None => s.push_str(",\"session\":null"),
    }
    s.push_str(",\"error\":");
    push_json_opt(s, r.error);
    s.push('}');
}

/// The URI, escaped, cut after [`MAX_URI`] bytes (at a character boundary) with `...`
/// marking the cut.
fn push_uri(s: &mut String, text: &str, json: bool) {
    if text.len() <= MAX_URI {
        push_escaped(s, text, json);
        return;
    }
    let mut end = MAX_URI;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    push_escaped(s, &text[..end], json);
    s.push_str("...");
}

fn push_json_opt(s: &mut String, v: Option<&str>) {
    match v {
        Some(v) => push_json_str(s, v),
        None => s.push_str("null"),
    }
}

fn push_json_str(s: &mut String, v: &str) {
    s.push('"');
    push_escaped(s, v, true);
    s.push('"');
}

/// Escapes quotes, backslashes and control characters so a hostile path cannot forge a
/// log line or break the JSON.
fn push_escaped(s: &mut String, v: &str, json: bool) {
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if c.is_control() => {
                if json {
                    let _ = write!(s, "\\u{:04x}", c as u32);
                } else {
                    let _ = write!(s, "\\x{:02x}", c as u32);
                }
            }
            c => s.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn record<'a>(method: &'a str, uri: &'a str) -> Record<'a> {
        Record {
            start_millis: 1_795_341_845_123,
            client: "127.0.0.1:5000".parse().unwrap(),
            listener: "web",
            method,
            uri,
            version: "HTTP/1.1",
            status: 200,
            pool: Some("shop"),
            backend: Some("app-1"),
            upstream: Some(Duration::from_micros(1204)),
            total: Duration::from_micros(1391),
            bytes_in: 3,
            bytes_out: 512,
            error: None,
            affinity: "hit",
            session: Some(0x00c0_ffee_0000_0042),
        }
    }

    #[test]
    fn text_line_has_every_field() {
        let (m, u) = ("GET", "/cart?id=1");
        let mut s = String::new();
        format_text(&mut s, &record(m, u));
        assert_eq!(
            s,
            "2026-11-22T10:04:05.123Z 127.0.0.1:5000 web \"GET /cart?id=1 HTTP/1.1\" 200 pool=shop backend=app-1 \
             upstream_ms=1.204 total_ms=1.391 bytes_in=3 bytes_out=512 affinity=hit session=00c0ffee00000042"
        );
    }

    #[test]
    fn json_line_parses_and_escapes() {
        let (m, u) = ("POST", "/a%22b");
        let mut r = record(m, u);
        r.error = Some("backend \"x\"\n");
        r.upstream = None;
        let mut s = String::new();
        format_json(&mut s, &r);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["status"], 200);
        assert_eq!(v["error"], "backend \"x\"\n");
        assert!(v["upstream_ms"].is_null());
        assert_eq!(v["bytes_out"], 512);
        assert_eq!(v["session"], "00c0ffee00000042");
        r.session = None;
        s.clear();
        format_json(&mut s, &r);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(v["session"].is_null());
    }

    #[test]
    fn pseudonyms_are_one_per_identity_and_per_key() {
        let with = |key: u8| AccessLog::start(LogFormat::Json, Box::new(io::sink()), 8, [key; 32]).unwrap();
        let (a, b) = (with(1), with(2));
        let id = [7u8; 16];
        let p = a.pseudonym(Some(id)).unwrap();
        assert_eq!(a.pseudonym(Some(id)), Some(p), "one identity, one pseudonym");
        assert_ne!(a.pseudonym(Some([8u8; 16])), Some(p));
        assert_ne!(b.pseudonym(Some(id)), Some(p), "another key, another pseudonym");
        assert_eq!(a.pseudonym(None), None);
        let off =
            AccessLog::open(&config::AccessLog { format: LogFormat::Off, path: None, session_key: None }).unwrap();
        assert_eq!(off.pseudonym(Some(id)), None, "no log, nothing computed");
    }

    #[test]
    fn long_uris_are_cut_and_marked() {
        // Reproduction: a 64 KiB request target (hyper accepts that much) used to be
        // logged whole, 64 KiB per queued line.
        let long = format!("/{}?q=1", "a".repeat(64 * 1024 - 8));
        let (m, u) = ("GET", long.as_str());
        let mut text = String::new();
        format_text(&mut text, &record(m, u));
        let logged = text.split(' ').nth(4).unwrap();
        assert_eq!(logged.len(), MAX_URI + 3, "{}", &text[..200]);
        assert!(logged.starts_with("/aaaa") && logged.ends_with("a..."), "{logged}");
        assert!(text.len() < MAX_URI + 300);
        let mut json = String::new();
        format_json(&mut json, &record(m, u));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let uri = v["uri"].as_str().unwrap();
        assert_eq!(uri.len(), MAX_URI + 3);
        assert!(uri.ends_with("a..."));
        // A URI within the bound is logged as it is, without the mark.
        let (m, u) = ("GET", &long[..MAX_URI]);
        let mut text = String::new();
        format_text(&mut text, &record(m, u));
        assert_eq!(text.split(' ').nth(4).unwrap(), &long[..MAX_URI]);
    }

    /// An output that says when a write reaches it, then blocks until released, as a full
    /// pipe or a stalled disk would; it reports what it got when the writer thread ends.
    struct Stalled {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
        got: Vec<u8>,
        done: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Stalled {
        fn drop(&mut self) {
            let _ = self.done.send(std::mem::take(&mut self.got));
        }
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_lines_instead_of_queueing_them_all() {
        // Reproduction: with the unbounded channel, every line a request wrote while the
        // output was stuck stayed in memory; nothing was ever dropped.
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let out = Stalled { entered: entered_tx, release: release_rx, got: Vec::new(), done: done_tx };
        let queue = 4;
        let log = AccessLog::start(LogFormat::Text, Box::new(out), queue, [0; 32]).unwrap();
        let (m, u) = ("GET", "/first");
        log.write(&record(m, u));
        // The writer thread took the first line and is now stuck writing it.
        entered.recv_timeout(Duration::from_secs(10)).expect("the writer reached its output");
        let (m, u) = ("GET", "/queued");
        for _ in 0..queue + 3 {
            log.write(&record(m, u));
        }
        assert_eq!(log.dropped(), 3, "the queue holds {queue} lines; the rest must be dropped");
        // Unstuck, the writer writes what was queued and ends when the log is dropped.
        drop(log);
        drop(release);
        let got = String::from_utf8(done.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
        assert_eq!(got.lines().filter(|l| l.contains("/first")).count(), 1, "{got}");
        assert_eq!(got.lines().filter(|l| l.contains("/queued")).count(), queue, "{got}");
    }
}
