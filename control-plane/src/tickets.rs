//! TLS 1.3 session tickets that survive a restart of the control plane.
//!
//! After a restart every agent reconnects at once, and a full handshake
//! (key exchange, the server's signature, the client's certificate chain and
//! its signature checked) is most of what a reconnect costs. A resumed
//! handshake skips the signatures and the chain. For agents to resume
//! against a restarted process, the keys that seal tickets must outlive it:
//! they are kept in the data directory (`tls-tickets.json`, mode 0600, next
//! to the CA key), written atomically.
//!
//! - **Rotation.** A key seals new tickets for one period
//!   (`tls_ticket_rotation`, 12 h by default) and opens them for one more, so
//!   a ticket is usable for at most a period (its advertised lifetime) and no
//!   key lives longer than two. At most two keys exist; an older one is
//!   erased from the file when a new one is made.
//! - **Bound to the trusted roots.** The sealing key is derived (HKDF-SHA256)
//!   from the stored secret salted with the SHA-256 of the client roots the
//!   listener trusts, so a CA rotation (the roots change) makes every ticket
//!   issued under the old trust unusable: those clients handshake in full.
//! - **What resumption skips is checked elsewhere.** A resumed session
//!   carries the client certificate chain it was first verified with and no
//!   new verification. Expiry is checked when the connection is accepted
//!   (`tls_accept`); revocation and replacement (a removed node, a revoked
//!   user, a renewed certificate) are checked on every call, as for any
//!   connection (`auth`, `Registry::verify_current`).
//!
//! A ticket is `[format 1][key id: 8][nonce: 12][AES-256-GCM of the session
//! state][tag: 16]`, the first nine bytes authenticated as associated data.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use hotswap_common::fsutil::{PRIVATE_FILE_MODE, write_atomic};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const FORMAT: u8 = 1;
const ID_LEN: usize = 8;
const HEADER_LEN: usize = 1 + ID_LEN;
const TAG_LEN: usize = 16;
const INFO: &[u8] = b"hotswap tls13 session ticket v1";

/// The longest rotation period: a TLS 1.3 ticket may not be advertised for
/// longer than seven days (RFC 8446 §4.6.1).
pub const MAX_PERIOD: Duration = Duration::from_secs(7 * 86_400);
/// The shortest: rotating faster only turns resumptions into full handshakes.
pub const MIN_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("the system random generator failed")]
    Random,
    #[error("cannot write the TLS ticket keys to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One key as the file holds it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct StoredKey {
    id: String,
    created_ms: u64,
    secret: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredKeys {
    format: u32,
    /// Newest first, at most two.
    keys: Vec<StoredKey>,
}

struct Key {
    id: [u8; ID_LEN],
    created_ms: u64,
    secret: [u8; 32],
    aead: LessSafeKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &hex::encode(self.id))
            .field("created_ms", &self.created_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// What a key may still do at a time, given the rotation period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAge {
    /// Seals new tickets and opens old ones.
    Sealing,
    /// Only opens tickets it sealed during its sealing period.
    Opening,
    /// Past both: erased.
    Expired,
}

/// The age class of a key created at `created_ms`, at `now_ms`. A key dated
/// after `now_ms` (the clock stepped back) counts as new.
pub fn key_age(created_ms: u64, now_ms: u64, period: Duration) -> KeyAge {
    let period_ms = period.as_millis().min(u128::from(u64::MAX)) as u64;
    let age = now_ms.saturating_sub(created_ms);
    if age < period_ms {
        KeyAge::Sealing
    } else if age < period_ms.saturating_mul(2) {
        KeyAge::Opening
    } else {
        KeyAge::Expired
    }
}

/// The ticket sealer of one listener: see the module documentation.
#[derive(Debug)]
pub struct TicketKeys {
    path: PathBuf,
    period: Duration,
    binding: [u8; 32],
    keys: RwLock<Keys>,
    rng: SystemRandom,
}

impl TicketKeys {
    /// Load the keys in `path` (made when missing, replaced with a warning
    /// when unreadable: they only spare full handshakes) for a listener
    /// trusting `client_roots_pem`, rotating every `period`.
    pub fn open(
        path: &Path,
        period: Duration,
        client_roots_pem: &str,
        now_ms: u64,
    ) -> Result<Self, TicketError> {
        let rng = SystemRandom::new();
        let binding: [u8; 32] = Sha256::digest(client_roots_pem.as_bytes()).into();
        let stored = match std::fs::read(path) {
            Ok(bytes) => match parse_stored(&bytes) {
                Ok(keys) => keys,
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "TLS ticket keys unreadable; replacing them (agents handshake in full once)");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the TLS ticket keys; replacing them (agents handshake in full once)");
                Vec::new()
            }
        };
        let mut usable = stored
            .into_iter()
            .filter(|k| key_age(k.created_ms, now_ms, period) != KeyAge::Expired)
            .map(|k| key_from_stored(&k, &binding))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        usable.sort_by_key(|k| std::cmp::Reverse(k.created_ms));
        usable.truncate(2);
        let mut drained = usable.into_iter();
        let keys = match drained.next() {
            Some(current) if key_age(current.created_ms, now_ms, period) == KeyAge::Sealing => {
                Keys {
                    current,
                    previous: drained.next(),
                }
            }
            // The newest only opens now: a new one seals.
            newest => Keys {
                current: new_key(&rng, &binding, now_ms)?,
                previous: newest,
            },
        };
        let this = TicketKeys {
            path: path.to_path_buf(),
            period,
            binding,
            keys: RwLock::new(keys),
            rng,
        };
        this.persist(&this.keys.read().unwrap_or_else(|e| e.into_inner()))?;
        Ok(this)
    }

    fn persist(&self, keys: &Keys) -> Result<(), TicketError> {
        let stored = StoredKeys {
            format: 1,
            keys: std::iter::once(&keys.current)
                .chain(keys.previous.as_ref())
                .map(|k| StoredKey {
                    id: hex::encode(k.id),
                    created_ms: k.created_ms,
                    secret: hex::encode(k.secret),
                })
                .collect(),
        };
        let mut text = serde_json::to_vec_pretty(&stored).unwrap_or_default();
        text.push(b'\n');
        write_atomic(&self.path, &text, PRIVATE_FILE_MODE).map_err(|source| TicketError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Make a new sealing key if the current one is past its period, and
    /// erase any key past opening. Called before sealing.
    fn rotate_if_due(&self, now_ms: u64) {
        {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if key_age(keys.current.created_ms, now_ms, self.period) == KeyAge::Sealing {
                return;
            }
        }
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if key_age(keys.current.created_ms, now_ms, self.period) == KeyAge::Sealing {
            return; // another connection rotated first
        }
        let Ok(fresh) = new_key(&self.rng, &self.binding, now_ms) else {
            tracing::warn!("cannot make a new TLS ticket key: the random generator failed");
            return;
        };
        let old = std::mem::replace(&mut keys.current, fresh);
        keys.previous =
            (key_age(old.created_ms, now_ms, self.period) == KeyAge::Opening).then_some(old);
        match self.persist(&keys) {
            Ok(()) => tracing::info!(
                id = %hex::encode(keys.current.id),
                "rotated the TLS ticket key"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "rotated the TLS ticket key in memory only: tickets sealed from now on will not survive a restart")
            }
        }
    }

    fn seal(&self, plain: &[u8], now_ms: u64) -> Option<Vec<u8>> {
        self.rotate_if_due(now_ms);
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = &keys.current;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        ticket.push(FORMAT);
        ticket.extend_from_slice(&key.id);
        ticket.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&ticket[..HEADER_LEN]),
                &mut body,
            )
            .ok()?;
        ticket.extend_from_slice(&body);
        Some(ticket)
    }

    fn open_ticket(&self, ticket: &[u8], now_ms: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || ticket[0] != FORMAT {
            return None;
        }
        let (header, rest) = ticket.split_at(HEADER_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .find(|k| k.id[..] == header[1..])?;
        if key_age(key.created_ms, now_ms, self.period) == KeyAge::Expired {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(header), &mut body)
            .ok()?;
        let len = plain.len();
        body.truncate(len);
        Some(body)
    }

    /// The ids of the keys held, newest first (for tests and diagnostics).
    pub fn key_ids(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .map(|k| hex::encode(k.id))
            .collect()
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.period.as_secs().min(MAX_PERIOD.as_secs()) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, hotswap_common::timefmt::now_ms())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_ticket(cipher, hotswap_common::timefmt::now_ms())
    }
}

fn parse_stored(bytes: &[u8]) -> Result<Vec<StoredKey>, String> {
    let stored: StoredKeys = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if stored.format != 1 {
        return Err(format!("unknown format {}", stored.format));
    }
    Ok(stored.keys)
}

fn key_from_stored(stored: &StoredKey, binding: &[u8; 32]) -> Option<Key> {
    let id: [u8; ID_LEN] = hex::decode(&stored.id).ok()?.try_into().ok()?;
    let secret: [u8; 32] = hex::decode(&stored.secret).ok()?.try_into().ok()?;
    Some(Key {
        id,
        created_ms: stored.created_ms,
        aead: sealing_key(&secret, binding),
        secret,
    })
}

fn new_key(rng: &SystemRandom, binding: &[u8; 32], now_ms: u64) -> Result<Key, TicketError> {
    let mut id = [0u8; ID_LEN];
    let mut secret = [0u8; 32];
    rng.fill(&mut id).map_err(|_| TicketError::Random)?;
    rng.fill(&mut secret).map_err(|_| TicketError::Random)?;
    Ok(Key {
        id,
        created_ms: now_ms,
        aead: sealing_key(&secret, binding),
        secret,
    })
}

/// The AES-256-GCM key for `secret` under the trust `binding`.
fn sealing_key(secret: &[u8; 32], binding: &[u8; 32]) -> LessSafeKey {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, binding).extract(secret);
    let mut bytes = [0u8; 32];
    // Both only fail for lengths other than the ones fixed here.
    let okm = prk
        .expand(&[INFO], Len)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    okm.fill(&mut bytes)
        .expect("the buffer is the requested length");
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("AES-256 takes a 32-byte key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const H_MS: u64 = 3_600_000;
    const T0: u64 = 1_800_000_000_000;

    fn open(dir: &Path, roots: &str, now: u64) -> TicketKeys {
        TicketKeys::open(&dir.join("tls-tickets.json"), HOUR, roots, now).expect("open")
    }

    #[test]
    fn a_ticket_opens_after_a_restart_and_not_under_other_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = open(dir.path(), "roots A", T0);
        let ticket = first.seal(b"session state", T0).expect("seal");
        assert_eq!(
            first.open_ticket(&ticket, T0 + 1).as_deref(),
            Some(&b"session state"[..])
        );
        drop(first);
        let restarted = open(dir.path(), "roots A", T0 + 60_000);
        assert_eq!(
            restarted.open_ticket(&ticket, T0 + 60_000).as_deref(),
            Some(&b"session state"[..]),
            "the key survived the restart"
        );
        let other_trust = open(dir.path(), "roots B", T0 + 60_000);
        assert_eq!(
            other_trust.open_ticket(&ticket, T0 + 60_000),
            None,
            "a ticket sealed under other client roots does not open"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("tls-tickets.json"))
                .expect("file")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn keys_rotate_each_period_and_open_for_one_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = open(dir.path(), "r", T0);
        let early = keys.seal(b"early", T0).expect("seal");
        let first_id = keys.key_ids()[0].clone();
        // Past one period: sealing makes a new key, the old one still opens.
        let late = keys.seal(b"late", T0 + H_MS + 1).expect("seal");
        let ids = keys.key_ids();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], first_id);
        assert_eq!(ids[1], first_id);
        assert!(keys.open_ticket(&early, T0 + H_MS + 2).is_some());
        // Past two periods of the first key: its tickets no longer open.
        assert_eq!(keys.open_ticket(&early, T0 + 2 * H_MS), None);
        assert!(keys.open_ticket(&late, T0 + 2 * H_MS).is_some());
        // The file holds the same two keys, newest first.
        let reopened = open(dir.path(), "r", T0 + H_MS + 3);
        assert_eq!(reopened.key_ids(), ids);
        // A restart long after: everything is erased, a fresh key seals.
        let much_later = open(dir.path(), "r", T0 + 10 * H_MS);
        assert_eq!(much_later.key_ids().len(), 1);
        assert!(!ids.contains(&much_later.key_ids()[0]));
        assert_eq!(much_later.open_ticket(&late, T0 + 10 * H_MS), None);
    }

    #[test]
    fn a_damaged_file_is_replaced_and_damaged_tickets_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tls-tickets.json");
        std::fs::write(&path, b"{not json").expect("write");
        let keys = open(dir.path(), "r", T0);
        assert_eq!(keys.key_ids().len(), 1);
        assert!(parse_stored(&std::fs::read(&path).expect("read")).is_ok());
        let ticket = keys.seal(b"state", T0).expect("seal");
        for cut in 0..ticket.len() {
            assert_eq!(keys.open_ticket(&ticket[..cut], T0), None, "cut at {cut}");
        }
        for i in 0..ticket.len() {
            let mut flipped = ticket.clone();
            flipped[i] ^= 0x01;
            assert_eq!(keys.open_ticket(&flipped, T0), None, "bit flipped at {i}");
        }
    }

    proptest! {
        #[test]
        fn key_age_is_monotonic_in_time(created in 0u64..1 << 50, a in 0u64..1 << 50, b in 0u64..1 << 50, period_s in 60u64..700_000) {
            let period = Duration::from_secs(period_s);
            let (early, late) = if a <= b { (a, b) } else { (b, a) };
            let rank = |age| match age { KeyAge::Sealing => 0, KeyAge::Opening => 1, KeyAge::Expired => 2 };
            prop_assert!(rank(key_age(created, early, period)) <= rank(key_age(created, late, period)));
            let age = late.saturating_sub(created);
            prop_assert_eq!(key_age(created, late, period) == KeyAge::Sealing, age < period_s * 1000);
        }

        #[test]
        fn arbitrary_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let keys = open(dir.path(), "r", T0);
            prop_assert_eq!(keys.open_ticket(&bytes, T0), None);
        }
    }
}
