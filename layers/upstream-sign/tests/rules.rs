//! Every rules layout public feeds use, and the validation of bad documents.

use serde_json::json;
use tollgate_upstream_sign::{sandbox_rules, DynamicRules, RulesError};

const INDEXES: [u8; 32] = [
    0, 0, 0, 2, 3, 5, 6, 8, 10, 12, 14, 16, 17, 18, 19, 20, 20, 22, 22, 24, 25, 26, 28, 30, 31, 35,
    36, 37, 37, 38, 38, 39,
];
const STATIC: &str = "ACYA1lT9csAxnUAvpLcuydYfTggHBHJ7";
const TOKEN: &str = "33d57ade8c02dbc5a333db99ff9ae26a";
// The prefix-style test vector of UPSTREAM.md, reused for every layout.
const PATH: &str = "/api2/v2/init";
const TIME: u64 = 1_672_505_467_206;
const SIGN: &str = "6437:d685ce0063c19ce301ff42c544eae570388b0697:77e:63aee19d";

fn parse(doc: serde_json::Value) -> Result<DynamicRules, RulesError> {
    DynamicRules::from_json(&doc.to_string())
}

fn assert_vector(rules: &DynamicRules) {
    assert_eq!(rules.sign_at(PATH, "0", TIME).sign, SIGN);
}

#[test]
fn fixture_files_match_the_vectors() {
    let format = DynamicRules::from_json(include_str!("fixtures/rules-format-style.json")).unwrap();
    assert_eq!(
        format.sign_at("/api2/v2/init", "0", 1_675_150_502_748).sign,
        "6820:148f109177631164a099641019e951d9f0c1edf7:7db:63d81407"
    );
    let prefix = DynamicRules::from_json(include_str!("fixtures/rules-prefix-style.json")).unwrap();
    assert_vector(&prefix);
    let current = DynamicRules::from_json(include_str!("fixtures/rules-current.json")).unwrap();
    assert_eq!(current, sandbox_rules());
}

#[test]
fn prefix_suffix_layout() {
    let rules = parse(json!({
        "static_param": STATIC, "prefix": "6437", "suffix": "63aee19d",
        "checksum_indexes": INDEXES, "checksum_constant": -386, "app_token": TOKEN
    }))
    .unwrap();
    assert_vector(&rules);
    assert_eq!(rules.app_token(), TOKEN);
}

#[test]
fn start_end_layout() {
    let rules = parse(json!({
        "static_param": STATIC, "start": "6437", "end": "63aee19d",
        "checksum_indexes": INDEXES, "checksum_constant": -386, "app_token": TOKEN
    }))
    .unwrap();
    assert_vector(&rules);
}

#[test]
fn format_layout() {
    let rules = parse(json!({
        "static_param": STATIC, "format": "6437:{}:{:x}:63aee19d",
        "checksum_indexes": INDEXES, "checksum_constant": -386, "app_token": TOKEN
    }))
    .unwrap();
    assert_vector(&rules);
}

#[test]
fn indexes_as_a_json_list_inside_a_string() {
    let rules = parse(json!({
        "static_param": STATIC, "prefix": "6437", "suffix": "63aee19d",
        "checksum_indexes": serde_json::to_string(&INDEXES).unwrap(),
        "checksum_constant": -386, "app_token": TOKEN
    }))
    .unwrap();
    assert_vector(&rules);
}

#[test]
fn per_index_constants_alone_give_the_constant() {
    let mut constants = vec![0i64; 32];
    constants[0] = -400;
    constants[5] = 14;
    let rules = parse(json!({
        "static_param": STATIC, "format": "6437:{}:{:x}:63aee19d",
        "checksum_indexes": INDEXES, "checksum_constants": constants, "app_token": TOKEN
    }))
    .unwrap();
    assert_eq!(rules.checksum_constant(), -386);
    assert_vector(&rules);
}

#[test]
fn per_index_constants_must_sum_to_the_constant() {
    let constants = vec![-12i64; 32]; // sums to -384, not -386
    let err = parse(json!({
        "static_param": STATIC, "prefix": "6437", "suffix": "63aee19d",
        "checksum_indexes": INDEXES, "checksum_constants": constants,
        "checksum_constant": -386, "app_token": TOKEN
    }))
    .unwrap_err();
    assert!(matches!(err, RulesError::Conflict(_)), "{err:?}");
}

#[test]
fn all_spellings_together_must_agree() {
    let ok = parse(json!({
        "static_param": STATIC, "prefix": "6437", "suffix": "63aee19d",
        "start": "6437", "end": "63aee19d", "format": "6437:{}:{:x}:63aee19d",
        "checksum_indexes": INDEXES, "checksum_constant": -386, "app_token": TOKEN
    }))
    .unwrap();
    assert_vector(&ok);

    let err = parse(json!({
        "static_param": STATIC, "prefix": "6437", "suffix": "63aee19d",
        "format": "6438:{}:{:x}:63aee19d",
        "checksum_indexes": INDEXES, "checksum_constant": -386, "app_token": TOKEN
    }))
    .unwrap_err();
    assert!(matches!(err, RulesError::Conflict(_)), "{err:?}");
}

#[test]
fn numbers_given_as_strings_are_accepted() {
    let rules = parse(json!({
        "static_param": STATIC, "prefix": 6437, "suffix": "63aee19d",
        "checksum_indexes": INDEXES, "checksum_constant": "-386", "app_token": TOKEN
    }))
    .unwrap();
    assert_vector(&rules);
}

#[test]
fn bad_documents_are_refused_with_the_reason() {
    let base = json!({
        "static_param": STATIC, "prefix": "6437", "suffix": "63aee19d",
        "checksum_indexes": INDEXES, "checksum_constant": -386, "app_token": TOKEN
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut doc = base.clone();
        doc[key] = value;
        parse(doc)
    };
    let without = |key: &str| {
        let mut doc = base.clone();
        doc.as_object_mut().unwrap().remove(key);
        parse(doc)
    };

    assert!(matches!(
        DynamicRules::from_json("not json"),
        Err(RulesError::Json(_))
    ));
    assert!(matches!(
        DynamicRules::from_json("[1,2]"),
        Err(RulesError::Json(_))
    ));
    assert_eq!(
        without("static_param"),
        Err(RulesError::Missing("static_param"))
    );
    assert_eq!(without("app_token"), Err(RulesError::Missing("app_token")));
    assert_eq!(without("prefix"), Err(RulesError::Missing("prefix")));
    assert_eq!(without("suffix"), Err(RulesError::Missing("suffix")));
    assert_eq!(
        without("checksum_indexes"),
        Err(RulesError::Missing("checksum_indexes"))
    );
    assert_eq!(
        without("checksum_constant"),
        Err(RulesError::Missing("checksum_constant"))
    );

    let field_of = |r: Result<DynamicRules, RulesError>| match r {
        Err(RulesError::Invalid { field, .. }) => field,
        other => panic!("expected Invalid, got {other:?}"),
    };
    assert_eq!(
        field_of(with("checksum_indexes", json!([]))),
        "checksum_indexes"
    );
    assert_eq!(
        field_of(with("checksum_indexes", json!([0, 40]))),
        "checksum_indexes"
    );
    assert_eq!(
        field_of(with("checksum_indexes", json!([-1]))),
        "checksum_indexes"
    );
    assert_eq!(
        field_of(with("checksum_indexes", json!([1.5]))),
        "checksum_indexes"
    );
    assert_eq!(
        field_of(with("checksum_indexes", json!("[0, 1"))),
        "checksum_indexes"
    );
    assert_eq!(
        field_of(with("checksum_indexes", json!({"a": 1}))),
        "checksum_indexes"
    );
    assert_eq!(
        field_of(with("checksum_constant", json!("abc"))),
        "checksum_constant"
    );
    assert_eq!(
        field_of(with("checksum_constant", json!(i64::MAX))),
        "checksum_constant"
    );
    assert_eq!(field_of(with("app_token", json!(["x"]))), "app_token");
    assert_eq!(
        field_of(with("format", json!("6437:{}:63aee19d"))),
        "format"
    );
}

#[test]
fn any_non_empty_index_count_is_accepted() {
    let rules = parse(json!({
        "static_param": STATIC, "prefix": "1", "suffix": "2",
        "checksum_indexes": [39], "checksum_constant": 0, "app_token": TOKEN
    }))
    .unwrap();
    let sig = rules.sign_at("/x", "0", 1);
    assert!(rules.verify("/x", "0", "1", &sig.sign));
}

#[test]
fn raw_query_is_signed_exactly_as_given() {
    let rules = sandbox_rules();
    let sig = rules.sign_at("/api2/v2/chats?a=%20b&c=d", "7", 1_700_000_000_000);
    assert!(rules.verify("/api2/v2/chats?a=%20b&c=d", "7", &sig.time, &sig.sign));
    assert!(!rules.verify("/api2/v2/chats?a= b&c=d", "7", &sig.time, &sig.sign));
    assert!(!rules.verify("/api2/v2/chats", "7", &sig.time, &sig.sign));
}
