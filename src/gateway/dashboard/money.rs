//! The Billing page (plan, the four plans, requests, the ledger; subscribe to Free, ask for a
//! paid plan or a top-up, cancel) and the operator's Pending list (approve or decline).

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;

use tollgate_core::{BoxError, ErrorCode, OrgId, Plan, Rejection};
use tollgate_credit_meter::EntryKind;

use super::auth::{self, check_csrf, Viewer, Who};
use super::http::{json_error, read_form, redirect, wants_html, with_code};
use super::pages::{nav, org_for};
use super::render;
use super::views::{
    date_time, thousands, BillingPage, Frame, LedgerRow, OrgNav, PendingPage, PlanCard, RequestRow,
    Tab,
};
use super::Site;
use crate::gateway::admin::{apply_cancel, apply_plan};
use crate::gateway::app::GatewayBody;
use crate::gateway::billing::{self, Ask, BillingRequest, RequestState};

type Answer = Result<Response<GatewayBody>, Rejection>;

/// Ledger rows shown.
const LEDGER_ROWS: usize = 100;
/// Requests shown on the Billing page.
const REQUEST_ROWS: usize = 20;

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.into())
}

fn no_page() -> Rejection {
    Rejection::new(ErrorCode::NotFound).with_message("No such page.")
}

fn title(plan: Plan) -> String {
    let name = plan.name();
    name[..1].to_uppercase() + &name[1..]
}

/// What a request asks for, in words.
fn what(ask: &Ask) -> String {
    match ask {
        Ask::PlanChange { plan } => format!("{} plan", title(*plan)),
        Ask::TopUp { amount } => format!("{} top-up credits", thousands(*amount)),
    }
}

fn request_row(r: &BillingRequest, org_name: String) -> RequestRow {
    let (state, state_class) = match r.state {
        RequestState::Pending => ("Pending", "badge-pending"),
        RequestState::Approved => ("Approved", "badge-approved"),
        RequestState::Declined => ("Declined", "badge-declined"),
    };
    RequestRow {
        org_href: format!("/dashboard/orgs/{}/billing", r.org),
        org_name,
        what: what(&r.ask),
        by: r.by.clone(),
        when: date_time(r.created_ms),
        state,
        state_class,
        approve_action: format!("/dashboard/pending/{}/approve", r.id),
        decline_action: format!("/dashboard/pending/{}/decline", r.id),
    }
}

/// Successive charges of one hour are one row: a busy org has thousands a day.
fn ledger_rows(entries: &[tollgate_credit_meter::LedgerEntry]) -> Vec<LedgerRow> {
    const HOUR: u64 = 3_600_000;
    let mut rows: Vec<(u64, EntryKind, i64, u64, u64)> = Vec::new();
    for e in entries {
        let delta = e.delta_plan + e.delta_topup;
        match rows.last_mut() {
            Some(last)
                if e.kind == EntryKind::Charge
                    && last.1 == EntryKind::Charge
                    && last.0 / HOUR == e.at_ms / HOUR =>
            {
                last.2 += delta;
                last.3 = e.balance_after;
                last.4 += 1;
            }
            _ => rows.push((e.at_ms, e.kind, delta, e.balance_after, 1)),
        }
    }
    rows.iter()
        .rev()
        .take(LEDGER_ROWS)
        .map(|(at, kind, delta, after, count)| LedgerRow {
            when: date_time(*at),
            kind: match kind {
                EntryKind::Charge if *count > 1 => "Charges",
                EntryKind::Charge => "Charge",
                EntryKind::TopUp => "Top-up",
                EntryKind::Renewal => "Renewal",
                EntryKind::PlanChange => "Plan change",
                EntryKind::Adjustment => "Adjustment",
                EntryKind::Cancel => "Cancellation",
                EntryKind::Refund => "Refund",
            },
            change: match (kind, *count) {
                (EntryKind::Charge, n) if n > 1 => format!(
                    "−{} ({} requests)",
                    thousands(delta.unsigned_abs()),
                    thousands(n)
                ),
                _ if *delta > 0 => format!("+{}", thousands(delta.unsigned_abs())),
                _ if *delta < 0 => format!("−{}", thousands(delta.unsigned_abs())),
                _ => "0".to_owned(),
            },
            positive: *delta > 0,
            balance_after: thousands(*after),
        })
        .collect()
}

async fn billing_page(
    state: &Site<'_>,
    viewer: &Viewer,
    org: OrgId,
    name: String,
    can_change: bool,
    notice: Option<String>,
    error: Option<String>,
) -> Result<BillingPage, Rejection> {
    let account = state.ledger.account(org).await.map_err(|e| e.rejection())?;
    let entries = state.ledger.entries(org).await.map_err(|e| e.rejection())?;
    let requests = state
        .billing
        .of_org(org, REQUEST_ROWS)
        .await
        .map_err(|e| e.rejection())?;
    let current = account.as_ref().and_then(|a| a.plan);
    let cancelled = account.is_some() && current.is_none();
    let requested: Vec<Plan> = requests
        .iter()
        .filter(|r| r.state == RequestState::Pending)
        .filter_map(|r| match r.ask {
            Ask::PlanChange { plan } => Some(plan),
            Ask::TopUp { .. } => None,
        })
        .collect();
    let plans = Plan::ALL
        .iter()
        .map(|p| PlanCard {
            value: p.name(),
            name: title(*p),
            price: if p.price_cents() == 0 {
                "Free".to_owned()
            } else {
                format!("${}/month", p.price_cents() / 100)
            },
            credits: p
                .monthly_credits()
                .map_or("Unlimited credits".to_owned(), |c| {
                    format!("{} credits a month", thousands(c))
                }),
            rate: format!(
                "{} requests/min per model",
                thousands(u64::from(p.requests_per_minute()))
            ),
            current: current == Some(*p),
            requested: requested.contains(p),
            action_label: if p.price_cents() == 0 && !cancelled {
                format!("Switch to {}", title(*p))
            } else {
                format!("Request {}", title(*p))
            },
        })
        .collect();
    let base = format!("/dashboard/orgs/{org}/billing");
    let org_nav = OrgNav::new(org.to_string(), name.clone(), Some(Tab::Billing));
    Ok(BillingPage {
        frame: Frame::with_nav("Billing", nav(viewer, Some(org_nav))),
        org_name: name.clone(),
        plan: current.map_or("None".to_owned(), title),
        balance: account.as_ref().map_or("0".to_owned(), |a| {
            a.balance().map_or("Unlimited".to_owned(), thousands)
        }),
        plan_credits: thousands(account.as_ref().map_or(0, |a| a.plan_credits)),
        topup_credits: thousands(account.as_ref().map_or(0, |a| a.topup_credits)),
        period_end: account
            .as_ref()
            .filter(|a| a.plan.is_some())
            .map_or("—".to_owned(), |a| date_time(a.period_end_ms)),
        subscribed: current.is_some(),
        plans,
        requests: requests
            .iter()
            .map(|r| request_row(r, name.clone()))
            .collect(),
        ledger: ledger_rows(&entries),
        can_change,
        plan_action: format!("{base}/plan"),
        cancel_action: format!("{base}/cancel"),
        topup_action: format!("{base}/topup"),
        operator: viewer.is_operator(),
        set_plan_action: format!("{base}/set-plan"),
        set_balance_action: format!("{base}/set-balance"),
        notice,
        error,
    })
}

pub async fn billing(state: &Site<'_>, headers: &HeaderMap, segment: &str) -> Answer {
    let Some(viewer) = auth::viewer(state, headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    let (org, name, can_change) = org_for(state, &viewer, segment).await?;
    let page = billing_page(state, &viewer, org, name, can_change, None, None).await?;
    Ok(render(StatusCode::OK, &page))
}

/// `POST /dashboard/orgs/:org/billing/(plan|cancel|topup)`.
pub async fn billing_action<B>(
    state: &Site<'_>,
    segment: &str,
    action: &str,
    req: Request<B>,
) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let Some(viewer) = auth::viewer(state, &headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    let form = read_form(req).await?;
    check_csrf(&viewer, &headers, &form)?;
    let (org, name, _) = org_for(state, &viewer, segment).await?;
    viewer.may_change(org)?;
    let by = viewer.label().0;
    let done: Result<String, Rejection> = match action {
        "plan" => match form.get("plan").parse::<Plan>() {
            Ok(plan) if plan.price_cents() == 0 => match free_at_once(state, org).await? {
                Some(true) => apply_plan(state, org, plan).await.map(|()| {
                    format!(
                        "{} plan: a new period started with its credits.",
                        title(plan)
                    )
                }),
                None => Ok(format!(
                    "The organization is on the {} plan already.",
                    title(plan)
                )),
                Some(false) => billing::ask(state, org, Ask::PlanChange { plan }, by)
                    .await
                    .map(|_| {
                        format!(
                            "{} plan requested: after a cancellation it is applied once the \
                             operator approves (a new period would hand out its monthly \
                             credits again).",
                            title(plan)
                        )
                    }),
            },
            Ok(plan) => billing::ask(state, org, Ask::PlanChange { plan }, by)
                .await
                .map(|r| match r.state {
                    RequestState::Approved => format!("{} plan: applied.", title(plan)),
                    _ => format!(
                        "{} plan requested: it is applied once approved.",
                        title(plan)
                    ),
                }),
            Err(_) => Err(invalid("Choose one of the four plans.")),
        },
        "topup" => match form.get("amount").trim().parse::<u64>() {
            Ok(amount) if (1..=tollgate_credit_meter::MAX_CREDITS).contains(&amount) => {
                match state.ledger.account(org).await.map_err(|e| e.rejection())? {
                    None => Err(invalid("Subscribe to a plan before buying top-up credits.")),
                    Some(_) => billing::ask(state, org, Ask::TopUp { amount }, by)
                        .await
                        .map(|_| {
                            format!(
                                "{} top-up credits requested: they are added once approved.",
                                thousands(amount)
                            )
                        }),
                }
            }
            _ => Err(invalid(
                "The top-up must be a whole number of credits, at least 1.",
            )),
        },
        "cancel" if form.get("confirm") == "yes" => apply_cancel(state, org)
            .await
            .map(|()| "The subscription is cancelled; top-up credits are kept.".to_owned()),
        "cancel" => Err(invalid("Tick the confirmation to cancel the subscription.")),
        "set-plan" | "set-balance" if !viewer.is_operator() => return Err(no_page()),
        "set-plan" => match form.get("plan").parse::<Plan>() {
            Ok(plan) => apply_plan(state, org, plan)
                .await
                .map(|()| format!("Plan set to {}; a new period started.", title(plan))),
            Err(_) => Err(invalid("Choose one of the four plans.")),
        },
        "set-balance" => match form.get("balance").trim().parse::<u64>() {
            Ok(balance) if balance <= tollgate_credit_meter::MAX_CREDITS => state
                .ledger
                .set_balance(org, balance)
                .await
                .map_err(|e| e.rejection())?
                .map(|_| format!("Balance adjusted to {}.", thousands(balance)))
                .ok_or_else(|| invalid("Subscribe the organization before adjusting its balance.")),
            _ => Err(invalid("The balance must be a whole number of credits.")),
        },
        _ => return Err(no_page()),
    };
    match done {
        Ok(notice) => {
            let page = billing_page(state, &viewer, org, name, true, Some(notice), None).await?;
            Ok(render(StatusCode::OK, &page))
        }
        Err(rejection) if rejection.code() == ErrorCode::InvalidRequest && wants_html(&headers) => {
            let message = rejection.message().to_owned();
            let page = billing_page(state, &viewer, org, name, true, None, Some(message)).await?;
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

/// Whether a switch to Free applies at once: `Some(true)` for an org that never subscribed or
/// is on a paid plan; `Some(false)` for a cancelled one (its Free credits would come back
/// with every cancel-and-resubscribe, so the operator decides); `None` when it is on Free.
async fn free_at_once(state: &Site<'_>, org: OrgId) -> Result<Option<bool>, Rejection> {
    let account = state.ledger.account(org).await.map_err(|e| e.rejection())?;
    Ok(match account {
        None => Some(true),
        Some(a) => match a.plan {
            Some(p) if p.price_cents() == 0 => None,
            Some(_) => Some(true),
            None => Some(false),
        },
    })
}

/// The operator only: users do not see this page (404).
fn operator_only(viewer: &Viewer) -> Result<(), Rejection> {
    match viewer.who {
        Who::Operator => Ok(()),
        Who::User(_) => Err(no_page()),
    }
}

async fn pending_page(
    state: &Site<'_>,
    viewer: &Viewer,
    notice: Option<String>,
) -> Result<PendingPage, Rejection> {
    let pending = state.billing.pending().await.map_err(|e| e.rejection())?;
    let mut rows = Vec::with_capacity(pending.len());
    for r in &pending {
        let name = state
            .orgs
            .name(r.org)
            .await
            .map_err(|e| e.rejection())?
            .unwrap_or_else(|| r.org.to_string());
        rows.push(request_row(r, name));
    }
    Ok(PendingPage {
        frame: Frame::with_nav("Pending", nav(viewer, None)),
        requests: rows,
        notice,
    })
}

pub async fn pending(state: &Site<'_>, headers: &HeaderMap) -> Answer {
    let Some(viewer) = auth::viewer(state, headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    operator_only(&viewer)?;
    Ok(render(
        StatusCode::OK,
        &pending_page(state, &viewer, None).await?,
    ))
}

/// `POST /dashboard/pending/:id/(approve|decline)`.
pub async fn decide<B>(state: &Site<'_>, id: &str, action: &str, req: Request<B>) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let headers = req.headers().clone();
    let Some(viewer) = auth::viewer(state, &headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    let form = read_form(req).await?;
    check_csrf(&viewer, &headers, &form)?;
    operator_only(&viewer)?;
    let id: uuid::Uuid = id.parse().map_err(|_| no_page())?;
    let approve = match action {
        "approve" => true,
        "decline" => false,
        _ => return Err(no_page()),
    };
    let decided = billing::decide(state, id, approve).await?;
    let org = state
        .orgs
        .name(decided.org)
        .await
        .map_err(|e| e.rejection())?
        .unwrap_or_default();
    let notice = format!(
        "{} for {org}: {}.",
        what(&decided.ask),
        if approve {
            "approved and applied"
        } else {
            "declined"
        }
    );
    Ok(render(
        StatusCode::OK,
        &pending_page(state, &viewer, Some(notice)).await?,
    ))
}
