//! Identifiers of the tenancy model: organizations, models (connected creator accounts) and
//! API keys. All are UUIDs; their text form is the hyphenated lowercase UUID.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The text given was not a UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdParseError {
    kind: &'static str,
}

impl fmt::Display for IdParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a valid {} id (expected a UUID)", self.kind)
    }
}

impl std::error::Error for IdParseError {}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID inside.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                // Only the canonical hyphenated form: ids appear in paths and logs, and one
                // spelling per id keeps buckets and ownership checks unambiguous.
                if s.len() != 36 {
                    return Err(IdParseError { kind: $kind });
                }
                Uuid::try_parse(s)
                    .map(Self)
                    .map_err(|_| IdParseError { kind: $kind })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.hyphenated())
            }
        }
    };
}

uuid_id!(
    /// An organization: the tenant that owns keys, models, one subscription and one balance.
    OrgId,
    "organization"
);
uuid_id!(
    /// A model: a connected creator account the gateway acts on behalf of.
    ModelId,
    "model"
);
uuid_id!(
    /// An API key's public id (never the secret).
    KeyId,
    "key"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let id = ModelId::new();
        let parsed: ModelId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
    }

    #[test]
    fn rejects_non_canonical_text() {
        assert!("not-a-uuid".parse::<OrgId>().is_err());
        // braced and simple forms parse as UUIDs but are not the canonical spelling
        assert!("{0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10}"
            .parse::<OrgId>()
            .is_err());
        assert!("0b6f7a528f0e4d3f9f575b1e2a7c9d10".parse::<OrgId>().is_err());
        assert!("0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10"
            .parse::<OrgId>()
            .is_ok());
        let err = "x".parse::<KeyId>().unwrap_err();
        assert_eq!(err.to_string(), "not a valid key id (expected a UUID)");
    }
}
