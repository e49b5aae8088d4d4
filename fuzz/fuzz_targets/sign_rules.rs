//! The signing rules parser: any text is either refused with an error or parsed into rules
//! that sign, verify their own signatures, and survive their own JSON form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::upstream_sign::DynamicRules;

/// A SHA-1 hex digest has 40 characters.
const MAX_CHECKSUM_INDEX: u8 = 39;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rules) = DynamicRules::from_json(text) else {
        return;
    };
    assert!(!rules.checksum_indexes().is_empty());
    assert!(rules
        .checksum_indexes()
        .iter()
        .all(|&i| i <= MAX_CHECKSUM_INDEX));

    // What the rules write is what they read.
    let again = DynamicRules::from_json(&rules.to_json())
        .unwrap_or_else(|e| panic!("to_json is not readable back ({e}): {}", rules.to_json()));
    assert_eq!(again, rules);

    let signature = rules.sign_at("/api2/v2/users/me?x=1", "12345", 1_700_000_000_000);
    assert_eq!(signature.time, "1700000000000");
    assert_eq!(signature.app_token, rules.app_token());
    assert!(signature.sign.starts_with(rules.prefix()));
    assert!(signature.sign.ends_with(rules.suffix()));
    assert!(rules.verify(
        "/api2/v2/users/me?x=1",
        "12345",
        &signature.time,
        &signature.sign
    ));
    assert!(!rules.verify(
        "/api2/v2/users/me?x=2",
        "12345",
        &signature.time,
        &signature.sign
    ));
});
