//! The response head parser: never panics, and what it accepts is self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::h1::response::{parse, Body};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else { return };
    let head_request = flags & 1 == 1;
    let Ok(Some(h)) = parse(input, 2048, head_request) else { return };
    assert!(h.len <= input.len() && h.len <= 2048);
    assert!((100..=999).contains(&h.status));
    for f in h.fields.iter() {
        assert!(f.name.end as usize <= h.len && f.value.end as usize <= h.len);
    }
    if head_request || h.status < 200 || h.status == 204 || h.status == 304 {
        assert_eq!(h.body, Body::None);
    }
    if h.body == Body::UntilClose {
        assert!(!h.keep_alive);
    }
    if h.drop_length {
        assert!(matches!(h.body, Body::Chunked | Body::UntilClose));
    }
});
