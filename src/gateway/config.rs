//! The gateway's settings as a plain struct, for programs that start a gateway themselves
//! (tests, benchmarks, embedders). The `tollgate` binary fills it from its command line and
//! environment ([`super::cli`]); `Config::default()` is what the binary does with nothing
//! configured: the demo, everything on one loopback listener.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tollgate_core::Plan;

/// What to do with rate-limit decisions while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateLimitFailure {
    /// Fall back to the in-process limiter (logged).
    #[default]
    Open,
    /// Answer 503 `SERVICE_UNAVAILABLE`.
    Closed,
}

/// Where the internal endpoints (`/admin`, `/metrics`, `/readyz`) are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminBind {
    /// On the public listener, next to `/api` (the demo; one port to think about).
    Public,
    /// On a listener of their own at this address (the public one then answers 404 there).
    Separate(SocketAddr),
}

impl AdminBind {
    /// The binary's default outside demo mode: loopback port 8001.
    pub const DEFAULT: AdminBind = AdminBind::Separate(SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        8001,
    ));
}

impl FromStr for AdminBind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("public") {
            return Ok(AdminBind::Public);
        }
        s.parse()
            .map(AdminBind::Separate)
            .map_err(|_| "expected host:port or `public`".to_owned())
    }
}

impl fmt::Display for AdminBind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminBind::Public => f.write_str("public"),
            AdminBind::Separate(addr) => addr.fmt(f),
        }
    }
}

/// The format of log lines (written to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The gateway's settings.
#[derive(Clone)]
pub struct Config {
    /// `TOLLGATE_BIND`: the public listener (`/api`, `/dashboard`, `/healthz`).
    pub bind: SocketAddr,
    /// `TOLLGATE_ADMIN_BIND`: the internal listener (`/admin`, `/metrics`, `/readyz`,
    /// `/healthz`), or [`AdminBind::Public`].
    pub admin_bind: AdminBind,
    /// `TOLLGATE_ADMIN_TOKEN`: bearer token of the admin API; `None` turns it off.
    pub admin_token: Option<String>,
    /// `DATABASE_URL`: PostgreSQL; `None` means memory backends.
    pub database_url: Option<String>,
    /// `TOLLGATE_DATABASE_POOL_SIZE`: connections of the request-path pool of this replica
    /// (default [`REQUEST_POOL_SIZE`](super::backends::REQUEST_POOL_SIZE)).
    pub database_pool_size: usize,
    /// `REDIS_URL`: Redis for rate limits; `None` means the in-process limiter.
    pub redis_url: Option<String>,
    /// `TOLLGATE_UPSTREAM`: upstream base URL; `None` runs the sandbox in-process.
    pub upstream: Option<String>,
    /// `TOLLGATE_SIGN_RULES`: rules JSON file; `None` uses the sandbox rules.
    pub sign_rules: Option<PathBuf>,
    /// `TOLLGATE_SIGNER_URL`: remote signer (`http://` or `https://`); overrides the rules.
    pub signer_url: Option<String>,
    /// `TOLLGATE_SIGNER_TOKEN`: sent to the remote signer as `Authorization: Bearer …`.
    pub signer_token: Option<String>,
    /// `TOLLGATE_CA_FILE`: PEM certificates trusted for outgoing `https://` (upstream and
    /// signer) besides the built-in web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// `TOLLGATE_SIGNER_TIMEOUT_MS`.
    pub signer_timeout: Duration,
    /// `TOLLGATE_UPSTREAM_TIMEOUT_MS`.
    pub upstream_timeout: Duration,
    /// `TOLLGATE_WINDOW_MS`.
    pub window: Duration,
    /// `TOLLGATE_BURST`: per-plan burst limits.
    pub burst: [u32; 4],
    /// `TOLLGATE_RATE_LIMIT_FAILURE`.
    pub rate_limit_failure: RateLimitFailure,
    /// `TOLLGATE_BODY_LIMIT`: max request body bytes.
    pub body_limit: usize,
    /// `TOLLGATE_SESSION_KEY`: 32-byte key (hex) encrypting model sessions at rest.
    pub session_key: Option<[u8; 32]>,
    /// `TOLLGATE_DEMO`: seed the demo org, model and key.
    pub demo: bool,
    /// `TOLLGATE_HOLD_TTL_MS`: how long a credit hold may stay open before the sweeper
    /// releases it (a crashed replica's holds). Longer than the upstream timeout.
    pub hold_ttl: Duration,
    /// `TOLLGATE_DRAIN_TIMEOUT_MS`: how long graceful shutdown waits for requests in flight
    /// before it drops them (their holds are released, nothing is charged).
    pub drain_timeout: Duration,
    /// `TOLLGATE_MAX_CONNECTIONS`: open connections on the public listener; further ones
    /// wait (unaccepted, in the OS backlog) until one closes.
    pub max_connections: usize,
    /// `TOLLGATE_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `TOLLGATE_DASHBOARD_INSECURE_COOKIES=1`: the dashboard's session cookie without
    /// `Secure`, for plain HTTP on loopback (and invite links with `http://`).
    pub dashboard_insecure_cookies: bool,
    /// Whether the request logger's worker feeds the usage rollups of `/api/usage` (default
    /// `true`; a library setting with no variable: the billed benchmark turns it off to show
    /// what the rollups cost).
    pub usage_rollups: bool,
    /// `TOLLGATE_WEBHOOK_ALLOW_PRIVATE=1`: webhook endpoints may be `http://` and on
    /// loopback, private, link-local or metadata addresses (for tests on loopback).
    pub webhook_allow_private: bool,
    /// The wait before a failed webhook delivery's first retry, doubling after each (default
    /// 30 s; a library setting with no variable, shortened by tests).
    pub webhook_retry_base: Duration,
    /// How often each replica looks at periods, balances and key expiries for webhook
    /// events (default 10 s; a library setting with no variable).
    pub webhook_scan_interval: Duration,
    /// `RUST_LOG`: tracing filter.
    pub log_filter: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets (admin token, session key, signer token, credentials in URLs) stay out of
        // logs.
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("admin_bind", &self.admin_bind)
            .field("admin_api", &self.admin_token.is_some())
            .field("database", &self.database_url.as_ref().map(|_| "<set>"))
            .field("redis", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("upstream", &self.upstream.as_deref().map(redact_url))
            .field("sign_rules", &self.sign_rules)
            .field("signer_url", &self.signer_url.as_deref().map(redact_url))
            .field("signer_token", &self.signer_token.as_ref().map(|_| "<set>"))
            .field("ca_file", &self.ca_file)
            .field("signer_timeout", &self.signer_timeout)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("window", &self.window)
            .field("burst", &self.burst)
            .field("rate_limit_failure", &self.rate_limit_failure)
            .field("body_limit", &self.body_limit)
            .field("session_key", &self.session_key.map(|_| "<set>"))
            .field("demo", &self.demo)
            .field("hold_ttl", &self.hold_ttl)
            .field("drain_timeout", &self.drain_timeout)
            .field("max_connections", &self.max_connections)
            .field("log_format", &self.log_format)
            .field(
                "dashboard_insecure_cookies",
                &self.dashboard_insecure_cookies,
            )
            .field("usage_rollups", &self.usage_rollups)
            .field("webhook_allow_private", &self.webhook_allow_private)
            .field("webhook_retry_base", &self.webhook_retry_base)
            .field("webhook_scan_interval", &self.webhook_scan_interval)
            .field("log_filter", &self.log_filter)
            .finish()
    }
}

/// The defaults, shared by [`Config::default`] and the command line's `--help`.
pub mod defaults {
    /// `TOLLGATE_BIND`.
    pub const BIND: &str = "127.0.0.1:8080";
    /// `TOLLGATE_ADMIN_BIND` outside demo mode.
    pub const ADMIN_BIND: &str = "127.0.0.1:8001";
    /// `TOLLGATE_SIGNER_TIMEOUT_MS`.
    pub const SIGNER_TIMEOUT_MS: u64 = 2_000;
    /// `TOLLGATE_UPSTREAM_TIMEOUT_MS`.
    pub const UPSTREAM_TIMEOUT_MS: u64 = 30_000;
    /// `TOLLGATE_WINDOW_MS`.
    pub const WINDOW_MS: u64 = 60_000;
    /// `TOLLGATE_BURST`.
    pub const BURST: &str = "free=5,basic=10,pro=30,enterprise=200";
    /// `TOLLGATE_BODY_LIMIT`.
    pub const BODY_LIMIT: usize = 1_048_576;
    /// `TOLLGATE_HOLD_TTL_MS`.
    pub const HOLD_TTL_MS: u64 = 300_000;
    /// `TOLLGATE_DRAIN_TIMEOUT_MS`.
    pub const DRAIN_TIMEOUT_MS: u64 = 30_000;
    /// `TOLLGATE_MAX_CONNECTIONS`.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `RUST_LOG`.
    pub const LOG_FILTER: &str = "info";
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: defaults::BIND.parse().expect("a socket address"),
            // Nothing configured means the demo, which serves everything on one port.
            admin_bind: AdminBind::Public,
            admin_token: None,
            database_url: None,
            database_pool_size: super::backends::REQUEST_POOL_SIZE,
            redis_url: None,
            upstream: None,
            sign_rules: None,
            signer_url: None,
            signer_token: None,
            ca_file: None,
            signer_timeout: Duration::from_millis(defaults::SIGNER_TIMEOUT_MS),
            upstream_timeout: Duration::from_millis(defaults::UPSTREAM_TIMEOUT_MS),
            window: Duration::from_millis(defaults::WINDOW_MS),
            burst: Plan::ALL.map(Plan::default_burst),
            rate_limit_failure: RateLimitFailure::Open,
            body_limit: defaults::BODY_LIMIT,
            session_key: None,
            demo: true,
            hold_ttl: Duration::from_millis(defaults::HOLD_TTL_MS),
            drain_timeout: Duration::from_millis(defaults::DRAIN_TIMEOUT_MS),
            max_connections: defaults::MAX_CONNECTIONS,
            log_format: LogFormat::Text,
            dashboard_insecure_cookies: false,
            usage_rollups: true,
            webhook_allow_private: false,
            webhook_retry_base: super::webhooks::DEFAULT_RETRY_BASE,
            webhook_scan_interval: super::webhooks::DEFAULT_SCAN_INTERVAL,
            log_filter: defaults::LOG_FILTER.to_owned(),
        }
    }
}

/// The settings do not fit together, or one cannot be used. The message names the setting
/// and never contains a secret's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The burst limit of a plan.
    pub fn burst_for(&self, plan: Plan) -> u32 {
        self.burst[plan.index()]
    }

    /// Checks the settings that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(token) = &self.admin_token {
            // An empty or trivially short token would let anyone in.
            if token.trim().len() < 8 {
                return Err(ConfigError(
                    "TOLLGATE_ADMIN_TOKEN must be at least 8 characters (the value is not shown)"
                        .to_owned(),
                ));
            }
        }
        if self.hold_ttl <= self.upstream_timeout {
            return Err(ConfigError(format!(
                "TOLLGATE_HOLD_TTL_MS ({} ms) must be longer than TOLLGATE_UPSTREAM_TIMEOUT_MS \
                 ({} ms), or holds of requests still in flight could be swept",
                self.hold_ttl.as_millis(),
                self.upstream_timeout.as_millis()
            )));
        }
        if self.database_url.is_some() && self.session_key.is_none() {
            return Err(ConfigError(
                "TOLLGATE_SESSION_KEY (64 hex digits) is required with DATABASE_URL".to_owned(),
            ));
        }
        if let AdminBind::Separate(addr) = self.admin_bind {
            if addr == self.bind && addr.port() != 0 {
                return Err(ConfigError(format!(
                    "TOLLGATE_ADMIN_BIND ({addr}) is the same address as TOLLGATE_BIND: use \
                     `public` to serve the admin API on the public listener"
                )));
            }
        }
        if self.signer_token.is_some() && self.signer_url.is_none() {
            return Err(ConfigError(
                "TOLLGATE_SIGNER_TOKEN is set but TOLLGATE_SIGNER_URL is not".to_owned(),
            ));
        }
        if self.demo && self.upstream.is_some() {
            return Err(ConfigError(
                "demo mode needs the in-process sandbox upstream: unset TOLLGATE_UPSTREAM or set \
                 TOLLGATE_DEMO=off"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

/// `scheme://host[:port]` of a URL: credentials, paths and queries (tokens) stay out of logs.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if scheme.is_empty() {
        host.to_owned()
    } else {
        format!("{scheme}://{host}")
    }
}

/// Parses `free=5,basic=10,pro=30,enterprise=200` (plans left out keep their default).
pub fn parse_burst(value: &str) -> Result<[u32; 4], String> {
    let mut burst = Plan::ALL.map(Plan::default_burst);
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part
            .split_once('=')
            .ok_or_else(|| format!("expected plan=number, got {part:?}"))?;
        let plan: Plan = name
            .trim()
            .parse()
            .map_err(|e: tollgate_core::PlanParseError| e.to_string())?;
        let n: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("burst for {plan} must be a positive number"))?;
        burst[plan.index()] = n;
    }
    Ok(burst)
}

/// Parses a 32-byte key written as 64 hex digits.
pub fn parse_key(value: &str) -> Option<[u8; 32]> {
    let bytes = value.trim().as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_demo_on_one_listener() {
        let c = Config::default();
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_bind, AdminBind::Public);
        assert!(c.demo);
        assert_eq!(c.burst, [5, 10, 30, 200]);
        assert_eq!(parse_burst(defaults::BURST).unwrap(), c.burst);
        assert_eq!(AdminBind::DEFAULT.to_string(), defaults::ADMIN_BIND);
        c.validate().unwrap();
    }

    #[test]
    fn admin_bind_parses_public_or_an_address() {
        assert_eq!("public".parse::<AdminBind>(), Ok(AdminBind::Public));
        assert_eq!("PUBLIC".parse::<AdminBind>(), Ok(AdminBind::Public));
        assert_eq!(
            "127.0.0.1:9001".parse::<AdminBind>(),
            Ok(AdminBind::Separate("127.0.0.1:9001".parse().unwrap()))
        );
        assert!("nowhere".parse::<AdminBind>().is_err());
    }

    #[test]
    fn settings_that_do_not_fit_together_are_refused() {
        let bad = |f: fn(&mut Config), needle: &str| {
            let mut c = Config {
                demo: false,
                ..Config::default()
            };
            f(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.0.contains(needle), "{err}");
        };
        bad(|c| c.admin_token = Some("short".into()), "at least 8");
        bad(|c| c.hold_ttl = c.upstream_timeout, "TOLLGATE_HOLD_TTL_MS");
        bad(
            |c| c.database_url = Some("postgres://x".into()),
            "TOLLGATE_SESSION_KEY",
        );
        bad(
            |c| c.admin_bind = AdminBind::Separate(c.bind),
            "same address",
        );
        bad(|c| c.signer_token = Some("t".into()), "TOLLGATE_SIGNER_URL");
        bad(
            |c| {
                c.demo = true;
                c.upstream = Some("http://127.0.0.1:1".into())
            },
            "demo mode",
        );
    }

    #[test]
    fn bursts_and_keys_parse() {
        assert_eq!(parse_burst("basic=3").unwrap(), [5, 3, 30, 200]);
        assert!(parse_burst("gold=3").unwrap_err().contains("unknown plan"));
        assert!(parse_burst("free=0").unwrap_err().contains("positive"));
        assert_eq!(parse_key(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_key("abcd"), None);
        assert_eq!(parse_key(&"zz".repeat(32)), None);
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Config {
            admin_token: Some("s3cret-admin".into()),
            database_url: Some("postgres://u:pw@h/db".into()),
            session_key: Some([0xab; 32]),
            signer_url: Some("https://user:tok@signer.example:8443/sign?key=abc".into()),
            signer_token: Some("signer-s3cret".into()),
            ..Config::default()
        };
        let text = format!("{c:?}");
        for secret in [
            "s3cret-admin",
            "pw@",
            "abab",
            "tok@",
            "key=abc",
            "signer-s3cret",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(
            redact_url("https://user:tok@signer.example:8443/sign?key=abc"),
            "https://signer.example:8443"
        );
    }
}
