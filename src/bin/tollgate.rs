//! `tollgate`: the turnkey gateway. `cargo install --path .` installs it; `tollgate --help`
//! lists every setting with its environment variable, default and meaning.

use std::process::ExitCode;

// A gateway allocates a little per request on every worker thread; mimalloc's per-thread
// heaps avoid the contention glibc's arenas show under load (measured by benches/load.rs).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tollgate::gateway::cli::run().await
}
