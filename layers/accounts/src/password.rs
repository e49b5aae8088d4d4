//! Password hashing with Argon2id.
//!
//! [`Passwords`] hashes and verifies on tokio's blocking pool (a hash takes tens of
//! milliseconds of CPU by design) and admits only a few at a time, so a burst of sign-ins
//! neither stalls the runtime nor allocates Argon2's memory without bound. Hashes are PHC
//! strings (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), so each records its own cost and stays
//! verifiable after the parameters change.

use std::fmt;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;
use tollgate_core::BackendError;

/// The shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// The longest password accepted, in bytes: beyond this nobody types it, and hashing it
/// would only cost time.
pub const MAX_PASSWORD_BYTES: usize = 1_024;

/// Why a new password was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeakPassword {
    /// Fewer than [`MIN_PASSWORD_CHARS`] characters.
    TooShort,
    /// More than [`MAX_PASSWORD_BYTES`] bytes.
    TooLong,
}

impl fmt::Display for WeakPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeakPassword::TooShort => {
                write!(
                    f,
                    "The password must be at least {MIN_PASSWORD_CHARS} characters long."
                )
            }
            WeakPassword::TooLong => {
                write!(
                    f,
                    "The password must be at most {MAX_PASSWORD_BYTES} bytes long."
                )
            }
        }
    }
}

impl std::error::Error for WeakPassword {}

/// Checks a new password's length.
///
/// ```
/// use tollgate_accounts::{check_new_password, WeakPassword};
///
/// assert_eq!(check_new_password("short"), Err(WeakPassword::TooShort));
/// assert!(check_new_password("correct horse battery").is_ok());
/// ```
pub fn check_new_password(password: &str) -> Result<(), WeakPassword> {
    if password.len() > MAX_PASSWORD_BYTES {
        Err(WeakPassword::TooLong)
    } else if password.chars().count() < MIN_PASSWORD_CHARS {
        Err(WeakPassword::TooShort)
    } else {
        Ok(())
    }
}

/// Hashes and verifies passwords with Argon2id. Cheap to clone (shared).
///
/// [`Passwords::new`] uses the recommended cost (19 MiB of memory, 2 passes, 1 lane).
/// [`Passwords::with_cost`] sets another one explicitly, e.g. a cheap cost in tests; there is
/// no other way to lower it.
#[derive(Clone)]
pub struct Passwords {
    inner: Arc<Inner>,
}

struct Inner {
    params: Params,
    permits: Semaphore,
    /// A hash of a random password with the same cost, verified when there is no real hash
    /// to check (unknown email), so that answer takes as long as a wrong password.
    dummy: OnceLock<String>,
}

impl fmt::Debug for Passwords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passwords")
            .field("m_cost_kib", &self.inner.params.m_cost())
            .field("t_cost", &self.inner.params.t_cost())
            .field("p_cost", &self.inner.params.p_cost())
            .finish()
    }
}

impl Default for Passwords {
    fn default() -> Self {
        Self::new()
    }
}

/// Memory of the default cost, in KiB (OWASP's recommendation for Argon2id).
pub const DEFAULT_M_COST_KIB: u32 = 19 * 1024;
/// Passes of the default cost.
pub const DEFAULT_T_COST: u32 = 2;

impl Passwords {
    /// Argon2id with the default cost: [`DEFAULT_M_COST_KIB`], [`DEFAULT_T_COST`], 1 lane.
    pub fn new() -> Self {
        Self::with_cost(DEFAULT_M_COST_KIB, DEFAULT_T_COST).unwrap_or_else(|_| {
            // The defaults are valid parameters; this branch exists only to avoid a panic path.
            Self::from_params(Params::default())
        })
    }

    /// Argon2id with `m_cost_kib` KiB of memory and `t_cost` passes (1 lane). Argon2 needs at
    /// least 8 KiB and 1 pass.
    pub fn with_cost(m_cost_kib: u32, t_cost: u32) -> Result<Self, BackendError> {
        let params = Params::new(m_cost_kib, t_cost, 1, None)
            .map_err(|e| BackendError::other(format!("invalid Argon2 parameters: {e}")))?;
        Ok(Self::from_params(params))
    }

    fn from_params(params: Params) -> Self {
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        Passwords {
            inner: Arc::new(Inner {
                params,
                permits: Semaphore::new(parallel.clamp(1, 8)),
                dummy: OnceLock::new(),
            }),
        }
    }

    fn argon2(params: Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    /// The PHC string of `password` with a fresh random salt.
    pub async fn hash(&self, password: &str) -> Result<String, BackendError> {
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt)
            .map_err(|e| BackendError::other(format!("the random number generator failed: {e}")))?;
        let params = self.inner.params.clone();
        let password = password.to_owned();
        self.blocking(move || {
            let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
            Self::argon2(params)
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| e.to_string())
        })
        .await?
        .map_err(|e| BackendError::other(format!("hashing the password failed: {e}")))
    }

    /// Whether `password` matches the PHC string `hash`. With `None` (no such user, or no
    /// password set yet) a dummy hash of the same cost is verified and the answer is `false`,
    /// so both cases take the same time as a wrong password.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, BackendError> {
        let (hash, real) = match hash {
            Some(h) => (h.to_owned(), true),
            None => (self.dummy_hash().await?, false),
        };
        let password = password.to_owned();
        let matches = self
            .blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|parsed| {
                    // The hash's own parameters apply, whatever this instance's cost is.
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
            })
            .await?;
        Ok(real && matches)
    }

    async fn dummy_hash(&self) -> Result<String, BackendError> {
        if let Some(h) = self.inner.dummy.get() {
            return Ok(h.clone());
        }
        let mut random = [0u8; 24];
        getrandom::getrandom(&mut random)
            .map_err(|e| BackendError::other(format!("the random number generator failed: {e}")))?;
        let h = self.hash(&hex::encode(random)).await?;
        Ok(self.inner.dummy.get_or_init(|| h).clone())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BackendError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| BackendError::other("the password hasher is closed"))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| BackendError::other(format!("password hashing task failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_salted_and_verify() {
        let p = Passwords::with_cost(64, 1).unwrap();
        let a = p.hash("correct horse battery").await.unwrap();
        let b = p.hash("correct horse battery").await.unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(!a.contains("correct horse"));
        assert!(p.verify("correct horse battery", Some(&a)).await.unwrap());
        assert!(!p.verify("correct horse batterY", Some(&a)).await.unwrap());
        assert!(!p.verify("correct horse battery", None).await.unwrap());
        assert!(!p.verify("x", Some("not a phc string")).await.unwrap());
        // A hash keeps verifying under another cost: its own parameters apply.
        let other = Passwords::with_cost(128, 2).unwrap();
        assert!(other
            .verify("correct horse battery", Some(&a))
            .await
            .unwrap());
    }

    #[test]
    fn the_default_cost_is_the_recommended_one() {
        let text = format!("{:?}", Passwords::new());
        assert!(
            text.contains("m_cost_kib: 19456") && text.contains("t_cost: 2"),
            "{text}"
        );
        assert!(
            Passwords::with_cost(1, 1).is_err(),
            "Argon2 needs 8 KiB at least"
        );
    }

    #[test]
    fn length_rules() {
        assert_eq!(
            check_new_password("elevenchars"),
            Err(WeakPassword::TooShort)
        );
        assert!(check_new_password("twelve chars").is_ok());
        // Characters, not bytes: 12 accented letters pass, 11 do not.
        assert!(check_new_password(&"é".repeat(12)).is_ok());
        assert_eq!(
            check_new_password(&"é".repeat(11)),
            Err(WeakPassword::TooShort)
        );
        assert_eq!(
            check_new_password(&"a".repeat(1_025)),
            Err(WeakPassword::TooLong)
        );
    }
}
