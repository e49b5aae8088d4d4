//! Users of the dashboard: ids, roles, and how emails are normalized.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tollgate_core::OrgId;
use uuid::Uuid;

/// A user's id: a UUID, hyphenated lowercase in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(Uuid);

impl UserId {
    /// A new random id.
    pub fn new() -> Self {
        UserId(Uuid::new_v4())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        UserId(uuid)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for UserId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0.hyphenated())
    }
}

/// The text was not a user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdParseError;

impl fmt::Display for UserIdParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a valid user id (expected a UUID)")
    }
}

impl std::error::Error for UserIdParseError {}

impl FromStr for UserId {
    type Err = UserIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the canonical hyphenated form, like every other id of the API.
        if s.len() != 36 {
            return Err(UserIdParseError);
        }
        Uuid::try_parse(s).map(UserId).map_err(|_| UserIdParseError)
    }
}

/// What a user may do in their organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: keys, models, billing, team.
    Owner,
    /// Sees everything, changes nothing.
    Viewer,
}

impl Role {
    /// `owner` or `viewer`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Viewer => "viewer",
        }
    }

    /// Whether the role may change the organization's settings.
    pub const fn can_change(self) -> bool {
        matches!(self, Role::Owner)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was neither `owner` nor `viewer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleParseError(pub String);

impl fmt::Display for RoleParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown role {:?} (expected owner or viewer)", self.0)
    }
}

impl std::error::Error for RoleParseError {}

impl FromStr for Role {
    type Err = RoleParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(Role::Owner),
            "viewer" => Ok(Role::Viewer),
            other => Err(RoleParseError(other.to_owned())),
        }
    }
}

/// A user as the admin API and the dashboard show it. Never the password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user's id.
    pub id: UserId,
    /// The organization the user belongs to.
    pub org: OrgId,
    /// The normalized email (see [`normalize_email`]); unique across the installation.
    pub email: String,
    /// What the user may do.
    pub role: Role,
    /// When the user was invited (ms since the epoch).
    pub created_at_ms: u64,
    /// Whether the user has set a password (accepted the invite).
    pub active: bool,
}

impl User {
    /// `active` once a password is set, `invited` before.
    pub fn status(&self) -> &'static str {
        if self.active {
            "active"
        } else {
            "invited"
        }
    }
}

/// The longest email accepted (RFC 5321's path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// The email as stored and compared: trimmed and lowercased. `None` when it cannot be an
/// address: empty local part or domain, no `@`, whitespace or control characters, or longer
/// than [`MAX_EMAIL_LEN`].
///
/// ```
/// use tollgate_accounts::normalize_email;
///
/// assert_eq!(normalize_email("  Ana@Example.COM ").as_deref(), Some("ana@example.com"));
/// assert_eq!(normalize_email("ana"), None);
/// assert_eq!(normalize_email("a b@example.com"), None);
/// ```
pub fn normalize_email(text: &str) -> Option<String> {
    let email = text.trim();
    if email.is_empty() || email.len() > MAX_EMAIL_LEN {
        return None;
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let (local, domain) = email.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') {
        return None;
    }
    Some(email.to_lowercase())
}
