//! Replaying Tether's JSON access log as a scenario's workload.
//!
//! Each line of the log becomes one simulated request at its logged start time (relative to
//! the log's first line), of its logged session pseudonym (`"session"`; a line without one is
//! a request of no session) and of its logged pool. The log is streamed: [`Reader`] holds
//! only the lines of a short reordering window, never the file. Tether writes a line when a
//! request ends, so lines are in the order requests ended, not started; the reader puts them
//! back in start order within [`WINDOW_MS`] (a line that ended later than that after a line
//! which started after it, a long download or a tunnel, is replayed at the time the replay
//! has reached, and counted as late).
//!
//! What a line gives the simulator is only its time, pool, backend, verdict, session
//! pseudonym and duration: never its client address, URI or anything else, so a replay
//! knows nothing of the users the pseudonyms stand for.
//!
//! Lines that are not JSON, not Tether's, or not requests that reached a pool are counted
//! ([`Counts`]), never fatal; a file whose first lines are none of Tether's is refused when
//! the scenario is read ([`probe`]).

use std::borrow::Cow;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::affinity::verdict::Verdict;

/// How far (in logged start time) lines are put back in order: a request that took longer
/// than this, and ended after requests that started after it, is replayed late.
pub const WINDOW_MS: u64 = 10_000;

/// Lines [`probe`] reads at the start of a file before it decides the file is not a Tether
/// JSON access log.
const PROBE_LINES: usize = 50;

/// How much of the end of the file [`probe`] reads to find the log's last time.
const TAIL_BYTES: u64 = 1 << 20;

/// The longest line read; a longer one (Tether cuts URIs at 4 KiB) is skipped and counted
/// as unparsable.
const MAX_LINE: usize = 64 * 1024;

/// A log to replay, as the scenario names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// The file, resolved against the scenario's directory.
    pub path: PathBuf,
    /// The path as the scenario writes it, for the report.
    pub shown: String,
    /// Only this logged pool's requests are replayed: the scenario's `pool`, else the pool
    /// of the log's first request; `None` (no request among the first lines reached a
    /// pool): every pool's.
    pub pool: Option<String>,
    /// Unix ms of the first line: simulated time 0.
    pub first_ms: u64,
    /// Unix ms of the latest start among the file's last lines (an estimate of the end).
    pub last_ms: u64,
    /// A session without a request for this long is no longer in progress, and forgotten.
    pub session_idle_ms: u64,
}

/// One line, as far as the replay reads it. Fields Tether writes and the replay does not
/// need (client, URI, method...) are not even parsed.
#[derive(Debug, Deserialize)]
struct LogLine<'a> {
    #[serde(borrow)]
    time: Cow<'a, str>,
    status: u16,
    #[serde(borrow)]
    pool: Option<Cow<'a, str>>,
    #[serde(borrow)]
    backend: Option<Cow<'a, str>>,
    #[serde(borrow)]
    affinity: Cow<'a, str>,
    #[serde(borrow, default)]
    session: Option<Cow<'a, str>>,
    #[serde(default)]
    total_ms: Option<f64>,
}

/// What the log says of one request, ready to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Simulated ms (logged start time minus the first line's).
    pub t_ms: u64,
    /// The line's place in the file, which orders requests of one millisecond.
    pub seq: u64,
    pub session: Option<u64>,
    /// The logged pool, by [`Reader::pool_name`] index.
    pub pool: u16,
    /// The logged backend, by [`Reader::backend_name`] index; `None`: Tether answered itself.
    pub backend: Option<u16>,
    /// The logged verdict; `None` when it is not one Tether knows.
    pub verdict: Option<Verdict>,
    /// How long the request took, in whole ms.
    pub service_ms: u32,
}

impl Ord for Request {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: the heap's top is the earliest.
        (other.t_ms, other.seq).cmp(&(self.t_ms, self.seq))
    }
}

impl PartialOrd for Request {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// What became of the log's lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every line read (blank lines included).
    pub lines: u64,
    /// Lines replayed as requests.
    pub requests: u64,
    /// Of those, requests of no session.
    pub sessionless: u64,
    /// Lines that are not JSON, or not a Tether access log line (no `time`, `status`,
    /// `pool`, `backend` or `affinity`, a time that is not RFC 3339, a pseudonym that is not
    /// 16 hex digits), or longer than 64 KiB.
    pub unparsable: u64,
    /// Lines of requests that reached no pool (refused before routing).
    pub not_to_a_pool: u64,
    /// Lines of another pool than the one replayed.
    pub other_pool: u64,
    /// Requests replayed later than they started (see [`WINDOW_MS`]).
    pub late: u64,
    /// Requests that started after the end of the run (`duration`), not replayed.
    pub after_end: u64,
    /// An error reading the file, which ended the replay early.
    pub read_error: Option<String>,
}

/// Reads a log as requests in start order, streaming.
pub struct Reader {
    input: Box<dyn BufRead>,
    pool: Option<String>,
    first_ms: u64,
    end_ms: u64,
    line: Vec<u8>,
    /// The window: lines read in start order (the usual case) queue in `in_order`; a line
    /// that started before the last one queued goes to `window`, a heap.
    in_order: VecDeque<Request>,
    window: BinaryHeap<Request>,
    /// The latest logged start read so far (simulated ms).
    read_up_to: u64,
    /// The time of the last request handed out.
    released: u64,
    eof: bool,
    pools: Names,
    backends: Names,
    pub counts: Counts,
}

/// Names interned to small indexes.
#[derive(Default)]
struct Names {
    index: HashMap<Box<str>, u16>,
    names: Vec<Box<str>>,
    /// The last name asked for: a log's lines nearly all name one pool.
    last: u16,
}

impl Names {
    fn get(&mut self, name: &str) -> Option<u16> {
        if self.names.get(usize::from(self.last)).is_some_and(|n| **n == *name) {
            return Some(self.last);
        }
        if let Some(&i) = self.index.get(name) {
            self.last = i;
            return Some(i);
        }
        let i = u16::try_from(self.names.len()).ok().filter(|&i| i < u16::MAX)?;
        self.index.insert(name.into(), i);
        self.names.push(name.into());
        Some(i)
    }
}

impl Reader {
    /// Opens `replay`'s file; requests that start after `end_ms` (simulated) are counted,
    /// not replayed.
    pub fn open(replay: &Replay, end_ms: u64) -> io::Result<Reader> {
        let file = File::open(&replay.path)?;
        Ok(Reader::new(Box::new(BufReader::with_capacity(1 << 16, file)), replay, end_ms))
    }

    fn new(input: Box<dyn BufRead>, replay: &Replay, end_ms: u64) -> Reader {
        Reader {
            input,
            pool: replay.pool.clone(),
            first_ms: replay.first_ms,
            end_ms,
            line: Vec::with_capacity(512),
            in_order: VecDeque::new(),
            window: BinaryHeap::new(),
            read_up_to: 0,
            released: 0,
            eof: false,
            pools: Names::default(),
            backends: Names::default(),
            counts: Counts::default(),
        }
    }

    pub fn pool_name(&self, i: u16) -> &str {
        &self.pools.names[usize::from(i)]
    }

    pub fn backend_name(&self, i: u16) -> &str {
        &self.backends.names[usize::from(i)]
    }

    /// The earliest line waiting: from the queue or the heap (`true`), or none.
    fn earliest(&self) -> Option<(Request, bool)> {
        match (self.in_order.front(), self.window.peek()) {
            (Some(q), Some(h)) if (h.t_ms, h.seq) < (q.t_ms, q.seq) => Some((*h, true)),
            (Some(q), _) => Some((*q, false)),
            (None, h) => h.map(|h| (*h, true)),
        }
    }

    /// Reads until the earliest line waiting is older than the window behind the latest
    /// line read: no line still to come can start before it, but a late one.
    fn fill(&mut self) -> Option<(Request, bool)> {
        loop {
            let first = self.earliest();
            if self.eof || first.is_some_and(|(r, _)| r.t_ms + WINDOW_MS <= self.read_up_to) {
                return first;
            }
            self.read_one();
        }
    }

    /// The next request in start order, `None` at the end of the log.
    pub fn next_request(&mut self) -> Option<Request> {
        let (r, from_heap) = self.fill()?;
        if from_heap {
            self.window.pop();
        } else {
            self.in_order.pop_front();
        }
        self.released = r.t_ms;
        Some(r)
    }

    /// The time of the next request, without taking it.
    pub fn peek_time(&mut self) -> Option<u64> {
        self.fill().map(|(r, _)| r.t_ms)
    }

    fn read_one(&mut self) {
        self.line.clear();
        let n = match (&mut self.input).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut self.line) {
            Ok(n) => n,
            Err(e) => {
                self.counts.read_error = Some(e.to_string());
                self.eof = true;
                return;
            }
        };
        if n == 0 {
            self.eof = true;
            return;
        }
        self.counts.lines += 1;
        if self.line.len() > MAX_LINE && !self.line.ends_with(b"\n") {
            // The rest of an overlong line, up to its end.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                match (&mut self.input).take(MAX_LINE as u64).read_until(b'\n', &mut rest) {
                    Ok(0) => break,
                    Ok(_) if rest.ends_with(b"\n") => break,
                    Ok(_) => {}
                    Err(e) => {
                        self.counts.read_error = Some(e.to_string());
                        self.eof = true;
                        break;
                    }
                }
            }
            self.counts.unparsable += 1;
            return;
        }
        let seq = self.counts.lines;
        let line = std::mem::take(&mut self.line);
        self.take_line(&line, seq);
        self.line = line;
    }

    fn take_line(&mut self, raw: &[u8], seq: u64) {
        let text = trim(raw);
        if text.is_empty() {
            return;
        }
        let Some(l) = parse_line(text) else {
            self.counts.unparsable += 1;
            return;
        };
        let Some(pool) = l.pool.as_deref() else {
            self.counts.not_to_a_pool += 1;
            return;
        };
        if self.pool.as_deref().is_some_and(|p| p != pool) {
            self.counts.other_pool += 1;
            return;
        }
        let t_ms = l.at_ms.saturating_sub(self.first_ms);
        if t_ms > self.end_ms {
            self.counts.after_end += 1;
            return;
        }
        let (Some(pool), backend) = (self.pools.get(pool), l.backend.as_deref().map(|b| self.backends.get(b))) else {
            self.counts.unparsable += 1;
            return;
        };
        let backend = match backend {
            Some(None) => {
                self.counts.unparsable += 1;
                return;
            }
            Some(b) => b,
            None => None,
        };
        self.read_up_to = self.read_up_to.max(t_ms);
        let late = t_ms < self.released;
        if late {
            self.counts.late += 1;
        }
        self.counts.requests += 1;
        if l.session.is_none() {
            self.counts.sessionless += 1;
        }
        let r = Request {
            t_ms: t_ms.max(self.released),
            seq,
            session: l.session,
            pool,
            backend,
            verdict: l.verdict,
            service_ms: l.service_ms,
        };
        // Sequence numbers only grow: a line at or after the last one queued keeps the
        // queue in order.
        if self.in_order.back().is_none_or(|last| last.t_ms <= r.t_ms) {
            self.in_order.push_back(r);
        } else {
            self.window.push(r);
        }
    }
}

/// A line's fields, checked.
struct Parsed<'a> {
    at_ms: u64,
    pool: Option<Cow<'a, str>>,
    backend: Option<Cow<'a, str>>,
    verdict: Option<Verdict>,
    session: Option<u64>,
    service_ms: u32,
}

fn trim(raw: &[u8]) -> &[u8] {
    let mut s = raw;
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// One line of Tether's JSON access log, or `None` when it is not one.
fn parse_line(text: &[u8]) -> Option<Parsed<'_>> {
    match fast::fields(text) {
        Some(f) => checked(f.time, f.status, f.pool, f.backend, f.affinity, f.session, f.total_ms),
        None => {
            let l: LogLine<'_> = serde_json::from_slice(text).ok()?;
            checked(l.time, l.status, l.pool, l.backend, l.affinity, l.session, l.total_ms)
        }
    }
}

/// The fields of a line, checked and converted.
fn checked<'a>(
    time: Cow<'a, str>,
    _status: u16,
    pool: Option<Cow<'a, str>>,
    backend: Option<Cow<'a, str>>,
    affinity: Cow<'a, str>,
    session: Option<Cow<'a, str>>,
    total_ms: Option<f64>,
) -> Option<Parsed<'a>> {
    let at_ms = parse_rfc3339(&time)?;
    let session = match session.as_deref() {
        None => None,
        Some(s) if s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit()) => Some(u64::from_str_radix(s, 16).ok()?),
        Some(_) => return None,
    };
    let verdict = Verdict::ALL.iter().find(|(_, label)| *label == affinity).map(|(v, _)| *v);
    let service_ms =
        total_ms.filter(|x| x.is_finite() && *x > 0.0).map_or(0, |x| x.round().min(f64::from(u32::MAX)) as u32);
    Some(Parsed { at_ms, pool, backend, verdict, session, service_ms })
}

/// A parser for the lines as Tether writes them (one flat object, no whitespace, strings
/// and numbers and nulls), five times faster than `serde_json` into [`LogLine`]: the
/// replay's speed is mostly reading. It answers only when it is sure to read a line as
/// `serde_json` would; anything else (an escape in a field the replay reads, any `\u`
/// escape, whitespace, a nested value, a type it does not expect, a repeated field) is
/// left to `serde_json` (`None`), which reads it or refuses it.
mod fast {
    use std::borrow::Cow;

    pub struct Fields<'a> {
        pub time: Cow<'a, str>,
        pub status: u16,
        pub pool: Option<Cow<'a, str>>,
        pub backend: Option<Cow<'a, str>>,
        pub affinity: Cow<'a, str>,
        pub session: Option<Cow<'a, str>>,
        pub total_ms: Option<f64>,
    }

    enum Value<'a> {
        /// A string without escapes.
        Str(&'a str),
        /// A string with escapes (other than `\u`), which this parser does not decode.
        Escaped,
        Num(&'a str),
        Null,
        Bool,
    }

    /// The end (after the closing quote) of the string whose opening quote is at `i`, and
    /// whether it has escapes.
    fn string(b: &[u8], i: usize) -> Option<(usize, bool)> {
        let mut j = i + 1;
        let mut escaped = false;
        loop {
            // A plain loop: most strings are a few bytes, shorter than a `memchr` call's
            // setup pays for.
            let k = j + b[j..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
            if b[k] < 0x20 {
                return None;
            }
            if b[k] == b'"' {
                return Some((k + 1, escaped));
            }
            match b.get(k + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                    escaped = true;
                    j = k + 2;
                }
                _ => return None,
            }
        }
    }

    /// The end of the JSON number at `i`: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(b: &[u8], i: usize) -> Option<usize> {
        let digits = |mut j: usize| {
            let from = j;
            while b.get(j).is_some_and(u8::is_ascii_digit) {
                j += 1;
            }
            (j > from).then_some(j)
        };
        let mut j = i + usize::from(b.get(i) == Some(&b'-'));
        j = match b.get(j)? {
            b'0' => j + 1,
            b'1'..=b'9' => digits(j)?,
            _ => return None,
        };
        if b.get(j) == Some(&b'.') {
            j = digits(j + 1)?;
        }
        if matches!(b.get(j), Some(b'e' | b'E')) {
            j += 1;
            if matches!(b.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            j = digits(j)?;
        }
        Some(j)
    }

    fn value<'a>(s: &'a str, i: usize) -> Option<(Value<'a>, usize)> {
        let b = s.as_bytes();
        match b.get(i)? {
            b'"' => {
                let (end, escaped) = string(b, i)?;
                Some((if escaped { Value::Escaped } else { Value::Str(&s[i + 1..end - 1]) }, end))
            }
            b'n' if b[i..].starts_with(b"null") => Some((Value::Null, i + 4)),
            b't' if b[i..].starts_with(b"true") => Some((Value::Bool, i + 4)),
            b'f' if b[i..].starts_with(b"false") => Some((Value::Bool, i + 5)),
            _ => {
                let end = number(b, i)?;
                Some((Value::Num(&s[i..end]), end))
            }
        }
    }

    pub fn fields(line: &[u8]) -> Option<Fields<'_>> {
        let s = std::str::from_utf8(line).ok()?;
        let b = s.as_bytes();
        if b.first() != Some(&b'{') {
            return None;
        }
        let (mut time, mut status, mut affinity) = (None, None, None);
        let (mut pool, mut backend, mut session, mut total_ms) = (None, None, None, None);
        let mut i = 1;
        if b.get(i) == Some(&b'}') {
            return None;
        }
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let (end, escaped) = string(b, i)?;
            if escaped {
                return None;
            }
            let key = &s[i + 1..end - 1];
            if b.get(end) != Some(&b':') {
                return None;
            }
            let (v, next) = value(s, end + 1)?;
            // A field read twice is `serde_json`'s to refuse.
            let once = |slot: bool| (!slot).then_some(());
            match (key, v) {
                ("time", Value::Str(t)) => {
                    once(time.is_some())?;
                    time = Some(t);
                }
                ("status", Value::Num(n)) => {
                    once(status.is_some())?;
                    status = Some(n.parse::<u16>().ok()?);
                }
                ("affinity", Value::Str(a)) => {
                    once(affinity.is_some())?;
                    affinity = Some(a);
                }
                ("pool" | "backend" | "session", v) => {
                    let v = match v {
                        Value::Str(x) => Some(x),
                        Value::Null => None,
                        _ => return None,
                    };
                    let slot = match key {
                        "pool" => &mut pool,
                        "backend" => &mut backend,
                        _ => &mut session,
                    };
                    once(slot.is_some())?;
                    *slot = Some(v);
                }
                ("total_ms", v) => {
                    let v = match v {
                        // Out of f64's range is `serde_json`'s error to give.
                        Value::Num(n) => Some(n.parse::<f64>().ok().filter(|x| x.is_finite())?),
                        Value::Null => None,
                        _ => return None,
                    };
                    once(total_ms.is_some())?;
                    total_ms = Some(v);
                }
                ("time" | "status" | "affinity", _) => return None,
                _ => {}
            }
            i = next;
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b'}') if i + 1 == b.len() => break,
                _ => return None,
            }
        }
        Some(Fields {
            time: Cow::Borrowed(time?),
            status: status?,
            pool: pool.flatten().map(Cow::Borrowed),
            backend: backend.flatten().map(Cow::Borrowed),
            affinity: Cow::Borrowed(affinity?),
            session: session.flatten().map(Cow::Borrowed),
            total_ms: total_ms.flatten(),
        })
    }
}

/// `2026-11-22T10:04:05.123Z` (what Tether writes: UTC, milliseconds) as Unix ms. Seconds
/// without a fraction, or with up to nine digits of one, read too; other offsets do not.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let d = &b[r];
        d.iter().all(u8::is_ascii_digit).then(|| d.iter().fold(0u64, |n, c| n * 10 + u64::from(c - b'0')))
    };
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut ms = 0;
    if let [b'.', frac @ ..] = rest {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let scale = [100, 10, 1];
        ms = frac[..digits.min(3)].iter().zip(scale).map(|(c, s)| u64::from(c - b'0') * s).sum();
        rest = &frac[digits..];
    }
    if !matches!(rest, [b'Z' | b'z']) {
        return None;
    }
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + mi * 60 + sec;
    Some(secs * 1000 + ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Why a file cannot be replayed (the scenario reports it at its `replay` key).
///
/// For a file that is one: the Unix ms of its first line, the latest start among its last
/// lines, and the pool of its first request that reached one (among the first lines).
pub fn probe(path: &Path) -> Result<(u64, u64, Option<String>), String> {
    let file = File::open(path).map_err(|e| format!("cannot read the access log {}: {e}", path.display()))?;
    let mut input = BufReader::new(file);
    let mut line = Vec::new();
    let mut first = None;
    let mut pool = None;
    let mut seen = 0;
    let mut objects = false;
    while seen < PROBE_LINES && pool.is_none() {
        line.clear();
        let n = (&mut input)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read the access log {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        let text = trim(&line);
        if text.is_empty() {
            continue;
        }
        seen += 1;
        objects |= text.first() == Some(&b'{');
        if let Some(p) = parse_line(text) {
            first = first.or(Some(p.at_ms));
            pool = p.pool.map(Cow::into_owned);
        }
    }
    let Some(first) = first else {
        let hint = if seen == 0 {
            "it is empty".to_string()
        } else if objects {
            format!("none of its first {seen} lines has Tether's fields (time, status, pool, backend, affinity)")
        } else {
            format!("none of its first {seen} lines is JSON (a text log? set access_log.format = \"json\" for replays)")
        };
        return Err(format!("{} is not a Tether JSON access log: {hint}", path.display()));
    };
    // The end: the latest start among the last lines (lines are written as requests end).
    let mut file = input.into_inner();
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let from = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(from)).map_err(|e| e.to_string())?;
    let mut tail = Vec::new();
    file.take(TAIL_BYTES).read_to_end(&mut tail).map_err(|e| e.to_string())?;
    let mut last = first;
    // The first piece may be the end of a line cut by the seek: skipped unless whole.
    for (k, l) in tail.split(|&c| c == b'\n').enumerate() {
        if k == 0 && from > 0 {
            continue;
        }
        if let Some(p) = parse_line(trim(l)) {
            last = last.max(p.at_ms);
        }
    }
    Ok((first, last, pool))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(pool: Option<&str>) -> Replay {
        Replay {
            path: PathBuf::new(),
            shown: String::new(),
            pool: pool.map(str::to_string),
            first_ms: parse_rfc3339("2026-12-04T10:00:00.000Z").unwrap(),
            last_ms: 0,
            session_idle_ms: 1_800_000,
        }
    }

    fn line(time: &str, pool: &str, backend: &str, verdict: &str, session: &str) -> String {
        format!(
            "{{\"time\":\"{time}\",\"client\":\"127.0.0.1:1\",\"listener\":\"web\",\"method\":\"GET\",\"uri\":\"/\",\
             \"protocol\":\"HTTP/1.1\",\"status\":200,\"pool\":{pool},\"backend\":{backend},\"upstream_ms\":1.0,\
             \"total_ms\":2.4,\"bytes_in\":0,\"bytes_out\":5,\"affinity\":\"{verdict}\",\"session\":{session},\"error\":null}}\n"
        )
    }

    fn read_all(text: &str, pool: Option<&str>) -> (Vec<Request>, Counts) {
        let mut r = Reader::new(Box::new(io::Cursor::new(text.as_bytes().to_vec())), &replay(pool), u64::MAX);
        let mut out = Vec::new();
        while let Some(q) = r.next_request() {
            out.push(q);
        }
        (out, r.counts)
    }

    #[test]
    fn times_read_as_tether_writes_them() {
        let mut s = String::new();
        for ms in [0, 1_795_341_845_123, 1_800_000_000_000, 4_102_444_799_999] {
            s.clear();
            crate::time::write_rfc3339(&mut s, ms);
            assert_eq!(parse_rfc3339(&s), Some(ms), "{s}");
        }
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00Z"), parse_rfc3339("2026-12-04T10:00:00.000Z"));
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00.5Z").unwrap() % 1000, 500);
        for bad in [
            "",
            "2026-12-04",
            "2026-12-04T10:00:00+01:00",
            "2026-13-04T10:00:00Z",
            "2026-12-04T10:00:00.Z",
            "x026-12-04T10:00:00Z",
            "2026-12-04T10:00:00.000Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn lines_become_requests_in_start_order_and_the_rest_is_counted() {
        let mut log = String::new();
        log += &line("2026-12-04T10:00:00.000Z", "\"web\"", "\"a\"", "new", "\"00000000000000aa\"");
        // Ended after the next one but started before it: put back in order.
        log += &line("2026-12-04T10:00:02.000Z", "\"web\"", "\"b\"", "new", "\"00000000000000bb\"");
        log += &line("2026-12-04T10:00:01.000Z", "\"web\"", "\"a\"", "hit", "\"00000000000000aa\"");
        log += "not json at all\n";
        log += "{\"time\":\"2026-12-04T10:00:01.000Z\"}\n";
        log += &line("2026-12-04T10:00:03.000Z", "null", "null", "-", "null");
        log += &line("2026-12-04T10:00:03.000Z", "\"other\"", "\"x\"", "-", "null");
        log += "\n";
        log += &line("2026-12-04T10:00:03.000Z", "\"web\"", "null", "new", "\"00000000000000cc\"");
        log += &line("2026-12-04T10:00:03.000Z", "\"web\"", "\"a\"", "-", "null");
        log += &line("2026-12-04T10:00:04.000Z", "\"web\"", "\"a\"", "hit", "\"0000000000000zzz\"");
        let (reqs, counts) = read_all(&log, Some("web"));
        let times: Vec<u64> = reqs.iter().map(|r| r.t_ms).collect();
        assert_eq!(times, [0, 1000, 2000, 3000, 3000]);
        assert_eq!(reqs[0].session, Some(0xaa));
        assert_eq!(reqs[1].verdict, Some(Verdict::Hit));
        assert_eq!(reqs[0].service_ms, 2);
        assert_eq!(reqs[3].backend, None);
        assert_eq!(reqs[4].session, None);
        // One millisecond, two requests: file order.
        assert!(reqs[3].seq < reqs[4].seq);
        assert_eq!(
            counts,
            Counts {
                lines: 11,
                requests: 5,
                sessionless: 1,
                unparsable: 3,
                not_to_a_pool: 1,
                other_pool: 1,
                late: 0,
                after_end: 0,
                read_error: None
            }
        );
        // Without a pool named, every pool's requests.
        let (reqs, counts) = read_all(&log, None);
        assert_eq!((reqs.len(), counts.other_pool), (6, 0));
    }

    #[test]
    fn a_line_later_than_the_window_is_replayed_late() {
        let mut log = String::new();
        log += &line("2026-12-04T10:00:00.000Z", "\"web\"", "\"a\"", "new", "null");
        log += &line("2026-12-04T10:00:30.000Z", "\"web\"", "\"a\"", "new", "null");
        log += &line("2026-12-04T10:00:40.000Z", "\"web\"", "\"a\"", "new", "null");
        // A tunnel that started at 5 s and was logged when it closed, after 40 s.
        log += &line("2026-12-04T10:00:05.000Z", "\"web\"", "\"b\"", "new", "null");
        let (reqs, counts) = read_all(&log, None);
        let times: Vec<u64> = reqs.iter().map(|r| r.t_ms).collect();
        assert_eq!(times, [0, 30_000, 30_000, 40_000]);
        assert_eq!(counts.late, 1);
    }

    /// A line's fields, owned: time, status, pool, backend, affinity, session, total_ms.
    type Owned = (String, u16, Option<String>, Option<String>, String, Option<String>, Option<f64>);

    /// The fast parser reads what `serde_json` reads, or leaves the line to it: lines as
    /// Tether writes them, and many mutations of them (bytes dropped, inserted, repeated).
    #[test]
    fn the_fast_parser_agrees_with_serde_json() {
        let base = [
            line("2026-12-04T10:00:00.000Z", "\"web\"", "\"a\"", "new", "\"00000000000000aa\""),
            line("2026-12-04T10:00:00.123Z", "null", "null", "-", "null"),
            line("2026-12-04T10:00:00.123Z", "\"w\\\"eb\"", "\"a\"", "repin:down", "null"),
            "{\"time\":\"2026-12-04T10:00:00.000Z\",\"status\":200,\"affinity\":\"hit\",\"total_ms\":-0.5e-1,\"x\":true,\"y\":false,\"uri\":\"/a\\\\b\\\"c\\u00e9\"}".to_string(),
        ];
        let serde = |t: &[u8]| -> Option<Owned> {
            let l: LogLine<'_> = serde_json::from_slice(t).ok()?;
            let o = |c: Option<Cow<'_, str>>| c.map(Cow::into_owned);
            Some((
                l.time.into_owned(),
                l.status,
                o(l.pool),
                o(l.backend),
                l.affinity.into_owned(),
                o(l.session),
                l.total_ms,
            ))
        };
        let alphabet = b"{}[]\":,\\ 0123456789.eE+-nultrfasb/\x01\xc3";
        let mut rng = crate::simulate::engine::Rng::new(3);
        let (mut fast_read, mut tried) = (0, 0);
        for b in &base {
            for _ in 0..20_000 {
                let mut t = b.trim_end().as_bytes().to_vec();
                for _ in 0..1 + rng.next_u64() % 3 {
                    let at = (rng.next_u64() % (t.len() as u64 + 1)) as usize;
                    match rng.next_u64() % 3 {
                        0 if at < t.len() => {
                            t.remove(at);
                        }
                        1 => t.insert(at, alphabet[(rng.next_u64() % alphabet.len() as u64) as usize]),
                        _ => {
                            // A piece of the line again, somewhere else: repeated fields.
                            let from = (rng.next_u64() % t.len() as u64) as usize;
                            let piece: Vec<u8> = t[from..(from + 30).min(t.len())].to_vec();
                            t.splice(at..at, piece);
                        }
                    }
                }
                tried += 1;
                if let Some(f) = fast::fields(&t) {
                    fast_read += 1;
                    let o = |c: Option<Cow<'_, str>>| c.map(Cow::into_owned);
                    let got = (
                        f.time.into_owned(),
                        f.status,
                        o(f.pool),
                        o(f.backend),
                        f.affinity.into_owned(),
                        o(f.session),
                        f.total_ms,
                    );
                    assert_eq!(Some(got), serde(&t), "{}", String::from_utf8_lossy(&t));
                }
            }
            // Unmutated, Tether's own lines take the fast path (but the one with escapes).
            assert_eq!(fast::fields(b.trim_end().as_bytes()).is_some(), !b.contains("\\\""), "{b}");
        }
        assert!(fast_read > tried / 20, "the mutations left too few lines to compare: {fast_read} of {tried}");
    }

    #[test]
    fn hostile_lines_are_counted_not_fatal() {
        let long = format!("{{\"time\":\"{}\"}}\n", "x".repeat(MAX_LINE * 2));
        let mut log = long;
        log += "\u{0}\u{1}\u{2}\n{\"time\":1}\n[1,2]\n{\"time\":\"2026-12-04T10:00:00.000Z\",\"status\":-1,\"pool\":\"web\",\"backend\":\"a\",\"affinity\":\"new\"}\n";
        log += &line("2026-12-04T10:00:01.000Z", "\"web\"", "\"a\"", "something-new", "\"00000000000000aa\"");
        let (reqs, counts) = read_all(&log, None);
        assert_eq!(counts.unparsable, 5);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].verdict, None, "an unknown verdict is no verdict");
    }
}
