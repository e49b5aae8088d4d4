//! The query string of `GET /api/logs`: percent decoding and the export parameters.
//!
//! ```
//! use tollgate::gateway::query::{percent_decode, ExportParams};
//! use tollgate_request_logger::ExportFormat;
//!
//! assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
//! assert_eq!(percent_decode("%zz"), None);
//!
//! let p = ExportParams::parse("format=csv&status=429&from=2024-05-01T00%3A00%3A00Z").unwrap();
//! assert_eq!(p.format, ExportFormat::Csv);
//! assert_eq!(p.status, Some(429));
//! assert_eq!(p.from_ms, Some(1_714_521_600_000));
//! let err = ExportParams::parse("limit=0").unwrap_err();
//! assert_eq!(err.message(), "`limit` must be between 1 and 10000.");
//! ```

use tollgate_core::time::ms_from_rfc3339;
use tollgate_core::{ErrorCode, ModelId, OrgId, Rejection};
use tollgate_request_logger::{ExportFormat, LogCursor, LogQuery};

/// The most rows one paged export response (`limit=`) carries; `X-Next-Cursor` continues.
pub const MAX_EXPORT_LIMIT: usize = 10_000;

/// Decodes one `application/x-www-form-urlencoded` component: `%XX` (two hex digits) is a
/// byte, `+` a space, anything else itself. `None` when a `%` is not followed by two hex
/// digits or the bytes are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex_digit(*bytes.get(i + 1)?)?;
                let lo = hex_digit(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    // Only the digits themselves: `from_str_radix` would also take a sign (`%+5`).
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The parameters of a log export: `from`, `to` (RFC 3339 or milliseconds since the epoch;
/// `from` inclusive, `to` exclusive), `model`, `status`, `format` (`ndjson` or `csv`),
/// `cursor` and `limit` (1 to [`MAX_EXPORT_LIMIT`]; without it the export streams every
/// row).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportParams {
    /// Earliest request time, inclusive.
    pub from_ms: Option<u64>,
    /// Latest request time, exclusive.
    pub to_ms: Option<u64>,
    /// Only this model's requests.
    pub model: Option<ModelId>,
    /// Only this status.
    pub status: Option<u16>,
    /// The export format.
    pub format: ExportFormat,
    /// Continue after the page that returned this cursor (validated).
    pub cursor: Option<String>,
    /// Rows in this response, when paged.
    pub limit: Option<usize>,
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.into())
}

/// Parses `from`/`to` as RFC 3339 or as milliseconds since the epoch.
fn instant(name: &str, value: &str) -> Result<u64, Rejection> {
    value
        .parse::<u64>()
        .ok()
        .or_else(|| ms_from_rfc3339(value))
        .ok_or_else(|| {
            bad(format!(
                "`{name}` must be an RFC 3339 time or milliseconds since the epoch."
            ))
        })
}

impl ExportParams {
    /// Parses a raw query string (without the `?`). Parameters are read in order, a later
    /// one replacing an earlier one of the same name; the first bad one is a 400
    /// `INVALID_REQUEST` saying what is wrong.
    pub fn parse(query: &str) -> Result<Self, Rejection> {
        let mut p = ExportParams::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let invalid = || bad("The query string is not valid.");
            let k = percent_decode(k).ok_or_else(invalid)?;
            let v = percent_decode(v).ok_or_else(invalid)?;
            match k.as_str() {
                "from" => p.from_ms = Some(instant("from", &v)?),
                "to" => p.to_ms = Some(instant("to", &v)?),
                "model" => {
                    p.model = Some(
                        v.parse::<ModelId>()
                            .map_err(|_| bad("`model` must be a model id (UUID)."))?,
                    )
                }
                "status" => {
                    p.status = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|s| (100..=599).contains(s))
                            .ok_or_else(|| bad("`status` must be an HTTP status code."))?,
                    )
                }
                "format" => {
                    p.format = v
                        .parse::<ExportFormat>()
                        .map_err(|_| bad("`format` must be ndjson or csv."))?
                }
                "cursor" => {
                    LogCursor::decode(&v)
                        .ok_or_else(|| bad("`cursor` is not a cursor this API gave out."))?;
                    p.cursor = Some(v)
                }
                "limit" => {
                    p.limit = Some(
                        v.parse::<usize>()
                            .ok()
                            .filter(|n| (1..=MAX_EXPORT_LIMIT).contains(n))
                            .ok_or_else(|| {
                                bad(format!("`limit` must be between 1 and {MAX_EXPORT_LIMIT}."))
                            })?,
                    )
                }
                other => return Err(bad(format!("Unknown parameter `{other}`."))),
            }
        }
        Ok(p)
    }

    /// The sink query for `org`'s rows, `page` rows at a time.
    pub fn log_query(&self, org: OrgId, page: usize) -> LogQuery {
        LogQuery {
            org,
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            model: self.model,
            status: self.status,
            cursor: self.cursor.clone(),
            limit: page,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percent_needs_two_hex_digits() {
        assert_eq!(percent_decode("%41%6a").as_deref(), Some("Aj"));
        for bad in ["%", "%4", "%+5", "%-1", "% 1", "%g0", "%é"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%C3"), None, "not UTF-8");
    }

    #[test]
    fn later_parameters_replace_earlier_ones() {
        let p = ExportParams::parse("status=200&&status=404&format=ndjson").unwrap();
        assert_eq!(p.status, Some(404));
        assert_eq!(p.format, ExportFormat::Ndjson);
        assert_eq!(p.limit, None);
    }
}
