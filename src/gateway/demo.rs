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
    Ok(Demo {
        org,
        model: model.id,
        key_id: key.id,
        key: key.secret,
    })
}
