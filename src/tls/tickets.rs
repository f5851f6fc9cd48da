//! Session tickets a fleet shares: every instance with the same secret seals and opens the
//! same tickets, so a client resumes its TLS session whichever instance it reaches next.
//!
//! Nothing is exchanged between instances: the key of each period (an hour) is derived
//! from the secret and the period's number, as Tether's cookie keys are shared by
//! configuration. A ticket is sealed under the current period's key and opened under the
//! key of the period it names, if that is the current one or a neighbour (the previous
//! one, so a ticket lives an hour or two; the next one, so an instance whose clock is a
//! little behind still takes a ticket a neighbour sealed just after the hour). Tickets are
//! AES-256-GCM-SIV: `[1] [period: u64 LE] [nonce: 12] [ciphertext] [tag: 16]`, the first
//! 21 bytes authenticated with it.
//!
//! The cost: whoever holds the secret can open any ticket of the periods it covers, so it
//! is as precious as the certificates' keys (replace it to retire every ticket at once).
//! Without a configured secret each listener keeps rustls' own ticketer, whose keys are
//! random and rotate, and tickets resume only on the instance that issued them.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes::cipher::BlockCipherEncrypt;
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use chacha20poly1305::{AeadInOut, KeyInit};

/// How long one key seals tickets.
pub const PERIOD: Duration = Duration::from_secs(3600);
const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + 12;

/// Seals and opens session tickets under keys derived from a fleet's secret.
pub struct SharedTickets {
    /// Derives each period's key: AES-256 under the secret, as a pseudo-random function.
    prf: aes::Aes256,
    /// The last key derived, with its period (handshakes mostly need the current one).
    last: Mutex<Option<(u64, Aes256GcmSiv)>>,
}

impl std::fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedTickets")
    }
}

impl SharedTickets {
    pub fn new(secret: [u8; 32]) -> SharedTickets {
        SharedTickets { prf: aes::Aes256::new(&secret.into()), last: Mutex::new(None) }
    }

    /// The key of `period`: two blocks of the PRF, labelled apart from anything else the
    /// secret could be used for.
    fn key(&self, period: u64) -> Aes256GcmSiv {
        let mut blocks = [[0u8; 16]; 2];
        for (i, b) in blocks.iter_mut().enumerate() {
            b[..8].copy_from_slice(&period.to_le_bytes());
            b[8..15].copy_from_slice(b"tickets");
            b[15] = i as u8;
            let mut block = (*b).into();
            self.prf.encrypt_block(&mut block);
            *b = block.into();
        }
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&blocks[0]);
        key[16..].copy_from_slice(&blocks[1]);
        Aes256GcmSiv::new(&key.into())
    }

    fn with_key<T>(&self, period: u64, f: impl FnOnce(&Aes256GcmSiv) -> T) -> T {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((p, k)) if *p == period => f(k),
            _ if period == now_period() => {
                let k = self.key(period);
                let out = f(&k);
                *last = Some((period, k));
                out
            }
            _ => f(&self.key(period)),
        }
    }

    /// A ticket for `plain`, sealed in period `period`.
    pub fn seal_at(&self, plain: &[u8], period: u64) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(HEADER + plain.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&period.to_le_bytes());
        out.extend_from_slice(&[0; 12]);
        getrandom::fill(&mut out[9..HEADER]).ok()?;
        out.extend_from_slice(plain);
        let (header, body) = out.split_at_mut(HEADER);
        let nonce = Nonce::try_from(&header[9..]).ok()?;
        let tag = self.with_key(period, |k| k.encrypt_inout_detached(&nonce, header, body.into()).ok())?;
        out.extend_from_slice(&tag);
        Some(out)
    }

    /// What `ticket` holds, if it was sealed with this secret in a period next to `now`.
    pub fn open_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER + 16 || ticket[0] != VERSION {
            return None;
        }
        let period = u64::from_le_bytes(ticket[1..9].try_into().ok()?);
        if period.abs_diff(now) > 1 {
            return None;
        }
        let (header, rest) = ticket.split_at(HEADER);
        let (body, tag) = rest.split_at(rest.len() - 16);
        let nonce = Nonce::try_from(&header[9..]).ok()?;
        let tag = Tag::try_from(tag).ok()?;
        let mut plain = body.to_vec();
        self.with_key(period, |k| k.decrypt_inout_detached(&nonce, header, (&mut plain[..]).into(), &tag).ok())?;
        Some(plain)
    }
}

/// The current period's number.
fn now_period() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / PERIOD.as_secs())
}

impl rustls::server::ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    /// What clients are told: a ticket is good for the rest of its period and the next.
    fn lifetime(&self) -> u32 {
        PERIOD.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, now_period())
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.open_at(ticket, now_period())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_open_with_the_same_secret_in_neighbouring_periods_only() {
        let a = SharedTickets::new([7; 32]);
        let b = SharedTickets::new([7; 32]);
        let other = SharedTickets::new([8; 32]);
        let t = a.seal_at(b"session state", 1000).unwrap();
        assert_eq!(b.open_at(&t, 1000).as_deref(), Some(&b"session state"[..]), "another instance, same secret");
        assert_eq!(b.open_at(&t, 1001).as_deref(), Some(&b"session state"[..]), "the next period");
        assert_eq!(b.open_at(&t, 999).as_deref(), Some(&b"session state"[..]), "a clock a little behind");
        assert_eq!(b.open_at(&t, 1002), None, "too old");
        assert_eq!(other.open_at(&t, 1000), None, "another secret");
        // Tampered anywhere: the period, the nonce, the body; cut short; another version.
        for i in [1, 10, HEADER + 1, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(b.open_at(&bad, 1000), None, "byte {i}");
        }
        assert_eq!(b.open_at(&t[..HEADER - 1], 1000), None);
        let mut v2 = t.clone();
        v2[0] = 2;
        assert_eq!(b.open_at(&v2, 1000), None);
        // Two tickets of the same state differ (a fresh nonce each).
        assert_ne!(a.seal_at(b"session state", 1000), a.seal_at(b"session state", 1000));
    }
}
