//! Reading the query parameters the endpoints honour.

use chrono::{NaiveDate, NaiveDateTime};

/// The decoded `name=value` pairs of a raw query string.
#[derive(Debug, Default)]
pub(crate) struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Self {
        let pairs = raw
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(name), decode(value))
            })
            .collect();
        Query { pairs }
    }

    /// The first value of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name` as an unsigned integer; absent or malformed gives `None`.
    pub(crate) fn uint(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|v| v.trim().parse().ok())
    }

    /// `limit` clamped to `1..=max`, `default` when absent or malformed.
    pub(crate) fn limit(&self, default: u64, max: u64) -> u64 {
        self.uint("limit").unwrap_or(default).clamp(1, max)
    }

    /// `name` as a date or date-time (`YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS`, RFC 3339), in
    /// Unix seconds.
    pub(crate) fn date(&self, name: &str) -> Option<i64> {
        parse_date(self.get(name)?.trim())
    }
}

fn parse_date(s: &str) -> Option<i64> {
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp());
    }
    for format in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, format) {
            return Some(dt.and_utc().timestamp());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|dt| dt.and_utc().timestamp())
}

/// Percent-decoding with `+` as a space; malformed escapes are kept as they are.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match bytes.get(i + 1..i + 3) {
                Some(&[hi, lo]) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                    out.push(hex_value(hi) << 4 | hex_value(lo));
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_reads_parameters() {
        let q = Query::parse(Some(
            "limit=20&offset=x&startDate=2024-12-01%2010%3A00%3A00&name=a+b&bad=%zz&tail=%4",
        ));
        assert_eq!(q.limit(10, 100), 20);
        assert_eq!(q.uint("offset"), None);
        assert_eq!(q.get("name"), Some("a b"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(q.get("tail"), Some("%4"));
        assert_eq!(q.date("startDate"), Some(1_733_047_200));
        assert_eq!(Query::parse(Some("limit=0")).limit(10, 100), 1);
        assert_eq!(Query::parse(Some("limit=1000")).limit(10, 100), 100);
        assert_eq!(Query::parse(None).limit(10, 100), 10);
    }

    #[test]
    fn reads_every_date_spelling() {
        assert_eq!(parse_date("2025-01-15"), Some(1_736_899_200));
        assert_eq!(parse_date("2025-01-15T00:00:00+00:00"), Some(1_736_899_200));
        assert_eq!(parse_date("2025-01-15T01:00:00+01:00"), Some(1_736_899_200));
        assert_eq!(parse_date("2025-01-15 00:00:00"), Some(1_736_899_200));
        assert_eq!(parse_date("yesterday"), None);
    }
}
