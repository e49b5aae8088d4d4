//! The command line: every setting is a `--flag` and an environment variable (the flag wins),
//! described with its default in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};

use crate::gateway::config::{defaults, parse_burst, AdminBind};

const ABOUT: &str = "A metered, multi-tenant API gateway in front of the OnlyFans web API.";

const LONG_ABOUT: &str = "\
A metered, multi-tenant API gateway in front of the OnlyFans web API: API keys, per-org \
per-model sliding-window rate limits, credits charged only for successful responses, request \
logs, an admin API.

With nothing configured it runs the demo: in-memory backends, the sandbox upstream in-process, \
a demo org, model and key printed with a ready curl line, and every endpoint on one listener.";

const AFTER_HELP: &str = "\
Every setting is also read from the environment variable shown with it; a flag wins over its \
variable. Secrets (admin token, session key, database URL, signer token) may instead be read \
from a file named by the variable with a _FILE suffix, e.g. TOLLGATE_ADMIN_TOKEN_FILE; their \
values are never printed. Documentation: docs/configuration.md in the repository.";

/// The `tollgate` command line.
#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    // The same usage line whichever program runs it (the binary or the gateway example).
    bin_name = "tollgate",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub(super) listeners: Listeners,
    #[command(flatten)]
    pub(super) backends: BackendArgs,
    #[command(flatten)]
    pub(super) upstream: UpstreamArgs,
    #[command(flatten)]
    pub(super) limits: Limits,
    #[command(flatten)]
    pub(super) dashboard: DashboardArgs,
    #[command(flatten)]
    pub(super) operation: Operation,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Listeners")]
pub(super) struct Listeners {
    /// The public listener: the customer API (/api), the dashboard (/dashboard) and /healthz.
    #[arg(long, env = "TOLLGATE_BIND", value_name = "HOST:PORT", default_value = defaults::BIND)]
    pub(super) bind: SocketAddr,

    /// The internal listener: /admin, /metrics, /readyz and /healthz; `public` serves them on
    /// the public listener instead. Default: 127.0.0.1:8001, or `public` in demo mode.
    #[arg(long, env = "TOLLGATE_ADMIN_BIND", value_name = "HOST:PORT|public")]
    pub(super) admin_bind: Option<AdminBind>,

    /// Bearer token of the admin API (at least 8 characters). Unset: the admin API is off.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(super) admin_token: Option<String>,

    /// A file holding the admin token (instead of TOLLGATE_ADMIN_TOKEN).
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "admin_token"
    )]
    pub(super) admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Backends")]
pub(super) struct BackendArgs {
    /// PostgreSQL for keys, orgs, models, credits and logs (migrations run at start). Unset:
    /// in-memory backends.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub(super) database_url: Option<String>,

    /// A file holding the PostgreSQL URL (instead of DATABASE_URL).
    #[arg(
        long,
        env = "DATABASE_URL_FILE",
        value_name = "PATH",
        conflicts_with = "database_url"
    )]
    pub(super) database_url_file: Option<PathBuf>,

    /// Connections of each replica's request-path pool (key lookups, sessions, holds and
    /// charges); each replica also opens 8 for the admin API, logs and jobs, and 2 listeners.
    /// Keep replicas × (this + 10) under PostgreSQL's max_connections.
    #[arg(
        long,
        env = "TOLLGATE_DATABASE_POOL_SIZE",
        value_name = "N",
        default_value_t = 32,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub(super) database_pool_size: u16,

    /// 32-byte key (64 hex digits) encrypting model sessions at rest; required with
    /// DATABASE_URL. Unset: generated (memory backends only).
    #[arg(
        long,
        env = "TOLLGATE_SESSION_KEY",
        value_name = "HEX",
        hide_env_values = true
    )]
    pub(super) session_key: Option<String>,

    /// A file holding the session key (instead of TOLLGATE_SESSION_KEY).
    #[arg(
        long,
        env = "TOLLGATE_SESSION_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "session_key"
    )]
    pub(super) session_key_file: Option<PathBuf>,

    /// Redis for the rate limits (redis://… or redis+cluster://… for Cluster). Unset: the
    /// in-process limiter.
    #[arg(long, env = "REDIS_URL", value_name = "URL", hide_env_values = true)]
    pub(super) redis_url: Option<String>,

    /// What rate limiting does while Redis is unreachable: `open` decides locally (logged),
    /// `closed` answers 503 SERVICE_UNAVAILABLE.
    #[arg(long, env = "TOLLGATE_RATE_LIMIT_FAILURE", value_enum, default_value_t = Failure::Open)]
    pub(super) rate_limit_failure: Failure,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Upstream and signing")]
pub(super) struct UpstreamArgs {
    /// Upstream base URL, e.g. https://onlyfans.com (paths go to /api2/v2/… under it). Unset:
    /// the sandbox upstream, in-process.
    #[arg(long, env = "TOLLGATE_UPSTREAM", value_name = "URL")]
    pub(super) upstream: Option<String>,

    /// Upstream response timeout (milliseconds): past it the answer is 504 UPSTREAM_TIMEOUT.
    #[arg(long, env = "TOLLGATE_UPSTREAM_TIMEOUT_MS", value_name = "MS",
          default_value_t = defaults::UPSTREAM_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) upstream_timeout_ms: u64,

    /// Signing rules JSON file, re-read within 5 s of a change (an invalid new file is logged
    /// and the last good rules stay). Unset: the sandbox rules.
    #[arg(long, env = "TOLLGATE_SIGN_RULES", value_name = "PATH")]
    pub(super) sign_rules: Option<PathBuf>,

    /// Remote signing service (http:// or https://): POST {"path","user_id"} →
    /// {"sign","time","app_token"}. Overrides the rules. Unset: the rules sign.
    #[arg(
        long,
        env = "TOLLGATE_SIGNER_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub(super) signer_url: Option<String>,

    /// Bearer token sent to the remote signer (Authorization: Bearer …). Unset: none.
    #[arg(
        long,
        env = "TOLLGATE_SIGNER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(super) signer_token: Option<String>,

    /// A file holding the signer token (instead of TOLLGATE_SIGNER_TOKEN).
    #[arg(
        long,
        env = "TOLLGATE_SIGNER_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "signer_token"
    )]
    pub(super) signer_token_file: Option<PathBuf>,

    /// Remote signer timeout (milliseconds): past it the answer is 502 SIGNING_FAILED.
    #[arg(long, env = "TOLLGATE_SIGNER_TIMEOUT_MS", value_name = "MS",
          default_value_t = defaults::SIGNER_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) signer_timeout_ms: u64,

    /// PEM file of certificate authorities trusted for outgoing https:// (upstream and
    /// signer), besides the built-in web PKI roots. Unset: the web PKI roots only.
    #[arg(long, env = "TOLLGATE_CA_FILE", value_name = "PATH")]
    pub(super) ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Limits")]
pub(super) struct Limits {
    /// Sliding window length (milliseconds); shorter only for tests.
    #[arg(long, env = "TOLLGATE_WINDOW_MS", value_name = "MS",
          default_value_t = defaults::WINDOW_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) window_ms: u64,

    /// Per-second burst limit of each plan (plans left out keep their default).
    #[arg(long, env = "TOLLGATE_BURST", value_name = "PLAN=N,…",
          default_value = defaults::BURST, value_parser = burst)]
    pub(super) burst: Burst,

    /// Largest request body (bytes): past it the answer is 413 PAYLOAD_TOO_LARGE.
    #[arg(long, env = "TOLLGATE_BODY_LIMIT", value_name = "BYTES",
          default_value_t = defaults::BODY_LIMIT, value_parser = positive_usize)]
    pub(super) body_limit: usize,

    /// Open connections on the public listener; further ones wait, unaccepted, until one
    /// closes (idle keep-alive connections close after 30 s).
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS", value_name = "N",
          default_value_t = defaults::MAX_CONNECTIONS, value_parser = positive_usize)]
    pub(super) max_connections: usize,

    /// How long a credit hold may stay open before the sweeper releases it (milliseconds;
    /// the holds of a crashed replica). Must exceed the upstream timeout.
    #[arg(long, env = "TOLLGATE_HOLD_TTL_MS", value_name = "MS",
          default_value_t = defaults::HOLD_TTL_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) hold_ttl_ms: u64,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Dashboard")]
pub(super) struct DashboardArgs {
    /// `1`: the dashboard's session cookie without `Secure` (and invite links with http://),
    /// for plain HTTP on loopback; browsers drop `Secure` cookies sent over HTTP. `0`: the
    /// cookie is `Secure` (TLS in front of the gateway).
    #[arg(long, env = "TOLLGATE_DASHBOARD_INSECURE_COOKIES", value_name = "1|0",
          default_value = "0", value_parser = toggle)]
    pub(super) dashboard_insecure_cookies: Toggle,
    /// `1`: webhook endpoints may use http:// and loopback, private, link-local or metadata
    /// addresses (for tests and receivers on loopback). `0`: only https:// endpoints on
    /// public addresses, checked after DNS resolution at registration and every delivery.
    #[arg(long, env = "TOLLGATE_WEBHOOK_ALLOW_PRIVATE", value_name = "1|0",
          default_value = "0", value_parser = toggle)]
    pub(super) webhook_allow_private: Toggle,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Operation")]
pub(super) struct Operation {
    /// Seed a demo org (basic plan), model and key, and print them. Default: on when no
    /// DATABASE_URL, REDIS_URL or TOLLGATE_UPSTREAM is set.
    #[arg(long, env = "TOLLGATE_DEMO", value_name = "on|off", value_parser = toggle)]
    pub(super) demo: Option<Toggle>,

    /// On SIGTERM/SIGINT, how long to wait for requests in flight (milliseconds) before
    /// dropping them (nothing is charged for those). A second signal exits at once.
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT_MS", value_name = "MS",
          default_value_t = defaults::DRAIN_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) drain_timeout_ms: u64,

    /// Log line format (lines go to stderr; the demo banner to stdout).
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = Format::Text)]
    pub(super) log_format: Format,

    /// Log filter (tracing's EnvFilter syntax, e.g. `info,tollgate=debug`).
    #[arg(long = "log", env = "RUST_LOG", value_name = "FILTER", default_value = defaults::LOG_FILTER)]
    pub(super) log_filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Failure {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Burst(pub(super) [u32; 4]);

#[derive(Debug, Clone, Copy)]
pub(super) struct Toggle(pub(super) bool);

fn burst(value: &str) -> Result<Burst, String> {
    parse_burst(value).map(Burst)
}

fn toggle(value: &str) -> Result<Toggle, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(Toggle(true)),
        "0" | "false" | "off" | "no" => Ok(Toggle(false)),
        _ => Err("expected on or off (or 1 or 0)".to_owned()),
    }
}

fn positive_usize(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| "expected a positive whole number".to_owned())
}
