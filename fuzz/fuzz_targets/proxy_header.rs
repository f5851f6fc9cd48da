//! The PROXY protocol header reader (`proxy_header::parse`): never panics, a verdict once
//! taken does not change as more bytes arrive, a whole header is never longer than the
//! input or the bound, and a header Tether writes reads back as what it describes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::proxy_header::{parse, write, Parsed, Version, MAX};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Parsed::Whole { len, .. } = whole {
        assert!(len <= data.len() && len <= MAX);
    }
    // A prefix is either still partial or already the same verdict.
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        let early = parse(&data[..cut]);
        assert!(early == Parsed::Partial || early == whole, "{early:?} at {cut} but {whole:?} at {}", data.len());
    }
    // Addresses from the input, written and read back.
    if data.len() >= 36 {
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(&data[..16]);
        let source = std::net::SocketAddr::from((v6, u16::from_be_bytes([data[32], data[33]])));
        let mut d6 = [0u8; 16];
        d6.copy_from_slice(&data[16..32]);
        let destination = std::net::SocketAddr::from((d6, u16::from_be_bytes([data[34], data[35]])));
        for version in [Version::V1, Version::V2] {
            let h = write(version, source, destination);
            let Parsed::Whole { len, source: Some(s), destination: Some(d) } = parse(h.as_bytes()) else {
                panic!("{h:?} does not read back")
            };
            assert_eq!(len, h.as_bytes().len());
            assert_eq!((s.port(), d.port()), (source.port(), destination.port()));
        }
    }
});
