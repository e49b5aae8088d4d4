//! [`LogRecord`], one row per request (docs/contract.md §6), and its export formats.

use std::fmt;
use std::str::FromStr;

use serde::ser::{Serialize, SerializeStruct, Serializer};
use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{ErrorCode, KeyId, ModelId, OrgId};

/// One request as the logs record it. Never the key, the session, or a body.
///
/// Serializes (and exports) as exactly the fields `time` (RFC 3339), `request_id`, `org_id`,
/// `key_id`, `model_id`, `method`, `route`, `status`, `code`, `credits`, `latency_ms`; ids
/// are strings, absent values `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The client's `X-Request-Id` when it sent a usable one, else a generated id.
    pub request_id: String,
    /// The caller's organization, once authenticated.
    pub org_id: Option<OrgId>,
    /// The API key used, once authenticated (its public id, never the secret).
    pub key_id: Option<KeyId>,
    /// The model the route is about.
    pub model_id: Option<ModelId>,
    /// The HTTP method.
    pub method: String,
    /// The route template (`/api/models/:id/users/me`); `None` when no route matched.
    pub route: Option<String>,
    /// The response status; 499 when the client went away before a response, 500 when the
    /// service failed without one.
    pub status: u16,
    /// The error code of a rejection; `None` on success.
    pub code: Option<ErrorCode>,
    /// Credits charged (0 when rejected or not charged).
    pub credits: u64,
    /// From the request's arrival to the end of its response body.
    pub latency_ms: u64,
}

/// The CSV header line (RFC 4180, CRLF-terminated), matching [`LogRecord::to_csv_row`].
pub const CSV_HEADER: &str =
    "time,request_id,org_id,key_id,model_id,method,route,status,code,credits,latency_ms\r\n";

impl LogRecord {
    /// The CSV header line, see [`CSV_HEADER`].
    pub const CSV_HEADER: &'static str = CSV_HEADER;

    /// `time` as RFC 3339 text with milliseconds (`2023-01-31T07:35:02.748Z`).
    pub fn time(&self) -> String {
        rfc3339_from_ms(self.time_ms)
    }

    /// The record as one line of newline-delimited JSON (ending in `\n`).
    pub fn to_ndjson_line(&self) -> String {
        let mut line = String::with_capacity(320);
        self.write_ndjson_line(&mut line);
        line
    }

    /// Appends the record as one NDJSON line to `out`.
    pub fn write_ndjson_line(&self, out: &mut String) {
        // Only strings, integers and nulls: serializing cannot fail.
        if let Ok(json) = serde_json::to_string(self) {
            out.push_str(&json);
        }
        out.push('\n');
    }

    /// The record as one CSV row (RFC 4180: fields quoted when they contain `,`, `"`, CR or
    /// LF, quotes doubled, CRLF-terminated); absent values are empty fields.
    pub fn to_csv_row(&self) -> String {
        let mut row = String::with_capacity(256);
        self.write_csv_row(&mut row);
        row
    }

    /// Appends the record as one CSV row to `out`.
    pub fn write_csv_row(&self, out: &mut String) {
        push_csv_field(out, &self.time());
        out.push(',');
        push_csv_field(out, &self.request_id);
        out.push(',');
        push_csv_opt(out, self.org_id.map(|id| id.to_string()));
        out.push(',');
        push_csv_opt(out, self.key_id.map(|id| id.to_string()));
        out.push(',');
        push_csv_opt(out, self.model_id.map(|id| id.to_string()));
        out.push(',');
        push_csv_field(out, &self.method);
        out.push(',');
        push_csv_field(out, self.route.as_deref().unwrap_or_default());
        out.push(',');
        out.push_str(&self.status.to_string());
        out.push(',');
        out.push_str(self.code.map(ErrorCode::as_str).unwrap_or_default());
        out.push(',');
        out.push_str(&self.credits.to_string());
        out.push(',');
        out.push_str(&self.latency_ms.to_string());
        out.push_str("\r\n");
    }
}

fn push_csv_opt(out: &mut String, value: Option<String>) {
    if let Some(value) = value {
        push_csv_field(out, &value);
    }
}

fn push_csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

impl Serialize for LogRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("LogRecord", 11)?;
        s.serialize_field("time", &self.time())?;
        s.serialize_field("request_id", &self.request_id)?;
        s.serialize_field("org_id", &self.org_id)?;
        s.serialize_field("key_id", &self.key_id)?;
        s.serialize_field("model_id", &self.model_id)?;
        s.serialize_field("method", &self.method)?;
        s.serialize_field("route", &self.route)?;
        s.serialize_field("status", &self.status)?;
        s.serialize_field("code", &self.code)?;
        s.serialize_field("credits", &self.credits)?;
        s.serialize_field("latency_ms", &self.latency_ms)?;
        s.end()
    }
}

/// The formats of `GET /api/logs?format=` (docs/contract.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ExportFormat {
    /// Newline-delimited JSON, one record per line (the default).
    #[default]
    Ndjson,
    /// RFC 4180 CSV with a header line.
    Csv,
}

impl ExportFormat {
    /// The `format=` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Ndjson => "ndjson",
            ExportFormat::Csv => "csv",
        }
    }

    /// The `content-type` of the export.
    pub const fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Ndjson => "application/x-ndjson",
            ExportFormat::Csv => "text/csv; charset=utf-8",
        }
    }

    /// What goes before the first record: the CSV header, nothing for NDJSON.
    pub const fn header(self) -> &'static str {
        match self {
            ExportFormat::Ndjson => "",
            ExportFormat::Csv => CSV_HEADER,
        }
    }

    /// Appends one record in this format to `out`.
    pub fn write_record(self, record: &LogRecord, out: &mut String) {
        match self {
            ExportFormat::Ndjson => record.write_ndjson_line(out),
            ExportFormat::Csv => record.write_csv_row(out),
        }
    }

    /// One record in this format.
    pub fn render(self, record: &LogRecord) -> String {
        let mut out = String::with_capacity(320);
        self.write_record(record, &mut out);
        out
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was neither `ndjson` nor `csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFormatParseError(pub String);

impl fmt::Display for ExportFormatParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown export format {:?} (expected ndjson or csv)",
            self.0
        )
    }
}

impl std::error::Error for ExportFormatParseError {}

impl FromStr for ExportFormat {
    type Err = ExportFormatParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("ndjson") {
            Ok(ExportFormat::Ndjson)
        } else if s.eq_ignore_ascii_case("csv") {
            Ok(ExportFormat::Csv)
        } else {
            Err(ExportFormatParseError(s.to_owned()))
        }
    }
}
