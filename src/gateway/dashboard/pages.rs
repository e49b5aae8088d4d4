//! The signed-in pages: where `/dashboard` leads, the operator's list of orgs, and an org's
//! Overview and Team.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;

use tollgate_accounts::{Granularity, GroupBy, Role, UsageCounts, UsageQuery, UserId};
use tollgate_core::{BoxError, Clock as _, ErrorCode, OrgId, Rejection, SystemClock};

use super::auth::{self, check_csrf, Viewer, Who};
use super::http::{json_error, read_form, redirect, wants_html, with_code};
use super::render;
use super::views::{
    date_time, thousands, Frame, InviteLink, Nav, OrgNav, OrgRow, OrgsPage, OverviewPage, Tab,
    TeamPage, TeamRow, UsageSummary,
};
use super::Site;
use crate::gateway::admin_accounts::{create_invite, host_of, invite_url, remove_user};
use crate::gateway::app::GatewayBody;

type Answer = Result<Response<GatewayBody>, Rejection>;

/// Resolves the session or answers with the redirect to the login page.
macro_rules! signed_in {
    ($state:expr, $headers:expr) => {
        match auth::viewer($state, $headers).await? {
            Some(viewer) => viewer,
            None => return Ok(redirect("/dashboard/login")),
        }
    };
}

/// The top bar for `viewer`, with `org`'s tabs when inside one.
pub fn nav(viewer: &Viewer, org: Option<OrgNav>) -> Nav {
    let (who, role) = viewer.label();
    Nav {
        who,
        role,
        operator: viewer.is_operator(),
        csrf: viewer.csrf(),
        org,
    }
}

fn no_page() -> Rejection {
    Rejection::new(ErrorCode::NotFound).with_message("No such page.")
}

/// The org of a URL segment that `viewer` may see: its id, name, and whether they may change
/// it. Unknown orgs and other orgs look the same (404).
pub(super) async fn org_for(
    state: &Site<'_>,
    viewer: &Viewer,
    segment: &str,
) -> Result<(OrgId, String, bool), Rejection> {
    let org: OrgId = segment.parse().map_err(|_| no_page())?;
    let can_change = viewer.access(org)?;
    let name = state
        .orgs
        .name(org)
        .await
        .map_err(|e| e.rejection())?
        .ok_or_else(no_page)?;
    Ok((org, name, can_change))
}

pub async fn home(state: &Site<'_>, headers: &HeaderMap) -> Answer {
    let viewer = signed_in!(state, headers);
    Ok(match &viewer.who {
        Who::User(u) => redirect(&format!("/dashboard/orgs/{}", u.org)),
        Who::Operator => redirect("/dashboard/orgs"),
    })
}

pub async fn orgs(state: &Site<'_>, headers: &HeaderMap) -> Answer {
    let viewer = signed_in!(state, headers);
    if let Who::User(u) = &viewer.who {
        return Ok(redirect(&format!("/dashboard/orgs/{}", u.org)));
    }
    Ok(render(
        StatusCode::OK,
        &orgs_page(state, &viewer, None, None).await?,
    ))
}

/// `POST /dashboard/orgs/create` (operator; `name`, `plan`): the org, subscribed when a plan
/// was chosen; then its Team page, to invite its owner.
pub async fn create_org<B>(state: &Site<'_>, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let viewer = signed_in!(state, &headers);
    let form = read_form(req).await?;
    check_csrf(&viewer, &headers, &form)?;
    if !viewer.is_operator() {
        return Err(no_page());
    }
    let name = form.get("name").trim().to_owned();
    let plan = match form.get("plan") {
        "" => Ok(None),
        p => p
            .parse::<tollgate_core::Plan>()
            .map(Some)
            .map_err(|_| "Choose one of the four plans, or none."),
    };
    let problem = if name.is_empty() {
        Some("The organization needs a name.")
    } else {
        plan.err()
    };
    if let Some(problem) = problem {
        let page = orgs_page(state, &viewer, None, Some(problem.to_owned())).await?;
        return Ok(with_code(
            render(StatusCode::BAD_REQUEST, &page),
            ErrorCode::InvalidRequest,
        ));
    }
    let org = state.orgs.create(name).await.map_err(|e| e.rejection())?;
    if let Ok(Some(plan)) = plan {
        crate::gateway::admin::apply_plan(state, org, plan).await?;
    }
    Ok(redirect(&format!("/dashboard/orgs/{org}/team")))
}

async fn orgs_page(
    state: &Site<'_>,
    viewer: &Viewer,
    notice: Option<String>,
    error: Option<String>,
) -> Result<OrgsPage, Rejection> {
    let now = SystemClock.now_ms();
    let today = Granularity::Day.floor(now);
    let orgs = state.orgs.list().await.map_err(|e| e.rejection())?;
    let mut rows = Vec::with_capacity(orgs.len());
    for (id, name) in orgs {
        let account = state.ledger.account(id).await.map_err(|e| e.rejection())?;
        let (plan, balance) = match &account {
            Some(a) => (
                a.plan
                    .map_or("Cancelled".to_owned(), |p| title_case(p.name())),
                a.balance().map_or("Unlimited".to_owned(), thousands),
            ),
            None => ("No subscription".to_owned(), "—".to_owned()),
        };
        let requests_today: u64 = state
            .accounts
            .usage
            .query(UsageQuery {
                org: id,
                from_ms: today,
                to_ms: today + tollgate_accounts::DAY_MS,
                granularity: Granularity::Day,
                group_by: GroupBy::default(),
            })
            .await
            .map_err(|e| e.rejection())?
            .iter()
            .map(|b| b.counts.requests)
            .sum();
        rows.push(OrgRow {
            href: format!("/dashboard/orgs/{id}"),
            id: id.to_string(),
            name,
            plan,
            balance,
            requests_today: thousands(requests_today),
        });
    }
    let pending = state
        .billing
        .pending()
        .await
        .map_err(|e| e.rejection())?
        .len();
    Ok(OrgsPage {
        frame: Frame::with_nav("Organizations", nav(viewer, None)),
        orgs: rows,
        pending,
        create_action: "/dashboard/orgs/create".to_owned(),
        notice,
        error,
    })
}

fn title_case(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "—".to_owned()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

pub async fn overview(state: &Site<'_>, headers: &HeaderMap, segment: &str) -> Answer {
    let viewer = signed_in!(state, headers);
    let (org, name, _) = org_for(state, &viewer, segment).await?;
    let account = state.ledger.account(org).await.map_err(|e| e.rejection())?;
    let now = SystemClock.now_ms();
    let (plan, plan_note, balance, plan_credits, topup_credits, period_end, period_note, from) =
        match &account {
            Some(a) => {
                let (plan, note) = match a.plan {
                    Some(p) => (
                        title_case(p.name()),
                        format!(
                            "${}/month · {} · {} requests/min per model",
                            p.price_cents() / 100,
                            p.monthly_credits().map_or(
                                "unlimited credits".to_owned(),
                                |c| format!("{} credits", thousands(c))
                            ),
                            thousands(u64::from(p.requests_per_minute())),
                        ),
                    ),
                    None => (
                        "Cancelled".to_owned(),
                        "API calls are refused until the org subscribes again.".to_owned(),
                    ),
                };
                (
                    plan,
                    note,
                    a.balance().map_or("Unlimited".to_owned(), thousands),
                    thousands(a.plan_credits),
                    thousands(a.topup_credits),
                    a.plan
                        .map_or("—".to_owned(), |_| date_time(a.period_end_ms)),
                    "Plan credits reset then; top-ups are kept.".to_owned(),
                    a.period_start_ms,
                )
            }
            None => (
                "No subscription".to_owned(),
                "Subscribe the organization to a plan to use the API.".to_owned(),
                "0".to_owned(),
                "0".to_owned(),
                "0".to_owned(),
                "—".to_owned(),
                String::new(),
                now.saturating_sub(30 * tollgate_accounts::DAY_MS),
            ),
        };
    let buckets = state
        .accounts
        .usage
        .query(UsageQuery {
            org,
            from_ms: Granularity::Hour.floor(from),
            to_ms: Granularity::Hour.ceil(now.max(from + 1)),
            granularity: Granularity::Day,
            group_by: GroupBy::default(),
        })
        .await
        .map_err(|e| e.rejection())?;
    let mut total = UsageCounts::default();
    for b in &buckets {
        total.add(&b.counts);
    }
    let usage = UsageSummary {
        requests: thousands(total.requests),
        ok: thousands(total.ok),
        client_errors: thousands(total.client_errors),
        server_errors: thousands(total.server_errors),
        rate_limited: thousands(total.rate_limited),
        credits: thousands(total.credits),
        error_rate: percent(total.client_errors + total.server_errors, total.requests),
    };
    let (chart, _) = super::activity::period_chart(state, org).await?;
    let (top_models, top_routes) = super::activity::busiest(state, org).await?;
    let org_nav = OrgNav::new(org.to_string(), name.clone(), Some(Tab::Overview));
    Ok(render(
        StatusCode::OK,
        &OverviewPage {
            frame: Frame::with_nav("Overview", nav(&viewer, Some(org_nav))),
            org_name: name,
            plan,
            plan_note,
            balance,
            plan_credits,
            topup_credits,
            period_end,
            period_note,
            usage,
            chart,
            top_models,
            top_routes,
            usage_href: format!("/dashboard/orgs/{org}/usage"),
        },
    ))
}

async fn team_page(
    state: &Site<'_>,
    viewer: &Viewer,
    org: OrgId,
    name: String,
    can_change: bool,
    invite_link: Option<InviteLink>,
    error: Option<String>,
) -> Result<TeamPage, Rejection> {
    let users = state
        .accounts
        .users
        .users(org)
        .await
        .map_err(|e| e.rejection())?;
    let me = viewer.user().map(|u| u.id);
    let rows = users
        .iter()
        .map(|u| TeamRow {
            email: u.email.clone(),
            role: u.role.as_str(),
            status: if u.active { "Active" } else { "Invited" },
            created: date_time(u.created_at_ms),
            removable: Some(u.id) != me,
            remove_action: format!("/dashboard/orgs/{org}/team/{}/remove", u.id),
        })
        .collect();
    let org_nav = OrgNav::new(org.to_string(), name.clone(), Some(Tab::Team));
    Ok(TeamPage {
        frame: Frame::with_nav("Team", nav(viewer, Some(org_nav))),
        org_name: name,
        users: rows,
        can_change,
        invite_action: format!("/dashboard/orgs/{org}/team/invite"),
        invite_link,
        error,
    })
}

pub async fn team(state: &Site<'_>, headers: &HeaderMap, segment: &str) -> Answer {
    let viewer = signed_in!(state, headers);
    let (org, name, can_change) = org_for(state, &viewer, segment).await?;
    let page = team_page(state, &viewer, org, name, can_change, None, None).await?;
    Ok(render(StatusCode::OK, &page))
}

/// `POST /dashboard/orgs/:org/team/invite` (`email`, `role`): the Team page with the new
/// invite link, shown once.
pub async fn team_invite<B>(state: &Site<'_>, segment: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let host = host_of(&req);
    let viewer = signed_in!(state, &headers);
    let form = read_form(req).await?;
    check_csrf(&viewer, &headers, &form)?;
    let (org, name, _) = org_for(state, &viewer, segment).await?;
    viewer.may_change(org)?;
    let role = form.get("role").parse::<Role>().map_err(|_| {
        Rejection::new(ErrorCode::InvalidRequest).with_message("Choose a role: owner or viewer.")
    });
    let created = match role {
        Ok(role) => create_invite(state, org, form.get("email"), role).await,
        Err(e) => Err(e),
    };
    match created {
        Ok((user, token)) => {
            let link = InviteLink {
                email: user.email,
                url: invite_url(state, host.as_deref(), &token),
            };
            let page = team_page(state, &viewer, org, name, true, Some(link), None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        Err(rejection) if rejection.code() == ErrorCode::InvalidRequest && wants_html(&headers) => {
            let page = team_page(
                state,
                &viewer,
                org,
                name,
                true,
                None,
                Some(rejection.message().to_owned()),
            )
            .await?;
            Ok(with_code(
                render(StatusCode::BAD_REQUEST, &page),
                ErrorCode::InvalidRequest,
            ))
        }
        Err(rejection) if rejection.code() == ErrorCode::InvalidRequest => {
            Ok(json_error(rejection))
        }
        Err(rejection) => Err(rejection),
    }
}

/// `POST /dashboard/orgs/:org/team/:user/remove`: deletes the user (their sessions end).
pub async fn team_remove<B>(state: &Site<'_>, segment: &str, user: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let viewer = signed_in!(state, &headers);
    let form = read_form(req).await?;
    check_csrf(&viewer, &headers, &form)?;
    let (org, _, _) = org_for(state, &viewer, segment).await?;
    viewer.may_change(org)?;
    let id: UserId = user.parse().map_err(|_| no_page())?;
    let target = state
        .accounts
        .users
        .user(id)
        .await
        .map_err(|e| e.rejection())?;
    if target.as_ref().map(|u| u.org) != Some(org) {
        return Err(no_page());
    }
    if viewer.user().map(|u| u.id) == Some(id) {
        return Err(Rejection::new(ErrorCode::InvalidRequest)
            .with_message("You cannot remove yourself; ask another owner."));
    }
    remove_user(state, id).await?;
    Ok(redirect(&format!("/dashboard/orgs/{org}/team")))
}
