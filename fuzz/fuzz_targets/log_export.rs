//! Log export filters: whatever the rows and the filter, paging through the memory sink with
//! its cursors returns exactly the org's matching rows, once each, in order; every row
//! renders as valid NDJSON and CSV.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use futures_util::FutureExt as _;
use tollgate::core::{ErrorCode, KeyId, ManualClock, ModelId, OrgId};
use tollgate::request_logger::{
    ExportFormat, LogCursor, LogQuery, LogRecord, LogSink, MemoryLogSink,
};

const NOW: u64 = 1_700_000_000_000;
const STATUSES: [u16; 4] = [200, 401, 429, 502];

#[derive(Debug, Arbitrary)]
struct Row {
    org: bool,
    model: u8,
    status: u8,
    age_ms: u8,
    tag: String,
}

#[derive(Debug, Arbitrary)]
struct Filter {
    from: Option<u8>,
    to: Option<u8>,
    model: Option<u8>,
    status: Option<u8>,
    limit: u8,
    /// A cursor the client made up (it must not break anything).
    made_up_cursor: Option<(u64, u64)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    rows: Vec<Row>,
    filter: Filter,
    junk_cursor: String,
}

fn model(models: &[ModelId; 3], i: u8) -> Option<ModelId> {
    models.get(usize::from(i % 4)).copied()
}

fn now<T>(f: tollgate::core::BoxFuture<T>) -> T {
    f.now_or_never().expect("the memory sink answers at once")
}

fuzz_target!(|input: Input| {
    let orgs = [OrgId::new(), OrgId::new()];
    let models = [ModelId::new(), ModelId::new(), ModelId::new()];
    let records: Vec<LogRecord> = input
        .rows
        .iter()
        .take(64)
        .enumerate()
        .map(|(i, r)| LogRecord {
            time_ms: NOW - 300 + u64::from(r.age_ms),
            request_id: format!("r{i}-{}", r.tag),
            org_id: Some(orgs[usize::from(r.org)]),
            key_id: Some(KeyId::new()),
            model_id: model(&models, r.model),
            method: "GET".into(),
            route: Some("/api/models/:id/users/me".into()),
            status: STATUSES[usize::from(r.status % 4)],
            code: (r.status % 4 != 0).then_some(ErrorCode::RateLimitExceeded),
            credits: u64::from(r.status % 4 == 0),
            latency_ms: 3,
        })
        .collect();
    let sink = MemoryLogSink::new(ManualClock::new(NOW));
    now(sink.write_batch(records.clone())).unwrap();

    let f = &input.filter;
    let time = |t: u8| NOW - 300 + u64::from(t);
    let mut query = LogQuery {
        org: orgs[0],
        from_ms: f.from.map(time),
        to_ms: f.to.map(time),
        model: f.model.and_then(|m| model(&models, m)),
        status: f.status.map(|s| STATUSES[usize::from(s % 4)]),
        cursor: None,
        limit: usize::from(f.limit % 8) + 1,
    };
    let wanted: Vec<&LogRecord> = records
        .iter()
        .filter(|r| r.org_id == Some(query.org))
        .filter(|r| query.from_ms.is_none_or(|from| r.time_ms >= from))
        .filter(|r| query.to_ms.is_none_or(|to| r.time_ms < to))
        .filter(|r| query.model.is_none_or(|m| r.model_id == Some(m)))
        .filter(|r| query.status.is_none_or(|s| r.status == s))
        .collect();
    let mut wanted_sorted = wanted.clone();
    // By time, then in arrival order (a stable sort keeps it).
    wanted_sorted.sort_by_key(|r| r.time_ms);

    let mut got: Vec<LogRecord> = Vec::new();
    for _ in 0..=records.len() + 1 {
        let page = now(sink.query(query.clone())).unwrap();
        assert!(page.records.len() <= query.limit);
        got.extend(page.records);
        match page.next_cursor {
            Some(cursor) => {
                assert!(LogCursor::decode(&cursor).is_some());
                query.cursor = Some(cursor);
            }
            None => break,
        }
    }
    let got_refs: Vec<&LogRecord> = got.iter().collect();
    assert_eq!(got_refs, wanted_sorted, "paging returns each matching row once, in order");

    // Cursors a client made up: an error or a page, never a panic.
    if let Some((t, tiebreak)) = f.made_up_cursor {
        query.cursor = Some(LogCursor { time_ms: t, tiebreak }.encode());
        let page = now(sink.query(query.clone())).unwrap();
        assert!(page.records.len() <= query.limit);
    }
    query.cursor = Some(input.junk_cursor.clone());
    let junk = now(sink.query(query.clone()));
    assert_eq!(junk.is_ok(), LogCursor::decode(&input.junk_cursor).is_some());

    for r in &got {
        let line = ExportFormat::Ndjson.render(r);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["request_id"], r.request_id.as_str());
        assert_eq!(v["status"], r.status);
        let csv = ExportFormat::Csv.render(r);
        let fields = parse_csv_row(&csv).unwrap_or_else(|| panic!("not one CSV row: {csv:?}"));
        assert_eq!(fields.len(), 11, "{csv:?}");
        assert_eq!(fields[1], r.request_id);
        assert_eq!(fields[7], r.status.to_string());
    }
});

/// One RFC 4180 row ending in CRLF, split into its fields; `None` if it is not exactly that.
fn parse_csv_row(row: &str) -> Option<Vec<String>> {
    let body = row.strip_suffix("\r\n")?;
    let mut fields = vec![String::new()];
    let mut chars = body.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if at_start => quoted = true,
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut()?.push('"');
            }
            (true, '"') => {
                quoted = false;
                if !matches!(chars.peek(), None | Some(',')) {
                    return None;
                }
            }
            (false, ',') => {
                fields.push(String::new());
                at_start = true;
                continue;
            }
            (false, '"' | '\r' | '\n') => return None,
            (_, c) => fields.last_mut()?.push(c),
        }
        at_start = false;
    }
    (!quoted).then_some(fields)
}
