//! The demo tenant: an org on the basic plan, a model connected to a sandbox account, a key.

use tollgate_core::{BoxError, KeyId, ModelId, OrgId, Plan};
use tollgate_upstream_sign::Session;

use super::state::AppState;
use crate::sandbox::Sandbox;

/// The demo tenant seeded in demo mode.
#[derive(Clone)]
pub struct Demo {
    /// The demo organization (basic plan).
    pub org: OrgId,
    /// The demo model, connected to a sandbox account.
    pub model: ModelId,
    /// The demo key's id.
    pub key_id: KeyId,
    /// The demo key's secret.
    pub key: String,
    /// The email of the demo org's dashboard owner.
    pub dashboard_email: String,
    /// Their password (random per start; printed in the banner, never logged).
    pub dashboard_password: String,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo")
            .field("org", &self.org)
            .field("model", &self.model)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

pub(crate) async fn seed(state: &AppState, sandbox: Option<&Sandbox>) -> Result<Demo, BoxError> {
    let org = state.orgs.create("Demo Org".to_owned()).await?;
    state.ledger.subscribe(org, Plan::Basic).await?;
    state.keys.set_subscription(org, Some(Plan::Basic)).await?;
    let session = match sandbox {
        Some(sandbox) => {
            let account = sandbox.add_account();
            Session {
                cookie: account.cookie,
                user_id: account.user_id,
                x_bc: account.x_bc,
                user_agent: account.user_agent,
            }
        }
        None => return Err("demo mode needs the in-process sandbox upstream (unset TOLLGATE_UPSTREAM or TOLLGATE_DEMO)".into()),
    };
    let model = state
        .sessions
        .connect(org, "Demo Model".to_owned(), session)
        .await?;
    state.keys.add_model(org, model.id).await?;
    let key = state.keys.create_key(org, "demo".to_owned()).await?;
    let (dashboard_email, dashboard_password) = seed_owner(state, org).await?;
    Ok(Demo {
        org,
        model: model.id,
        key_id: key.id,
        key: key.secret,
        dashboard_email,
        dashboard_password,
    })
}

/// A dashboard owner of the demo org with a random password: (email, password). The email
/// names the org, so demo orgs seeded into one database each get their own.
async fn seed_owner(state: &AppState, org: OrgId) -> Result<(String, String), BoxError> {
    let id = org.to_string();
    let email = format!("owner-{}@demo.tollgate.test", &id[..8]);
    let mut bytes = [0u8; 9];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| format!("the random number generator failed: {e}"))?;
    let password = format!("demo-{}", hex::encode(bytes));
    let (_, token) =
        super::admin_accounts::create_invite(state, org, &email, tollgate_accounts::Role::Owner)
            .await
            .map_err(|r| r.message().to_owned())?;
    let hash = state.accounts.passwords.hash(&password).await?;
    state
        .accounts
        .users
        .accept_invite(token.hash(), hash)
        .await?
        .ok_or("the demo owner's invite could not be used")?;
    Ok((email, password))
}
