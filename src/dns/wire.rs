//! The DNS wire format (RFC 1035, SRV from RFC 2782), as much of it as a stub resolver
//! needs: one query to send, and the answer to it read back.
//!
//! Parsing never panics and never trusts a length: every read is bounds-checked, a
//! compressed name may only point backwards (so following pointers always ends), a name
//! is at most 255 bytes and a packet at most 65535. What does not parse is an error, and
//! [`Response::check`] refuses an answer to any question but the one asked.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Record types Tether asks for or follows.
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;

/// The response codes Tether tells apart.
pub const RCODE_OK: u8 = 0;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;

/// The longest name on the wire, in bytes (RFC 1035 section 2.3.4).
const MAX_NAME: usize = 255;
/// At most this many records of a section are kept; more are read over and dropped.
const MAX_RECORDS: usize = 512;

/// Why a packet was not a usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The packet ends inside something it announced.
    Truncated,
    /// A name is too long, has a label over 63 bytes, a reserved label type or a pointer
    /// that does not point backwards.
    BadName,
    /// Not a response, or not to a standard query.
    NotAResponse,
    /// It answers another question (id, name, type or class differ).
    OtherQuestion,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireError::Truncated => "the packet ends early",
            WireError::BadName => "a name in the packet is malformed",
            WireError::NotAResponse => "not a response to a standard query",
            WireError::OtherQuestion => "an answer to another question",
        })
    }
}

/// Writes a query for `name` (dotted, a trailing dot allowed) of `qtype` with id `id`,
/// recursion desired. `Err` when `name` is not a name that can be asked.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    // Flags: a query (QR 0), opcode 0, RD 1.
    out.extend_from_slice(&[0x01, 0x00]);
    // One question, no answers, authorities or additionals.
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    encode_name(name, &mut out)?;
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

/// Appends `name` as labels. The root (`""` or `"."`) is one zero byte.
fn encode_name(name: &str, out: &mut Vec<u8>) -> Result<(), WireError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let start = out.len();
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(WireError::BadName);
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    if out.len() - start > MAX_NAME {
        return Err(WireError::BadName);
    }
    Ok(())
}

/// One resource record's data, for the types Tether reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Cname(String),
    /// Any other type, by number; its data is skipped.
    Other(u16),
}

/// A resource record: its owner name (lower case, no trailing dot), TTL and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub ttl: u32,
    pub data: RData,
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    /// TC: the answer did not fit; ask again over TCP.
    pub truncated: bool,
    pub rcode: u8,
    /// The question it answers (name lower case), if it has one.
    pub question: Option<(String, u16, u16)>,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// A bounds-checked reader over a packet.
struct Reader<'a> {
    packet: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, WireError> {
        let b = *self.packet.get(self.at).ok_or(WireError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes([self.u8()?, self.u8()?, self.u8()?, self.u8()?]))
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.packet.get(self.at..end).ok_or(WireError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    /// A possibly compressed name at the cursor, lower-cased and dotted without the root's
    /// dot; the cursor moves past its bytes at this place (not those pointed to).
    fn name(&mut self) -> Result<String, WireError> {
        let (name, end) = read_name(self.packet, self.at)?;
        self.at = end;
        Ok(name)
    }
}

/// Reads the name at `at` in `packet`; returns it and where the bytes at `at` end.
/// Pointers must point strictly before the pointer itself, so each jump goes backwards
/// and the walk ends; the name read is at most [`MAX_NAME`] bytes on the wire.
fn read_name(packet: &[u8], at: usize) -> Result<(String, usize), WireError> {
    let mut name = String::new();
    let mut pos = at;
    let mut end = None;
    let mut wire_len = 0usize;
    loop {
        let len = *packet.get(pos).ok_or(WireError::Truncated)?;
        match len >> 6 {
            0b00 => {
                wire_len += 1 + usize::from(len);
                if wire_len > MAX_NAME {
                    return Err(WireError::BadName);
                }
                if len == 0 {
                    return Ok((name, end.unwrap_or(pos + 1)));
                }
                let label = packet.get(pos + 1..pos + 1 + usize::from(len)).ok_or(WireError::Truncated)?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    // Names Tether asks for are host names; other bytes are kept escaped
                    // so that they never compare equal to one.
                    if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                        name.push(char::from(b.to_ascii_lowercase()));
                    } else {
                        name.push_str(&format!("\\{b:03}"));
                    }
                }
                pos += 1 + usize::from(len);
            }
            0b11 => {
                let low = *packet.get(pos + 1).ok_or(WireError::Truncated)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                if target >= pos {
                    return Err(WireError::BadName);
                }
                end.get_or_insert(pos + 2);
                pos = target;
            }
            // 0b01 (extended label types) and 0b10 are reserved.
            _ => return Err(WireError::BadName),
        }
    }
}

/// Parses a response packet. Only the header, the question and the answer and
/// additional sections are read (authorities are skipped by count).
pub fn parse(packet: &[u8]) -> Result<Response, WireError> {
    let mut r = Reader { packet, at: 0 };
    let id = r.u16()?;
    let flags = r.u16()?;
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0x0f;
    if !qr || opcode != 0 {
        return Err(WireError::NotAResponse);
    }
    let truncated = flags & 0x0200 != 0;
    let rcode = (flags & 0x000f) as u8;
    let (qd, an, ns, ar) = (r.u16()?, r.u16()?, r.u16()?, r.u16()?);
    let mut question = None;
    for i in 0..qd {
        let name = r.name()?;
        let (qtype, qclass) = (r.u16()?, r.u16()?);
        if i == 0 {
            question = Some((name, qtype, qclass));
        }
    }
    // A truncated answer may end anywhere: what came is not read further.
    if truncated {
        return Ok(Response { id, truncated, rcode, question, answers: Vec::new(), additionals: Vec::new() });
    }
    let answers = records(&mut r, an)?;
    records(&mut r, ns)?;
    let additionals = records(&mut r, ar)?;
    Ok(Response { id, truncated, rcode, question, answers, additionals })
}

/// Reads `count` records, keeping the first [`MAX_RECORDS`] of class IN.
fn records(r: &mut Reader<'_>, count: u16) -> Result<Vec<Record>, WireError> {
    let mut out = Vec::new();
    for _ in 0..count {
        let name = r.name()?;
        let (rtype, class, ttl, len) = (r.u16()?, r.u16()?, r.u32()?, r.u16()?);
        let start = r.at;
        let data = r.bytes(usize::from(len))?;
        let data = match (rtype, data.len()) {
            (TYPE_A, 4) => RData::A(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (TYPE_AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                RData::Aaaa(Ipv6Addr::from(b))
            }
            (TYPE_A | TYPE_AAAA, _) => return Err(WireError::Truncated),
            (TYPE_SRV, n) if n >= 7 => {
                let mut d = Reader { packet: r.packet, at: start };
                let (priority, weight, port) = (d.u16()?, d.u16()?, d.u16()?);
                let target = d.name()?;
                if d.at != start + n {
                    return Err(WireError::Truncated);
                }
                RData::Srv { priority, weight, port, target }
            }
            (TYPE_SRV, _) => return Err(WireError::Truncated),
            (TYPE_CNAME, n) => {
                let mut d = Reader { packet: r.packet, at: start };
                let target = d.name()?;
                if d.at != start + n {
                    return Err(WireError::Truncated);
                }
                RData::Cname(target)
            }
            (other, _) => RData::Other(other),
        };
        if class == CLASS_IN && out.len() < MAX_RECORDS {
            out.push(Record { name, ttl, data });
        }
    }
    Ok(out)
}

impl Response {
    /// `Ok` when this is the answer to query `id` for `name` (compared without case and
    /// trailing dot) of `qtype` in class IN; anything else is not for us.
    pub fn check(&self, id: u16, name: &str, qtype: u16) -> Result<(), WireError> {
        let want = normalise(name);
        match &self.question {
            Some((n, t, c)) if self.id == id && *n == want && *t == qtype && *c == CLASS_IN => Ok(()),
            _ => Err(WireError::OtherQuestion),
        }
    }

    /// The records of `qtype` that answer `name`: those owned by the name, or by the end
    /// of a chain of CNAMEs from it in the same answer (at most 8 links).
    pub fn records_for(&self, name: &str, qtype: u16) -> Vec<&Record> {
        let mut owner = normalise(name);
        for _ in 0..8 {
            let next = self.answers.iter().find_map(|r| match &r.data {
                RData::Cname(t) if r.name == owner && qtype != TYPE_CNAME => Some(t.clone()),
                _ => None,
            });
            match next {
                Some(t) => owner = t,
                None => break,
            }
        }
        self.answers.iter().filter(|r| r.name == owner && rtype(&r.data) == qtype).collect()
    }
}

/// The type number of a record's data.
pub fn rtype(d: &RData) -> u16 {
    match d {
        RData::A(_) => TYPE_A,
        RData::Aaaa(_) => TYPE_AAAA,
        RData::Srv { .. } => TYPE_SRV,
        RData::Cname(_) => TYPE_CNAME,
        RData::Other(t) => *t,
    }
}

/// A name as [`parse`] writes it: lower case, without the root's trailing dot.
pub fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response to `query` with the given answer records (name, type, data), each owned
    /// by a pointer to the question's name when `name` is `None`.
    fn answer(query: &[u8], flags: u16, records: &[(Option<&str>, u16, Vec<u8>)]) -> Vec<u8> {
        let mut p = query.to_vec();
        p[2..4].copy_from_slice(&flags.to_be_bytes());
        p[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (name, t, data) in records {
            match name {
                None => p.extend_from_slice(&[0xc0, 12]),
                Some(n) => encode_name(n, &mut p).unwrap(),
            }
            p.extend_from_slice(&t.to_be_bytes());
            p.extend_from_slice(&CLASS_IN.to_be_bytes());
            p.extend_from_slice(&300u32.to_be_bytes());
            p.extend_from_slice(&(data.len() as u16).to_be_bytes());
            p.extend_from_slice(data);
        }
        p
    }

    #[test]
    fn a_query_encodes_as_rfc_1035_says() {
        let q = encode_query(0x1234, "App.Example.", TYPE_A).unwrap();
        assert_eq!(
            q,
            [
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'A', b'p', b'p', 7, b'E', b'x', b'a', b'm', b'p',
                b'l', b'e', 0, 0, 1, 0, 1
            ]
        );
        assert_eq!(encode_query(1, "a..b", TYPE_A), Err(WireError::BadName));
        assert_eq!(encode_query(1, &"x".repeat(64), TYPE_A), Err(WireError::BadName));
        let long = vec!["abcdefghi"; 30].join(".");
        assert_eq!(encode_query(1, &long, TYPE_A), Err(WireError::BadName));
    }

    #[test]
    fn answers_are_read_with_compression_and_cname_chains() {
        let q = encode_query(7, "app.example", TYPE_A).unwrap();
        let mut cname = Vec::new();
        encode_name("real.example", &mut cname).unwrap();
        let p = answer(
            &q,
            0x8180,
            &[
                (None, TYPE_CNAME, cname),
                (Some("real.example"), TYPE_A, vec![10, 0, 0, 1]),
                (Some("REAL.example"), TYPE_A, vec![10, 0, 0, 2]),
                (Some("other.example"), TYPE_A, vec![10, 0, 0, 9]),
            ],
        );
        let r = parse(&p).unwrap();
        assert_eq!(r.check(7, "App.Example.", TYPE_A), Ok(()));
        assert_eq!(r.check(8, "app.example", TYPE_A), Err(WireError::OtherQuestion));
        assert_eq!(r.check(7, "app.example", TYPE_AAAA), Err(WireError::OtherQuestion));
        assert_eq!(r.check(7, "evil.example", TYPE_A), Err(WireError::OtherQuestion));
        let found: Vec<_> = r.records_for("app.example", TYPE_A).iter().map(|r| r.data.clone()).collect();
        assert_eq!(found, [RData::A(Ipv4Addr::new(10, 0, 0, 1)), RData::A(Ipv4Addr::new(10, 0, 0, 2))]);
    }

    #[test]
    fn srv_and_aaaa_records_are_read() {
        let q = encode_query(9, "_http._tcp.app", TYPE_SRV).unwrap();
        let mut srv = vec![0, 10, 0, 5, 0x1f, 0x90];
        encode_name("node-1.app", &mut srv).unwrap();
        let six = std::net::Ipv6Addr::LOCALHOST.octets().to_vec();
        let mut p = answer(&q, 0x8180, &[(None, TYPE_SRV, srv)]);
        // One additional AAAA record for the target.
        p[10..12].copy_from_slice(&1u16.to_be_bytes());
        encode_name("node-1.app", &mut p).unwrap();
        p.extend_from_slice(&TYPE_AAAA.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p.extend_from_slice(&60u32.to_be_bytes());
        p.extend_from_slice(&16u16.to_be_bytes());
        p.extend_from_slice(&six);
        let r = parse(&p).unwrap();
        let srvs = r.records_for("_http._tcp.app", TYPE_SRV);
        assert_eq!(srvs[0].data, RData::Srv { priority: 10, weight: 5, port: 8080, target: "node-1.app".into() });
        assert_eq!(r.additionals[0].data, RData::Aaaa(std::net::Ipv6Addr::LOCALHOST));
        assert_eq!(r.additionals[0].ttl, 60);
    }

    #[test]
    fn rcodes_and_truncation_are_reported() {
        let q = encode_query(3, "gone.example", TYPE_A).unwrap();
        let r = parse(&answer(&q, 0x8183, &[])).unwrap();
        assert_eq!(r.rcode, RCODE_NXDOMAIN);
        let r = parse(&answer(&q, 0x8182, &[])).unwrap();
        assert_eq!(r.rcode, RCODE_SERVFAIL);
        // TC set, and the answer cut mid-record: still a response saying "ask over TCP".
        let mut p = answer(&q, 0x8380, &[(None, TYPE_A, vec![1, 2, 3, 4])]);
        p.truncate(p.len() - 3);
        let r = parse(&p).unwrap();
        assert!(r.truncated);
        // A query is not a response.
        assert_eq!(parse(&q), Err(WireError::NotAResponse));
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        let q = encode_query(3, "x.example", TYPE_A).unwrap();
        let good = answer(&q, 0x8180, &[(None, TYPE_A, vec![1, 2, 3, 4])]);
        assert!(parse(&good).is_ok());
        // Every prefix of a good packet fails cleanly.
        for n in 0..good.len() {
            assert!(parse(&good[..n]).is_err(), "prefix of {n} bytes");
        }
        // A pointer to itself, and one pointing forwards.
        let mut looped = good.clone();
        let at = q.len();
        looped[at..at + 2].copy_from_slice(&[0xc0 | ((at >> 8) as u8), at as u8]);
        assert_eq!(parse(&looped), Err(WireError::BadName));
        let mut forward = good.clone();
        forward[at..at + 2].copy_from_slice(&[0xc0, 0xff]);
        assert_eq!(parse(&forward), Err(WireError::BadName));
        // Reserved label types.
        let mut reserved = good.clone();
        reserved[12] = 0x41;
        assert_eq!(parse(&reserved), Err(WireError::BadName));
        // An A record of 5 bytes.
        let bad_a = answer(&q, 0x8180, &[(None, TYPE_A, vec![1, 2, 3, 4, 5])]);
        assert_eq!(parse(&bad_a), Err(WireError::Truncated));
        // A SRV record whose target runs past its data.
        let mut srv = vec![0, 1, 0, 1, 0, 80];
        encode_name("t.example", &mut srv).unwrap();
        let mut bad_srv = answer(&q, 0x8180, &[(None, TYPE_SRV, srv)]);
        let len_at = bad_srv.len() - 11 - 2 - 6;
        bad_srv[len_at..len_at + 2].copy_from_slice(&7u16.to_be_bytes());
        assert!(parse(&bad_srv).is_err());
        // A name made of many labels, each pointing back to the one before: the walk
        // ends, and the name is refused once it passes 255 bytes.
        let mut chain = vec![0u8; 12];
        chain.extend_from_slice(&[1, b'a', 0]);
        let mut prev = 12usize;
        for _ in 0..200 {
            let here = chain.len();
            chain.extend_from_slice(&[1, b'a', 0xc0 | (prev >> 8) as u8, prev as u8]);
            prev = here;
        }
        assert_eq!(read_name(&chain, prev).map(|(n, _)| n.len()), Err(WireError::BadName));
        assert_eq!(read_name(&chain, 15).map(|(n, _)| n), Ok("a.a".to_string()));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic spread of inputs: every packet of a seeded generator, from
        // short to long, some starting from a real answer with bytes flipped.
        let q = encode_query(3, "x.example", TYPE_SRV).unwrap();
        let mut srv = vec![0, 1, 0, 1, 0, 80];
        encode_name("t.example", &mut srv).unwrap();
        let base = answer(&q, 0x8180, &[(None, TYPE_SRV, srv), (Some("t.example"), TYPE_A, vec![1, 2, 3, 4])]);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut p = if round % 2 == 0 {
                let n = (next() % 600) as usize;
                (0..n).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                base.clone()
            };
            for _ in 0..(next() % 8) {
                if p.is_empty() {
                    break;
                }
                let i = (next() as usize) % p.len();
                p[i] = next() as u8;
            }
            if let Ok(r) = parse(&p) {
                let _ = r.check(3, "x.example", TYPE_SRV);
                let _ = r.records_for("x.example", TYPE_SRV);
            }
        }
    }
}
