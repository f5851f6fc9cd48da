//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a proxy in front sends as
//! the first bytes of a connection to say whose connection it is, read
//! ([`parse`]) and written ([`write`], [`Header::local`]).
//!
//! No I/O and no allocation: `parse` looks at the bytes the caller has and says whether
//! they begin with a whole header, and how long it is; the caller reads exactly that many
//! from its socket, so nothing after the header is consumed here. Every read is
//! bounds-checked and a verdict never changes as more bytes arrive (`fuzz/`). TLVs of
//! version 2 are skipped: Tether uses only the addresses.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2's signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A v1 header is at most 107 bytes, CRLF included (the specification's bound: the
/// longest `TCP6` line).
pub const V1_MAX: usize = 107;

/// The longest v2 header Tether reads, TLVs included. The addresses need at most 232
/// bytes (unix sockets); TLVs (TLS details, cloud endpoint ids) add a few hundred in
/// practice. 4 KiB keeps the read bounded while leaving room for any sane sender.
pub const V2_MAX: usize = 4096;

/// The longest header [`parse`] may need to see: what a caller's buffer must hold.
pub const MAX: usize = V2_MAX;

/// Which version of the protocol a pool sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a header: more bytes are needed for a verdict.
    Partial,
    /// Not a PROXY header: the connection starts with something else.
    NotProxy,
    /// A PROXY header, malformed: the connection must be refused.
    Invalid(&'static str),
    /// A whole header of `len` bytes. The addresses are `None` when it carries none: v1
    /// `UNKNOWN`, v2 `LOCAL` (a health check of the proxy itself), or a v2 family or
    /// transport other than TCP over IPv4 or IPv6.
    Whole { len: usize, source: Option<SocketAddr>, destination: Option<SocketAddr> },
}

/// Reads the header at the start of `buf`, if it begins with one.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let v1 = b"PROXY ";
    if buf[..buf.len().min(v1.len())] == v1[..buf.len().min(v1.len())] {
        return parse_v1(buf);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf);
    }
    Parsed::NotProxy
}

/// `PROXY TCP4 203.0.113.7 192.0.2.1 4444 80\r\n`, `PROXY TCP6 ...`, or `PROXY UNKNOWN`
/// followed by anything up to the CRLF. Strict: single spaces, addresses of the named
/// family, ports in decimal without leading zeros.
fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX { Parsed::Invalid("v1 header longer than 107 bytes") } else { Parsed::Partial };
    };
    if window[cr] != b'\r' {
        return Parsed::Invalid("v1 header ends without CRLF");
    }
    match window.get(cr + 1) {
        None if buf.len() > cr + 1 => return Parsed::Invalid("v1 header longer than 107 bytes"),
        None => return Parsed::Partial,
        Some(b'\n') => {}
        Some(_) => return Parsed::Invalid("v1 header ends without CRLF"),
    }
    let len = cr + 2;
    let Ok(line) = std::str::from_utf8(&buf[6..cr]) else { return Parsed::Invalid("v1 header is not text") };
    if line.starts_with("UNKNOWN") {
        // Whatever follows UNKNOWN is to be ignored (the specification's words).
        return Parsed::Whole { len, source: None, destination: None };
    }
    let mut parts = line.split(' ');
    let (Some(family), Some(src), Some(dst), Some(sport), Some(dport), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Invalid("v1 header does not have five fields");
    };
    let (src, dst) = match family {
        "TCP4" => match (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) {
            (Ok(s), Ok(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
            _ => return Parsed::Invalid("v1 TCP4 header with an address that is not IPv4"),
        },
        "TCP6" => match (src.parse::<Ipv6Addr>(), dst.parse::<Ipv6Addr>()) {
            (Ok(s), Ok(d)) => (IpAddr::V6(s), IpAddr::V6(d)),
            _ => return Parsed::Invalid("v1 TCP6 header with an address that is not IPv6"),
        },
        _ => return Parsed::Invalid("v1 header of an unknown protocol"),
    };
    let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
        return Parsed::Invalid("v1 header with a port that is not 0 to 65535");
    };
    Parsed::Whole { len, source: Some(SocketAddr::new(src, sport)), destination: Some(SocketAddr::new(dst, dport)) }
}

/// A port in decimal: digits only, no leading zero, at most 65535.
fn port(s: &str) -> Option<u16> {
    let valid =
        !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if valid {
        s.parse().ok()
    } else {
        None
    }
}

/// The signature, a version and command byte, a family and transport byte, the length of
/// what follows (big-endian), then the addresses and TLVs.
fn parse_v2(buf: &[u8]) -> Parsed {
    let Some(fixed) = buf.get(..16) else { return Parsed::Partial };
    let (ver_cmd, fam, rest) = (fixed[12], fixed[13], usize::from(u16::from_be_bytes([fixed[14], fixed[15]])));
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("v2 header of another version");
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Parsed::Invalid("v2 header with an unknown command"),
    };
    let (family, transport) = (fam >> 4, fam & 0x0f);
    if family > 3 || transport > 2 {
        return Parsed::Invalid("v2 header with an unknown family or transport");
    }
    let len = 16 + rest;
    if len > V2_MAX {
        return Parsed::Invalid("v2 header longer than 4096 bytes");
    }
    let need = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if rest < need {
        return Parsed::Invalid("v2 header too short for its addresses");
    }
    let Some(body) = buf.get(16..len) else { return Parsed::Partial };
    if local || transport != 1 {
        return Parsed::Whole { len, source: None, destination: None };
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let (source, destination) = match family {
        1 => {
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]));
            (SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))
        }
        2 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            (SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)))
        }
        _ => return Parsed::Whole { len, source: None, destination: None },
    };
    Parsed::Whole { len, source: Some(source), destination: Some(destination) }
}

/// A header Tether writes, on the stack: at most 107 bytes (v1), 52 (v2).
#[derive(Clone, Copy)]
pub struct Header {
    bytes: [u8; V1_MAX],
    len: u8,
}

impl Header {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// A header that describes no client connection, for Tether's own connections (health
    /// checks): v1 `PROXY UNKNOWN`, v2 the `LOCAL` command. A backend that expects the
    /// protocol refuses a connection without a header, so checks must send one too.
    pub fn local(version: Version) -> Header {
        let mut h = Header { bytes: [0; V1_MAX], len: 0 };
        match version {
            Version::V1 => h.put(b"PROXY UNKNOWN\r\n"),
            Version::V2 => {
                h.put(&V2_SIGNATURE);
                h.put(&[0x20, 0x00, 0, 0]);
            }
        }
        h
    }

    fn put(&mut self, b: &[u8]) {
        let at = usize::from(self.len);
        self.bytes[at..at + b.len()].copy_from_slice(b);
        self.len += b.len() as u8;
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Header({:?})", self.as_bytes().escape_ascii().to_string())
    }
}

/// The header for a client connection from `source` to `destination`. IPv4-mapped IPv6
/// addresses count as IPv4; when one side is IPv4 and the other IPv6, the IPv4 one is
/// written IPv4-mapped (a header has one family).
pub fn write(version: Version, source: SocketAddr, destination: SocketAddr) -> Header {
    let (src, dst) = match (crate::net::canonical(source.ip()), crate::net::canonical(destination.ip())) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(mapped(s)), IpAddr::V6(mapped(d))),
    };
    let mut h = Header { bytes: [0; V1_MAX], len: 0 };
    match version {
        Version::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut out = &mut h.bytes[..];
            let room = out.len();
            // The longest line (TCP6, two full addresses, two 5-digit ports) is 104 bytes,
            // so this cannot run out of room.
            let _ = write!(out, "PROXY {family} {src} {dst} {} {}\r\n", source.port(), destination.port());
            h.len = (room - out.len()) as u8;
        }
        Version::V2 => {
            h.put(&V2_SIGNATURE);
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.put(&[0x21, 0x11, 0, 12]);
                    h.put(&s.octets());
                    h.put(&d.octets());
                }
                (s, d) => {
                    h.put(&[0x21, 0x21, 0, 36]);
                    h.put(&mapped(s).octets());
                    h.put(&mapped(d).octets());
                }
            }
            h.put(&source.port().to_be_bytes());
            h.put(&destination.port().to_be_bytes());
        }
    }
    h
}

fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn whole(len: usize, source: &str, destination: &str) -> Parsed {
        Parsed::Whole { len, source: Some(addr(source)), destination: Some(addr(destination)) }
    }

    /// Every strict prefix of a header is `Partial`; the whole, with anything after it,
    /// is the same verdict.
    fn check(input: &[u8], expected: Parsed) {
        for cut in 0..input.len() {
            assert_eq!(parse(&input[..cut]), Parsed::Partial, "prefix of {cut} bytes of {:?}", input.escape_ascii());
        }
        assert_eq!(parse(input), expected);
        let mut more = input.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parse(&more), expected);
    }

    #[test]
    fn v1_round_trips() {
        for (s, d, text) in [
            ("203.0.113.7:4444", "192.0.2.1:80", "PROXY TCP4 203.0.113.7 192.0.2.1 4444 80\r\n"),
            ("[2001:db8::7]:65535", "[2001:db8::1]:0", "PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n"),
            ("[::ffff:203.0.113.7]:1", "192.0.2.1:2", "PROXY TCP4 203.0.113.7 192.0.2.1 1 2\r\n"),
            ("203.0.113.7:1", "[2001:db8::1]:2", "PROXY TCP6 ::ffff:203.0.113.7 2001:db8::1 1 2\r\n"),
        ] {
            let h = write(Version::V1, addr(s), addr(d));
            assert_eq!(h.as_bytes(), text.as_bytes());
            let Parsed::Whole { len, source: Some(src), destination: Some(dst) } = parse(h.as_bytes()) else {
                panic!("{text:?} did not parse")
            };
            assert_eq!(len, text.len());
            assert_eq!(crate::net::canonical(src.ip()), crate::net::canonical(addr(s).ip()));
            assert_eq!(crate::net::canonical(dst.ip()), crate::net::canonical(addr(d).ip()));
            assert_eq!((src.port(), dst.port()), (addr(s).port(), addr(d).port()));
            check(h.as_bytes(), parse(h.as_bytes()));
        }
        let longest = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        let all_ones: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        let h = write(Version::V1, SocketAddr::new(all_ones, 65535), SocketAddr::new(all_ones, 65535));
        assert_eq!(h.as_bytes(), longest.as_bytes());
        assert!(longest.len() <= V1_MAX);
    }

    #[test]
    fn v2_round_trips() {
        for (s, d) in [
            ("203.0.113.7:4444", "192.0.2.1:80"),
            ("[2001:db8::7]:65535", "[2001:db8::1]:0"),
            ("203.0.113.7:1", "[2001:db8::1]:2"),
        ] {
            let h = write(Version::V2, addr(s), addr(d));
            let expected = if addr(s).is_ipv4() && addr(d).is_ipv4() { 28 } else { 52 };
            assert_eq!(h.as_bytes().len(), expected);
            let Parsed::Whole { len, source: Some(src), destination: Some(dst) } = parse(h.as_bytes()) else {
                panic!("{s} {d} did not parse")
            };
            assert_eq!(len, expected);
            assert_eq!(crate::net::canonical(src.ip()), crate::net::canonical(addr(s).ip()));
            assert_eq!(crate::net::canonical(dst.ip()), crate::net::canonical(addr(d).ip()));
            assert_eq!((src.port(), dst.port()), (addr(s).port(), addr(d).port()));
            check(h.as_bytes(), parse(h.as_bytes()));
        }
    }

    #[test]
    fn headers_without_addresses() {
        let none = |len| Parsed::Whole { len, source: None, destination: None };
        check(Header::local(Version::V1).as_bytes(), none(15));
        check(Header::local(Version::V2).as_bytes(), none(16));
        check(b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", none(35));
        // LOCAL with addresses: they are skipped.
        let mut local = write(Version::V2, addr("1.2.3.4:1"), addr("5.6.7.8:2")).as_bytes().to_vec();
        local[12] = 0x20;
        check(&local, none(28));
        // UDP over IPv4, and a unix socket: no TCP client address.
        let mut udp = write(Version::V2, addr("1.2.3.4:1"), addr("5.6.7.8:2")).as_bytes().to_vec();
        udp[13] = 0x12;
        check(&udp, none(28));
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 216]);
        unix.extend_from_slice(&[b'/'; 216]);
        check(&unix, none(232));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut h = write(Version::V2, addr("203.0.113.7:4444"), addr("192.0.2.1:80")).as_bytes().to_vec();
        h[15] = 12 + 7;
        h.extend_from_slice(&[0x04, 0, 4, b'n', b'o', b'o', b'p']);
        check(&h, whole(35, "203.0.113.7:4444", "192.0.2.1:80"));
    }

    #[test]
    fn every_refusal() {
        for (input, why) in [
            (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..], "v1 header ends without CRLF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "v1 header ends without CRLF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1 header does not have five fields"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1 header does not have five fields"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1 header does not have five fields"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1 TCP4 header with an address that is not IPv4"),
            (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "v1 TCP4 header with an address that is not IPv4"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1 TCP6 header with an address that is not IPv6"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 header of an unknown protocol"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1 header with a port that is not 0 to 65535"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1 header with a port that is not 0 to 65535"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "v1 header with a port that is not 0 to 65535"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xff 2\r\n", "v1 header is not text"),
        ] {
            assert_eq!(parse(input), Parsed::Invalid(why), "{:?}", input.escape_ascii().to_string());
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
        assert_eq!(parse(&long), Parsed::Invalid("v1 header longer than 107 bytes"));
        let mut ok_len = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; V1_MAX - 16], b"\r\n"].concat();
        assert_eq!(ok_len.len(), V1_MAX);
        assert_eq!(parse(&ok_len), Parsed::Whole { len: V1_MAX, source: None, destination: None });
        ok_len.insert(20, b'x');
        assert_eq!(parse(&ok_len), Parsed::Invalid("v1 header longer than 107 bytes"));

        let v2 = |ver_cmd: u8, fam: u8, len: u16| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[ver_cmd, fam]);
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        assert_eq!(parse(&v2(0x11, 0x11, 12)), Parsed::Invalid("v2 header of another version"));
        assert_eq!(parse(&v2(0x22, 0x11, 12)), Parsed::Invalid("v2 header with an unknown command"));
        assert_eq!(parse(&v2(0x21, 0x41, 12)), Parsed::Invalid("v2 header with an unknown family or transport"));
        assert_eq!(parse(&v2(0x21, 0x13, 12)), Parsed::Invalid("v2 header with an unknown family or transport"));
        assert_eq!(parse(&v2(0x21, 0x11, 11)), Parsed::Invalid("v2 header too short for its addresses"));
        assert_eq!(parse(&v2(0x21, 0x21, 35)), Parsed::Invalid("v2 header too short for its addresses"));
        assert_eq!(parse(&v2(0x21, 0x11, 4081)), Parsed::Invalid("v2 header longer than 4096 bytes"));
        assert_eq!(parse(&v2(0x21, 0x11, 4080)), Parsed::Partial);
    }

    #[test]
    fn other_protocols_are_not_proxy() {
        for input in [&b"GET / HTTP/1.1\r\n"[..], b"PRI * HTTP/2.0", b"\x16\x03\x01", b"PROXYZ", b"\r\n\r\n\0\r\nQUIX"]
        {
            assert_eq!(parse(input), Parsed::NotProxy, "{:?}", input.escape_ascii().to_string());
        }
        assert_eq!(parse(b""), Parsed::Partial);
        assert_eq!(parse(b"PRO"), Parsed::Partial);
        assert_eq!(parse(b"\r\n\r\n"), Parsed::Partial);
    }
}
