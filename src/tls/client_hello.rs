//! The server name (SNI) a TLS ClientHello asks for, read without terminating TLS: what a
//! `tcp` listener routes passthrough connections by.
//!
//! [`read`] looks at the bytes a client has sent so far and says whether they are a whole
//! ClientHello (and its name), not yet, or not TLS at all. Every read is bounds-checked and
//! nothing allocates unless the ClientHello is split over several TLS records (RFC 8446
//! 5.1 allows it; clients rarely do it), when its pieces are joined into one buffer of at
//! most [`MAX_HELLO`] bytes.
//!
//! Layout (RFC 8446 4.1.2, RFC 5246 7.4.1.2, RFC 6066 3):
//! record: type 22, version (2), length (2); handshake: type 1, length (3), then
//! legacy_version (2), random (32), session id (1 + n), cipher suites (2 + n),
//! compression methods (1 + n), extensions (2 + n: each type (2), length (2), data);
//! server_name (type 0): list length (2), entries of type (1; 0 is host_name), length (2),
//! name.

/// Handshake record content type.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// The largest TLS record payload a client may send (2^14), with the room RFC 5246 allows
/// for compression and expansion; a longer record is not TLS.
const MAX_RECORD: usize = (1 << 14) + 2048;
/// The largest ClientHello read. Real ones are under 2 KiB (one with a post-quantum key
/// share under 2 KiB too); anything larger is routed as if it named no server.
pub const MAX_HELLO: usize = 16 * 1024;

/// What the bytes so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello has begun but is not whole yet: read more (at most [`MAX_HELLO`] plus
    /// record headers in all).
    Partial,
    /// Not a TLS ClientHello (another protocol, or a malformed one).
    NotTls,
    /// A whole ClientHello, and the host name it asks for, lower-case without a trailing
    /// dot, when it asks for one that is a valid DNS name.
    Whole { server_name: Option<String> },
}

/// Reads the ClientHello at the start of `data`, the bytes received so far.
pub fn read(data: &[u8]) -> Hello {
    // The handshake message may span records: the first record alone is the common case.
    let Some(&first) = data.first() else { return Hello::Partial };
    if first != HANDSHAKE {
        return Hello::NotTls;
    }
    let mut joined: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = data.get(at..at + 5) else { return Hello::Partial };
        // A record of another type before the ClientHello is whole, a version whose major
        // number is not 3, or an empty or oversized record: not TLS.
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Hello::NotTls;
        }
        let Some(payload) = data.get(at + 5..at + 5 + len) else { return Hello::Partial };
        at += 5 + len;
        let message: &[u8] = if joined.is_empty() && hello_len(payload).is_some_and(|n| payload.len() >= n) {
            payload
        } else {
            if joined.len() + payload.len() > MAX_HELLO + 4 {
                return Hello::NotTls;
            }
            joined.extend_from_slice(payload);
            &joined
        };
        match hello_len(message) {
            Some(n) if n > MAX_HELLO + 4 => return Hello::NotTls,
            Some(n) if message.len() >= n => {
                return match server_name(&message[4..n]) {
                    Ok(name) => Hello::Whole { server_name: name.and_then(normalise) },
                    Err(Malformed) => Hello::NotTls,
                };
            }
            Some(_) => {}
            // Not even the handshake header yet: it needs the next record.
            None if message.len() < 4 => {}
            None => return Hello::NotTls,
        }
    }
}

/// The whole length (header included) of the ClientHello message `m` begins, once its
/// 4-byte header is there; `None` when it is not a ClientHello or the header is short.
fn hello_len(m: &[u8]) -> Option<usize> {
    let h = m.get(..4)?;
    (h[0] == CLIENT_HELLO).then(|| 4 + ((usize::from(h[1]) << 16) | (usize::from(h[2]) << 8) | usize::from(h[3])))
}

/// A ClientHello body that does not parse.
#[derive(Debug)]
struct Malformed;

/// A bounds-checked reader over a ClientHello body.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.data.len() < n {
            return Err(Malformed);
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The `host_name` of the server_name extension of a ClientHello body; `None` when it has
/// none (no extensions, no server_name, or a server_name without a host_name entry).
fn server_name(body: &[u8]) -> Result<Option<&[u8]>, Malformed> {
    let mut r = Reader { data: body };
    r.take(2 + 32)?; // legacy_version, random
    if r.vec8()?.len() > 32 {
        return Err(Malformed);
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(Malformed);
    }
    if r.data.is_empty() {
        // A ClientHello without extensions (TLS 1.2 allows it).
        return Ok(None);
    }
    let mut extensions = Reader { data: r.vec16()? };
    let mut found = None;
    while !extensions.data.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != 0 {
            continue;
        }
        if found.is_some() {
            // RFC 8446 4.2: an extension type appears at most once.
            return Err(Malformed);
        }
        let mut list = Reader { data };
        let mut entries = Reader { data: list.vec16()? };
        if !list.data.is_empty() {
            return Err(Malformed);
        }
        while !entries.data.is_empty() {
            let name_type = entries.u8()?;
            let name = entries.vec16()?;
            if name_type == 0 && found.is_none() {
                found = Some(name);
            }
        }
    }
    Ok(found)
}

/// A host name as routes compare it: a DNS name of letters, digits, `-` and `.` (and `_`,
/// which some internal names use), lower-cased, without a trailing dot; `None` for
/// anything else (an IP literal is not a valid SNI either, RFC 6066 3).
fn normalise(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && name.split(|&b| b == b'.').all(|label| !label.is_empty() && label.len() <= 63);
    valid.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body with the given extensions block (`None`: no extensions at all).
    fn body(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[7; 32]);
        b.push(0); // no session id
        b.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        b.extend_from_slice(&[1, 0]); // null compression
        if let Some(e) = extensions {
            b.extend_from_slice(&(e.len() as u16).to_be_bytes());
            b.extend_from_slice(e);
        }
        b
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut e = vec![0, 0];
        e.extend_from_slice(&(list.len() as u16).to_be_bytes());
        e.extend_from_slice(&list);
        e
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let mut m = vec![CLIENT_HELLO];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(body);
        m
    }

    /// `message` in records of at most `per_record` bytes each.
    fn records(message: &[u8], per_record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in message.chunks(per_record) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    fn hello_for(name: &[u8]) -> Vec<u8> {
        // Another extension (supported_versions) before server_name, as clients send them.
        let mut ext = vec![0, 43, 0, 3, 2, 3, 4];
        ext.extend_from_slice(&sni_extension(name));
        records(&handshake(&body(Some(&ext))), 1 << 14)
    }

    fn named(name: &str) -> Hello {
        Hello::Whole { server_name: Some(name.into()) }
    }

    #[test]
    fn reads_the_server_name_and_waits_for_every_byte_of_it() {
        let hello = hello_for(b"Shop.Example.COM.");
        assert_eq!(read(&hello), named("shop.example.com"));
        // Every proper prefix is partial, never a verdict taken too early.
        for n in 0..hello.len() {
            assert_eq!(read(&hello[..n]), Hello::Partial, "prefix of {n} bytes");
        }
        // Bytes after the ClientHello (none are expected, but a client may pipeline) do
        // not change the answer.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(read(&more), named("shop.example.com"));
    }

    #[test]
    fn reads_what_openssl_sends() {
        // Captured from `openssl s_client`: with -servername, and with -noservername.
        let named_hello = include_bytes!("../../fuzz/corpus/client_hello/openssl-a");
        assert_eq!(read(named_hello), named("shop.example.com"));
        let anonymous = include_bytes!("../../fuzz/corpus/client_hello/openssl-b");
        assert_eq!(read(anonymous), Hello::Whole { server_name: None });
    }

    #[test]
    fn a_hello_split_over_records_is_joined() {
        let message = handshake(&body(Some(&sni_extension(b"a.example"))));
        for per_record in [1, 2, 3, 5, 17, 100] {
            let data = records(&message, per_record);
            assert_eq!(read(&data), named("a.example"), "records of {per_record} bytes");
            assert_eq!(read(&data[..data.len() - 1]), Hello::Partial);
        }
    }

    #[test]
    fn no_name_is_a_whole_hello_without_one() {
        let none = Hello::Whole { server_name: None };
        assert_eq!(read(&records(&handshake(&body(None)), 1 << 14)), none);
        assert_eq!(read(&records(&handshake(&body(Some(&[0, 43, 0, 3, 2, 3, 4]))), 1 << 14)), none);
        // Names that are not DNS names count as no name.
        for bad in [&b"10.0.0.1:443"[..], b"a..b", b"sp ace", b"\xc3\xa9t\xc3\xa9", b"", b"."] {
            assert_eq!(read(&hello_for(bad)), none, "{bad:?}");
        }
    }

    #[test]
    fn other_protocols_and_malformed_hellos_are_not_tls() {
        assert_eq!(read(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(read(b"SSH-2.0-OpenSSH\r\n"), Hello::NotTls);
        // An alert record, a record of version 2.x, an empty record.
        assert_eq!(read(&[21, 3, 3, 0, 2, 2, 40]), Hello::NotTls);
        assert_eq!(read(&[22, 2, 0, 0, 1, 1]), Hello::NotTls);
        assert_eq!(read(&[22, 3, 1, 0, 0]), Hello::NotTls);
        // A ServerHello where a ClientHello belongs.
        let mut m = handshake(&body(None));
        m[0] = 2;
        assert_eq!(read(&records(&m, 1 << 14)), Hello::NotTls);
        // The server_name extension twice.
        let mut ext = sni_extension(b"a.example");
        ext.extend_from_slice(&sni_extension(b"b.example"));
        assert_eq!(read(&records(&handshake(&body(Some(&ext))), 1 << 14)), Hello::NotTls);
        // An extension that claims more than there is.
        let ext = [0, 0, 0, 9, 0, 1];
        assert_eq!(read(&records(&handshake(&body(Some(&ext))), 1 << 14)), Hello::NotTls);
        // A ClientHello longer than MAX_HELLO.
        let mut huge = vec![CLIENT_HELLO];
        huge.extend_from_slice(&((MAX_HELLO as u32) + 1).to_be_bytes()[1..]);
        assert_eq!(read(&records(&huge, 1 << 14)), Hello::NotTls);
    }

    #[test]
    fn every_truncation_and_corruption_is_answered_without_panicking() {
        let hello = hello_for(b"x.example");
        for i in 0..hello.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut h = hello.clone();
                h[i] = v;
                let _ = read(&h);
                let _ = read(&h[..i]);
            }
        }
    }
}
