//! Just enough DER to read what Tether needs from a certificate: the DNS names it covers
//! (subject alternative names) and when it expires. Every length is checked; input that
//! is not the expected structure is `None`, never a panic.

/// What Tether reads from a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// `dNSName` entries of the subject alternative names, lower-cased.
    pub names: Vec<String>,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// Reads the DNS names and expiry of a DER certificate.
pub fn leaf(cert: &[u8]) -> Option<Leaf> {
    let mut outer = Reader(cert);
    let mut cert = Reader(outer.expect(SEQUENCE)?);
    let mut tbs = Reader(cert.expect(SEQUENCE)?);
    if tbs.peek() == Some(0xa0) {
        tbs.any()?; // version
    }
    tbs.expect(0x02)?; // serial number
    tbs.expect(SEQUENCE)?; // signature algorithm
    tbs.expect(SEQUENCE)?; // issuer
    let mut validity = Reader(tbs.expect(SEQUENCE)?);
    validity.any()?; // notBefore
    let not_after = time(validity.any()?)?;
    tbs.expect(SEQUENCE)?; // subject
    tbs.expect(SEQUENCE)?; // subject public key info
    let mut names = Vec::new();
    while let Some((tag, content)) = tbs.any() {
        if tag != 0xa3 {
            continue; // issuer and subject unique ids
        }
        let mut exts = Reader(Reader(content).expect(SEQUENCE)?);
        while let Some(ext) = exts.expect(SEQUENCE) {
            let mut ext = Reader(ext);
            let oid = ext.expect(0x06)?;
            if ext.peek() == Some(0x01) {
                ext.any()?; // critical
            }
            let value = ext.expect(0x04)?;
            if oid == SUBJECT_ALT_NAME {
                let mut general = Reader(Reader(value).expect(SEQUENCE)?);
                while let Some((tag, name)) = general.any() {
                    // dNSName: [2] IMPLICIT IA5String
                    if tag == 0x82 {
                        names.push(std::str::from_utf8(name).ok()?.to_ascii_lowercase());
                    }
                }
            }
        }
    }
    Some(Leaf { names, not_after })
}

const SEQUENCE: u8 = 0x30;
/// 2.5.29.17
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next element: its tag and content.
    fn any(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        if tag & 0x1f == 0x1f {
            return None; // high tag numbers do not occur where Tether looks
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let (content, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, content))
    }

    /// The next element's content, if it has tag `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.any()? {
            (t, content) if t == tag => Some(content),
            _ => None,
        }
    }
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) in seconds since
/// the Unix epoch.
fn time((tag, text): (u8, &[u8])) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, b| b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0')))
    };
    let (year, rest) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = digits(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (0x18, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (hour, minute, second) = (digits(&rest[4..6])?, digits(&rest[6..8])?, digits(&rest[8..10])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(time((0x17, b"700101000000Z")), Some(0));
        assert_eq!(time((0x17, b"491231235959Z")), Some(2_524_607_999));
        assert_eq!(time((0x18, b"20261204180000Z")), Some(1_796_407_200));
        assert_eq!(time((0x18, b"20000229000000Z")), Some(951_782_400));
        assert_eq!(time((0x17, b"701301000000Z")), None);
        assert_eq!(time((0x17, b"70010100000Z")), None);
        assert_eq!(time((0x17, b"7001010000001")), None);
    }

    #[test]
    fn a_generated_certificate_reads_back() {
        let mut params = rcgen::CertificateParams::new(vec!["Shop.Example".into(), "*.cdn.example".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()));
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let leaf = leaf(cert.der()).unwrap();
        assert_eq!(leaf.names, ["shop.example", "*.cdn.example"]);
        assert_eq!(leaf.not_after, days_from_civil(2031, 5, 17) * 86_400);
    }

    #[test]
    fn no_input_panics() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        // Every truncation and every single-byte change of a real certificate.
        for n in 0..der.len() {
            let _ = leaf(&der[..n]);
        }
        for i in 0..der.len() {
            for b in [0x00, 0x30, 0x7f, 0x80, 0x84, 0xff] {
                let mut d = der.clone();
                d[i] = b;
                let _ = leaf(&d);
            }
        }
        assert!(leaf(&der).is_some());
        assert!(leaf(b"").is_none() && leaf(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
