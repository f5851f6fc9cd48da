//! The DNS answer parser (`dns::wire`): never panics on any packet, and what it accepts
//! is self-consistent (an answer checks against its own question; the records it finds
//! for a name are among its answers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::dns::wire::{self, RData};

fuzz_target!(|data: &[u8]| {
    let Ok(r) = wire::parse(data) else { return };
    if let Some((name, qtype, qclass)) = r.question.clone() {
        if qclass == 1 {
            assert_eq!(r.check(r.id, &name, qtype), Ok(()));
        }
        assert!(r.check(r.id.wrapping_add(1), &name, qtype).is_err());
        for t in [wire::TYPE_A, wire::TYPE_AAAA, wire::TYPE_SRV, qtype] {
            for found in r.records_for(&name, t) {
                assert!(r.answers.contains(found));
                assert_eq!(wire::rtype(&found.data), t);
            }
        }
    }
    if r.truncated {
        assert!(r.answers.is_empty() && r.additionals.is_empty());
    }
    for rec in r.answers.iter().chain(&r.additionals) {
        if let RData::Srv { target, .. } | RData::Cname(target) = &rec.data {
            assert!(target.len() <= 4 * 255);
        }
    }
});
