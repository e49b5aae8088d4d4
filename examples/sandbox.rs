//! Runs the sandbox upstream (a local fake of the OnlyFans web API) on its own.
//!
//! ```text
//! cargo run --example sandbox            # listens on 127.0.0.1:8081
//! TOLLGATE_SANDBOX_BIND=127.0.0.1:0 cargo run --example sandbox
//! ```
//!
//! Prints two JSON lines on stdout: the session material of one account
//! (`{user_id, username, cookie, x_bc, user_agent}`, ready for the admin API's `session`) and
//! the signing rules' static part. Controls for curl are under `/_sandbox/` (e.g.
//! `curl -XPOST localhost:8081/_sandbox/fault -d '{"mode":"fail","status":503,"count":2}'`).
//! Stops on Ctrl-C or SIGTERM, letting in-flight requests finish.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use tollgate::sandbox::{sandbox_rules, Sandbox};
    use tracing_subscriber::EnvFilter;

    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let bind = std::env::var("TOLLGATE_SANDBOX_BIND").unwrap_or_else(|_| "127.0.0.1:8081".into());
    let sandbox = Sandbox::new(sandbox_rules());
    let account = sandbox.add_account();
    let server = sandbox
        .bind(bind.as_str())
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;

    let rules = sandbox.rules();
    println!("{}", serde_json::to_string(&account)?);
    println!(
        "{}",
        serde_json::json!({
            "base_url": server.base_url(),
            "app_token": rules.app_token(),
            "static_param": rules.static_param(),
            "prefix": rules.prefix(),
            "suffix": rules.suffix(),
            "revision": rules.revision(),
        })
    );
    eprintln!(
        "sandbox upstream on {} (endpoints under /api2/v2/, controls under /_sandbox/); Ctrl-C to stop",
        server.base_url()
    );

    shutdown_signal().await;
    eprintln!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handling available: run until killed.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
