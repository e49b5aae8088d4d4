//! `GET /api/logs` without `limit` streams every row of the caller's org, page by page from
//! the sink; with `limit` it answers bounded pages that `X-Next-Cursor` continues.

mod common;

use std::collections::HashSet;

use tollgate::request_logger::LogRecord;
use tollgate_core::Clock as _;
use tollgate_core::{OrgId, SystemClock};

fn rows(org: OrgId, n: usize, prefix: &str) -> Vec<LogRecord> {
    let now = SystemClock.now_ms();
    (0..n)
        .map(|i| LogRecord {
            time_ms: now - 60_000 + i as u64,
            request_id: format!("{prefix}-{i}"),
            org_id: Some(org),
            key_id: None,
            model_id: None,
            method: "GET".into(),
            route: Some("/api/models/:id/chats".into()),
            status: 200,
            code: None,
            credits: 1,
            latency_ms: 3,
        })
        .collect()
}

#[tokio::test]
async fn an_export_without_limit_streams_every_row_of_the_org_once() {
    let gw = common::start(common::test_config()).await;
    let demo_org = gw.gw.demo().unwrap().org;
    let logs = gw.gw.state().logs.clone();
    // 2,345 rows of the org (several sink pages), and rows of another org that must not show.
    logs.write_batch(rows(demo_org, 2_345, "mine"))
        .await
        .unwrap();
    logs.write_batch(rows(OrgId::new(), 50, "theirs"))
        .await
        .unwrap();

    let answer = gw.get("/api/logs").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.headers["content-type"], "application/x-ndjson");
    assert!(!answer.headers.contains_key("x-next-cursor"));
    let text = answer.text();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mine: HashSet<&String> = ids.iter().filter(|id| id.starts_with("mine-")).collect();
    assert_eq!(mine.len(), 2_345, "every row once");
    assert_eq!(
        ids.iter().filter(|id| id.starts_with("mine-")).count(),
        2_345
    );
    assert!(!ids.iter().any(|id| id.starts_with("theirs-")));

    // CSV: one header, then one line per row.
    let csv = gw.get("/api/logs?format=csv").await;
    assert_eq!(csv.status, 200);
    let csv_text = csv.text();
    let lines: Vec<&str> = csv_text.lines().collect();
    assert_eq!(
        lines[0],
        "time,request_id,org_id,key_id,model_id,method,route,status,code,credits,latency_ms"
    );
    assert_eq!(lines.iter().filter(|l| l.contains(",mine-")).count(), 2_345);

    // Paged: `limit` + `X-Next-Cursor` walk the same rows.
    let mut seen = HashSet::new();
    let mut path = "/api/logs?limit=1000".to_owned();
    loop {
        let page = gw.get(&path).await;
        assert_eq!(page.status, 200);
        for l in page.text().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let id = v["request_id"].as_str().unwrap().to_owned();
            if id.starts_with("mine-") {
                assert!(seen.insert(id), "a row came twice");
            }
        }
        match page.headers.get("x-next-cursor") {
            Some(c) => path = format!("/api/logs?limit=1000&cursor={}", c.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2_345);
}
