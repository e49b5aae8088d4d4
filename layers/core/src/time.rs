//! Timestamps: milliseconds since the Unix epoch, RFC 3339 text and calendar months.

use chrono::{DateTime, Months, SecondsFormat, Utc};

/// `ms` since the epoch as RFC 3339 with millisecond precision and a `Z` offset.
pub fn rfc3339_from_ms(ms: u64) -> String {
    to_datetime(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses RFC 3339 text into milliseconds since the epoch (`None` for bad text or a time
/// before the epoch).
pub fn ms_from_rfc3339(text: &str) -> Option<u64> {
    let dt = DateTime::parse_from_rfc3339(text).ok()?;
    u64::try_from(dt.timestamp_millis()).ok()
}

/// The instant one calendar month after `ms` (the end of a billing period), clamped to the
/// end of shorter months (Jan 31 → Feb 28/29).
pub fn add_one_month_ms(ms: u64) -> u64 {
    let dt = to_datetime(ms);
    let next = dt.checked_add_months(Months::new(1)).unwrap_or(dt);
    u64::try_from(next.timestamp_millis()).unwrap_or(ms)
}

fn to_datetime(ms: u64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let ms = 1_675_150_502_748;
        let text = rfc3339_from_ms(ms);
        assert_eq!(text, "2023-01-31T07:35:02.748Z");
        assert_eq!(ms_from_rfc3339(&text), Some(ms));
        assert_eq!(ms_from_rfc3339("2023-01-31T08:35:02.748+01:00"), Some(ms));
        assert_eq!(ms_from_rfc3339("yesterday"), None);
    }

    #[test]
    fn months_clamp() {
        let jan31 = ms_from_rfc3339("2023-01-31T10:00:00Z").unwrap();
        assert_eq!(
            rfc3339_from_ms(add_one_month_ms(jan31)),
            "2023-02-28T10:00:00.000Z"
        );
    }
}
