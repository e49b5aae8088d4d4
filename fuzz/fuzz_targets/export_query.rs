//! The `/api/logs` query string: percent decoding undoes percent encoding, and any query is
//! either refused with a 400 or parsed into parameters that read back the same from their
//! canonical form.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tollgate::gateway::query::{percent_decode, ExportParams, MAX_EXPORT_LIMIT};
use tollgate::request_logger::LogCursor;

#[derive(Debug, Arbitrary)]
struct Input {
    text: String,
    /// Which bytes to encode and in which case: a client may encode any byte.
    encode_mask: Vec<u8>,
    query: String,
}

/// Encodes `s` as a client might: `%XX` for every byte the mask says (and for those that
/// must be), `+` for some spaces, the rest as is.
fn encode(s: &str, mask: &[u8]) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for (i, b) in s.bytes().enumerate() {
        let m = mask.get(i % mask.len().max(1)).copied().unwrap_or(0);
        let must = matches!(b, b'%' | b'+' | b'&' | b'=' | b'#') || !b.is_ascii_graphic();
        if b == b' ' && m & 1 == 0 {
            out.push('+');
        } else if must || m & 2 != 0 {
            if m & 4 != 0 {
                out.push_str(&format!("%{b:02x}"));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(b as char);
        }
    }
    out
}

/// The canonical query of parsed parameters.
fn render(p: &ExportParams) -> String {
    let mut parts = Vec::new();
    if let Some(v) = p.from_ms {
        parts.push(format!("from={v}"));
    }
    if let Some(v) = p.to_ms {
        parts.push(format!("to={v}"));
    }
    if let Some(v) = p.model {
        parts.push(format!("model={v}"));
    }
    if let Some(v) = p.status {
        parts.push(format!("status={v}"));
    }
    parts.push(format!("format={}", p.format.as_str()));
    if let Some(v) = &p.cursor {
        parts.push(format!("cursor={}", encode(v, &[])));
    }
    if let Some(v) = p.limit {
        parts.push(format!("limit={v}"));
    }
    parts.join("&")
}

fuzz_target!(|input: Input| {
    let encoded = encode(&input.text, &input.encode_mask);
    assert_eq!(
        percent_decode(&encoded).as_deref(),
        Some(input.text.as_str()),
        "{encoded}"
    );
    // Decoding never yields more bytes than it read.
    if let Some(decoded) = percent_decode(&input.query) {
        assert!(decoded.len() <= input.query.len());
    }

    match ExportParams::parse(&input.query) {
        Err(rejection) => {
            assert_eq!(rejection.status(), 400);
            assert_eq!(rejection.code().as_str(), "INVALID_REQUEST");
            assert!(rejection.message().ends_with('.'));
        }
        Ok(params) => {
            if let Some(limit) = params.limit {
                assert!((1..=MAX_EXPORT_LIMIT).contains(&limit));
            }
            if let Some(status) = params.status {
                assert!((100..=599).contains(&status));
            }
            if let Some(cursor) = &params.cursor {
                assert!(LogCursor::decode(cursor).is_some());
            }
            let canonical = render(&params);
            assert_eq!(
                ExportParams::parse(&canonical).as_ref(),
                Ok(&params),
                "{canonical}"
            );
        }
    }
});
