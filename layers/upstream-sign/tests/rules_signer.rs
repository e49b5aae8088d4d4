//! `RulesSigner`: clock, programmatic rotation, and the file watcher.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::ManualClock;
use tollgate_upstream_sign::{
    sandbox_rules, DynamicRules, RulesFileError, RulesSigner, Signer, SANDBOX_RULES_JSON,
};

const PREFIX_STYLE: &str = include_str!("fixtures/rules-prefix-style.json");
const FORMAT_STYLE: &str = include_str!("fixtures/rules-format-style.json");

/// A fresh file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(content: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "tollgate-rules-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, content).unwrap();
        TempFile(path)
    }

    /// Replaces the content the way deploy tools do: write aside, then rename over.
    fn rotate(&self, content: &str) {
        let aside = self.0.with_extension("tmp");
        std::fs::write(&aside, content).unwrap();
        std::fs::rename(&aside, &self.0).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits (real time, bounded) until the signer's generation reaches `n`.
async fn wait_generation(signer: &RulesSigner, n: u64, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if signer.generation() >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signer.generation() >= n
}

#[tokio::test]
async fn signs_with_the_clock_time() {
    let clock = ManualClock::new(1_672_505_467_206);
    let signer = RulesSigner::new(DynamicRules::from_json(PREFIX_STYLE).unwrap())
        .with_clock(Arc::new(clock.clone()));
    let sig = signer.sign("/api2/v2/init", "0").await.unwrap();
    assert_eq!(
        sig.sign,
        "6437:d685ce0063c19ce301ff42c544eae570388b0697:77e:63aee19d"
    );
    assert_eq!(sig.time, "1672505467206");
    clock.advance(Duration::from_millis(1));
    assert_eq!(signer.sign_now("/api2/v2/init", "0").time, "1672505467207");
}

#[test]
fn replace_is_seen_by_clones_and_spares_taken_rules() {
    let signer = RulesSigner::new(sandbox_rules());
    let clone = signer.clone();
    let taken = signer.current();
    let new = DynamicRules::from_json(FORMAT_STYLE).unwrap();
    signer.replace(new.clone());
    assert_eq!(*clone.current(), new);
    assert_eq!(clone.generation(), 1);
    // An `Arc` taken before the rotation still holds the old rules.
    assert_eq!(*taken, sandbox_rules());
    let sig = clone.sign_now("/p", "1");
    assert!(new.verify("/p", "1", &sig.time, &sig.sign));
    assert!(!sandbox_rules().verify("/p", "1", &sig.time, &sig.sign));
}

#[test]
fn from_file_reports_what_is_wrong() {
    let good = TempFile::new(SANDBOX_RULES_JSON);
    assert_eq!(
        *RulesSigner::from_file(&good.0).unwrap().current(),
        sandbox_rules()
    );

    let bad = TempFile::new(r#"{"static_param": "x"}"#);
    assert!(matches!(
        RulesSigner::from_file(&bad.0),
        Err(RulesFileError::Invalid { .. })
    ));
    let missing = std::env::temp_dir().join("tollgate-no-such-rules.json");
    assert!(matches!(
        RulesSigner::from_file(&missing),
        Err(RulesFileError::Io { .. })
    ));
}

#[tokio::test]
async fn watcher_follows_rotations_and_keeps_the_last_good_rules() {
    let file = TempFile::new(SANDBOX_RULES_JSON);
    let poll = Duration::from_millis(20);
    let (signer, watcher) = RulesSigner::watch(&file.0, poll).unwrap();
    assert_eq!(watcher.path(), file.0.as_path());
    assert_eq!(*signer.current(), sandbox_rules());

    // Unchanged content is not reloaded.
    tokio::time::sleep(poll * 5).await;
    assert_eq!(signer.generation(), 0);

    file.rotate(PREFIX_STYLE);
    assert!(wait_generation(&signer, 1, Duration::from_secs(5)).await);
    assert_eq!(
        *signer.current(),
        DynamicRules::from_json(PREFIX_STYLE).unwrap()
    );

    // An invalid file (bad JSON, then bad rules, then none at all) changes nothing.
    file.rotate("{ not json");
    tokio::time::sleep(poll * 5).await;
    file.rotate(r#"{"static_param":"x","prefix":"1","suffix":"2","checksum_indexes":[40],"checksum_constant":1,"app_token":"t"}"#);
    tokio::time::sleep(poll * 5).await;
    std::fs::remove_file(&file.0).unwrap();
    tokio::time::sleep(poll * 5).await;
    assert_eq!(signer.generation(), 1);
    assert_eq!(
        *signer.current(),
        DynamicRules::from_json(PREFIX_STYLE).unwrap()
    );
    let sig = signer.sign("/api2/v2/init", "0").await.unwrap();
    assert!(DynamicRules::from_json(PREFIX_STYLE).unwrap().verify(
        "/api2/v2/init",
        "0",
        &sig.time,
        &sig.sign
    ));

    // The next good file is picked up.
    file.rotate(FORMAT_STYLE);
    assert!(wait_generation(&signer, 2, Duration::from_secs(5)).await);
    assert_eq!(
        *signer.current(),
        DynamicRules::from_json(FORMAT_STYLE).unwrap()
    );

    // Stopped: further changes are ignored.
    assert!(watcher.is_running());
    watcher.stop();
    file.rotate(SANDBOX_RULES_JSON);
    tokio::time::sleep(poll * 5).await;
    assert_eq!(signer.generation(), 2);
}

#[tokio::test]
async fn watcher_on_an_existing_signer_starts_from_the_file() {
    let file = TempFile::new(PREFIX_STYLE);
    let signer = RulesSigner::new(sandbox_rules());
    let _watcher = signer.spawn_watcher(&file.0, Duration::from_millis(20));
    assert!(wait_generation(&signer, 1, Duration::from_secs(5)).await);
    assert_eq!(
        *signer.current(),
        DynamicRules::from_json(PREFIX_STYLE).unwrap()
    );
}

#[tokio::test]
async fn default_interval_picks_a_change_up_within_five_seconds() {
    let file = TempFile::new(SANDBOX_RULES_JSON);
    let (signer, _watcher) =
        RulesSigner::watch(&file.0, tollgate_upstream_sign::DEFAULT_RULES_POLL_INTERVAL).unwrap();
    file.rotate(FORMAT_STYLE);
    assert!(wait_generation(&signer, 1, Duration::from_secs(5)).await);
}

#[test]
fn watch_refuses_an_invalid_first_file() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let bad = TempFile::new("[]");
    assert!(matches!(
        RulesSigner::watch(&bad.0, Duration::from_millis(10)),
        Err(RulesFileError::Invalid { .. })
    ));
}
