//! The turnkey gateway: `cargo run --release --example gateway`.
//!
//! With no configuration it runs on memory backends with the sandbox upstream in-process and
//! prints a demo key and a ready curl line. Configuration: SPEC §8 (`--help`).

use std::process::ExitCode;

// A gateway allocates a little per request on every worker thread; mimalloc's per-thread
// heaps avoid the contention glibc's arenas show under load (measured by benches/load.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use tollgate::gateway::{self, Config};

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        print!("{}", gateway::config::usage());
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env_and_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log_filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let running = match gateway::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("tollgate listening on {}", running.base_url());
    if let Some(demo) = running.demo() {
        println!("demo org:   {}", demo.org);
        println!("demo model: {}", demo.model);
        println!("demo key:   {}", demo.key);
        if let Some(curl) = running.demo_curl() {
            println!("try:\n  {curl}");
        }
    }

    wait_for_signal().await;
    println!("shutting down: finishing requests in flight, flushing logs");
    running.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
