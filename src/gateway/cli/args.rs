//! The command line: every setting is a `--flag` and an environment variable (the flag wins),
//! described with its default in `--help`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::gateway::config::{
    defaults, parse_burst, parse_key, redact_url, AdminBind, Config, ConfigError, LogFormat,
    RateLimitFailure,
};

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
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    listeners: Listeners,
    #[command(flatten)]
    backends: BackendArgs,
    #[command(flatten)]
    upstream: UpstreamArgs,
    #[command(flatten)]
    limits: Limits,
    #[command(flatten)]
    operation: Operation,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Listeners")]
struct Listeners {
    /// The public listener: the customer API (/api) and /healthz.
    #[arg(long, env = "TOLLGATE_BIND", value_name = "HOST:PORT", default_value = defaults::BIND)]
    bind: SocketAddr,

    /// The internal listener: /admin, /metrics, /readyz and /healthz; `public` serves them on
    /// the public listener instead. Default: 127.0.0.1:8001, or `public` in demo mode.
    #[arg(long, env = "TOLLGATE_ADMIN_BIND", value_name = "HOST:PORT|public")]
    admin_bind: Option<AdminBind>,

    /// Bearer token of the admin API (at least 8 characters). Unset: the admin API is off.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,

    /// A file holding the admin token (instead of TOLLGATE_ADMIN_TOKEN).
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "admin_token"
    )]
    admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Backends")]
struct BackendArgs {
    /// PostgreSQL for keys, orgs, models, credits and logs (migrations run at start). Unset:
    /// in-memory backends.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,

    /// A file holding the PostgreSQL URL (instead of DATABASE_URL).
    #[arg(
        long,
        env = "DATABASE_URL_FILE",
        value_name = "PATH",
        conflicts_with = "database_url"
    )]
    database_url_file: Option<PathBuf>,

    /// 32-byte key (64 hex digits) encrypting model sessions at rest; required with
    /// DATABASE_URL. Unset: generated (memory backends only).
    #[arg(
        long,
        env = "TOLLGATE_SESSION_KEY",
        value_name = "HEX",
        hide_env_values = true
    )]
    session_key: Option<String>,

    /// A file holding the session key (instead of TOLLGATE_SESSION_KEY).
    #[arg(
        long,
        env = "TOLLGATE_SESSION_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "session_key"
    )]
    session_key_file: Option<PathBuf>,

    /// Redis for the rate limits (redis://… or redis+cluster://… for Cluster). Unset: the
    /// in-process limiter.
    #[arg(long, env = "REDIS_URL", value_name = "URL", hide_env_values = true)]
    redis_url: Option<String>,

    /// What rate limiting does while Redis is unreachable: `open` decides locally (logged),
    /// `closed` answers 503 SERVICE_UNAVAILABLE.
    #[arg(long, env = "TOLLGATE_RATE_LIMIT_FAILURE", value_enum, default_value_t = Failure::Open)]
    rate_limit_failure: Failure,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Upstream and signing")]
struct UpstreamArgs {
    /// Upstream base URL, e.g. https://onlyfans.com (paths go to /api2/v2/… under it). Unset:
    /// the sandbox upstream, in-process.
    #[arg(long, env = "TOLLGATE_UPSTREAM", value_name = "URL")]
    upstream: Option<String>,

    /// Upstream response timeout (milliseconds): past it the answer is 504 UPSTREAM_TIMEOUT.
    #[arg(long, env = "TOLLGATE_UPSTREAM_TIMEOUT_MS", value_name = "MS",
          default_value_t = defaults::UPSTREAM_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    upstream_timeout_ms: u64,

    /// Signing rules JSON file, re-read within 5 s of a change (an invalid new file is logged
    /// and the last good rules stay). Unset: the sandbox rules.
    #[arg(long, env = "TOLLGATE_SIGN_RULES", value_name = "PATH")]
    sign_rules: Option<PathBuf>,

    /// Remote signing service (http:// or https://): POST {"path","user_id"} →
    /// {"sign","time","app_token"}. Overrides the rules. Unset: the rules sign.
    #[arg(
        long,
        env = "TOLLGATE_SIGNER_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    signer_url: Option<String>,

    /// Bearer token sent to the remote signer (Authorization: Bearer …). Unset: none.
    #[arg(
        long,
        env = "TOLLGATE_SIGNER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    signer_token: Option<String>,

    /// A file holding the signer token (instead of TOLLGATE_SIGNER_TOKEN).
    #[arg(
        long,
        env = "TOLLGATE_SIGNER_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "signer_token"
    )]
    signer_token_file: Option<PathBuf>,

    /// Remote signer timeout (milliseconds): past it the answer is 502 SIGNING_FAILED.
    #[arg(long, env = "TOLLGATE_SIGNER_TIMEOUT_MS", value_name = "MS",
          default_value_t = defaults::SIGNER_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    signer_timeout_ms: u64,

    /// PEM file of certificate authorities trusted for outgoing https:// (upstream and
    /// signer), besides the built-in web PKI roots. Unset: the web PKI roots only.
    #[arg(long, env = "TOLLGATE_CA_FILE", value_name = "PATH")]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Limits")]
struct Limits {
    /// Sliding window length (milliseconds); shorter only for tests.
    #[arg(long, env = "TOLLGATE_WINDOW_MS", value_name = "MS",
          default_value_t = defaults::WINDOW_MS, value_parser = clap::value_parser!(u64).range(1..))]
    window_ms: u64,

    /// Per-second burst limit of each plan (plans left out keep their default).
    #[arg(long, env = "TOLLGATE_BURST", value_name = "PLAN=N,…",
          default_value = defaults::BURST, value_parser = burst)]
    burst: Burst,

    /// Largest request body (bytes): past it the answer is 413 PAYLOAD_TOO_LARGE.
    #[arg(long, env = "TOLLGATE_BODY_LIMIT", value_name = "BYTES",
          default_value_t = defaults::BODY_LIMIT, value_parser = positive_usize)]
    body_limit: usize,

    /// Open connections on the public listener; further ones wait, unaccepted, until one
    /// closes (idle keep-alive connections close after 30 s).
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS", value_name = "N",
          default_value_t = defaults::MAX_CONNECTIONS, value_parser = positive_usize)]
    max_connections: usize,

    /// How long a credit hold may stay open before the sweeper releases it (milliseconds;
    /// the holds of a crashed replica). Must exceed the upstream timeout.
    #[arg(long, env = "TOLLGATE_HOLD_TTL_MS", value_name = "MS",
          default_value_t = defaults::HOLD_TTL_MS, value_parser = clap::value_parser!(u64).range(1..))]
    hold_ttl_ms: u64,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Operation")]
struct Operation {
    /// Seed a demo org (basic plan), model and key, and print them. Default: on when no
    /// DATABASE_URL, REDIS_URL or TOLLGATE_UPSTREAM is set.
    #[arg(long, env = "TOLLGATE_DEMO", value_name = "on|off", value_parser = toggle)]
    demo: Option<Toggle>,

    /// On SIGTERM/SIGINT, how long to wait for requests in flight (milliseconds) before
    /// dropping them (nothing is charged for those). A second signal exits at once.
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT_MS", value_name = "MS",
          default_value_t = defaults::DRAIN_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    drain_timeout_ms: u64,

    /// Log line format (lines go to stderr; the demo banner to stdout).
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = Format::Text)]
    log_format: Format,

    /// Log filter (tracing's EnvFilter syntax, e.g. `info,tollgate=debug`).
    #[arg(long = "log", env = "RUST_LOG", value_name = "FILTER", default_value = defaults::LOG_FILTER)]
    log_filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Failure {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy)]
struct Burst([u32; 4]);

#[derive(Debug, Clone, Copy)]
struct Toggle(bool);

fn burst(value: &str) -> Result<Burst, String> {
    parse_burst(value).map(Burst)
}

fn toggle(value: &str) -> Result<Toggle, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(Toggle(true)),
        "0" | "false" | "off" | "no" => Ok(Toggle(false)),
        _ => Err("expected on or off".to_owned()),
    }
}

fn positive_usize(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| "expected a positive whole number".to_owned())
}

/// A secret given directly or through a file.
fn secret(
    direct: Option<String>,
    file: Option<&Path>,
    file_var: &str,
) -> Result<Option<String>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{file_var}: cannot read {}: {e}", path.display())))?;
        // Files written by editors and `echo` end in a newline that is no part of the secret.
        let value = text.trim_end_matches(['\r', '\n']).to_owned();
        if value.trim().is_empty() {
            return Err(ConfigError(format!(
                "{file_var}: {} is empty",
                path.display()
            )));
        }
        return Ok(Some(value));
    }
    Ok(direct)
}

fn http_url(var: &str, value: &str) -> Result<String, ConfigError> {
    let url: http::Uri = value
        .parse()
        .map_err(|_| ConfigError(format!("{var}: not a URL (got {:?})", redact_url(value))))?;
    match (url.scheme_str(), url.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(value.to_owned()),
        _ => Err(ConfigError(format!(
            "{var}: expected an http:// or https:// URL with a host (got {:?})",
            redact_url(value)
        ))),
    }
}

impl Cli {
    /// The configuration these arguments describe, with the secrets read from their files
    /// and the settings checked against each other.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let Cli {
            listeners,
            backends,
            upstream,
            limits,
            operation,
        } = self;
        let admin_token = secret(
            listeners.admin_token,
            listeners.admin_token_file.as_deref(),
            "TOLLGATE_ADMIN_TOKEN_FILE",
        )?;
        // An empty admin token is refused (by `validate`); other empty values mean unset.
        let database_url = secret(
            backends.database_url,
            backends.database_url_file.as_deref(),
            "DATABASE_URL_FILE",
        )?
        .filter(|v| !v.is_empty());
        let session_key = secret(
            backends.session_key,
            backends.session_key_file.as_deref(),
            "TOLLGATE_SESSION_KEY_FILE",
        )?
        .filter(|v| !v.is_empty())
        .map(|hex| {
            parse_key(&hex).ok_or_else(|| {
                ConfigError(
                    "TOLLGATE_SESSION_KEY: expected 64 hex digits (the value is not shown)"
                        .to_owned(),
                )
            })
        })
        .transpose()?;
        let signer_token = secret(
            upstream.signer_token,
            upstream.signer_token_file.as_deref(),
            "TOLLGATE_SIGNER_TOKEN_FILE",
        )?
        .filter(|v| !v.is_empty());
        let redis_url = backends.redis_url.filter(|v| !v.is_empty());
        let upstream_url = upstream
            .upstream
            .filter(|v| !v.is_empty())
            .map(|v| http_url("TOLLGATE_UPSTREAM", v.trim_end_matches('/')))
            .transpose()?;
        let signer_url = upstream
            .signer_url
            .filter(|v| !v.is_empty())
            .map(|v| http_url("TOLLGATE_SIGNER_URL", &v))
            .transpose()?;
        if let Some(path) = &upstream.ca_file {
            crate::gateway::tls::load_ca_file(path)
                .map_err(|e| ConfigError(format!("TOLLGATE_CA_FILE: {e}")))?;
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&operation.log_filter) {
            return Err(ConfigError(format!("RUST_LOG: {e}")));
        }

        // Demo mode is on when nothing is configured, unless set explicitly.
        let demo = operation.demo.map_or(
            database_url.is_none() && redis_url.is_none() && upstream_url.is_none(),
            |t| t.0,
        );
        let admin_bind = listeners.admin_bind.unwrap_or(if demo {
            AdminBind::Public
        } else {
            AdminBind::DEFAULT
        });
        let config = Config {
            bind: listeners.bind,
            admin_bind,
            admin_token,
            database_url,
            redis_url,
            upstream: upstream_url,
            sign_rules: upstream.sign_rules,
            signer_url,
            signer_token,
            ca_file: upstream.ca_file,
            signer_timeout: Duration::from_millis(upstream.signer_timeout_ms),
            upstream_timeout: Duration::from_millis(upstream.upstream_timeout_ms),
            window: Duration::from_millis(limits.window_ms),
            burst: limits.burst.0,
            rate_limit_failure: match backends.rate_limit_failure {
                Failure::Open => RateLimitFailure::Open,
                Failure::Closed => RateLimitFailure::Closed,
            },
            body_limit: limits.body_limit,
            session_key,
            demo,
            hold_ttl: Duration::from_millis(limits.hold_ttl_ms),
            drain_timeout: Duration::from_millis(operation.drain_timeout_ms),
            max_connections: limits.max_connections,
            log_format: match operation.log_format {
                Format::Text => LogFormat::Text,
                Format::Json => LogFormat::Json,
            },
            log_filter: operation.log_filter,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use clap::FromArgMatches;

    use super::*;

    /// Parses `args` alone: the environment of the test process (CI sets DATABASE_URL for
    /// other tests) is ignored.
    fn parse(args: &[&str]) -> Result<Config, String> {
        let cmd = Cli::command().mut_args(|a| a.env(None));
        let matches = cmd
            .try_get_matches_from(std::iter::once("tollgate").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        cli.into_config().map_err(|e| e.0)
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_contract() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert!(c.demo, "demo is on when nothing is configured");
        assert_eq!(
            c.admin_bind,
            AdminBind::Public,
            "the demo uses one listener"
        );
        assert!(c.admin_token.is_none());
        assert_eq!(c.signer_timeout, Duration::from_millis(2_000));
        assert_eq!(c.upstream_timeout, Duration::from_millis(30_000));
        assert_eq!(c.window, Duration::from_millis(60_000));
        assert_eq!(c.burst, [5, 10, 30, 200]);
        assert_eq!(c.rate_limit_failure, RateLimitFailure::Open);
        assert_eq!(c.body_limit, 1_048_576);
        assert_eq!(c.hold_ttl, Duration::from_millis(300_000));
        assert_eq!(c.drain_timeout, Duration::from_millis(30_000));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_filter, "info");
    }

    #[test]
    fn outside_the_demo_the_admin_api_has_its_own_listener() {
        let c = parse(&["--upstream", "http://127.0.0.1:1/"]).unwrap();
        assert!(!c.demo);
        assert_eq!(c.upstream.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(c.admin_bind.to_string(), "127.0.0.1:8001");
        let c = parse(&["--demo=off", "--admin-bind", "public"]).unwrap();
        assert_eq!(c.admin_bind, AdminBind::Public);
    }

    #[test]
    fn flags_set_each_setting() {
        let c = parse(&[
            "--bind=127.0.0.1:9100",
            "--admin-bind=127.0.0.1:9101",
            "--burst=basic=3",
            "--rate-limit-failure",
            "closed",
            "--window-ms=500",
            "--log-format=json",
            "--max-connections=7",
            "--drain-timeout-ms=1500",
            "--demo=off",
        ])
        .unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:9100");
        assert_eq!(c.admin_bind.to_string(), "127.0.0.1:9101");
        assert_eq!(c.burst, [5, 3, 30, 200]);
        assert_eq!(c.rate_limit_failure, RateLimitFailure::Closed);
        assert_eq!(c.window, Duration::from_millis(500));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.drain_timeout, Duration::from_millis(1_500));
        assert!(!c.demo);
    }

    #[test]
    fn bad_values_say_which_setting() {
        let cases: &[(&[&str], &str)] = &[
            (&["--bind", "nowhere"], "--bind"),
            (&["--burst", "gold=3"], "unknown plan"),
            (&["--burst", "free=0"], "positive"),
            (&["--body-limit=-1"], "--body-limit"),
            (&["--max-connections=0"], "positive"),
            (&["--rate-limit-failure", "maybe"], "open"),
            (&["--upstream", "ftp://x"], "http"),
            (&["--admin-token="], "at least 8"),
            (&["--admin-token=short"], "at least 8"),
            (&["--nope"], "unexpected argument"),
            (&["--bnd=127.0.0.1:1"], "--bind"),
            (&["--log", "foo=bar=baz"], "RUST_LOG"),
            (&["--ca-file", "/nonexistent.pem"], "TOLLGATE_CA_FILE"),
            (&["--database-url", "postgres://x"], "TOLLGATE_SESSION_KEY"),
        ];
        for (args, needle) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn secrets_are_not_echoed_in_errors() {
        let err = parse(&["--session-key", "not-hex-but-secret"]).unwrap_err();
        assert!(err.contains("64 hex"), "{err}");
        assert!(!err.contains("not-hex-but-secret"), "{err}");
        let err = parse(&["--admin-token", "sekret"]).unwrap_err();
        assert!(!err.contains("sekret"), "{err}");
        let err = parse(&["--signer-url", "ftp://user:pw@signer/x?token=t"]).unwrap_err();
        assert!(!err.contains("pw") && !err.contains("token=t"), "{err}");
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = std::env::temp_dir().join(format!("tollgate-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "from-a-file-token\n").unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "cd".repeat(32)).unwrap();
        let c = parse(&[
            "--admin-token-file",
            token.to_str().unwrap(),
            "--session-key-file",
            key.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("from-a-file-token"));
        assert_eq!(c.session_key, Some([0xcd; 32]));
        let err = parse(&["--admin-token=abcdefghij", "--admin-token-file=/x"]).unwrap_err();
        assert!(err.contains("cannot be used with"), "{err}");
        let err = parse(&["--database-url-file", "/nonexistent/db-url"]).unwrap_err();
        assert!(err.contains("DATABASE_URL_FILE"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
