//! The `tollgate` binary's `main`: read the configuration (exit status 2 on a bad value),
//! set up logging (stderr, text or JSON), start the gateway, print the banner (stdout), and
//! drain on SIGTERM/SIGINT (a second signal exits at once).
//!
//! `src/bin/tollgate.rs` and `examples/gateway.rs` are both thin wrappers over [`run`].

mod args;
mod convert;

use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches};

pub use args::Cli;

use super::config::{Config, LogFormat};
use super::RunningGateway;

/// Exit status when a second signal cuts the drain short (128 + SIGINT, as shells report an
/// interrupted program).
const INTERRUPTED: i32 = 130;

/// Variables read outside the command line (by the test suite, or by parts of the product
/// that read them directly), which are not typos.
const OTHER_VARIABLES: &[&str] = &["TOLLGATE_REQUIRE_SERVICES"];

/// Runs the gateway binary until it is stopped; the exit status follows the outcome.
pub async fn run() -> ExitCode {
    let config = config_or_exit();
    if let Err(e) = init_logging(config.log_format, &config.log_filter) {
        eprintln!("tollgate: {e}");
        return ExitCode::from(2);
    }
    for (name, suggestion) in unknown_variables() {
        match suggestion {
            Some(known) => {
                tracing::warn!(variable = %name, "unknown setting ignored; did you mean {known}?")
            }
            None => tracing::warn!(variable = %name, "unknown setting ignored"),
        }
    }
    let drain = config.drain_timeout;
    let running = match super::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "tollgate could not start");
            return ExitCode::FAILURE;
        }
    };
    print_banner(&running);

    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for signals");
            return ExitCode::FAILURE;
        }
    };
    signals.next().await;
    tracing::info!(
        drain_timeout_ms = drain.as_millis() as u64,
        "shutting down: finishing requests in flight (a second signal exits at once)"
    );
    tokio::select! {
        () = running.shutdown() => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        () = signals.next() => {
            tracing::warn!("second signal: exiting without waiting for requests in flight");
            std::process::exit(INTERRUPTED)
        }
    }
}

/// The configuration of this process's command line and environment; prints the help or
/// the version and exits 0, or prints what is wrong and exits 2.
pub fn config_or_exit() -> Config {
    let matches = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            let var = env_source(&e);
            let code = e.exit_code();
            let _ = e.print();
            if let Some(var) = var {
                eprintln!("(the value comes from the environment variable {var})");
            }
            std::process::exit(code);
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.into_config() {
        Ok(config) => config,
        Err(e) => Cli::command().error(ErrorKind::ValueValidation, e).exit(),
    }
}

/// The command line, where an empty environment variable counts as unset (as
/// `VAR=` in a compose file or a unit means).
fn command() -> clap::Command {
    Cli::command().mut_args(|arg| {
        let empty = arg
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|v| v.is_empty());
        if empty {
            arg.env(None)
        } else {
            arg
        }
    })
}

/// The environment variable a refused value came from, when it did not come from a flag.
fn env_source(e: &clap::Error) -> Option<String> {
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split([' ', '=']).next()?.strip_prefix("--")?;
    let cmd = Cli::command();
    let var = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?
        .get_env()?
        .to_str()?
        .to_owned();
    let from_flag =
        std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    (!from_flag && std::env::var_os(&var).is_some()).then_some(var)
}

/// Log lines to stderr, as text or one JSON object per line.
fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// `TOLLGATE_*` variables in the environment that no setting reads, each with the closest
/// known name when one is close (a typo).
fn unknown_variables() -> Vec<(String, Option<String>)> {
    let cmd = Cli::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .filter_map(|v| v.to_str())
        .chain(OTHER_VARIABLES.iter().copied())
        .map(str::to_owned)
        .collect();
    let mut unknown = Vec::new();
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("TOLLGATE_") || known.iter().any(|k| k == name) {
            continue;
        }
        let suggestion = known
            .iter()
            .map(|k| (strsim::jaro_winkler(name, k), k))
            .filter(|(score, _)| *score > 0.85)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, k)| k.clone());
        unknown.push((name.to_owned(), suggestion));
    }
    unknown
}

/// What the operator needs to know, on stdout (log lines go to stderr).
fn print_banner(running: &RunningGateway) {
    println!("tollgate listening on {}", running.base_url());
    match running.admin_addr() {
        Some(addr) => println!("admin API, /metrics and /readyz on http://{addr}"),
        None => println!("admin API, /metrics and /readyz on the same listener"),
    }
    if let Some(demo) = running.demo() {
        println!("demo org:   {}", demo.org);
        println!("demo model: {}", demo.model);
        println!("demo key:   {}", demo.key);
        println!("dashboard:  {}/dashboard", running.base_url());
        println!(
            "sign in:    {} / {}",
            demo.dashboard_email, demo.dashboard_password
        );
        if let Some(curl) = running.demo_curl() {
            println!("try:\n  {curl}");
        }
    }
}

/// SIGTERM and SIGINT, listened for once for the whole run (a signal arriving between two
/// waits is not lost).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
