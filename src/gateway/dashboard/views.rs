//! The dashboard's pages: one askama template each (in `templates/`, all extending
//! `layout.html`), filled by the handlers. Askama escapes every value for HTML, so names and
//! emails customers typed render as text.

use std::sync::OnceLock;

use std::hash::{Hash, Hasher};

use askama::Template;

/// The stylesheet, embedded in the binary.
pub const STYLESHEET: &str = include_str!("static/dashboard.css");

/// The script that only enhances (the copy buttons): every page works without it.
pub const SCRIPT: &str = include_str!("static/dashboard.js");

/// A short hash of the stylesheet, so its URL changes whenever it does (it is cached).
pub fn asset_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        // SipHash with fixed keys: the same text gives the same version in every build.
        let mut hasher = std::hash::DefaultHasher::new();
        STYLESHEET.hash(&mut hasher);
        SCRIPT.hash(&mut hasher);
        format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
    })
}

/// What the layout needs: the title and, when signed in, the navigation.
pub struct Frame {
    pub title: String,
    pub nav: Option<Nav>,
    pub asset_version: &'static str,
}

impl Frame {
    /// A page without navigation (sign-in, invite, errors of signed-out visitors).
    pub fn bare(title: impl Into<String>) -> Self {
        Frame {
            title: title.into(),
            nav: None,
            asset_version: asset_version(),
        }
    }

    /// A page with the top bar and, inside an org, its tabs.
    pub fn with_nav(title: impl Into<String>, nav: Nav) -> Self {
        Frame {
            title: title.into(),
            nav: Some(nav),
            asset_version: asset_version(),
        }
    }

    /// The session's CSRF token, for the hidden field of every form.
    pub fn csrf(&self) -> &str {
        self.nav.as_ref().map_or("", |n| n.csrf.as_str())
    }
}

/// The top bar of a signed-in page.
pub struct Nav {
    /// The user's email, or "Operator".
    pub who: String,
    /// `Owner`, `Viewer` or `Operator`.
    pub role: &'static str,
    pub operator: bool,
    pub csrf: String,
    pub org: Option<OrgNav>,
}

/// The org whose pages are shown, and its tabs.
pub struct OrgNav {
    pub id: String,
    pub name: String,
    pub links: Vec<NavLink>,
}

pub struct NavLink {
    pub href: String,
    pub label: &'static str,
    pub current: bool,
}

/// The tabs of an org's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Overview,
    Keys,
    Models,
    Billing,
    Usage,
    Webhooks,
    Team,
}

impl OrgNav {
    pub fn new(id: String, name: String, current: Option<Tab>) -> Self {
        let base = format!("/dashboard/orgs/{id}");
        let links = [
            (Tab::Overview, "Overview", base.clone()),
            (Tab::Keys, "API Keys", format!("{base}/keys")),
            (Tab::Models, "Models", format!("{base}/models")),
            (Tab::Billing, "Billing", format!("{base}/billing")),
            (Tab::Usage, "Usage & Logs", format!("{base}/usage")),
            (Tab::Webhooks, "Webhooks", format!("{base}/webhooks")),
            (Tab::Team, "Team", format!("{base}/team")),
        ]
        .into_iter()
        .map(|(tab, label, href)| NavLink {
            href,
            label,
            current: current == Some(tab),
        })
        .collect();
        OrgNav { id, name, links }
    }
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct LoginPage {
    pub frame: Frame,
    pub error: Option<String>,
    pub notice: Option<String>,
    pub operator_enabled: bool,
}

#[derive(Template)]
#[template(path = "invite.html")]
pub struct InvitePage {
    pub frame: Frame,
    pub email: String,
    pub role: &'static str,
    pub action: String,
    pub error: Option<String>,
    pub min_chars: usize,
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub frame: Frame,
    pub status: u16,
    pub heading: String,
    pub message: String,
    pub back_href: &'static str,
    pub back_label: &'static str,
}

/// This period's usage, formatted.
pub struct UsageSummary {
    pub requests: String,
    pub ok: String,
    pub client_errors: String,
    pub server_errors: String,
    pub rate_limited: String,
    pub credits: String,
    pub error_rate: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    pub frame: Frame,
    pub org_name: String,
    pub plan: String,
    pub plan_note: String,
    pub balance: String,
    pub plan_credits: String,
    pub topup_credits: String,
    pub period_end: String,
    pub period_note: String,
    pub usage: UsageSummary,
    pub chart: Chart,
    pub top_models: Vec<TopRow>,
    pub top_routes: Vec<TopRow>,
    pub usage_href: String,
}

pub struct TeamRow {
    pub email: String,
    pub role: &'static str,
    pub status: &'static str,
    pub created: String,
    pub removable: bool,
    pub remove_action: String,
}

pub struct InviteLink {
    pub email: String,
    pub url: String,
}

#[derive(Template)]
#[template(path = "team.html")]
pub struct TeamPage {
    pub frame: Frame,
    pub org_name: String,
    pub users: Vec<TeamRow>,
    pub can_change: bool,
    pub invite_action: String,
    pub invite_link: Option<InviteLink>,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "account.html")]
pub struct AccountPage {
    pub frame: Frame,
    pub who: String,
    pub is_operator: bool,
    pub notice: Option<String>,
    pub error: Option<String>,
    pub min_chars: usize,
}

pub struct OrgRow {
    pub id: String,
    pub name: String,
    pub plan: String,
    pub balance: String,
    pub requests_today: String,
    pub href: String,
}

#[derive(Template)]
#[template(path = "orgs.html")]
pub struct OrgsPage {
    pub frame: Frame,
    pub orgs: Vec<OrgRow>,
    pub pending: usize,
    pub create_action: String,
    pub notice: Option<String>,
    pub error: Option<String>,
}

/// `1234567` → `1,234,567`.
/// A secret shown once (a new key, a rotated key, a webhook signing secret).
pub struct NewSecret {
    /// What was created.
    pub heading: String,
    /// Why it is shown and what to do with it.
    pub note: String,
    /// The secret.
    pub secret: String,
}

/// One API key in the table.
pub struct KeyRow {
    pub name: String,
    pub prefix: String,
    pub status: &'static str,
    pub status_class: &'static str,
    pub created: String,
    pub last_used: String,
    pub expires: String,
    pub scopes: &'static str,
    pub models: String,
    pub limit: String,
    pub active: bool,
    pub revoke_action: String,
    pub rotate_action: String,
    pub field_id: String,
}

/// A model the create form can restrict a key to.
pub struct ModelChoice {
    pub name: String,
    pub field: String,
}

#[derive(Template)]
#[template(path = "keys.html")]
pub struct KeysPage {
    pub frame: Frame,
    pub org_name: String,
    pub keys: Vec<KeyRow>,
    pub can_change: bool,
    pub create_action: String,
    pub models: Vec<ModelChoice>,
    pub new_secret: Option<NewSecret>,
    pub error: Option<String>,
}

/// One model in the table.
pub struct ModelRow {
    pub name: String,
    pub connected: bool,
    pub last_disconnected: String,
    pub reconnect_action: String,
    pub field_id: String,
}

#[derive(Template)]
#[template(path = "models.html")]
pub struct ModelsPage {
    pub frame: Frame,
    pub org_name: String,
    pub models: Vec<ModelRow>,
    pub can_change: bool,
    pub add_action: String,
    pub notice: Option<String>,
    pub error: Option<String>,
}

/// One plan, side by side with the others.
pub struct PlanCard {
    pub value: &'static str,
    pub name: String,
    pub price: String,
    pub credits: String,
    pub rate: String,
    pub current: bool,
    pub requested: bool,
    /// The button's words: "Switch to Free", "Request Pro".
    pub action_label: String,
}

/// One row of the ledger.
pub struct LedgerRow {
    pub when: String,
    pub kind: &'static str,
    pub change: String,
    pub positive: bool,
    pub balance_after: String,
}

/// A billing request, as the org or the operator sees it.
pub struct RequestRow {
    pub org_name: String,
    pub org_href: String,
    pub what: String,
    pub by: String,
    pub when: String,
    pub state: &'static str,
    pub state_class: &'static str,
    pub approve_action: String,
    pub decline_action: String,
}

#[derive(Template)]
#[template(path = "billing.html")]
pub struct BillingPage {
    pub frame: Frame,
    pub org_name: String,
    pub plan: String,
    pub balance: String,
    pub plan_credits: String,
    pub topup_credits: String,
    pub period_end: String,
    pub subscribed: bool,
    pub plans: Vec<PlanCard>,
    pub requests: Vec<RequestRow>,
    pub ledger: Vec<LedgerRow>,
    pub can_change: bool,
    pub plan_action: String,
    pub cancel_action: String,
    pub topup_action: String,
    pub operator: bool,
    pub set_plan_action: String,
    pub set_balance_action: String,
    pub notice: Option<String>,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "pending.html")]
pub struct PendingPage {
    pub frame: Frame,
    pub requests: Vec<RequestRow>,
    pub notice: Option<String>,
}

/// One bucket of the usage series.
pub struct UsageRow {
    pub start: String,
    pub requests: String,
    pub ok: String,
    pub errors: String,
    pub rate_limited: String,
    pub credits: String,
}

/// One recent request.
pub struct RecentRow {
    pub time: String,
    pub method: String,
    pub route: String,
    pub model: String,
    pub status: u16,
    pub status_class: &'static str,
    pub credits: u64,
    pub latency: String,
    pub request_id: String,
}

/// A choice of a select.
pub struct SelectOption {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// The busiest of something (models, routes) this period.
pub struct TopRow {
    pub name: String,
    pub requests: String,
    pub credits: String,
}

#[derive(Template)]
#[template(path = "usage.html")]
pub struct UsagePage {
    pub frame: Frame,
    pub org_name: String,
    pub chart: Chart,
    pub hourly: bool,
    pub day_href: String,
    pub hour_href: String,
    pub rows: Vec<UsageRow>,
    pub recent: Vec<RecentRow>,
    pub models: Vec<SelectOption>,
    pub status_filter: String,
    pub periods: Vec<SelectOption>,
    pub filter_action: String,
    pub ndjson_href: String,
    pub csv_href: String,
    pub recent_note: String,
}

/// A bar chart of requests with the credits charged as a line, drawn as inline SVG on the
/// server (nothing loads from elsewhere). Built from numbers only, so its markup is safe
/// to insert unescaped.
pub struct Chart {
    pub svg: String,
    pub summary: String,
}

impl Chart {
    /// `points`: (label, requests, credits) per bucket, oldest first.
    pub fn new(points: &[(String, u64, u64)]) -> Chart {
        const W: f64 = 720.0;
        const H: f64 = 220.0;
        const LEFT: f64 = 48.0;
        const RIGHT: f64 = 12.0;
        const BOTTOM: f64 = 28.0;
        const TOP: f64 = 12.0;
        let n = points.len().max(1) as f64;
        // Round axis steps (1, 2, 5 × 10ⁿ), four of them.
        let step = nice_step(points.iter().map(|p| p.1).max().unwrap_or(0));
        let max_requests = step * 4;
        let max_credits = points.iter().map(|p| p.2).max().unwrap_or(0).max(1);
        let plot_w = W - LEFT - RIGHT;
        let plot_h = H - BOTTOM - TOP;
        let slot = plot_w / n;
        let bar = (slot * 0.7).clamp(1.0, 40.0);
        let mut svg = format!(
            "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-labelledby=\"chart-title\">\
             <title id=\"chart-title\">Requests (bars) and credits (line) per bucket</title>"
        );
        for i in 0..=4u64 {
            let y = TOP + plot_h * (4 - i) as f64 / 4.0;
            svg.push_str(&format!(
                "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
                 <text class=\"axis\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                W - RIGHT,
                LEFT - 8.0,
                y + 4.0,
                thousands(step * i)
            ));
        }
        let mut line = String::new();
        let mut dots = String::new();
        let label_every = (points.len() / 8).max(1);
        for (i, (label, requests, credits)) in points.iter().enumerate() {
            let cx = LEFT + slot * (i as f64 + 0.5);
            let h = plot_h * *requests as f64 / max_requests as f64;
            svg.push_str(&format!(
                "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\" rx=\"2\"/>",
                cx - bar / 2.0,
                TOP + plot_h - h
            ));
            let cy = TOP + plot_h - plot_h * *credits as f64 / max_credits as f64;
            line.push_str(&format!(
                "{}{cx:.1},{cy:.1}",
                if line.is_empty() { "" } else { " " }
            ));
            if points.len() <= 62 {
                dots.push_str(&format!(
                    "<circle class=\"dot\" cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"2.5\"/>"
                ));
            }
            if i % label_every == 0 {
                svg.push_str(&format!(
                    "<text class=\"axis\" x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    H - 8.0,
                    html_escape(label)
                ));
            }
        }
        if points.len() > 1 {
            svg.push_str(&format!("<polyline class=\"line\" points=\"{line}\"/>"));
        }
        svg.push_str(&dots);
        svg.push_str("</svg>");
        let total_requests: u64 = points.iter().map(|p| p.1).sum();
        let total_credits: u64 = points.iter().map(|p| p.2).sum();
        Chart {
            svg,
            summary: format!(
                "{} and {} over {}",
                plural(total_requests, "request"),
                plural(total_credits, "credit"),
                plural(points.len() as u64, "bucket")
            ),
        }
    }
}

/// `1 request`, `2 requests`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{} {what}s", thousands(n))
    }
}

/// The smallest of 1, 2, 5 × 10ⁿ whose four steps reach `max`.
fn nice_step(max: u64) -> u64 {
    let mut scale = 1u64;
    loop {
        for m in [1, 2, 5] {
            let step = m * scale;
            if step.saturating_mul(4) >= max {
                return step;
            }
        }
        scale = scale.saturating_mul(10);
    }
}

/// Escapes text for the chart's labels (dates: no markup, but never trust a string).
fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One recent delivery of an endpoint.
pub struct DeliveryRow {
    pub kind: &'static str,
    pub status: &'static str,
    pub status_class: &'static str,
    pub created: String,
    pub attempts: usize,
    pub last: String,
}

/// One webhook endpoint with its recent deliveries.
pub struct EndpointRow {
    pub url: String,
    pub events: String,
    pub created: String,
    pub delete_action: String,
    pub test_action: String,
    pub rotate_action: String,
    pub deliveries: Vec<DeliveryRow>,
}

/// An event the create form offers.
pub struct EventChoice {
    pub name: &'static str,
    pub field: String,
    pub id: String,
    pub about: &'static str,
}

#[derive(Template)]
#[template(path = "webhooks.html")]
pub struct WebhooksPage {
    pub frame: Frame,
    pub org_name: String,
    pub endpoints: Vec<EndpointRow>,
    pub can_change: bool,
    pub create_action: String,
    pub events: Vec<EventChoice>,
    pub new_secret: Option<NewSecret>,
    pub notice: Option<String>,
    pub error: Option<String>,
}

pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A time as `2024-05-31 13:27 UTC`.
pub fn date_time(ms: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M UTC").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_dates() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(date_time(1_675_150_502_748), "2023-01-31 07:35 UTC");
        assert_eq!(nice_step(0), 1);
        assert_eq!(nice_step(4), 1);
        assert_eq!(nice_step(5), 2);
        assert_eq!(nice_step(9), 5);
        assert_eq!(nice_step(21), 10);
        assert_eq!(nice_step(1_999), 500);
    }

    #[test]
    fn customer_text_is_escaped() {
        let page = ErrorPage {
            frame: Frame::bare("x"),
            status: 404,
            heading: "<script>alert(1)</script>".into(),
            message: "\"><img src=x onerror=alert(1)>".into(),
            back_href: "/dashboard",
            back_label: "Back",
        };
        let html = page.render().unwrap();
        assert!(
            !html.contains("<script>alert") && !html.contains("<img src=x"),
            "{html}"
        );
        assert!(html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"));
    }
}
