//! Gateway configuration (SPEC §8): every setting is an environment variable with a matching
//! `--flag`; a flag wins over the variable.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
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

/// The gateway's settings.
#[derive(Clone)]
pub struct Config {
    /// `TOLLGATE_BIND`: listen address.
    pub bind: SocketAddr,
    /// `TOLLGATE_ADMIN_TOKEN`: bearer token of the admin API; `None` turns it off.
    pub admin_token: Option<String>,
    /// `DATABASE_URL`: PostgreSQL; `None` means memory backends.
    pub database_url: Option<String>,
    /// `REDIS_URL`: Redis for rate limits; `None` means the in-process limiter.
    pub redis_url: Option<String>,
    /// `TOLLGATE_UPSTREAM`: upstream base URL; `None` runs the sandbox in-process.
    pub upstream: Option<String>,
    /// `TOLLGATE_SIGN_RULES`: rules JSON file; `None` uses the sandbox rules.
    pub sign_rules: Option<PathBuf>,
    /// `TOLLGATE_SIGNER_URL`: remote signer; overrides the rules.
    pub signer_url: Option<String>,
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
    /// `TOLLGATE_HOLD_TTL_MS` (an addition to SPEC §8): how long a credit hold may stay open
    /// before the sweeper releases it (a crashed replica's holds). Longer than the upstream
    /// timeout.
    pub hold_ttl: Duration,
    /// `TOLLGATE_DASHBOARD_INSECURE_COOKIES=1`: the dashboard's session cookie without
    /// `Secure`, for plain HTTP on loopback (and invite links with `http://`).
    pub dashboard_insecure_cookies: bool,
    /// `RUST_LOG`: tracing filter.
    pub log_filter: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets (admin token, session key, credentials in URLs) stay out of logs.
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("admin_api", &self.admin_token.is_some())
            .field("database", &self.database_url.as_ref().map(|_| "<set>"))
            .field("redis", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("upstream", &self.upstream.as_deref().map(redact_url))
            .field("sign_rules", &self.sign_rules)
            .field("signer_url", &self.signer_url.as_deref().map(redact_url))
            .field("signer_timeout", &self.signer_timeout)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("window", &self.window)
            .field("burst", &self.burst)
            .field("rate_limit_failure", &self.rate_limit_failure)
            .field("body_limit", &self.body_limit)
            .field("session_key", &self.session_key.map(|_| "<set>"))
            .field("demo", &self.demo)
            .field("hold_ttl", &self.hold_ttl)
            .field(
                "dashboard_insecure_cookies",
                &self.dashboard_insecure_cookies,
            )
            .field("log_filter", &self.log_filter)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: None,
            database_url: None,
            redis_url: None,
            upstream: None,
            sign_rules: None,
            signer_url: None,
            signer_timeout: Duration::from_millis(2_000),
            upstream_timeout: Duration::from_millis(30_000),
            window: Duration::from_millis(60_000),
            burst: Plan::ALL.map(Plan::default_burst),
            rate_limit_failure: RateLimitFailure::Open,
            body_limit: 1_048_576,
            session_key: None,
            demo: true,
            hold_ttl: Duration::from_millis(300_000),
            dashboard_insecure_cookies: false,
            log_filter: "info".to_owned(),
        }
    }
}

/// A setting could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Each setting: environment variable, flag, and whether the flag takes a value.
const SETTINGS: &[(&str, &str)] = &[
    ("TOLLGATE_BIND", "--bind"),
    ("TOLLGATE_ADMIN_TOKEN", "--admin-token"),
    ("DATABASE_URL", "--database-url"),
    ("REDIS_URL", "--redis-url"),
    ("TOLLGATE_UPSTREAM", "--upstream"),
    ("TOLLGATE_SIGN_RULES", "--sign-rules"),
    ("TOLLGATE_SIGNER_URL", "--signer-url"),
    ("TOLLGATE_SIGNER_TIMEOUT_MS", "--signer-timeout-ms"),
    ("TOLLGATE_UPSTREAM_TIMEOUT_MS", "--upstream-timeout-ms"),
    ("TOLLGATE_WINDOW_MS", "--window-ms"),
    ("TOLLGATE_BURST", "--burst"),
    ("TOLLGATE_RATE_LIMIT_FAILURE", "--rate-limit-failure"),
    ("TOLLGATE_BODY_LIMIT", "--body-limit"),
    ("TOLLGATE_SESSION_KEY", "--session-key"),
    ("TOLLGATE_DEMO", "--demo"),
    ("TOLLGATE_HOLD_TTL_MS", "--hold-ttl-ms"),
    (
        "TOLLGATE_DASHBOARD_INSECURE_COOKIES",
        "--dashboard-insecure-cookies",
    ),
    ("RUST_LOG", "--log"),
];

/// The `--help` text.
pub fn usage() -> String {
    let mut out = String::from(
        "tollgate gateway\n\nEvery setting is an environment variable or the matching flag \
         (`--flag value` or `--flag=value`; the flag wins):\n\n",
    );
    for (var, flag) in SETTINGS {
        out.push_str(&format!("  {flag:<24} {var}\n"));
    }
    out
}

impl Config {
    /// Reads the process environment and command line.
    pub fn from_env_and_args() -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let args: Vec<String> = std::env::args().skip(1).collect();
        Config::from_sources(&env, &args)
    }

    /// Reads the given environment and arguments (testable).
    pub fn from_sources(
        env: &HashMap<String, String>,
        args: &[String],
    ) -> Result<Config, ConfigError> {
        let mut values: HashMap<&'static str, String> = HashMap::new();
        for (var, _) in SETTINGS {
            if let Some(v) = env.get(*var).filter(|v| !v.is_empty()) {
                values.insert(var, v.clone());
            }
        }
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (arg.as_str(), None),
            };
            let Some((var, _)) = SETTINGS.iter().find(|(_, f)| *f == flag) else {
                return Err(ConfigError(format!(
                    "unknown argument {arg:?}\n\n{}",
                    usage()
                )));
            };
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| ConfigError(format!("{flag} needs a value")))?
                }
            };
            values.insert(var, value);
            i += 1;
        }

        let mut c = Config::default();
        let explicit_backend_or_upstream = ["DATABASE_URL", "REDIS_URL", "TOLLGATE_UPSTREAM"]
            .iter()
            .any(|v| values.contains_key(v));
        for (var, value) in &values {
            let bad = |why: &str| ConfigError(format!("{var}: {why} (got {value:?})"));
            match *var {
                "TOLLGATE_BIND" => c.bind = value.parse().map_err(|_| bad("expected host:port"))?,
                "TOLLGATE_ADMIN_TOKEN" => {
                    // An empty or trivially short token would let anyone in.
                    if value.trim().len() < 8 {
                        return Err(bad("the admin token must be at least 8 characters"));
                    }
                    c.admin_token = Some(value.clone())
                }
                "DATABASE_URL" => c.database_url = Some(value.clone()),
                "REDIS_URL" => c.redis_url = Some(value.clone()),
                "TOLLGATE_UPSTREAM" => {
                    let v = value.trim_end_matches('/');
                    if !(v.starts_with("http://") || v.starts_with("https://")) {
                        return Err(bad("expected an http:// or https:// URL"));
                    }
                    c.upstream = Some(v.to_owned());
                }
                "TOLLGATE_SIGN_RULES" => c.sign_rules = Some(PathBuf::from(value)),
                "TOLLGATE_SIGNER_URL" => c.signer_url = Some(value.clone()),
                "TOLLGATE_SIGNER_TIMEOUT_MS" => c.signer_timeout = millis(value).map_err(bad)?,
                "TOLLGATE_UPSTREAM_TIMEOUT_MS" => {
                    c.upstream_timeout = millis(value).map_err(bad)?
                }
                "TOLLGATE_WINDOW_MS" => c.window = millis(value).map_err(bad)?,
                "TOLLGATE_BURST" => c.burst = parse_burst(value).map_err(|e| bad(&e))?,
                "TOLLGATE_RATE_LIMIT_FAILURE" => {
                    c.rate_limit_failure = match value.as_str() {
                        "open" => RateLimitFailure::Open,
                        "closed" => RateLimitFailure::Closed,
                        _ => return Err(bad("expected open or closed")),
                    }
                }
                "TOLLGATE_BODY_LIMIT" => {
                    c.body_limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("expected a positive number of bytes"))?
                }
                "TOLLGATE_SESSION_KEY" => {
                    c.session_key =
                        Some(parse_key(value).ok_or_else(|| bad("expected 64 hex digits"))?)
                }
                "TOLLGATE_DEMO" => {
                    c.demo = match value.as_str() {
                        "1" | "true" | "on" | "yes" => true,
                        "0" | "false" | "off" | "no" => false,
                        _ => return Err(bad("expected on or off")),
                    }
                }
                "TOLLGATE_HOLD_TTL_MS" => c.hold_ttl = millis(value).map_err(bad)?,
                "TOLLGATE_DASHBOARD_INSECURE_COOKIES" => {
                    c.dashboard_insecure_cookies = match value.as_str() {
                        "1" | "true" | "on" | "yes" => true,
                        "0" | "false" | "off" | "no" => false,
                        _ => return Err(bad("expected 1 or 0")),
                    }
                }
                "RUST_LOG" => c.log_filter = value.clone(),
                _ => {}
            }
        }
        // Demo mode is on when nothing is configured, unless set explicitly.
        if !values.contains_key("TOLLGATE_DEMO") {
            c.demo = !explicit_backend_or_upstream;
        }
        if c.hold_ttl <= c.upstream_timeout {
            return Err(ConfigError(format!(
                "TOLLGATE_HOLD_TTL_MS ({} ms) must be longer than TOLLGATE_UPSTREAM_TIMEOUT_MS ({} ms), \
                 or holds of requests still in flight could be swept",
                c.hold_ttl.as_millis(),
                c.upstream_timeout.as_millis()
            )));
        }
        if c.database_url.is_some() && c.session_key.is_none() {
            return Err(ConfigError(
                "TOLLGATE_SESSION_KEY (64 hex digits) is required with DATABASE_URL".to_owned(),
            ));
        }
        Ok(c)
    }

    /// The burst limit of a plan.
    pub fn burst_for(&self, plan: Plan) -> u32 {
        self.burst[plan.index()]
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

fn millis(value: &str) -> Result<Duration, &'static str> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .map(Duration::from_millis)
        .ok_or("expected a positive number of milliseconds")
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

fn parse_key(value: &str) -> Option<[u8; 32]> {
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

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_are_the_contract() {
        let c = Config::from_sources(&HashMap::new(), &[]).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert!(c.admin_token.is_none());
        assert_eq!(c.signer_timeout, Duration::from_millis(2_000));
        assert_eq!(c.upstream_timeout, Duration::from_millis(30_000));
        assert_eq!(c.window, Duration::from_millis(60_000));
        assert_eq!(c.burst, [5, 10, 30, 200]);
        assert_eq!(c.rate_limit_failure, RateLimitFailure::Open);
        assert_eq!(c.body_limit, 1_048_576);
        assert!(c.demo, "demo is on when nothing is configured");
    }

    #[test]
    fn flags_win_over_environment() {
        let c = Config::from_sources(
            &env(&[
                ("TOLLGATE_BIND", "127.0.0.1:9000"),
                ("TOLLGATE_WINDOW_MS", "500"),
            ]),
            &args(&[
                "--bind",
                "127.0.0.1:9100",
                "--burst=basic=3",
                "--rate-limit-failure",
                "closed",
            ]),
        )
        .unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:9100");
        assert_eq!(c.window, Duration::from_millis(500));
        assert_eq!(c.burst, [5, 3, 30, 200]);
        assert_eq!(c.rate_limit_failure, RateLimitFailure::Closed);
    }

    #[test]
    fn demo_turns_off_with_an_explicit_upstream_unless_asked() {
        let e = env(&[("TOLLGATE_UPSTREAM", "http://127.0.0.1:1/")]);
        let c = Config::from_sources(&e, &[]).unwrap();
        assert_eq!(c.upstream.as_deref(), Some("http://127.0.0.1:1"));
        assert!(!c.demo);
        let c = Config::from_sources(&e, &args(&["--demo", "on"])).unwrap();
        assert!(c.demo);
    }

    #[test]
    fn bad_values_say_which_setting() {
        let cases = [
            (("TOLLGATE_BIND", "nowhere"), "TOLLGATE_BIND"),
            (("TOLLGATE_BURST", "gold=3"), "unknown plan"),
            (("TOLLGATE_BURST", "free=0"), "positive"),
            (("TOLLGATE_BODY_LIMIT", "-1"), "TOLLGATE_BODY_LIMIT"),
            (("TOLLGATE_RATE_LIMIT_FAILURE", "maybe"), "open or closed"),
            (("TOLLGATE_SESSION_KEY", "abcd"), "64 hex"),
            (("TOLLGATE_UPSTREAM", "ftp://x"), "http"),
        ];
        for ((k, v), needle) in cases {
            let err = Config::from_sources(&env(&[(k, v)]), &[]).unwrap_err();
            assert!(err.0.contains(needle), "{k}={v}: {err}");
        }
        let err = Config::from_sources(&HashMap::new(), &args(&["--admin-token="])).unwrap_err();
        assert!(err.0.contains("at least 8"), "{err}");
        let err = Config::from_sources(&HashMap::new(), &args(&["--nope"])).unwrap_err();
        assert!(err.0.contains("unknown argument"));
        let err = Config::from_sources(&env(&[("DATABASE_URL", "postgres://x")]), &[]).unwrap_err();
        assert!(err.0.contains("TOLLGATE_SESSION_KEY"));
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Config::from_sources(
            &env(&[
                ("TOLLGATE_ADMIN_TOKEN", "s3cret-admin"),
                ("DATABASE_URL", "postgres://u:pw@h/db"),
                ("TOLLGATE_SESSION_KEY", &"ab".repeat(32)),
            ]),
            &[],
        )
        .unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret-admin") && !text.contains("pw@") && !text.contains("abab"));
        assert_eq!(
            redact_url("https://user:tok@signer.example:8443/sign?key=abc"),
            "https://signer.example:8443"
        );
    }
}
