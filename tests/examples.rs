//! The examples run: `examples/axum.rs --self-test` serves the layers on an axum `Router`,
//! calls itself (a priced call, a free one, refused ones) and checks the balance and logs;
//! `examples/gateway.rs` (the README's run command) is the `tollgate` binary.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn example(name: &str) -> PathBuf {
    // <target>/debug/deps/examples-xxxx → <target>/debug/examples/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples (or run `cargo build --example {name}`)",
        path.display()
    );
    path
}

#[test]
fn the_axum_example_serves_the_stack_and_passes_its_self_test() {
    let mut child = Command::new(example("axum"))
        .arg("--self-test")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the axum example starts");
    // Bounded: the self-test takes well under a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                status.success(),
                "self-test failed: {status}\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.contains("self-test ok: balance Some(95), 3 log rows for the org"),
                "{stdout}"
            );
            assert!(
                stdout.contains(r#""_credits":{"balance":95,"used":5}"#),
                "{stdout}"
            );
            return;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the axum example did not finish its self-test within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_gateway_example_is_the_tollgate_binary() {
    for args in [&["--version"][..], &["--help"]] {
        let example = Command::new(example("gateway"))
            .args(args)
            .env_clear()
            .output()
            .expect("the gateway example runs");
        let binary = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env_clear()
            .output()
            .expect("the binary runs");
        assert!(example.status.success(), "{example:?}");
        assert_eq!(
            String::from_utf8_lossy(&example.stdout),
            String::from_utf8_lossy(&binary.stdout),
            "{args:?}"
        );
    }
}
