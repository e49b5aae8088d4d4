//! The secrets of the dashboard: session and invite tokens, and the hash they are stored as.
//!
//! A token is 32 bytes from the operating system's random number generator, written as 64
//! lowercase hex characters (it goes into a cookie or a URL unchanged). Stores keep only its
//! SHA-256 ([`TokenHash`]); a plain hash is enough because 256 random bits leave nothing to
//! brute-force, and it lets a store look the token up.

use std::fmt;
use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_core::BackendError;

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// Length of a token's text: 64 hex characters.
pub const TOKEN_LEN: usize = 2 * TOKEN_BYTES;

/// A session or invite token as the browser holds it. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(String);

impl SecretToken {
    /// A new random token.
    pub fn generate() -> Result<Self, BackendError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::getrandom(&mut bytes).map_err(|e| {
            BackendError::other(format!("the system random number generator failed: {e}"))
        })?;
        Ok(SecretToken(hex::encode(bytes)))
    }

    /// A token presented by a client (cookie, URL): `None` unless it has the shape of one
    /// (exactly [`TOKEN_LEN`] lowercase hex characters), so junk is refused before any lookup.
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == TOKEN_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| SecretToken(text.to_owned()))
    }

    /// The token's text (for the cookie or the invite URL, nowhere else).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What stores keep.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The CSRF token of the session this token opens: derived, so nothing more is stored, and
    /// unrelated to the stored hash (another SHA-256 domain), so the database does not give
    /// it away. 64 hex characters.
    pub fn csrf_token(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"tollgate dashboard csrf\0");
        hasher.update(self.0.as_bytes());
        hex::encode(hasher.finalize())
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(<redacted>)")
    }
}

/// Compares two strings in time independent of where they differ (CSRF tokens, admin tokens).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The SHA-256 of a token: the only form in which tokens are stored. Equality is constant
/// time; `Debug` shows the first four bytes only.
#[derive(Clone, Copy)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// The SHA-256 of arbitrary bytes (e.g. a sign-in throttle key).
    pub fn of(bytes: &[u8]) -> Self {
        TokenHash(Sha256::digest(bytes).into())
    }

    /// Wraps a stored hash.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        TokenHash(bytes)
    }

    /// Wraps a stored hash given as a slice; `None` unless it is 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(TokenHash)
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl ConstantTimeEq for TokenHash {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for TokenHash {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for TokenHash {}

impl Hash for TokenHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_never_debug_printed() {
        let a = SecretToken::generate().unwrap();
        let b = SecretToken::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), TOKEN_LEN);
        assert_eq!(SecretToken::parse(a.expose()), Some(a.clone()));
        assert!(!format!("{a:?}").contains(a.expose()));
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), SecretToken::parse(a.expose()).unwrap().hash());
        assert_ne!(a.csrf_token(), hex::encode(a.hash().as_bytes()));
        assert_eq!(a.csrf_token().len(), 64);
    }

    #[test]
    fn junk_is_not_a_token() {
        let upper = "A".repeat(TOKEN_LEN);
        for junk in [
            "",
            "abc",
            &"g".repeat(TOKEN_LEN),
            &upper,
            &"a".repeat(TOKEN_LEN + 1),
        ] {
            assert_eq!(SecretToken::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }
}
