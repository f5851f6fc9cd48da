//! Stable, seed-fixed hashing for affinity keys and backend identities.
//!
//! Every Tether instance, on every host and across restarts and upgrades,
//! must compute exactly the same values from the same inputs: the values are
//! written into session cookies (backend ids), used to build Maglev tables and
//! used as stick-table keys. **The seeds and the input framing below are part
//! of the wire format and must never change.** Golden tests at the bottom of
//! this file pin the outputs.
//!
//! Inputs are framed unambiguously before hashing: every variable-length
//! field except the last is preceded by its length as a little-endian `u32`,
//! so `("ab", "c")` and `("a", "bc")` never collide by construction.
//!
//! The hash is XXH3 (64- and 128-bit variants) from `xxhash-rust`, whose
//! output is specified and stable across versions and platforms.

use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64_with_seed, Xxh3};

/// Seed for [`key_hash`]. Frozen: ASCII "TthrKey1" read as big-endian u64.
pub const KEY_SEED: u64 = 0x5474_6872_4b65_7931;

/// Seed for [`key_hash128`]. Frozen: ASCII "TthrK128" read as big-endian u64.
pub const KEY128_SEED: u64 = 0x5474_6872_4b31_3238;

/// Seed for [`backend_id`]. Frozen: ASCII "TthrBknd" read as big-endian u64.
pub const BACKEND_SEED: u64 = 0x5474_6872_426b_6e64;

/// Inputs up to this size are framed into a stack buffer and hashed one-shot;
/// longer ones are streamed. Both paths produce identical output.
const STACK_FRAME: usize = 256;

/// Hashes `len(a) || a || len(b) || b || c` (lengths as little-endian `u32`)
/// without allocating. `WIDE` selects the 64- or 128-bit variant.
fn framed<const WIDE: bool>(seed: u64, a: &[u8], b: &[u8], c: &[u8]) -> u128 {
    // Lengths beyond u32::MAX are not meaningful for header-derived keys;
    // truncating the length prefix is still deterministic.
    let la = (a.len() as u32).to_le_bytes();
    let lb = (b.len() as u32).to_le_bytes();
    let total = 8 + a.len() + b.len() + c.len();
    if total <= STACK_FRAME {
        let mut buf = [0u8; STACK_FRAME];
        let mut at = 0;
        for part in [&la[..], a, &lb[..], b, c] {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let input = &buf[..total];
        if WIDE {
            xxh3_128_with_seed(input, seed)
        } else {
            u128::from(xxh3_64_with_seed(input, seed))
        }
    } else {
        let mut h = Xxh3::with_seed(seed);
        h.update(&la);
        h.update(a);
        h.update(&lb);
        h.update(b);
        h.update(c);
        if WIDE {
            h.digest128()
        } else {
            u128::from(h.digest())
        }
    }
}

/// 64-bit hash of an affinity key (e.g. a header or cookie value) within a
/// pool. `kind` names the key's source (e.g. `"header:x-user"`, `"ip"`), so
/// equal bytes from different sources hash differently.
pub fn key_hash(pool: &str, kind: &str, key: &[u8]) -> u64 {
    framed::<false>(KEY_SEED, pool.as_bytes(), kind.as_bytes(), key) as u64
}

/// 128-bit hash of an affinity key, used as the stick-table key (collisions
/// are negligible at 128 bits, so the table never stores the raw key).
pub fn key_hash128(pool: &str, kind: &str, key: &[u8]) -> u128 {
    framed::<true>(KEY128_SEED, pool.as_bytes(), kind.as_bytes(), key)
}

/// Stable 64-bit identity of a backend within a pool, derived from its
/// configured name (not its address, so re-addressing a backend keeps its
/// sessions). Stored in session cookies and used to build Maglev tables.
pub fn backend_id(pool: &str, backend_name: &str) -> u64 {
    framed::<false>(BACKEND_SEED, pool.as_bytes(), backend_name.as_bytes(), &[]) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn concat(a: &[u8], b: &[u8], c: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(a.len() as u32).to_le_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(&(b.len() as u32).to_le_bytes());
        v.extend_from_slice(b);
        v.extend_from_slice(c);
        v
    }

    #[test]
    fn golden_values() {
        // These values are part of the wire format: if this test fails, the
        // change breaks every deployed cookie and every multi-instance setup.
        // Cross-checked against the reference C implementation (python-xxhash
        // over the same framed bytes).
        assert_eq!(key_hash("web", "cookie:sid", b"abc123"), 0x1290_06ff_864d_faba);
        assert_eq!(key_hash("", "", b""), 0x5630_818d_6adb_a477);
        assert_eq!(key_hash128("web", "cookie:sid", b"abc123"), 0x2597_a6c6_5ca6_20bc_1c77_9ae5_2b7b_50dd);
        assert_eq!(backend_id("web", "app-1"), 0x5913_d4aa_daf5_3964);
        assert_eq!(backend_id("web", "app-2"), 0xf717_789c_4ea9_15ec);
    }

    #[test]
    fn framing_separates_fields() {
        assert_ne!(key_hash("ab", "c", b""), key_hash("a", "bc", b""));
        assert_ne!(key_hash("a", "b", b"c"), key_hash("a", "bc", b""));
        assert_ne!(backend_id("p", "x"), key_hash("p", "x", b""));
        assert_ne!(key_hash128("ab", "c", b""), key_hash128("a", "bc", b""));
    }

    #[test]
    fn stack_and_streaming_paths_agree() {
        for len in [0usize, 1, 100, 239, 240, 241, 247, 248, 249, 300, 1000, 5000] {
            let key: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let framed_bytes = concat(b"pool", b"kind", &key);
            assert_eq!(key_hash("pool", "kind", &key), xxh3_64_with_seed(&framed_bytes, KEY_SEED), "len {len}");
            assert_eq!(key_hash128("pool", "kind", &key), xxh3_128_with_seed(&framed_bytes, KEY128_SEED), "len {len}");
        }
    }
}
