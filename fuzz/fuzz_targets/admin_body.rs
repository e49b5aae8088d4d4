//! The admin API's JSON body fields: every body is either refused with a clear 400 or
//! yields values within their contract, which read back the same from a body made of them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use tollgate::core::{Plan, Rejection};
use tollgate::credit_meter::MAX_CREDITS;
use tollgate::gateway::admin::body::{count_field, credits_field, session_field, string_field};

fn check_refusal(r: &Rejection) {
    assert_eq!(r.status(), 400);
    assert_eq!(r.code().as_str(), "INVALID_REQUEST");
    assert!(r.message().ends_with('.'), "{}", r.message());
}

fuzz_target!(|data: &[u8]| {
    // What the admin API reads: an empty body is `null`.
    let body: Value = if data.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(_) => return,
        }
    };

    for field in ["name", "plan"] {
        match string_field(&body, field) {
            Ok(s) => {
                assert!(!s.trim().is_empty());
                assert_eq!(body[field].as_str(), Some(s.as_str()));
                assert_eq!(string_field(&json!({ field: s }), field).as_ref(), Ok(&s));
                if field == "plan" {
                    if let Ok(plan) = s.parse::<Plan>() {
                        assert_eq!(plan.to_string().parse::<Plan>(), Ok(plan));
                    }
                }
            }
            Err(r) => check_refusal(&r),
        }
    }

    for field in ["amount", "balance"] {
        match count_field(&body, field) {
            Ok(n) => assert_eq!(body[field].as_u64(), Some(n)),
            Err(r) => check_refusal(&r),
        }
        match credits_field(&body, field) {
            Ok(n) => {
                assert!(n <= MAX_CREDITS);
                assert_eq!(credits_field(&json!({ field: n }), field).as_ref(), Ok(&n));
            }
            Err(r) => check_refusal(&r),
        }
    }

    match session_field(&body) {
        Ok(session) => {
            for (name, value) in [
                ("cookie", &session.cookie),
                ("user_id", &session.user_id),
                ("x_bc", &session.x_bc),
                ("user_agent", &session.user_agent),
            ] {
                assert!(!value.trim().is_empty());
                assert!(http::HeaderValue::from_str(value).is_ok());
                assert_eq!(body["session"][name].as_str(), Some(value.as_str()));
            }
            let again = json!({"session": {
                "cookie": session.cookie, "user_id": session.user_id,
                "x_bc": session.x_bc, "user_agent": session.user_agent,
            }});
            assert!(session_field(&again).ok() == Some(session.clone()));
        }
        Err(r) => check_refusal(&r),
    }
});
