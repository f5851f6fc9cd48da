//! Zero-copy helpers for cookies and URL session parameters.
//!
//! Parsing is tolerant (RFC 6265 section 5 style): pairs are separated by
//! `;`, optional whitespace around names and values is ignored, a value
//! wrapped in double quotes is returned without them, and segments without
//! `=` are skipped. Cookie names are compared case-sensitively; the first
//! occurrence of a name wins.

use std::fmt::Write as _;

use crate::config::SameSite;

/// Optional whitespace (space and horizontal tab) around tokens.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

fn unquote(v: &str) -> &str {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// Splits one `name=value` segment into trimmed name and unquoted value.
fn pair(segment: &str) -> Option<(&str, &str)> {
    let (name, value) = segment.split_once('=')?;
    Some((trim_ows(name), unquote(trim_ows(value))))
}

/// The value of cookie `name` in a `Cookie` request header value
/// (`a=1; b="2"`), unquoted. The first occurrence wins; `None` if absent or
/// if `name` is empty.
pub fn find_cookie<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    let v = find_cookie_bytes(cookie_header.as_bytes(), name.as_bytes())?;
    // `v` lies between ASCII delimiters (or the ends), so these are char boundaries.
    let start = v.as_ptr() as usize - cookie_header.as_ptr() as usize;
    cookie_header.get(start..start + v.len())
}

/// [`find_cookie`] on bytes, in one pass: each `;`-separated segment is compared with
/// `name` where it starts, and only the one that matches is trimmed and unquoted. It
/// finds what splitting every segment at its first `=` and trimming the name would: a
/// name that contains `=` or starts or ends with whitespace matches nothing.
pub fn find_cookie_bytes<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    for segment in segments(header) {
        let lead = segment.iter().position(|b| !ows(b)).unwrap_or(segment.len());
        let Some(rest) = segment[lead..].strip_prefix(name) else { continue };
        let at = rest.iter().position(|b| !ows(b)).unwrap_or(rest.len());
        let Some(value) = rest[at..].strip_prefix(b"=") else { continue };
        // Only a name that splitting could produce matches (checked here, once, rather
        // than on every call: a name is usually fine and a search usually finds it).
        if name.is_empty() || name.contains(&b'=') || name.first().is_some_and(ows) || name.last().is_some_and(ows) {
            return None;
        }
        return Some(unquote_bytes(trim_ows_bytes(value)));
    }
    None
}

/// The `;`-separated segments of a `Cookie` value, untrimmed, as `split` would give them
/// (found with `memchr`, many bytes at a time: a token cookie is long).
pub fn segments(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b';', r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

fn trim_ows_bytes(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|b| *b != b' ' && *b != b'\t').map_or(start, |e| e + 1);
    &s[start..end]
}

fn unquote_bytes(v: &[u8]) -> &[u8] {
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

/// Removes every occurrence of cookie `name` from a `Cookie` header value.
///
/// Returns `None` when `name` is not present (leave the header untouched),
/// otherwise `Some(rest)` with the remaining pairs joined by `"; "`;
/// `Some("")` means nothing remains and the header should be dropped.
pub fn strip_cookie(cookie_header: &str, name: &str) -> Option<String> {
    find_cookie(cookie_header, name)?;
    let mut rest = String::with_capacity(cookie_header.len());
    for segment in cookie_header.split(';') {
        let segment = trim_ows(segment);
        if segment.is_empty() || pair(segment).is_some_and(|(n, _)| n == name) {
            continue;
        }
        if !rest.is_empty() {
            rest.push_str("; ");
        }
        rest.push_str(segment);
    }
    Some(rest)
}

/// The cookie name and (unquoted) value of a `Set-Cookie` response header
/// value, ignoring its attributes. `None` if it has no `=` or an empty name.
pub fn set_cookie_name_value(set_cookie: &str) -> Option<(&str, &str)> {
    let first = set_cookie.split(';').next()?;
    pair(first).filter(|(n, _)| !n.is_empty())
}

/// Whether a `Set-Cookie` value carries attribute `name` (`Secure`, `HttpOnly`,
/// `Max-Age=60`...), compared case-insensitively; the cookie's own `name=value` is not an
/// attribute.
pub fn has_attribute(set_cookie: &str, name: &str) -> bool {
    set_cookie.split(';').skip(1).any(|a| trim_ows(a.split('=').next().unwrap_or("")).eq_ignore_ascii_case(name))
}

/// Attributes of the session cookie the balancer sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieAttrs {
    pub name: String,
    pub domain: Option<String>,
    /// Omitted when empty.
    pub path: String,
    pub same_site: SameSite,
    pub secure: bool,
    pub http_only: bool,
    /// `None` makes a session cookie (dropped when the browser closes).
    pub max_age: Option<u64>,
}

impl CookieAttrs {
    /// Defaults: `Path=/`, `SameSite=Lax`, `HttpOnly`, not `Secure`,
    /// no `Domain`, no `Max-Age`.
    #[cfg(test)]
    pub fn new(name: impl Into<String>) -> Self {
        CookieAttrs {
            name: name.into(),
            domain: None,
            path: "/".to_owned(),
            same_site: SameSite::Lax,
            secure: false,
            http_only: true,
            max_age: None,
        }
    }

    /// A `Set-Cookie` header value carrying `value`, which must already be
    /// a valid cookie value (e.g. a base64url token).
    pub fn render(&self, value: &str) -> String {
        let mut out = String::with_capacity(self.name.len() + value.len() + 96);
        out.push_str(&self.name);
        out.push('=');
        out.push_str(value);
        if !self.path.is_empty() {
            out.push_str("; Path=");
            out.push_str(&self.path);
        }
        if let Some(domain) = &self.domain {
            out.push_str("; Domain=");
            out.push_str(domain);
        }
        if let Some(age) = self.max_age {
            let _ = write!(out, "; Max-Age={age}");
        }
        if self.secure || self.same_site == SameSite::None {
            out.push_str("; Secure");
        }
        if self.http_only {
            out.push_str("; HttpOnly");
        }
        out.push_str("; SameSite=");
        out.push_str(self.same_site.as_str());
        out
    }
}

/// The value of a path parameter such as `;jsessionid=ID` in a URL path
/// (`/app;jsessionid=ABC/page`, `/app/page;JSESSIONID=ABC?x=1`). The name
/// is matched case-insensitively; the value runs to the next `;`, `/`, `?`
/// or `#`. A bare `;name` yields `Some("")`. First occurrence wins.
pub fn find_path_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    if name.is_empty() {
        return None;
    }
    let end = path.find(['?', '#']).unwrap_or(path.len());
    path[..end].split('/').find_map(|segment| {
        segment.split(';').skip(1).find_map(|param| {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            k.eq_ignore_ascii_case(name).then_some(v)
        })
    })
}

/// The raw (not percent-decoded) value of query parameter `name` in a query
/// string (with or without the leading `?`; a `#fragment` is ignored).
/// Names are case-sensitive; a bare `name` yields `Some("")`. First
/// occurrence wins.
pub fn find_query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    if name.is_empty() {
        return None;
    }
    let query = query.strip_prefix('?').unwrap_or(query);
    let end = query.find('#').unwrap_or(query.len());
    query[..end].split('&').find_map(|param| {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition [`find_cookie`] must agree with: split at `;`, split each segment at
    /// its first `=`, trim the name, compare, trim and unquote the value.
    fn find_cookie_by_splitting<'a>(header: &'a str, name: &str) -> Option<&'a str> {
        if name.is_empty() {
            return None;
        }
        header.split(';').filter_map(pair).find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    #[test]
    fn segments_are_what_split_gives() {
        for v in ["", ";", "a", "a;", ";a", "a;b", "a; b;;c ;", ";;"] {
            let ours: Vec<&[u8]> = segments(v.as_bytes()).collect();
            let split: Vec<&[u8]> = v.as_bytes().split(|b| *b == b';').collect();
            assert_eq!(ours, split, "{v:?}");
        }
    }

    #[test]
    fn find_cookie_agrees_with_splitting_on_every_small_input() {
        // Every string of up to 5 of these bytes, against names that are plain, empty,
        // have `=` or whitespace in them, or are prefixes of one another.
        let alphabet = [b'a', b'b', b'=', b';', b' ', b'\t', b'"'];
        let names = ["a", "ab", "b", "", "a=", "=", " a", "a ", "\"a\""];
        let mut inputs = vec![Vec::new()];
        let mut checked = 0;
        for _ in 0..5 {
            let longer: Vec<Vec<u8>> =
                inputs.iter().flat_map(|s| alphabet.iter().map(move |&c| [&s[..], &[c]].concat())).collect();
            inputs.extend(longer);
            inputs.sort();
            inputs.dedup();
        }
        for input in &inputs {
            let h = std::str::from_utf8(input).unwrap();
            for name in names {
                assert_eq!(find_cookie(h, name), find_cookie_by_splitting(h, name), "{h:?} {name:?}");
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn find_cookie_basics() {
        let h = "a=1; sid=abc; b=2";
        assert_eq!(find_cookie(h, "sid"), Some("abc"));
        assert_eq!(find_cookie(h, "a"), Some("1"));
        assert_eq!(find_cookie(h, "b"), Some("2"));
        assert_eq!(find_cookie(h, "c"), None);
        assert_eq!(find_cookie(h, ""), None);
        assert_eq!(find_cookie("", "sid"), None);
    }

    #[test]
    fn find_cookie_edge_cases() {
        // Whitespace tolerance, including tabs and no space after `;`.
        assert_eq!(find_cookie("a=1;sid=x", "sid"), Some("x"));
        assert_eq!(find_cookie("  sid = x ;b=2", "sid"), Some("x"));
        assert_eq!(find_cookie("a=1;\tsid=x\t", "sid"), Some("x"));
        // Quoted values.
        assert_eq!(find_cookie(r#"sid="abc"; b=2"#, "sid"), Some("abc"));
        assert_eq!(find_cookie(r#"sid="""#, "sid"), Some(""));
        assert_eq!(find_cookie(r#"sid=""#, "sid"), Some("\""));
        // Empty values.
        assert_eq!(find_cookie("sid=; b=2", "sid"), Some(""));
        assert_eq!(find_cookie("b=2; sid=", "sid"), Some(""));
        // Duplicates: first wins.
        assert_eq!(find_cookie("sid=1; sid=2", "sid"), Some("1"));
        // Prefixes and suffixes of other names do not match.
        assert_eq!(find_cookie("sidx=1; xsid=2", "sid"), None);
        assert_eq!(find_cookie("sidx=1; sid=3", "sid"), Some("3"));
        assert_eq!(find_cookie("sid=1", "sidx"), None);
        // Case-sensitive names.
        assert_eq!(find_cookie("SID=1", "sid"), None);
        // Values may contain `=`.
        assert_eq!(find_cookie("sid=a=b==", "sid"), Some("a=b=="));
        // Segments without `=` and empty segments are skipped.
        assert_eq!(find_cookie("sid; ;; sid=v", "sid"), Some("v"));
    }

    #[test]
    fn strip_cookie_cases() {
        assert_eq!(strip_cookie("a=1; b=2", "sid"), None);
        assert_eq!(strip_cookie("sidx=1", "sid"), None);
        assert_eq!(strip_cookie("sid=x", "sid").as_deref(), Some(""));
        assert_eq!(strip_cookie(" sid=x ; ", "sid").as_deref(), Some(""));
        assert_eq!(strip_cookie("a=1; sid=x; b=2", "sid").as_deref(), Some("a=1; b=2"));
        assert_eq!(strip_cookie("sid=x;a=1", "sid").as_deref(), Some("a=1"));
        assert_eq!(strip_cookie("a=1;sid=x", "sid").as_deref(), Some("a=1"));
        // All duplicates are removed; lookalike names are kept.
        assert_eq!(strip_cookie("sid=1; sidx=2; sid=3; xsid=4", "sid").as_deref(), Some("sidx=2; xsid=4"));
        assert_eq!(strip_cookie("sid=", "sid").as_deref(), Some(""));
        // Odd segments without `=` are preserved as they are.
        assert_eq!(strip_cookie("flag; sid=1", "sid").as_deref(), Some("flag"));
    }

    #[test]
    fn set_cookie_parsing() {
        assert_eq!(set_cookie_name_value("JSESSIONID=abc123; Path=/; HttpOnly"), Some(("JSESSIONID", "abc123")));
        assert_eq!(set_cookie_name_value("sid=\"q\""), Some(("sid", "q")));
        assert_eq!(set_cookie_name_value(" sid = v ;Secure"), Some(("sid", "v")));
        assert_eq!(set_cookie_name_value("sid=; Max-Age=0"), Some(("sid", "")));
        assert_eq!(set_cookie_name_value("sid=a=b"), Some(("sid", "a=b")));
        assert_eq!(set_cookie_name_value("=v"), None);
        assert_eq!(set_cookie_name_value("novalue; Path=/"), None);
        assert_eq!(set_cookie_name_value(""), None);
    }

    #[test]
    fn set_cookie_attributes() {
        assert!(has_attribute("t=v; Path=/; Secure; HttpOnly", "Secure"));
        assert!(has_attribute("t=v; secure", "Secure"));
        assert!(has_attribute("t=v;Max-Age=60", "max-age"));
        assert!(!has_attribute("t=v; Path=/; HttpOnly", "Secure"));
        // The cookie itself is no attribute, whatever it is called.
        assert!(!has_attribute("Secure=1; Path=/", "Secure"));
        assert!(!has_attribute("t=Secure", "Secure"));
    }

    #[test]
    fn render_cookie() {
        let mut attrs = CookieAttrs::new("tether");
        assert_eq!(attrs.render("TOKEN"), "tether=TOKEN; Path=/; HttpOnly; SameSite=Lax");
        attrs.domain = Some("example.com".into());
        attrs.path = "/app".into();
        attrs.max_age = Some(3600);
        attrs.secure = true;
        attrs.same_site = SameSite::Strict;
        assert_eq!(
            attrs.render("v"),
            "tether=v; Path=/app; Domain=example.com; Max-Age=3600; Secure; HttpOnly; SameSite=Strict"
        );
        // SameSite=None forces Secure.
        let mut none = CookieAttrs::new("s");
        none.same_site = SameSite::None;
        none.http_only = false;
        none.path.clear();
        assert_eq!(none.render("v"), "s=v; Secure; SameSite=None");
        // Round trip through the parser.
        assert_eq!(set_cookie_name_value(&attrs.render("tok")), Some(("tether", "tok")));
    }

    #[test]
    fn path_params() {
        assert_eq!(find_path_param("/app;jsessionid=ABC123", "jsessionid"), Some("ABC123"));
        assert_eq!(find_path_param("/app;JSESSIONID=ABC/page", "jsessionid"), Some("ABC"));
        assert_eq!(find_path_param("/shop/cart;jsessionid=X1?item=2", "JSessionId"), Some("X1"));
        assert_eq!(find_path_param("/a;foo=1;jsessionid=Z;bar=2/b", "jsessionid"), Some("Z"));
        assert_eq!(find_path_param("/a;jsessionid=/b", "jsessionid"), Some(""));
        assert_eq!(find_path_param("/a;jsessionid", "jsessionid"), Some(""));
        assert_eq!(find_path_param("/a;jsessionid=1/b;jsessionid=2", "jsessionid"), Some("1"));
        // Prefix names, query and fragment are not path parameters.
        assert_eq!(find_path_param("/a;jsessionidx=1", "jsessionid"), None);
        assert_eq!(find_path_param("/a;sid=1", "jsessionid"), None);
        assert_eq!(find_path_param("/a?x=1;jsessionid=2", "jsessionid"), None);
        assert_eq!(find_path_param("/a#;jsessionid=2", "jsessionid"), None);
        assert_eq!(find_path_param("/jsessionid=1", "jsessionid"), None);
        assert_eq!(find_path_param("", "jsessionid"), None);
        assert_eq!(find_path_param("/a;=1", ""), None);
    }

    #[test]
    fn query_params() {
        assert_eq!(find_query_param("a=1&sid=x&b=2", "sid"), Some("x"));
        assert_eq!(find_query_param("?sid=x", "sid"), Some("x"));
        assert_eq!(find_query_param("sid=x#frag", "sid"), Some("x"));
        assert_eq!(find_query_param("a=1#sid=x", "sid"), None);
        assert_eq!(find_query_param("sid=", "sid"), Some(""));
        assert_eq!(find_query_param("a=1&sid", "sid"), Some(""));
        assert_eq!(find_query_param("sid=1&sid=2", "sid"), Some("1"));
        assert_eq!(find_query_param("sidx=1&xsid=2", "sid"), None);
        assert_eq!(find_query_param("sidx=1&sid=3", "sid"), Some("3"));
        assert_eq!(find_query_param("SID=1", "sid"), None);
        assert_eq!(find_query_param("sid=a%3Db", "sid"), Some("a%3Db"));
        assert_eq!(find_query_param("", "sid"), None);
        assert_eq!(find_query_param("&&sid=1", "sid"), Some("1"));
        assert_eq!(find_query_param("=1", ""), None);
    }
}
