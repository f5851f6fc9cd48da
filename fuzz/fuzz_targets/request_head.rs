//! The request head parser: never panics, and what it accepts is self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::h1::request::{parse, Body, Limits, Target};

fuzz_target!(|data: &[u8]| {
    // Small limits, so the limit paths are reached too.
    let limits = Limits { max_head: 2048, max_target: 256 };
    let Ok(Some(h)) = parse(data, &limits) else { return };
    assert!(h.len <= data.len() && h.len <= limits.max_head);
    let head = &data[..h.len];
    assert!(head.ends_with(b"\r\n\r\n"));
    assert!(h.target.len() <= limits.max_target);
    for f in h.fields.iter() {
        assert!(f.name.end as usize <= h.len && f.value.end as usize <= h.len);
        assert!(!f.name.is_empty());
    }
    if let Target::Absolute { authority, path } = h.form {
        assert!(!authority.is_empty() && authority.end <= path.start && path.end == h.target.end);
    }
    match h.body {
        Body::Length(n) => assert!(n > 0),
        Body::Chunked => assert_eq!(h.minor, 1),
        Body::None => {}
    }
    // The head alone parses the same: nothing after it changed what it was.
    let again = parse(head, &limits).expect("the head alone parses").expect("the head alone is complete");
    assert_eq!((again.len, again.body, again.target, again.host), (h.len, h.body, h.target, h.host));
});
