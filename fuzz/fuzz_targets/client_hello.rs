//! The ClientHello reader (`tls::client_hello`): never panics, a verdict once taken does
//! not change as more bytes arrive, and a name it returns is a lower-case DNS name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::tls::client_hello::{read, Hello};

fuzz_target!(|data: &[u8]| {
    let whole = read(data);
    if let Hello::Whole { server_name: Some(name) } = &whole {
        assert!(!name.is_empty() && !name.ends_with('.'));
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)));
    }
    // A prefix is either still partial or already the same verdict.
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        let early = read(&data[..cut]);
        assert!(early == Hello::Partial || early == whole, "{early:?} at {cut} but {whole:?} at {}", data.len());
    }
});
