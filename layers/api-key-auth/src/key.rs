//! API key secrets: their format, how they are generated, and the hash they are stored as.
//!
//! A key is `sk_live_` followed by 64 lowercase hex characters encoding 32 bytes from the
//! operating system's random number generator (72 characters in all). Hex was chosen over
//! base64url so a key survives any copy/paste, shell or URL context unchanged and can be
//! checked with a trivial byte scan.
//!
//! A store keeps only the SHA-256 of the whole key ([`KeyHash`]) and a short display prefix
//! ([`display_prefix`], e.g. `sk_live_ab12`); the secret itself is shown once, when it is
//! created. A plain (unsalted) hash is enough because the secret carries 256 bits of entropy:
//! there is nothing to brute-force, and an unsalted hash is what lets a store look keys up by
//! hash.

use std::fmt;
use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_core::BackendError;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "sk_live_";

/// Random bytes in a key.
pub const KEY_SECRET_BYTES: usize = 32;

/// Length of a well-formed key: the prefix plus 64 hex characters.
pub const KEY_LEN: usize = KEY_PREFIX.len() + 2 * KEY_SECRET_BYTES;

/// Characters of a key kept for display (`sk_live_` plus the first four hex characters).
pub const DISPLAY_PREFIX_LEN: usize = 12;

/// The SHA-256 of an API key: the only form in which a key is stored.
///
/// Equality is constant time ([`ConstantTimeEq`]), so comparing a presented key's hash with a
/// stored one reveals nothing through timing. `Debug` shows only the first four bytes.
#[derive(Clone, Copy)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// The hash of a key.
    pub fn of(secret: &str) -> Self {
        Self::of_bytes(secret.as_bytes())
    }

    /// The hash of a key given as bytes (a header value).
    pub fn of_bytes(secret: &[u8]) -> Self {
        KeyHash(Sha256::digest(secret).into())
    }

    /// Wraps a stored hash.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyHash(bytes)
    }

    /// The 32 bytes of the hash.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The hash as 64 lowercase hex characters (for a text column).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters back into a hash.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(KeyHash(bytes))
    }
}

impl ConstantTimeEq for KeyHash {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for KeyHash {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for KeyHash {}

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", hex::encode(&self.0[..4]))
    }
}

/// Whether `key` has the shape of a tollgate key: exactly [`KEY_LEN`] bytes, [`KEY_PREFIX`],
/// then lowercase hex. Runs in time bounded by [`KEY_LEN`] whatever the input, so oversized
/// or binary header values are refused before anything is hashed.
pub fn is_well_formed(key: &[u8]) -> bool {
    key.len() == KEY_LEN
        && key.starts_with(KEY_PREFIX.as_bytes())
        && key[KEY_PREFIX.len()..]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The part of a key kept for display: its first [`DISPLAY_PREFIX_LEN`] characters.
pub fn display_prefix(secret: &str) -> String {
    // Keys are ASCII; the char walk only keeps odd input from splitting a character.
    secret
        .char_indices()
        .take_while(|(i, c)| i + c.len_utf8() <= DISPLAY_PREFIX_LEN)
        .map(|(_, c)| c)
        .collect()
}

/// A freshly generated key: the secret (to show once), its hash and its display prefix.
/// `Debug` never shows the secret.
#[derive(Clone)]
pub struct GeneratedKey {
    /// The full key, `sk_live_<64 hex>`.
    pub secret: String,
    /// Its SHA-256, the form a store keeps.
    pub hash: KeyHash,
    /// Its display prefix.
    pub prefix: String,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("secret", &"<redacted>")
            .field("hash", &self.hash)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Generates a new key from the operating system's random number generator.
///
/// Fails (as a [`BackendError`], so a store can pass it on) only when the OS has no
/// randomness to give.
pub fn generate_key() -> Result<GeneratedKey, BackendError> {
    let mut bytes = [0u8; KEY_SECRET_BYTES];
    getrandom::getrandom(&mut bytes).map_err(|e| {
        BackendError::other(format!("the system random number generator failed: {e}"))
    })?;
    let mut secret = String::with_capacity(KEY_LEN);
    secret.push_str(KEY_PREFIX);
    secret.push_str(&hex::encode(bytes));
    Ok(GeneratedKey {
        hash: KeyHash::of(&secret),
        prefix: display_prefix(&secret),
        secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_eq!(a.secret.len(), KEY_LEN);
        assert!(is_well_formed(a.secret.as_bytes()));
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.hash, b.hash);
        assert_eq!(a.hash, KeyHash::of(&a.secret));
        assert_eq!(a.prefix, &a.secret[..12]);
        assert!(a.prefix.starts_with("sk_live_"));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = format!("sk_live_{}", "ab".repeat(32));
        assert!(is_well_formed(good.as_bytes()));
        for bad in [
            String::new(),
            "sk_live_".to_owned(),
            format!("sk_test_{}", "ab".repeat(32)),
            format!("sk_live_{}", "AB".repeat(32)),
            format!("sk_live_{}", "ab".repeat(31)),
            format!("sk_live_{}x", "ab".repeat(32)),
            format!("sk_live_{}", "zz".repeat(32)),
            format!(" sk_live_{}", "ab".repeat(32)),
            "k".repeat(10 * 1024),
        ] {
            assert!(!is_well_formed(bad.as_bytes()), "{bad:?}");
        }
        assert!(!is_well_formed(&[0xff; KEY_LEN]));
    }

    #[test]
    fn hash_is_sha256_and_round_trips_through_hex() {
        // SHA-256("abc") from FIPS 180-2.
        let h = KeyHash::of("abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("nope"), None);
        assert_eq!(format!("{h:?}"), "KeyHash(ba7816bf…)");
    }

    #[test]
    fn display_prefix_never_panics() {
        assert_eq!(display_prefix("short"), "short");
        assert_eq!(display_prefix("ééééééééééééé"), "éééééé");
        assert_eq!(display_prefix("aéééééééééé"), "aééééé");
    }
}
