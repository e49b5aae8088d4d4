//! Sandbox accounts and their session material.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The session material of one sandbox account: what a model's `session` holds in the
/// gateway (docs/contract.md §5 `{cookie, user_id, x_bc, user_agent}`), plus the username.
///
/// `Debug` leaves the cookie and the device token out: they are secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxAccount {
    /// The numeric account id (`auth_id`), sent as `user-id`.
    pub user_id: String,
    /// The account's username (`u<user_id>`, as new OnlyFans accounts get).
    pub username: String,
    /// `sess=…; auth_id=…`.
    pub cookie: String,
    /// The device token the session was created with (`x-bc`).
    pub x_bc: String,
    /// The browser the session was created with (`user-agent`).
    pub user_agent: String,
}

impl SandboxAccount {
    /// The `session` object the admin API takes to connect a model: `{cookie, user_id, x_bc,
    /// user_agent}`.
    pub fn session_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cookie": self.cookie,
            "user_id": self.user_id,
            "x_bc": self.x_bc,
            "user_agent": self.user_agent,
        })
    }
}

impl fmt::Debug for SandboxAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxAccount")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("cookie", &"<redacted>")
            .field("x_bc", &"<redacted>")
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

/// An account as the sandbox keeps it.
pub(crate) struct AccountRecord {
    pub(crate) account: SandboxAccount,
    /// The `sess` cookie value currently accepted.
    pub(crate) sess: String,
    /// When the current session was created (ms since the epoch).
    pub(crate) created_ms: u64,
    /// Ended by [`Sandbox::expire_session`](super::Sandbox::expire_session).
    pub(crate) expired: bool,
}

const BROWSERS: [&str; 4] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36 Edg/{v}.0.0.0",
];

/// 128 random bits (two v4 UUIDs with their fixed version and variant bits folded away).
fn random_u128() -> u128 {
    let a = uuid::Uuid::new_v4().as_u128();
    let b = uuid::Uuid::new_v4().as_u128();
    a ^ b.rotate_left(17)
}

/// `len` lowercase base-36 characters of fresh randomness.
fn random_base36(len: usize) -> String {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(len);
    let mut bits = random_u128();
    let mut left = 24; // 36^24 < 2^125: draw at most 24 characters per 128 bits
    for _ in 0..len {
        if left == 0 {
            bits = random_u128();
            left = 24;
        }
        out.push(char::from(ALPHABET[(bits % 36) as usize]));
        bits /= 36;
        left -= 1;
    }
    out
}

fn random_hex(len: usize) -> String {
    let mut out = String::with_capacity(len + 32);
    while out.len() < len {
        out.push_str(&format!("{:032x}", random_u128()));
    }
    out.truncate(len);
    out
}

impl AccountRecord {
    /// A new account with random session material, created at `now_ms`.
    pub(crate) fn generate(now_ms: u64) -> Self {
        let bits = random_u128();
        // A nine-digit auth id, as OnlyFans gives recent accounts.
        let user_id = (100_000_000 + (bits % 900_000_000) as u64).to_string();
        let browser = BROWSERS[((bits >> 64) % BROWSERS.len() as u128) as usize];
        let chrome = 118 + ((bits >> 72) % 14) as u32;
        let user_agent = browser.replace("{v}", &chrome.to_string());
        let sess = random_base36(26);
        AccountRecord {
            account: SandboxAccount {
                username: format!("u{user_id}"),
                cookie: cookie(&sess, &user_id),
                x_bc: random_hex(40),
                user_agent,
                user_id,
            },
            sess,
            created_ms: now_ms,
            expired: false,
        }
    }

    /// A new `sess` for the same account, device and browser.
    pub(crate) fn renew(&mut self, now_ms: u64) {
        self.sess = random_base36(26);
        self.account.cookie = cookie(&self.sess, &self.account.user_id);
        self.created_ms = now_ms;
        self.expired = false;
    }

    /// Whether the session is neither ended nor past its lifetime.
    pub(crate) fn is_live(&self, now_ms: u64, ttl_ms: u64) -> bool {
        !self.expired && now_ms.saturating_sub(self.created_ms) < ttl_ms
    }
}

fn cookie(sess: &str, user_id: &str) -> String {
    format!("sess={sess}; auth_id={user_id}")
}

/// The `sess` and `auth_id` values of a `cookie` header (`name=value` pairs separated by
/// `;`, in any order, among other cookies).
pub(crate) fn parse_session_cookie(header: &str) -> (Option<&str>, Option<&str>) {
    let mut sess = None;
    let mut auth_id = None;
    for pair in header.split(';') {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        match name.trim() {
            "sess" => sess = Some(value.trim()),
            "auth_id" => auth_id = Some(value.trim()),
            _ => {}
        }
    }
    (sess, auth_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_has_the_upstream_shapes() {
        let a = AccountRecord::generate(0);
        assert_eq!(a.account.user_id.len(), 9);
        assert!(a.account.user_id.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(a.account.username, format!("u{}", a.account.user_id));
        assert_eq!(a.account.x_bc.len(), 40);
        assert!(a.account.x_bc.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a.sess.len(), 26);
        assert_eq!(
            parse_session_cookie(&a.account.cookie),
            (Some(a.sess.as_str()), Some(a.account.user_id.as_str()))
        );
        assert!(a.account.user_agent.starts_with("Mozilla/5.0 ("));
        assert!(!a.account.user_agent.contains("{v}"));
        let b = AccountRecord::generate(0);
        assert_ne!(a.sess, b.sess);
        assert_ne!(a.account.x_bc, b.account.x_bc);
    }

    #[test]
    fn cookie_parsing_tolerates_order_spacing_and_other_cookies() {
        assert_eq!(
            parse_session_cookie("fp=abc; auth_id=42 ;lang=en;sess=xyz"),
            (Some("xyz"), Some("42"))
        );
        assert_eq!(parse_session_cookie("garbage"), (None, None));
    }

    #[test]
    fn renewal_changes_only_the_sess_and_revives() {
        let mut a = AccountRecord::generate(0);
        a.expired = true;
        let before = a.account.clone();
        a.renew(5);
        assert!(a.is_live(5, 10));
        assert!(!a.is_live(15, 10));
        assert_ne!(a.account.cookie, before.cookie);
        assert_eq!(a.account.x_bc, before.x_bc);
        assert_eq!(a.account.user_agent, before.user_agent);
    }

    #[test]
    fn debug_redacts_secrets() {
        let a = AccountRecord::generate(0);
        let shown = format!("{:?}", a.account);
        assert!(!shown.contains(&a.sess));
        assert!(!shown.contains(&a.account.x_bc));
    }
}
