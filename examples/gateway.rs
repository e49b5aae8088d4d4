//! The turnkey gateway as an example: `cargo run --release --example gateway` runs exactly
//! the `tollgate` binary (`src/bin/tollgate.rs`), so the README's command works on a fresh
//! clone without installing anything. `-- --help` lists the settings.

use std::process::ExitCode;

// The binary's allocator (see src/bin/tollgate.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tollgate::gateway::cli::run().await
}
