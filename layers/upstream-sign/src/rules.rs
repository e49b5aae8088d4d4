//! The upstream's request-signing rules ("dynamic rules") and the signing algorithm.
//!
//! A rules document carries a `static_param`, a prefix and a suffix, the `checksum_indexes`
//! (each 0–39), a `checksum_constant` and the `app_token`. Public feeds spell the same rules
//! several ways; [`DynamicRules::from_json`] accepts all of them:
//!
//! - the prefix and suffix as `prefix`/`suffix`, as `start`/`end`, or inside
//!   `format: "PREFIX:{}:{:x}:SUFFIX"` (several spellings may be present; they must agree);
//! - `checksum_indexes` as a JSON list, or as a JSON list inside a string;
//! - per-index `checksum_constants`, whose sum is the `checksum_constant` (when both are
//!   given they must agree).
//!
//! To sign a request, `message = static_param \n time \n path \n user_id`, `sha = sha1(message)`
//! in lowercase hex, `checksum = Σ ascii(sha[i]) for i in checksum_indexes + checksum_constant`
//! and `sign = PREFIX:sha:hex(|checksum|):SUFFIX`.

use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};

/// The largest valid checksum index: a SHA-1 hex digest has 40 characters.
pub const MAX_CHECKSUM_INDEX: u8 = 39;

/// A parsed, validated set of signing rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicRules {
    static_param: String,
    prefix: String,
    suffix: String,
    checksum_indexes: Vec<u8>,
    checksum_constant: i64,
    app_token: String,
    revision: Option<String>,
}

/// The three values a signed upstream request carries in its `sign`, `time` and `app-token`
/// headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// `PREFIX:sha:HEX:SUFFIX`.
    pub sign: String,
    /// Milliseconds since the epoch, as the decimal string that was hashed.
    pub time: String,
    /// The rules' app token.
    pub app_token: String,
}

/// Why a rules document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// The document is not a JSON object.
    #[error("rules are not a JSON object: {0}")]
    Json(String),
    /// A required field is absent.
    #[error("rules field `{0}` is missing")]
    Missing(&'static str),
    /// A field has the wrong type or a value out of range.
    #[error("rules field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field's name in the document.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Two spellings of the same value disagree.
    #[error("rules are inconsistent: {0}")]
    Conflict(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RulesError {
    RulesError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Reads a field that feeds give as a string (or, in some feeds, as a bare number).
fn text_field(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, RulesError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(invalid(field, format!("expected a string, got {other}"))),
    }
}

fn integer(value: &Value, field: &'static str) -> Result<i64, RulesError> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| invalid(field, format!("{n} is not an integer"))),
        Value::String(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| invalid(field, format!("{s:?} is not an integer"))),
        other => Err(invalid(field, format!("expected an integer, got {other}"))),
    }
}

/// A list of values, given either as a JSON list or as a JSON list inside a string.
fn list_field(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<Vec<Value>>, RulesError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items.clone())),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(items)) => Ok(Some(items)),
            _ => Err(invalid(field, "the string does not hold a JSON list")),
        },
        Some(other) => Err(invalid(field, format!("expected a list, got {other}"))),
    }
}

/// Splits `PREFIX:{}:{:x}:SUFFIX`.
fn split_format(format: &str) -> Result<(String, String), RulesError> {
    const HOLES: &str = ":{}:{:x}:";
    let at = format
        .find(HOLES)
        .ok_or_else(|| invalid("format", "expected the shape PREFIX:{}:{:x}:SUFFIX"))?;
    let prefix = &format[..at];
    let suffix = &format[at + HOLES.len()..];
    if suffix.contains('{') || prefix.contains('{') {
        return Err(invalid(
            "format",
            "expected the shape PREFIX:{}:{:x}:SUFFIX",
        ));
    }
    Ok((prefix.to_owned(), suffix.to_owned()))
}

/// Picks the one value the given spellings agree on.
fn agree(
    what: &'static str,
    spellings: [(&'static str, Option<String>); 3],
) -> Result<String, RulesError> {
    let mut chosen: Option<(&'static str, String)> = None;
    for (name, value) in spellings {
        let Some(value) = value else { continue };
        match &chosen {
            None => chosen = Some((name, value)),
            Some((first, v)) if *v != value => {
                return Err(RulesError::Conflict(format!(
                    "{what} is {v:?} in `{first}` but {value:?} in `{name}`"
                )))
            }
            Some(_) => {}
        }
    }
    chosen.map(|(_, v)| v).ok_or(RulesError::Missing(what))
}

impl DynamicRules {
    /// Parses a rules document in any of the layouts public feeds use.
    pub fn from_json(json: &str) -> Result<DynamicRules, RulesError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| RulesError::Json(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(RulesError::Json("the document is not an object".into()));
        };

        let static_param =
            text_field(&obj, "static_param")?.ok_or(RulesError::Missing("static_param"))?;
        let app_token = text_field(&obj, "app_token")?.ok_or(RulesError::Missing("app_token"))?;

        let (format_prefix, format_suffix) = match text_field(&obj, "format")? {
            Some(f) => {
                let (p, s) = split_format(&f)?;
                (Some(p), Some(s))
            }
            None => (None, None),
        };
        let prefix = agree(
            "prefix",
            [
                ("prefix", text_field(&obj, "prefix")?),
                ("start", text_field(&obj, "start")?),
                ("format", format_prefix),
            ],
        )?;
        let suffix = agree(
            "suffix",
            [
                ("suffix", text_field(&obj, "suffix")?),
                ("end", text_field(&obj, "end")?),
                ("format", format_suffix),
            ],
        )?;

        let raw_indexes =
            list_field(&obj, "checksum_indexes")?.ok_or(RulesError::Missing("checksum_indexes"))?;
        if raw_indexes.is_empty() {
            return Err(invalid("checksum_indexes", "the list is empty"));
        }
        let mut checksum_indexes = Vec::with_capacity(raw_indexes.len());
        for item in &raw_indexes {
            let i = integer(item, "checksum_indexes")?;
            if !(0..=i64::from(MAX_CHECKSUM_INDEX)).contains(&i) {
                return Err(invalid(
                    "checksum_indexes",
                    format!("index {i} is outside 0..={MAX_CHECKSUM_INDEX}"),
                ));
            }
            checksum_indexes.push(i as u8);
        }

        let constant = match obj.get("checksum_constant") {
            None | Some(Value::Null) => None,
            Some(v) => Some(integer(v, "checksum_constant")?),
        };
        let per_index = match list_field(&obj, "checksum_constants")? {
            None => None,
            Some(items) => {
                if items.len() != checksum_indexes.len() {
                    return Err(RulesError::Conflict(format!(
                        "{} checksum_constants for {} checksum_indexes",
                        items.len(),
                        checksum_indexes.len()
                    )));
                }
                let mut sum: i64 = 0;
                for item in &items {
                    sum = sum
                        .checked_add(integer(item, "checksum_constants")?)
                        .ok_or_else(|| invalid("checksum_constants", "the sum overflows"))?;
                }
                Some(sum)
            }
        };
        let checksum_constant = match (constant, per_index) {
            (Some(c), Some(sum)) if c != sum => {
                return Err(RulesError::Conflict(format!(
                    "checksum_constant is {c} but checksum_constants sum to {sum}"
                )))
            }
            (Some(c), _) => c,
            (None, Some(sum)) => sum,
            (None, None) => return Err(RulesError::Missing("checksum_constant")),
        };
        // Keeps the checksum arithmetic far from overflow: 40 indexes × 'f' is tiny next to it.
        if checksum_constant.unsigned_abs() > (i64::MAX as u64) / 2 {
            return Err(invalid("checksum_constant", "out of range"));
        }

        let revision = text_field(&obj, "revision")?;

        Ok(DynamicRules {
            static_param,
            prefix,
            suffix,
            checksum_indexes,
            checksum_constant,
            app_token,
            revision,
        })
    }

    /// Builds rules from their parts, validating the indexes like [`from_json`](Self::from_json).
    pub fn new(
        static_param: impl Into<String>,
        prefix: impl Into<String>,
        suffix: impl Into<String>,
        checksum_indexes: Vec<u8>,
        checksum_constant: i64,
        app_token: impl Into<String>,
    ) -> Result<DynamicRules, RulesError> {
        if checksum_indexes.is_empty() {
            return Err(invalid("checksum_indexes", "the list is empty"));
        }
        if let Some(i) = checksum_indexes.iter().find(|i| **i > MAX_CHECKSUM_INDEX) {
            return Err(invalid(
                "checksum_indexes",
                format!("index {i} is outside 0..={MAX_CHECKSUM_INDEX}"),
            ));
        }
        if checksum_constant.unsigned_abs() > (i64::MAX as u64) / 2 {
            return Err(invalid("checksum_constant", "out of range"));
        }
        Ok(DynamicRules {
            static_param: static_param.into(),
            prefix: prefix.into(),
            suffix: suffix.into(),
            checksum_indexes,
            checksum_constant,
            app_token: app_token.into(),
            revision: None,
        })
    }

    /// Signs a request at `time_ms` (milliseconds since the epoch). `path_and_query` is the
    /// path as sent on the wire plus `?` and the raw query, percent-encoding kept.
    pub fn sign_at(&self, path_and_query: &str, user_id: &str, time_ms: u64) -> Signature {
        let time = time_ms.to_string();
        let sign = self.sign_string(path_and_query, user_id, &time);
        Signature {
            sign,
            time,
            app_token: self.app_token.clone(),
        }
    }

    /// The `sign` header for a request carrying the `time` header `time` (used as given).
    pub fn sign_string(&self, path_and_query: &str, user_id: &str, time: &str) -> String {
        let mut hasher = Sha1::new();
        hasher.update(self.static_param.as_bytes());
        hasher.update(b"\n");
        hasher.update(time.as_bytes());
        hasher.update(b"\n");
        hasher.update(path_and_query.as_bytes());
        hasher.update(b"\n");
        hasher.update(user_id.as_bytes());
        let sha = hex::encode(hasher.finalize());
        let bytes = sha.as_bytes();
        let checksum: i64 = self
            .checksum_indexes
            .iter()
            .map(|&i| i64::from(bytes[usize::from(i)]))
            .sum::<i64>()
            + self.checksum_constant;
        let mut sign =
            String::with_capacity(self.prefix.len() + self.suffix.len() + sha.len() + 24);
        sign.push_str(&self.prefix);
        sign.push(':');
        sign.push_str(&sha);
        // Writing to a String cannot fail.
        let _ = write!(sign, ":{:x}:", checksum.unsigned_abs());
        sign.push_str(&self.suffix);
        sign
    }

    /// Whether `sign` is the signature of the request under these rules (what the upstream
    /// checks; the sandbox upstream uses it).
    pub fn verify(&self, path_and_query: &str, user_id: &str, time: &str, sign: &str) -> bool {
        let expected = self.sign_string(path_and_query, user_id, time);
        // Constant-time comparison: the signature is the secret part of the request.
        expected.len() == sign.len()
            && expected
                .bytes()
                .zip(sign.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The `app-token` header value.
    pub fn app_token(&self) -> &str {
        &self.app_token
    }

    /// The static parameter hashed first.
    pub fn static_param(&self) -> &str {
        &self.static_param
    }

    /// The `sign` prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The `sign` suffix.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// The checksum indexes into the SHA-1 hex digest.
    pub fn checksum_indexes(&self) -> &[u8] {
        &self.checksum_indexes
    }

    /// The constant added to the checksum.
    pub fn checksum_constant(&self) -> i64 {
        self.checksum_constant
    }

    /// The feed's `revision`, when it gives one (useful in logs after a rotation).
    pub fn revision(&self) -> Option<&str> {
        self.revision.as_deref()
    }

    /// The rules as a JSON document in the `prefix`/`suffix` layout (with `format` too, so
    /// every client layout can read it back).
    pub fn to_json(&self) -> String {
        let mut obj = Map::new();
        obj.insert("static_param".into(), self.static_param.clone().into());
        obj.insert("prefix".into(), self.prefix.clone().into());
        obj.insert("suffix".into(), self.suffix.clone().into());
        obj.insert(
            "format".into(),
            format!("{}:{{}}:{{:x}}:{}", self.prefix, self.suffix).into(),
        );
        obj.insert(
            "checksum_indexes".into(),
            self.checksum_indexes
                .iter()
                .map(|&i| Value::from(i))
                .collect(),
        );
        obj.insert("checksum_constant".into(), self.checksum_constant.into());
        obj.insert("app_token".into(), self.app_token.clone().into());
        if let Some(r) = &self.revision {
            obj.insert("revision".into(), r.clone().into());
        }
        Value::Object(obj).to_string()
    }
}

impl std::str::FromStr for DynamicRules {
    type Err = RulesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DynamicRules::from_json(s)
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sign={} time={}", self.sign, self.time)
    }
}

/// The fixed rules the sandbox upstream and the demo gateway use (a real rules document from
/// a public feed, embedded at build time).
pub fn sandbox_rules() -> DynamicRules {
    static RULES: OnceLock<DynamicRules> = OnceLock::new();
    RULES
        .get_or_init(|| {
            DynamicRules::from_json(SANDBOX_RULES_JSON)
                .expect("the embedded sandbox rules are valid (checked by the tests)")
        })
        .clone()
}

/// The JSON text of [`sandbox_rules`].
pub const SANDBOX_RULES_JSON: &str = include_str!("../tests/fixtures/rules-current.json");

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_STYLE: &str = include_str!("../tests/fixtures/rules-format-style.json");
    const PREFIX_STYLE: &str = include_str!("../tests/fixtures/rules-prefix-style.json");

    #[test]
    fn vector_format_style() {
        let rules = DynamicRules::from_json(FORMAT_STYLE).unwrap();
        assert_eq!(rules.prefix(), "6820");
        assert_eq!(rules.suffix(), "63d81407");
        assert_eq!(rules.checksum_constant(), 155);
        let sig = rules.sign_at("/api2/v2/init", "0", 1_675_150_502_748);
        assert_eq!(
            sig.sign,
            "6820:148f109177631164a099641019e951d9f0c1edf7:7db:63d81407"
        );
        assert_eq!(sig.time, "1675150502748");
        assert_eq!(sig.app_token, "33d57ade8c02dbc5a333db99ff9ae26a");
        assert!(rules.verify("/api2/v2/init", "0", "1675150502748", &sig.sign));
    }

    #[test]
    fn vector_prefix_style() {
        let rules = DynamicRules::from_json(PREFIX_STYLE).unwrap();
        assert_eq!(rules.checksum_indexes().len(), 32);
        let sig = rules.sign_at("/api2/v2/init", "0", 1_672_505_467_206);
        assert_eq!(
            sig.sign,
            "6437:d685ce0063c19ce301ff42c544eae570388b0697:77e:63aee19d"
        );
        assert!(rules.verify("/api2/v2/init", "0", "1672505467206", &sig.sign));
    }

    #[test]
    fn verify_rejects_any_change() {
        let rules = DynamicRules::from_json(PREFIX_STYLE).unwrap();
        let good = "6437:d685ce0063c19ce301ff42c544eae570388b0697:77e:63aee19d";
        assert!(!rules.verify("/api2/v2/init", "0", "1672505467207", good));
        assert!(!rules.verify("/api2/v2/init?", "0", "1672505467206", good));
        assert!(!rules.verify("/api2/v2/init", "1", "1672505467206", good));
        assert!(!rules.verify(
            "/api2/v2/init",
            "0",
            "1672505467206",
            &good[..good.len() - 1]
        ));
        assert!(!rules.verify("/api2/v2/init", "0", "1672505467206", ""));
    }

    #[test]
    fn current_layout_parses_with_all_three_spellings() {
        let rules = DynamicRules::from_json(SANDBOX_RULES_JSON).unwrap();
        assert_eq!(rules.prefix(), "40089");
        assert_eq!(rules.suffix(), "68013327");
        assert_eq!(rules.checksum_constant(), -250);
        assert_eq!(rules.checksum_indexes().len(), 32);
        assert_eq!(rules.checksum_indexes()[31], 39);
        assert_eq!(rules.app_token(), "33d57ade8c02dbc5a333db99ff9ae26a");
        assert_eq!(rules.static_param(), "UkBoRvNXEEgUq42IDfP867YM2u2QsTxG");
        assert_eq!(rules.revision(), Some("202504171657-5ce73b38fc"));
        assert_eq!(sandbox_rules(), rules);
        let sig = rules.sign_at("/api2/v2/users/me", "12345", 1_700_000_000_000);
        assert!(sig.sign.starts_with("40089:"));
        assert!(sig.sign.ends_with(":68013327"));
        assert!(rules.verify("/api2/v2/users/me", "12345", &sig.time, &sig.sign));
    }

    #[test]
    fn to_json_round_trips() {
        for doc in [FORMAT_STYLE, PREFIX_STYLE, SANDBOX_RULES_JSON] {
            let rules = DynamicRules::from_json(doc).unwrap();
            assert_eq!(DynamicRules::from_json(&rules.to_json()).unwrap(), rules);
        }
    }
}
