//! The exported shape of a log row: NDJSON and CSV, exactly.

use tollgate_core::{ErrorCode, KeyId, ModelId, OrgId};
use tollgate_request_logger::{ExportFormat, LogRecord, CSV_HEADER};

fn full_record() -> LogRecord {
    LogRecord {
        time_ms: 1_675_150_502_748,
        request_id: "req-1".into(),
        org_id: Some(
            "11111111-2222-4333-8444-555555555555"
                .parse::<OrgId>()
                .unwrap(),
        ),
        key_id: Some(
            "66666666-7777-4888-8999-aaaaaaaaaaaa"
                .parse::<KeyId>()
                .unwrap(),
        ),
        model_id: Some(
            "0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10"
                .parse::<ModelId>()
                .unwrap(),
        ),
        method: "GET".into(),
        route: Some("/api/models/:id/payouts/stats".into()),
        status: 200,
        code: None,
        credits: 2,
        latency_ms: 35,
    }
}

fn rejected_record() -> LogRecord {
    LogRecord {
        time_ms: 1_675_150_502_000,
        request_id: "3f2c1a9e-0000-4000-8000-000000000001".into(),
        org_id: None,
        key_id: None,
        model_id: None,
        method: "POST".into(),
        route: None,
        status: 401,
        code: Some(ErrorCode::InvalidApiKey),
        credits: 0,
        latency_ms: 1,
    }
}

#[test]
fn ndjson_lines_are_exact() {
    assert_eq!(
        full_record().to_ndjson_line(),
        concat!(
            r#"{"time":"2023-01-31T07:35:02.748Z","request_id":"req-1","#,
            r#""org_id":"11111111-2222-4333-8444-555555555555","#,
            r#""key_id":"66666666-7777-4888-8999-aaaaaaaaaaaa","#,
            r#""model_id":"0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10","method":"GET","#,
            r#""route":"/api/models/:id/payouts/stats","status":200,"code":null,"#,
            r#""credits":2,"latency_ms":35}"#,
            "\n"
        )
    );
    assert_eq!(
        rejected_record().to_ndjson_line(),
        concat!(
            r#"{"time":"2023-01-31T07:35:02.000Z","request_id":"3f2c1a9e-0000-4000-8000-000000000001","#,
            r#""org_id":null,"key_id":null,"model_id":null,"method":"POST","route":null,"#,
            r#""status":401,"code":"INVALID_API_KEY","credits":0,"latency_ms":1}"#,
            "\n"
        )
    );
}

#[test]
fn serializes_exactly_the_contract_fields() {
    let value = serde_json::to_value(full_record()).unwrap();
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "code",
            "credits",
            "key_id",
            "latency_ms",
            "method",
            "model_id",
            "org_id",
            "request_id",
            "route",
            "status",
            "time"
        ]
    );
}

#[test]
fn csv_rows_are_exact_and_quoted_per_rfc_4180() {
    assert_eq!(
        CSV_HEADER,
        "time,request_id,org_id,key_id,model_id,method,route,status,code,credits,latency_ms\r\n"
    );
    assert_eq!(LogRecord::CSV_HEADER, CSV_HEADER);
    assert_eq!(
        full_record().to_csv_row(),
        "2023-01-31T07:35:02.748Z,req-1,11111111-2222-4333-8444-555555555555,\
         66666666-7777-4888-8999-aaaaaaaaaaaa,0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10,GET,\
         /api/models/:id/payouts/stats,200,,2,35\r\n"
    );
    assert_eq!(
        rejected_record().to_csv_row(),
        "2023-01-31T07:35:02.000Z,3f2c1a9e-0000-4000-8000-000000000001,,,,POST,,401,INVALID_API_KEY,0,1\r\n"
    );
    // A route of a user's own cost table with the characters CSV must quote.
    let odd = LogRecord {
        route: Some("/v1/a,b/\"q\"/line\nbreak".into()),
        ..rejected_record()
    };
    assert_eq!(
        odd.to_csv_row(),
        "2023-01-31T07:35:02.000Z,3f2c1a9e-0000-4000-8000-000000000001,,,,POST,\
         \"/v1/a,b/\"\"q\"\"/line\nbreak\",401,INVALID_API_KEY,0,1\r\n"
    );
}

#[test]
fn export_formats() {
    assert_eq!("ndjson".parse::<ExportFormat>(), Ok(ExportFormat::Ndjson));
    assert_eq!("csv".parse::<ExportFormat>(), Ok(ExportFormat::Csv));
    assert_eq!("CSV".parse::<ExportFormat>(), Ok(ExportFormat::Csv));
    let err = "json".parse::<ExportFormat>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown export format \"json\" (expected ndjson or csv)"
    );
    assert!("".parse::<ExportFormat>().is_err());
    assert_eq!(ExportFormat::default(), ExportFormat::Ndjson);

    assert_eq!(ExportFormat::Ndjson.content_type(), "application/x-ndjson");
    assert_eq!(ExportFormat::Csv.content_type(), "text/csv; charset=utf-8");
    assert_eq!(ExportFormat::Ndjson.header(), "");
    assert_eq!(ExportFormat::Csv.header(), CSV_HEADER);
    assert_eq!(ExportFormat::Csv.to_string(), "csv");

    let mut out = String::from(ExportFormat::Csv.header());
    for r in [full_record(), rejected_record()] {
        ExportFormat::Csv.write_record(&r, &mut out);
    }
    assert_eq!(
        out,
        format!(
            "{CSV_HEADER}{}{}",
            full_record().to_csv_row(),
            rejected_record().to_csv_row()
        )
    );
    assert_eq!(
        ExportFormat::Ndjson.render(&rejected_record()),
        rejected_record().to_ndjson_line()
    );
}
