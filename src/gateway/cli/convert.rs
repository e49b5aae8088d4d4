//! From the parsed command line to a [`Config`]: secrets read from their files, URLs and keys
//! checked (their values never echoed), the demo's defaults, the settings checked together.

use std::path::Path;
use std::time::Duration;

use super::args::{Cli, Failure, Format};
use crate::gateway::config::{
    parse_key, redact_url, AdminBind, Config, ConfigError, LogFormat, RateLimitFailure,
};

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
            dashboard,
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
            database_pool_size: usize::from(backends.database_pool_size),
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
            dashboard_insecure_cookies: dashboard.dashboard_insecure_cookies.0,
            usage_rollups: true,
            webhook_allow_private: dashboard.webhook_allow_private.0,
            webhook_retry_base: super::super::webhooks::DEFAULT_RETRY_BASE,
            webhook_scan_interval: super::super::webhooks::DEFAULT_SCAN_INTERVAL,
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
        assert_eq!(c.database_pool_size, 32);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.dashboard_insecure_cookies, "session cookies are Secure");
        assert_eq!(c.log_filter, "info");
    }

    #[test]
    fn the_pool_size_is_bounded() {
        assert_eq!(
            parse(&["--database-pool-size", "12"])
                .unwrap()
                .database_pool_size,
            12
        );
        for bad in ["0", "1025", "many"] {
            let err = parse(&["--database-pool-size", bad]).unwrap_err();
            assert!(err.contains("--database-pool-size"), "{bad}: {err}");
        }
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
            "--dashboard-insecure-cookies=1",
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
        assert!(c.dashboard_insecure_cookies);
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
            (
                &["--dashboard-insecure-cookies=maybe"],
                "--dashboard-insecure-cookies",
            ),
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
