//! Encrypted, authenticated session-cookie tokens.
//!
//! A token carries the backend a client is pinned to plus session metadata. It is sealed
//! under the first key of a [`KeyRing`] and can be opened by any key of the ring, which
//! allows rotation: deploy `[new, old]` everywhere, wait for old cookies to age out, drop
//! `old`.
//!
//! Two formats exist, told apart by their length and their first byte ([`Version`]).
//! Every ring opens both; which one is sealed is the caller's choice
//! ([`KeyRing::seal_as`]), so a fleet can move from one to the other in two phases
//! without dropping a session: first every instance learns to open the new version while
//! still issuing the old one, then they start issuing the new one.
//!
//! Version 1 (82 bytes, then base64url without padding = 110 characters), sealed with
//! XChaCha20-Poly1305 under the configured key:
//!
//! | bytes | field                                                       |
//! |-------|-------------------------------------------------------------|
//! | 1     | version (1)                                                 |
//! | 1     | key id: one-byte fingerprint of the sealing key (a hint)    |
//! | 24    | random nonce                                                |
//! | 40    | ciphertext of backend, session, issued, last_seen (LE)      |
//! | 16    | Poly1305 tag                                                |
//!
//! Version 2 (78 bytes = 104 characters), sealed with AES-256-GCM-SIV (RFC 8452) under
//! a key derived from the configured one (so the same key never keys two algorithms);
//! it also records the pool the session belongs to:
//!
//! | bytes | field                                                           |
//! |-------|-----------------------------------------------------------------|
//! | 1     | version (2)                                                     |
//! | 1     | key id (the same fingerprint as version 1's)                    |
//! | 12    | random nonce                                                    |
//! | 48    | ciphertext of backend, pool, session, issued, last_seen (LE)    |
//! | 16    | GCM-SIV tag                                                     |
//!
//! AES-GCM-SIV resists nonce misuse: a repeated random 96-bit nonce only shows that the
//! same token was sealed twice, so random nonces stay safe under keys that live for
//! years. See ARCHITECTURE.md ("The token") for why this cipher and what it costs.
//!
//! In both versions the version byte and key id are authenticated as associated data.
//! Sealing and opening never allocate, but for the one allocation per thread of the cache
//! of opened tokens.
//!
//! Opening is cached: a browser sends the same cookie text back until Tether refreshes
//! it, so [`KeyRing::open`] keeps, per thread, the tokens it recently opened, keyed by
//! their exact text and the ring that opened them (`OpenCache`, whose documentation says
//! why it cannot make a forged token open).

use core::cell::RefCell;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use aes_gcm_siv::{Aes256GcmSiv, Nonce as SivNonce, Tag as SivTag};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use chacha20poly1305::{AeadInOut, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A token format version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Version {
    /// XChaCha20-Poly1305; backend, session and stamps. Issued by default.
    #[default]
    V1,
    /// AES-256-GCM-SIV; backend, pool, session and stamps.
    V2,
}

impl Version {
    /// The version with this number (the first byte of a token), if there is one.
    pub const fn from_number(n: u8) -> Option<Version> {
        match n {
            1 => Some(Version::V1),
            2 => Some(Version::V2),
            _ => None,
        }
    }

    /// The number written as the token's first byte.
    pub const fn number(self) -> u8 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }

    /// The length of a token of this version as text.
    pub const fn str_len(self) -> usize {
        match self {
            Version::V1 => V1_STR_LEN,
            Version::V2 => V2_STR_LEN,
        }
    }

    const fn raw_len(self) -> usize {
        match self {
            Version::V1 => V1_RAW_LEN,
            Version::V2 => V2_RAW_LEN,
        }
    }
}

/// Length of an encoded version 1 token.
pub const V1_STR_LEN: usize = 110;
/// Length of an encoded version 2 token.
pub const V2_STR_LEN: usize = 104;
/// The longest encoded token of any version.
pub const MAX_STR_LEN: usize = V1_STR_LEN;

const HEADER_LEN: usize = 2;
const TAG_LEN: usize = 16;

const V1_NONCE_LEN: usize = 24;
const V1_PLAIN_LEN: usize = 8 + 16 + 8 + 8;
const V1_RAW_LEN: usize = HEADER_LEN + V1_NONCE_LEN + V1_PLAIN_LEN + TAG_LEN;

const V2_NONCE_LEN: usize = 12;
const V2_PLAIN_LEN: usize = 8 + 8 + 16 + 8 + 8;
const V2_RAW_LEN: usize = HEADER_LEN + V2_NONCE_LEN + V2_PLAIN_LEN + TAG_LEN;

/// Decoding buffer size: base64's conservative estimate for the longest token.
const DECODE_BUF: usize = MAX_STR_LEN.div_ceil(4) * 3;

const _: () = assert!(V1_RAW_LEN == 82 && V2_RAW_LEN == 78);
const _: () = assert!(V1_STR_LEN == (V1_RAW_LEN * 4).div_ceil(3));
const _: () = assert!(V2_STR_LEN == (V2_RAW_LEN * 4).div_ceil(3));
const _: () = assert!(V2_STR_LEN <= MAX_STR_LEN && MAX_STR_LEN <= u8::MAX as usize);

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_encode_padding(false).with_decode_padding_mode(DecodePaddingMode::Indifferent);
const KEY_STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const KEY_URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// A 256-bit token key. `Debug` does not reveal it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Key(bytes)
    }

    /// The raw key bytes (the access log's pseudonym key is one of these).
    pub(crate) const fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Parses a key given as base64, standard (`+/`) or URL-safe (`-_`)
    /// alphabet, with or without padding; surrounding whitespace is ignored.
    /// It must decode to exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let engine = if text.contains(['-', '_']) { &KEY_URL_SAFE } else { &KEY_STANDARD };
        let mut buf = [0u8; 48];
        // Anything longer than 48 decoded bytes is the wrong length anyway.
        if text.len() > 64 {
            return Err(KeyError::Length { decoded: text.len() / 4 * 3 });
        }
        let n = engine.decode_slice(text, &mut buf).map_err(|_| KeyError::Base64)?;
        if n != 32 {
            return Err(KeyError::Length { decoded: n });
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&buf[..32]);
        Ok(Key(key))
    }

    /// A fresh random key from the operating system's RNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(Key(key))
    }

    /// The raw key bytes.
    #[cfg(test)]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why a key could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Not valid base64 in either the standard or URL-safe alphabet.
    Base64,
    /// Valid base64, but it decoded to this many bytes instead of 32.
    Length { decoded: usize },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Base64 => f.write_str("token key is not valid base64"),
            KeyError::Length { decoded } => {
                write!(f, "token key must decode to 32 bytes, got {decoded} (make one with: head -c 32 /dev/urandom | base64)")
            }
        }
    }
}

impl std::error::Error for KeyError {}

/// Why a key ring could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRingError {
    /// No keys were given.
    Empty,
    /// The key at this position (0 = the sealing key) is invalid.
    Key { index: usize, error: KeyError },
}

impl fmt::Display for KeyRingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRingError::Empty => f.write_str("token key ring needs at least one key"),
            KeyRingError::Key { index, error } => write!(f, "token key #{index}: {error}"),
        }
    }
}

impl std::error::Error for KeyRingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyRingError::Empty => None,
            KeyRingError::Key { error, .. } => Some(error),
        }
    }
}

struct RingKey {
    id: u8,
    /// Seals and opens version 1.
    v1: XChaCha20Poly1305,
    /// Seals and opens version 2, under a key derived from the configured one.
    v2: Aes256GcmSiv,
}

impl RingKey {
    fn new(key: &Key) -> RingKey {
        let v1 = XChaCha20Poly1305::new(&key.0.into());
        let v2 = Aes256GcmSiv::new(&v2_key(&v1).into());
        RingKey { id: key_id(&v1), v1, v2 }
    }
}

/// One or more keys: the first seals, all of them open.
///
/// A ring's keys never change once it is built (a reload or a rotation builds a new
/// ring), which is what lets [`KeyRing::open`] remember what a ring opened.
pub struct KeyRing {
    keys: Vec<RingKey>,
    /// This ring's identity in the `OpenCache`: unique in the process, never 0.
    id: u64,
}

/// The next [`KeyRing`] identity. 0 marks an empty cache entry, so counting starts at 1;
/// 64 bits do not wrap.
static NEXT_RING_ID: AtomicU64 = AtomicU64::new(1);

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys.len())
            .field("ids", &self.keys.iter().map(|k| k.id).collect::<Vec<_>>())
            .finish()
    }
}

/// One-byte fingerprint of a key: the first byte of the Poly1305 tag of an
/// empty message under a fixed nonce, i.e. a PRF output of the key. It only
/// tells `open` which key to try first; it is not relied on for security.
fn key_id(cipher: &XChaCha20Poly1305) -> u8 {
    let nonce = XNonce::from(*b"tether token key-id v1..");
    let tag = cipher
        .encrypt_inout_detached(&nonce, b"tether key fingerprint", (&mut [][..]).into())
        .expect("empty message is within AEAD limits");
    tag[0]
}

/// The version 2 key: 32 bytes of the XChaCha20 keystream of the configured key under a
/// fixed nonce no token uses (tokens take random nonces, and the key id's fixed nonce
/// differs), a PRF output of the key. The configured key thus never keys AES directly,
/// and one configured key still serves both versions.
fn v2_key(cipher: &XChaCha20Poly1305) -> [u8; 32] {
    let nonce = XNonce::from(*b"tether token v2 aes key.");
    let mut key = [0u8; 32];
    cipher.encrypt_inout_detached(&nonce, b"", (&mut key[..]).into()).expect("32-byte message is within AEAD limits");
    key
}

impl KeyRing {
    /// Builds a ring from keys, the first of which seals.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Result<Self, KeyRingError> {
        let keys: Vec<RingKey> = keys.into_iter().map(|k| RingKey::new(&k)).collect();
        if keys.is_empty() {
            return Err(KeyRingError::Empty);
        }
        // The thread that builds a ring usually opens with it next: let it pay its one
        // allocation of the cache now rather than inside its first `open`.
        OpenCache::prepare();
        Ok(KeyRing { keys, id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed) })
    }

    /// Builds a ring from base64 keys (see [`Key::from_base64`]), the first
    /// of which seals.
    pub fn from_base64<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Result<Self, KeyRingError> {
        let mut parsed = Vec::new();
        for (index, text) in keys.into_iter().enumerate() {
            let key = Key::from_base64(text.as_ref()).map_err(|error| KeyRingError::Key { index, error })?;
            parsed.push(key);
        }
        Self::new(parsed)
    }

    /// A ring with a single fresh random key (tokens will not survive a
    /// restart or be shared across instances).
    pub fn generate() -> Result<Self, getrandom::Error> {
        let key = Key::generate()?;
        Ok(Self::new([key]).expect("one key"))
    }

    /// Number of keys in the ring.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a ring has at least one key.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Seals a token in the default version ([`Version::V1`]), which drops its pool.
    /// Never allocates.
    ///
    /// # Panics
    /// Only if the operating system's RNG fails; see [`KeyRing::try_seal_as`].
    pub fn seal(&self, token: &Token) -> TokenString {
        self.seal_as(Version::V1, token)
    }

    /// Seals a token in `version`. Never allocates. Version 1 has no room for the pool
    /// and drops it; version 2 records it (no pool is recorded as 0).
    ///
    /// # Panics
    /// Only if the operating system's RNG fails; see [`KeyRing::try_seal_as`].
    pub fn seal_as(&self, version: Version, token: &Token) -> TokenString {
        self.try_seal_as(version, token).expect("operating system random number generator failed")
    }

    /// Seals a token in `version`, reporting an RNG failure instead of panicking.
    pub fn try_seal_as(&self, version: Version, token: &Token) -> Result<TokenString, getrandom::Error> {
        let key = &self.keys[0];
        let mut raw = [0u8; V1_RAW_LEN];
        let raw = &mut raw[..version.raw_len()];
        raw[0] = version.number();
        raw[1] = key.id;
        let (header, rest) = raw.split_at_mut(HEADER_LEN);
        match version {
            Version::V1 => {
                let (nonce, rest) = rest.split_at_mut(V1_NONCE_LEN);
                let (body, tag_out) = rest.split_at_mut(V1_PLAIN_LEN);
                getrandom::fill(nonce)?;
                token.encode_v1(body);
                let nonce = XNonce::try_from(&*nonce).expect("24-byte nonce");
                let tag = key
                    .v1
                    .encrypt_inout_detached(&nonce, header, body.into())
                    .expect("40-byte message is within AEAD limits");
                tag_out.copy_from_slice(&tag);
            }
            Version::V2 => {
                let (nonce, rest) = rest.split_at_mut(V2_NONCE_LEN);
                let (body, tag_out) = rest.split_at_mut(V2_PLAIN_LEN);
                getrandom::fill(nonce)?;
                token.encode_v2(body);
                let nonce = SivNonce::try_from(&*nonce).expect("12-byte nonce");
                let tag = key
                    .v2
                    .encrypt_inout_detached(&nonce, header, body.into())
                    .expect("48-byte message is within AEAD limits");
                tag_out.copy_from_slice(&tag);
            }
        }

        let mut out = [0u8; MAX_STR_LEN];
        let n = URL_SAFE_NO_PAD.encode_slice(&*raw, &mut out).expect("buffer sized for the encoded token");
        debug_assert_eq!(n, version.str_len());
        Ok(TokenString { text: out, len: n as u8 })
    }

    /// Opens a token string of either version. Never allocates, except for the calling
    /// thread's first use of the open cache if this thread built no ring.
    ///
    /// Tries the key whose fingerprint matches the token's key id first, then
    /// every other key. Expiry is not checked: see [`Token::check`]; nor is the pool a
    /// version 2 token records, which its caller compares with its own.
    ///
    /// A text this ring already opened on this thread is answered from a per-thread cache
    /// without decrypting, with exactly the token decrypting gives: only texts that opened
    /// are cached, and only a byte-equal text under the same ring hits, so the cache
    /// cannot make a forged token open (`OpenCache` has the argument and the costs).
    pub fn open(&self, text: &str) -> Result<Token, OpenError> {
        if text.len() != V1_STR_LEN && text.len() != V2_STR_LEN {
            return Err(OpenError::Malformed);
        }
        let hash = OpenCache::hash(text);
        if let Some(token) = OpenCache::get(self.id, text, hash) {
            return Ok(token);
        }
        let token = self.decrypt(text)?;
        OpenCache::insert(self.id, text, hash, &token);
        Ok(token)
    }

    /// Opens a token by decoding and decrypting it: [`KeyRing::open`] without the cache.
    fn decrypt(&self, text: &str) -> Result<Token, OpenError> {
        let version = match text.len() {
            V1_STR_LEN => Version::V1,
            V2_STR_LEN => Version::V2,
            _ => return Err(OpenError::Malformed),
        };
        let mut buf = [0u8; DECODE_BUF];
        let n = URL_SAFE_NO_PAD.decode_slice(text, &mut buf).map_err(|_| OpenError::Malformed)?;
        if n != version.raw_len() || buf[0] != version.number() {
            return Err(OpenError::Malformed);
        }
        let raw = &buf[..n];
        let header = &raw[..HEADER_LEN];
        let hinted = raw[1];
        let likely = self.keys.iter().filter(|k| k.id == hinted);
        let others = self.keys.iter().filter(|k| k.id != hinted);
        let keys = likely.chain(others);
        match version {
            Version::V1 => {
                let nonce = XNonce::try_from(&raw[HEADER_LEN..HEADER_LEN + V1_NONCE_LEN]).expect("24-byte nonce");
                let ciphertext = &raw[HEADER_LEN + V1_NONCE_LEN..V1_RAW_LEN - TAG_LEN];
                let tag = Tag::try_from(&raw[V1_RAW_LEN - TAG_LEN..]).expect("16-byte tag");
                for key in keys {
                    let mut body = [0u8; V1_PLAIN_LEN];
                    body.copy_from_slice(ciphertext);
                    if key.v1.decrypt_inout_detached(&nonce, header, (&mut body[..]).into(), &tag).is_ok() {
                        return Ok(Token::decode_v1(&body));
                    }
                }
            }
            Version::V2 => {
                let nonce = SivNonce::try_from(&raw[HEADER_LEN..HEADER_LEN + V2_NONCE_LEN]).expect("12-byte nonce");
                let ciphertext = &raw[HEADER_LEN + V2_NONCE_LEN..V2_RAW_LEN - TAG_LEN];
                let tag = SivTag::try_from(&raw[V2_RAW_LEN - TAG_LEN..]).expect("16-byte tag");
                for key in keys {
                    let mut body = [0u8; V2_PLAIN_LEN];
                    body.copy_from_slice(ciphertext);
                    if key.v2.decrypt_inout_detached(&nonce, header, (&mut body[..]).into(), &tag).is_ok() {
                        return Ok(Token::decode_v2(&body));
                    }
                }
            }
        }
        Err(OpenError::Forged)
    }
}

/// Sets in a thread's [`OpenCache`] (a power of two).
const CACHE_SETS: usize = 1024;
/// Entries per set.
const CACHE_WAYS: usize = 2;
/// The seed of the hash that picks a set. Fixed: see [`OpenCache`] on flooding.
const CACHE_SEED: u64 = 0x7465_7468_6572_2d63;

/// The tokens this thread recently opened, so that a cookie the browser sends back
/// unchanged is opened once, not on every request: a hit costs a hash and a compare of
/// the text instead of a base64 decode and an AEAD open.
///
/// **It cannot make a forged token open.** An entry is written only after its text
/// opened successfully under a ring, and holds that exact text, the ring's identity and
/// the token it opened as. A lookup hits only when both the ring's identity and every byte
/// of the text are equal, so a hit is a text that this same ring already authenticated.
/// A ring's keys never change after it is built and opening is deterministic (the token
/// depends on nothing but the text and the keys), so a hit returns precisely what
/// decrypting the text again would. A text that fails to open is never stored, and a text
/// differing from a stored one in any byte misses and is decrypted (and refused) as
/// without a cache. Ring identities come from a process-wide counter
/// ([`KeyRing::new`]), never from an address, so a ring built by a reload or rotation
/// cannot see the entries of the ring it replaces, even at the same address.
///
/// Expiry needs nothing here: the cache returns the token with its stamps, and callers
/// still run [`Token::check`] on it.
///
/// **Shape and memory.** Per thread ([`thread_local!`]), 2-way set associative, 1024 sets:
/// 2048 entries, enough for a few thousand sessions a thread without much eviction. An
/// entry is 176 bytes (the text, up to 110 bytes, its length, the ring's identity and the
/// 56-byte [`Token`]); a set is two entries and a one-byte note of the way used last, 360
/// bytes; the table is 360 KiB per thread, allocated once, the first time the thread
/// builds a ring or opens a token (a thread that does neither pays nothing). After that
/// a lookup, a hit, a miss and an insert never allocate.
///
/// **Hashing and flooding.** The set is picked by XXH3 of the text under a fixed seed. A
/// collision only costs a miss, that is one decrypt, which is what every open cost before
/// the cache. An attacker can fill a thread's cache only with texts that open, that is
/// with tokens Tether issued (forged ones are never stored), and by sending many of them,
/// or ones chosen to fall in one set, it can only evict entries: the evicted sessions pay
/// a decrypt, as they did without a cache. It cannot make the cache return anything but
/// what decrypting returns.
struct OpenCache {
    sets: Box<[CacheSet]>,
}

/// Gives this thread a token open cache of at least `entries` entries (rounded up to a
/// power of two of sets), emptying the one it had; never smaller than the default. Only
/// the simulator calls it: it runs a whole fleet's sessions on one thread, where a
/// running Tether spreads them over its workers' caches. The cache answers exactly what
/// decrypting would, so its size changes how fast a token opens, never what it opens as.
pub fn size_open_cache(entries: usize) {
    let sets = entries.div_ceil(CACHE_WAYS).next_power_of_two().max(CACHE_SETS);
    let _ = OPEN_CACHE.try_with(|cache| {
        *cache.borrow_mut() = Some(OpenCache::with_sets(sets));
    });
}

#[derive(Clone, Copy)]
struct CacheSet {
    ways: [CacheEntry; CACHE_WAYS],
    /// The way hit or filled last: a fill replaces the other one.
    recent: u8,
}

#[derive(Clone, Copy)]
struct CacheEntry {
    /// The identity of the ring that opened `text`; 0 (no ring's) while empty.
    ring: u64,
    /// What `text` opened as.
    token: Token,
    len: u8,
    text: [u8; MAX_STR_LEN],
}

const _: () = assert!(CACHE_SETS.is_power_of_two() && CACHE_WAYS == 2);
// The sizes the documentation gives (exact on 64-bit targets).
const _: () = assert!(size_of::<CacheEntry>() <= 176 && size_of::<CacheSet>() <= 360);

impl CacheEntry {
    const EMPTY: CacheEntry = CacheEntry {
        ring: 0,
        token: Token { backend: 0, pool: None, session: [0; 16], issued: 0, last_seen: 0 },
        len: 0,
        text: [0; MAX_STR_LEN],
    };

    fn holds(&self, ring: u64, text: &[u8]) -> bool {
        self.ring == ring && &self.text[..usize::from(self.len)] == text
    }
}

thread_local! {
    // A const initialiser: touching it before the table exists allocates nothing.
    static OPEN_CACHE: RefCell<Option<OpenCache>> = const { RefCell::new(None) };
}

#[cfg(test)]
thread_local! {
    static CACHE_HITS: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

impl OpenCache {
    fn new() -> OpenCache {
        OpenCache::with_sets(CACHE_SETS)
    }

    /// `sets` must be a power of two.
    fn with_sets(sets: usize) -> OpenCache {
        let empty = CacheSet { ways: [CacheEntry::EMPTY; CACHE_WAYS], recent: 0 };
        OpenCache { sets: vec![empty; sets].into_boxed_slice() }
    }

    /// Allocates this thread's table if it has none yet.
    fn prepare() {
        // `try_with`: during thread teardown there is simply no cache.
        let _ = OPEN_CACHE.try_with(|cache| {
            cache.borrow_mut().get_or_insert_with(OpenCache::new);
        });
    }

    fn hash(text: &str) -> u64 {
        xxh3_64_with_seed(text.as_bytes(), CACHE_SEED)
    }

    fn set(&mut self, hash: u64) -> &mut CacheSet {
        // Truncating the hash is the point: its low bits pick the set.
        let mask = self.sets.len() - 1;
        &mut self.sets[hash as usize & mask]
    }

    /// The token `ring` opened `text` as, if this thread remembers it.
    fn get(ring: u64, text: &str, hash: u64) -> Option<Token> {
        let token = OPEN_CACHE
            .try_with(|cache| {
                let mut cache = cache.borrow_mut();
                let set = cache.as_mut()?.set(hash);
                let way = set.ways.iter().position(|e| e.holds(ring, text.as_bytes()))?;
                set.recent = way as u8;
                Some(set.ways[way].token)
            })
            .ok()
            .flatten();
        #[cfg(test)]
        if token.is_some() {
            CACHE_HITS.with(|hits| hits.set(hits.get() + 1));
        }
        token
    }

    /// Remembers that `ring` opened `text` as `token`. Only for texts that did open.
    fn insert(ring: u64, text: &str, hash: u64, token: &Token) {
        debug_assert!(text.len() <= MAX_STR_LEN);
        let _ = OPEN_CACHE.try_with(|cache| {
            let mut cache = cache.borrow_mut();
            let set = cache.get_or_insert_with(OpenCache::new).set(hash);
            let way = usize::from(set.recent ^ 1);
            let entry = &mut set.ways[way];
            entry.ring = ring;
            entry.token = *token;
            entry.len = text.len() as u8;
            entry.text[..text.len()].copy_from_slice(text.as_bytes());
            set.recent = way as u8;
        });
    }

    /// How many opens this thread answered from its cache.
    #[cfg(test)]
    fn hits() -> u64 {
        CACHE_HITS.with(core::cell::Cell::get)
    }
}

/// Why a token could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Not a token of a known format: wrong length, bad base64, or a version byte that
    /// does not match the length.
    Malformed,
    /// Well-formed, but no key in the ring authenticates it (tampered,
    /// or sealed with a key that has since been removed).
    Forged,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenError::Malformed => "malformed session token",
            OpenError::Forged => "session token failed authentication",
        })
    }
}

impl std::error::Error for OpenError {}

/// A sealed token: base64url characters on the stack, as many as its version has
/// ([`Version::str_len`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenString {
    text: [u8; MAX_STR_LEN],
    len: u8,
}

impl TokenString {
    /// The token text, ready to be a cookie value.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.text[..usize::from(self.len)]).expect("base64 output is ASCII")
    }
}

impl AsRef<str> for TokenString {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for TokenString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TokenString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenString({:?})", self.as_str())
    }
}

/// The session payload carried in the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    /// The pinned backend's [`backend_id`](super::hash::backend_id).
    pub backend: u64,
    /// The identity of the pool the session belongs to (a fixed-seed hash of its name,
    /// never 0). `None`: no pool recorded, as in every version 1 token.
    pub pool: Option<u64>,
    /// Random session identifier.
    pub session: [u8; 16],
    /// When the session started, unix seconds.
    pub issued: u64,
    /// When the session was last seen (cookie last re-issued), unix seconds.
    pub last_seen: u64,
}

/// Why [`Token::check`] rejected a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Unused for longer than the idle timeout.
    Idle,
    /// Older than the absolute timeout.
    Absolute,
    /// `issued` or `last_seen` lies further in the future than the clock skew
    /// allowed.
    Future,
}

impl fmt::Display for Expired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expired::Idle => "session idle timeout exceeded",
            Expired::Absolute => "session absolute timeout exceeded",
            Expired::Future => "session timestamps are in the future",
        })
    }
}

impl std::error::Error for Expired {}

fn u64_at(body: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&body[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Token {
    /// A new session pinned to `backend`, with a random session id, issued
    /// and last seen at `now` (unix seconds), no pool recorded.
    pub fn issue(backend: u64, now: u64) -> Result<Self, getrandom::Error> {
        let mut session = [0u8; 16];
        getrandom::fill(&mut session)?;
        Ok(Token { backend, pool: None, session, issued: now, last_seen: now })
    }

    /// Checks the token's age at `now` (unix seconds).
    ///
    /// Rejects when `now - last_seen > idle_timeout_secs`, when
    /// `now - issued > absolute_timeout_secs` (if set), and when either
    /// timestamp is more than `skew_secs` ahead of `now` (instances' clocks disagree, or
    /// this one stepped back; within the skew the token is trusted as it is).
    pub fn check(
        &self,
        now: u64,
        idle_timeout_secs: u64,
        absolute_timeout_secs: Option<u64>,
        skew_secs: u64,
    ) -> Result<(), Expired> {
        let horizon = now.saturating_add(skew_secs);
        if self.issued > horizon || self.last_seen > horizon {
            return Err(Expired::Future);
        }
        if let Some(limit) = absolute_timeout_secs {
            if now.saturating_sub(self.issued) > limit {
                return Err(Expired::Absolute);
            }
        }
        if now.saturating_sub(self.last_seen) > idle_timeout_secs {
            return Err(Expired::Idle);
        }
        Ok(())
    }

    fn encode_v1(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.backend.to_le_bytes());
        out[8..24].copy_from_slice(&self.session);
        out[24..32].copy_from_slice(&self.issued.to_le_bytes());
        out[32..40].copy_from_slice(&self.last_seen.to_le_bytes());
    }

    fn decode_v1(body: &[u8; V1_PLAIN_LEN]) -> Self {
        let mut session = [0u8; 16];
        session.copy_from_slice(&body[8..24]);
        Token { backend: u64_at(body, 0), pool: None, session, issued: u64_at(body, 24), last_seen: u64_at(body, 32) }
    }

    fn encode_v2(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.backend.to_le_bytes());
        out[8..16].copy_from_slice(&self.pool.unwrap_or(0).to_le_bytes());
        out[16..32].copy_from_slice(&self.session);
        out[32..40].copy_from_slice(&self.issued.to_le_bytes());
        out[40..48].copy_from_slice(&self.last_seen.to_le_bytes());
    }

    fn decode_v2(body: &[u8; V2_PLAIN_LEN]) -> Self {
        let mut session = [0u8; 16];
        session.copy_from_slice(&body[16..32]);
        let pool = Some(u64_at(body, 8)).filter(|&p| p != 0);
        Token { backend: u64_at(body, 0), pool, session, issued: u64_at(body, 32), last_seen: u64_at(body, 40) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key::from_bytes([byte; 32])
    }

    fn sample() -> Token {
        Token {
            backend: 0x0123_4567_89ab_cdef,
            pool: None,
            session: *b"0123456789abcdef",
            issued: 1_700_000_000,
            last_seen: 1_700_000_100,
        }
    }

    #[test]
    fn roundtrip() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let t = sample();
        let s = ring.seal(&t);
        assert_eq!(s.as_str().len(), V1_STR_LEN);
        assert!(s.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(ring.open(s.as_str()), Ok(t));
        // Random nonces: sealing twice gives different strings.
        assert_ne!(ring.seal(&t), s);
    }

    #[test]
    fn issue_and_generate() {
        let ring = KeyRing::generate().unwrap();
        let a = Token::issue(7, 100).unwrap();
        let b = Token::issue(7, 100).unwrap();
        assert_ne!(a.session, b.session);
        assert_eq!(ring.open(ring.seal(&a).as_str()), Ok(a));
    }

    fn raw_of(s: &TokenString) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s.as_str()).unwrap()
    }

    fn encode_raw(raw: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let ring = KeyRing::new([key(1), key(2)]).unwrap();
        let s = ring.seal(&sample());
        let raw = raw_of(&s);
        assert_eq!(raw.len(), V1_RAW_LEN);
        for byte in 0..V1_RAW_LEN {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[byte] ^= 1 << bit;
                let got = ring.open(&encode_raw(&bad));
                let want = if byte == 0 { OpenError::Malformed } else { OpenError::Forged };
                assert_eq!(got, Err(want), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn every_changed_character_is_rejected() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let s = ring.seal(&sample());
        let text = s.as_str().as_bytes();
        for i in 0..text.len() {
            for replacement in [b'A', b'z', b'-', b'_', b'0', b'=', b'+', b'/', b' '] {
                if text[i] == replacement {
                    continue;
                }
                let mut bad = text.to_vec();
                bad[i] = replacement;
                let bad = String::from_utf8(bad).unwrap();
                assert!(ring.open(&bad).is_err(), "position {i} -> {replacement}");
            }
        }
    }

    #[test]
    fn truncated_and_extended_are_malformed() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let s = ring.seal(&sample());
        let text = s.as_str();
        for len in 0..text.len() {
            assert_eq!(ring.open(&text[..len]), Err(OpenError::Malformed), "len {len}");
        }
        assert_eq!(ring.open(&format!("{text}A")), Err(OpenError::Malformed));
        assert_eq!(ring.open(""), Err(OpenError::Malformed));
        let non_ascii = "é".repeat(V1_STR_LEN / 2);
        assert_eq!(ring.open(&non_ascii), Err(OpenError::Malformed));
    }

    #[test]
    fn golden_token_opens() {
        // Sealed once by this code and verified independently with
        // libsodium's crypto_aead_xchacha20poly1305_ietf (also key id 0xbf).
        // Pins the wire format: a change here breaks deployed cookies.
        const GOLDEN: &str = "Ab-ElBNiqn7zfeC0KAdtIrr6n4ZnF041Ai1QcZ_M5gWahJs0-HM-se5Bi9qG_dQT9Q_NElVlGw1qq_2CVF1KUcf-zg-3FdfVWMG5NbIifPr0Xw";
        let ring = KeyRing::new([Key::from_bytes([0x11; 32])]).unwrap();
        assert_eq!(ring.keys[0].id, 0xbf);
        assert_eq!(
            ring.open(GOLDEN),
            Ok(Token {
                backend: 0x5913_d4aa_daf5_3964,
                pool: None,
                session: *b"golden-session-1",
                issued: 1_750_000_000,
                last_seen: 1_750_000_123,
            })
        );
    }

    #[test]
    fn golden_v2_token_opens() {
        // Sealed once by this code and opened independently with Python's `cryptography`
        // (AESGCMSIV, under the v2 key computed from an HChaCha20 checked against the
        // XChaCha draft's test vector and IETF ChaCha20 at counter 1). Pins the wire
        // format: a change here breaks deployed cookies.
        const GOLDEN: &str =
            "Ar-13XA9lBwnmPVCkCgQ1Ujv0K8uszozzgB8Ef2D0o9Dk-rpQBy2Wsc5KAxX0yxfZYCww9vxhrV0yS4Nu5VVAiSjxYR5oyt2FXJ06nrr";
        let ring = KeyRing::new([Key::from_bytes([0x11; 32])]).unwrap();
        assert_eq!(
            ring.open(GOLDEN),
            Ok(Token {
                backend: 0x5913_d4aa_daf5_3964,
                pool: Some(0x0ddb_a11c_afe0_0001),
                session: *b"golden-session-2",
                issued: 1_750_000_000,
                last_seen: 1_750_000_123,
            })
        );
    }

    #[test]
    fn wrong_key_is_forged() {
        let a = KeyRing::new([key(1)]).unwrap();
        let b = KeyRing::new([key(2)]).unwrap();
        let s = a.seal(&sample());
        assert_eq!(b.open(s.as_str()), Err(OpenError::Forged));
    }

    #[test]
    fn rotation() {
        let old = KeyRing::new([key(1)]).unwrap();
        let rotated = KeyRing::new([key(9), key(1)]).unwrap();
        let t = sample();
        let by_old = old.seal(&t);
        assert_eq!(rotated.open(by_old.as_str()), Ok(t));
        let by_new = rotated.seal(&t);
        assert_eq!(rotated.open(by_new.as_str()), Ok(t));
        // The new key seals, so the old ring cannot read new tokens.
        assert_eq!(old.open(by_new.as_str()), Err(OpenError::Forged));
        // Key ids differ for the two keys and are carried in the token.
        assert_ne!(raw_of(&by_old)[1], raw_of(&by_new)[1]);
    }

    #[test]
    fn key_id_mismatch_still_tries_every_key() {
        // Simulate a colliding/absent hint: a token claiming a key id that
        // no key has is still opened by trying all keys, but the id is
        // authenticated so the altered token is rejected.
        let ring = KeyRing::new([key(3), key(1)]).unwrap();
        let old = KeyRing::new([key(1)]).unwrap();
        let s = old.seal(&sample());
        let mut raw = raw_of(&s);
        raw[1] = raw[1].wrapping_add(1);
        assert_eq!(ring.open(&encode_raw(&raw)), Err(OpenError::Forged));
    }

    #[test]
    fn key_parsing() {
        let bytes: [u8; 32] = core::array::from_fn(|i| (i * 8 + 3) as u8);
        let std_pad = base64::engine::general_purpose::STANDARD.encode(bytes);
        let std_nopad = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        let url_pad = base64::engine::general_purpose::URL_SAFE.encode(bytes);
        let url_nopad = URL_SAFE_NO_PAD.encode(bytes);
        assert!(std_pad.contains(['+', '/']) && url_pad.contains(['-', '_']));
        for text in [&std_pad, &std_nopad, &url_pad, &url_nopad] {
            let k = Key::from_base64(&format!("  {text}\n")).unwrap();
            assert_eq!(k.as_bytes(), &bytes, "{text}");
        }
        let k = Key::from_bytes(bytes);
        assert_eq!(Key::from_base64(&URL_SAFE_NO_PAD.encode(bytes)).unwrap(), k);
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");

        assert_eq!(Key::from_base64("not base64!"), Err(KeyError::Base64));
        assert_eq!(Key::from_base64("+-"), Err(KeyError::Base64));
        let short = URL_SAFE_NO_PAD.encode([1u8; 16]);
        assert_eq!(Key::from_base64(&short), Err(KeyError::Length { decoded: 16 }));
        let long = URL_SAFE_NO_PAD.encode([1u8; 33]);
        assert_eq!(Key::from_base64(&long), Err(KeyError::Length { decoded: 33 }));
        let huge = URL_SAFE_NO_PAD.encode([1u8; 300]);
        assert!(matches!(Key::from_base64(&huge), Err(KeyError::Length { .. })));
        assert_eq!(Key::from_base64(""), Err(KeyError::Length { decoded: 0 }));

        assert_eq!(KeyRing::from_base64(Vec::<String>::new()).unwrap_err(), KeyRingError::Empty);
        assert_eq!(
            KeyRing::from_base64([url_nopad.as_str(), "bad!"]).unwrap_err(),
            KeyRingError::Key { index: 1, error: KeyError::Base64 }
        );
        let ring = KeyRing::from_base64([&url_nopad, &std_pad]).unwrap();
        assert_eq!(ring.len(), 2);
        assert!(!ring.is_empty());
    }

    fn in_pool(pool: u64) -> Token {
        Token { pool: Some(pool), ..sample() }
    }

    #[test]
    fn v2_roundtrip_records_the_pool() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let t = in_pool(0x7777_0000_1234_5678);
        let s = ring.seal_as(Version::V2, &t);
        assert_eq!(s.as_str().len(), V2_STR_LEN);
        assert!(s.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let raw = raw_of(&s);
        assert_eq!((raw.len(), raw[0], raw[1]), (V2_RAW_LEN, 2, ring.keys[0].id));
        assert_eq!(ring.open(s.as_str()), Ok(t));
        assert_ne!(ring.seal_as(Version::V2, &t), s, "random nonces");
        // No pool recorded stays none.
        let bare = sample();
        assert_eq!(ring.open(ring.seal_as(Version::V2, &bare).as_str()), Ok(bare));
    }

    #[test]
    fn one_ring_opens_both_versions_and_v1_has_no_pool() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let t = in_pool(99);
        let v1 = ring.seal(&t);
        assert_eq!((v1.as_str().len(), raw_of(&v1)[0]), (V1_STR_LEN, 1));
        assert_eq!(ring.seal_as(Version::V1, &t).as_str().len(), V1_STR_LEN);
        // Version 1 has no room for the pool: it opens as "no pool recorded".
        assert_eq!(ring.open(v1.as_str()), Ok(Token { pool: None, ..t }));
        assert_eq!(ring.open(ring.seal_as(Version::V2, &t).as_str()), Ok(t));
        // Both versions carry the same key id.
        assert_eq!(raw_of(&v1)[1], raw_of(&ring.seal_as(Version::V2, &t))[1]);
    }

    #[test]
    fn v2_every_flipped_bit_is_rejected() {
        let ring = KeyRing::new([key(1), key(2)]).unwrap();
        let s = ring.seal_as(Version::V2, &in_pool(5));
        let raw = raw_of(&s);
        assert_eq!(raw.len(), V2_RAW_LEN);
        for byte in 0..V2_RAW_LEN {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[byte] ^= 1 << bit;
                let got = ring.open(&encode_raw(&bad));
                let want = if byte == 0 { OpenError::Malformed } else { OpenError::Forged };
                assert_eq!(got, Err(want), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn v2_every_changed_character_is_rejected() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let s = ring.seal_as(Version::V2, &in_pool(5));
        let text = s.as_str().as_bytes();
        for i in 0..text.len() {
            for replacement in [b'A', b'z', b'-', b'_', b'0', b'=', b'+', b'/', b' '] {
                if text[i] == replacement {
                    continue;
                }
                let mut bad = text.to_vec();
                bad[i] = replacement;
                let bad = String::from_utf8(bad).unwrap();
                assert!(ring.open(&bad).is_err(), "position {i} -> {replacement}");
            }
        }
    }

    #[test]
    fn v2_truncated_extended_and_relabelled_are_malformed() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let s = ring.seal_as(Version::V2, &in_pool(5));
        let text = s.as_str();
        for len in 0..text.len() {
            assert_eq!(ring.open(&text[..len]), Err(OpenError::Malformed), "len {len}");
        }
        for extra in ["A", "AAAAAA"] {
            assert_eq!(ring.open(&format!("{text}{extra}")), Err(OpenError::Malformed), "+{extra}");
        }
        // A version byte that does not match the length.
        for version in [0u8, 1, 3, 255] {
            let mut raw = raw_of(&s);
            raw[0] = version;
            assert_eq!(ring.open(&encode_raw(&raw)), Err(OpenError::Malformed), "version {version}");
        }
        // A version 1 token cut to version 2's length is not a version 2 token.
        let v1 = ring.seal(&sample());
        assert_eq!(ring.open(&v1.as_str()[..V2_STR_LEN]), Err(OpenError::Malformed));
    }

    #[test]
    fn v2_wrong_key_is_forged_and_rotation_opens() {
        let a = KeyRing::new([key(1)]).unwrap();
        let b = KeyRing::new([key(2)]).unwrap();
        let t = in_pool(5);
        let by_a = a.seal_as(Version::V2, &t);
        assert_eq!(b.open(by_a.as_str()), Err(OpenError::Forged));
        let rotated = KeyRing::new([key(2), key(1)]).unwrap();
        assert_eq!(rotated.open(by_a.as_str()), Ok(t));
        assert_eq!(a.open(rotated.seal_as(Version::V2, &t).as_str()), Err(OpenError::Forged));
    }

    #[test]
    fn v2_is_keyed_apart_from_the_configured_key() {
        // The AES key is derived: the configured key itself does not open a v2 token.
        let ring = KeyRing::new([key(1)]).unwrap();
        let raw = raw_of(&ring.seal_as(Version::V2, &in_pool(5)));
        let direct = Aes256GcmSiv::new(&[1u8; 32].into());
        let nonce = SivNonce::try_from(&raw[2..14]).unwrap();
        let tag = SivTag::try_from(&raw[V2_RAW_LEN - TAG_LEN..]).unwrap();
        let mut body = [0u8; V2_PLAIN_LEN];
        body.copy_from_slice(&raw[14..V2_RAW_LEN - TAG_LEN]);
        assert!(direct.decrypt_inout_detached(&nonce, &raw[..2], (&mut body[..]).into(), &tag).is_err());
        assert_ne!(v2_key(&ring.keys[0].v1), [1u8; 32]);
    }

    #[test]
    fn versions_by_number() {
        assert_eq!(Version::from_number(1), Some(Version::V1));
        assert_eq!(Version::from_number(2), Some(Version::V2));
        assert_eq!(Version::from_number(0), None);
        assert_eq!(Version::from_number(3), None);
        assert_eq!(Version::default(), Version::V1);
        for v in [Version::V1, Version::V2] {
            assert_eq!(Version::from_number(v.number()), Some(v));
        }
    }

    /// Opens `text` with `ring`, reporting whether this thread's cache answered.
    fn open_counting(ring: &KeyRing, text: &str) -> (Result<Token, OpenError>, bool) {
        let before = OpenCache::hits();
        let got = ring.open(text);
        (got, OpenCache::hits() > before)
    }

    #[test]
    fn second_open_of_the_same_text_is_a_cache_hit() {
        let ring = KeyRing::new([key(1), key(2)]).unwrap();
        for (version, t) in [(Version::V1, sample()), (Version::V2, in_pool(5))] {
            let s = ring.seal_as(version, &t);
            assert_eq!(open_counting(&ring, s.as_str()), (Ok(t), false), "{version:?} first open decrypts");
            for _ in 0..3 {
                assert_eq!(open_counting(&ring, s.as_str()), (Ok(t), true), "{version:?} reopen");
            }
        }
        // Also through the rotated-out key: the cache holds what the ring opened.
        let old = KeyRing::new([key(2)]).unwrap();
        let s = old.seal_as(Version::V2, &in_pool(6));
        assert_eq!(open_counting(&ring, s.as_str()), (Ok(in_pool(6)), false));
        assert_eq!(open_counting(&ring, s.as_str()), (Ok(in_pool(6)), true));
    }

    #[test]
    fn another_ring_never_hits_a_rings_entry() {
        let a = KeyRing::new([key(1)]).unwrap();
        let s = a.seal_as(Version::V2, &in_pool(5));
        assert_eq!(open_counting(&a, s.as_str()), (Ok(in_pool(5)), false));
        assert_eq!(open_counting(&a, s.as_str()), (Ok(in_pool(5)), true));
        // A ring with other keys refuses it, though ring `a` cached this very text.
        let b = KeyRing::new([key(2)]).unwrap();
        assert_eq!(open_counting(&b, s.as_str()), (Err(OpenError::Forged), false));
        // A ring with the same keys (a reload) opens it by decrypting, then caches it too.
        let reloaded = KeyRing::new([key(1)]).unwrap();
        assert_ne!(reloaded.id, a.id);
        assert_eq!(open_counting(&reloaded, s.as_str()), (Ok(in_pool(5)), false));
        assert_eq!(open_counting(&reloaded, s.as_str()), (Ok(in_pool(5)), true));
        // A dropped ring's entry stays useless to the rings built after it.
        let v1 = a.seal(&sample());
        assert_eq!(a.open(v1.as_str()), Ok(sample()));
        drop(a);
        let c = KeyRing::new([key(3)]).unwrap();
        assert_eq!(open_counting(&c, v1.as_str()), (Err(OpenError::Forged), false));
    }

    #[test]
    fn a_text_one_character_off_a_cached_one_misses_and_is_refused() {
        let ring = KeyRing::new([key(1)]).unwrap();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for (version, t) in [(Version::V1, sample()), (Version::V2, in_pool(5))] {
            let s = ring.seal_as(version, &t);
            assert_eq!(ring.open(s.as_str()), Ok(t));
            assert_eq!(open_counting(&ring, s.as_str()), (Ok(t), true), "{version:?} cached");
            let text = s.as_str().as_bytes();
            let cached_hash = OpenCache::hash(s.as_str());
            for i in 0..text.len() {
                for &c in alphabet.iter().filter(|&&c| c != text[i]) {
                    let mut bad = text.to_vec();
                    bad[i] = c;
                    let bad = String::from_utf8(bad).unwrap();
                    // As if it collided with the cached text: the compare alone must refuse it.
                    assert_eq!(
                        OpenCache::get(ring.id, &bad, cached_hash),
                        None,
                        "{version:?} {i} -> {}",
                        char::from(c)
                    );
                    let (got, hit) = open_counting(&ring, &bad);
                    assert!(got.is_err() && !hit, "{version:?} position {i} -> {}: {got:?}, hit {hit}", char::from(c));
                }
            }
            // Tampering never evicted or spoiled the valid entry.
            assert_eq!(open_counting(&ring, s.as_str()), (Ok(t), true), "{version:?} still cached");
        }
    }

    #[test]
    fn tampered_texts_are_refused_after_a_valid_one_was_cached() {
        let ring = KeyRing::new([key(1), key(2)]).unwrap();
        for (version, t) in [(Version::V1, sample()), (Version::V2, in_pool(5))] {
            let s = ring.seal_as(version, &t);
            assert_eq!(ring.open(s.as_str()), Ok(t));
            assert_eq!(open_counting(&ring, s.as_str()), (Ok(t), true));
            let raw = raw_of(&s);
            for byte in 0..raw.len() {
                for bit in 0..8 {
                    let mut bad = raw.clone();
                    bad[byte] ^= 1 << bit;
                    let want = if byte == 0 { OpenError::Malformed } else { OpenError::Forged };
                    // Twice: a refusal is not remembered as anything.
                    for _ in 0..2 {
                        assert_eq!(
                            open_counting(&ring, &encode_raw(&bad)),
                            (Err(want), false),
                            "byte {byte} bit {bit}"
                        );
                    }
                }
            }
            // Cut or extended copies of the cached text are malformed, not hits.
            assert_eq!(open_counting(&ring, &s.as_str()[..s.as_str().len() - 1]), (Err(OpenError::Malformed), false));
            assert_eq!(open_counting(&ring, &format!("{}A", s.as_str())), (Err(OpenError::Malformed), false));
        }
    }

    /// The simulator's larger cache holds what the default one cannot: of 4096 sessions
    /// (twice the default's 2048 entries, so at most 2048 hits there), all but the few
    /// whose set drew a third text open again from it, as what they opened as.
    #[test]
    fn a_sized_cache_holds_more_tokens_and_opens_them_the_same() {
        let ring = KeyRing::new([key(1)]).unwrap();
        size_open_cache(1 << 16);
        let texts: Vec<(Token, TokenString)> =
            (1..=4096).map(|p| (in_pool(p), ring.seal_as(Version::V2, &in_pool(p)))).collect();
        for (t, s) in &texts {
            assert_eq!(open_counting(&ring, s.as_str()), (Ok(*t), false));
        }
        let hits = texts.iter().filter(|(t, s)| open_counting(&ring, s.as_str()) == (Ok(*t), true)).count();
        // 32768 sets of two: about 11 sets draw three of 4096 random texts, each a miss.
        assert!(hits > 4000, "{hits} hits");
    }

    #[test]
    fn a_full_set_keeps_the_entry_used_last() {
        // Three valid texts that fall in one set: the third evicts the one not used last.
        let ring = KeyRing::new([key(1)]).unwrap();
        let first = ring.seal_as(Version::V2, &in_pool(1));
        let target = OpenCache::hash(first.as_str()) as usize & (CACHE_SETS - 1);
        let mut same_set = (2..).map(|p| (p, ring.seal_as(Version::V2, &in_pool(p))));
        let mut next =
            || same_set.find(|(_, s)| OpenCache::hash(s.as_str()) as usize & (CACHE_SETS - 1) == target).unwrap();
        let ((p2, second), (p3, third)) = (next(), next());
        assert_eq!(open_counting(&ring, first.as_str()), (Ok(in_pool(1)), false));
        assert_eq!(open_counting(&ring, second.as_str()), (Ok(in_pool(p2)), false));
        assert_eq!(open_counting(&ring, first.as_str()), (Ok(in_pool(1)), true));
        assert_eq!(open_counting(&ring, third.as_str()), (Ok(in_pool(p3)), false));
        assert_eq!(open_counting(&ring, first.as_str()), (Ok(in_pool(1)), true));
        assert_eq!(open_counting(&ring, third.as_str()), (Ok(in_pool(p3)), true));
        // `second` was evicted: it opens again by decrypting, still correctly.
        assert_eq!(open_counting(&ring, second.as_str()), (Ok(in_pool(p2)), false));
    }

    #[test]
    fn expiry() {
        let t = Token { backend: 1, pool: None, session: [0; 16], issued: 1000, last_seen: 2000 };
        // Idle: boundary is inclusive (exactly idle seconds is still fine).
        assert_eq!(t.check(2300, 300, None, 60), Ok(()));
        assert_eq!(t.check(2301, 300, None, 60), Err(Expired::Idle));
        // Absolute.
        assert_eq!(t.check(2000, 300, Some(1000), 60), Ok(()));
        assert_eq!(t.check(2001, 300, Some(1000), 60), Err(Expired::Absolute));
        // Future timestamps beyond the allowed skew.
        assert_eq!(t.check(1940, 300, None, 60), Ok(()));
        assert_eq!(t.check(1939, 300, None, 60), Err(Expired::Future));
        let future_issue = Token { issued: 3000, ..t };
        assert_eq!(future_issue.check(2900, 300, None, 60), Err(Expired::Future));
        // Saturation: now far before both does not underflow.
        assert_eq!(t.check(0, 300, Some(10), 60), Err(Expired::Future));
        let max = Token { issued: u64::MAX, last_seen: u64::MAX, ..t };
        assert_eq!(max.check(u64::MAX, 0, Some(0), 60), Ok(()));
    }
}
