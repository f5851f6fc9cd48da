//! Admin actions shared by a fleet: a drain, enable, disable or weight change made
//! through one instance's admin API reaches every instance through the store the config's
//! top-level `store` names (see ARCHITECTURE.md, "Fleet-wide admin actions").
//!
//! Each backend's override is one field of the fleet's admin hash in Redis, holding what
//! a warm restart saves of it (the state and weight set, the file's values they were set
//! over, when a drain began). An action writes its field and announces it; every other
//! instance reads the hash when told, when Redis comes (back), and every few seconds in
//! case a message was missed, and applies what differs from its own overrides by the rule
//! reloads keep them by. The hash outlives every instance, so one that starts later, or
//! restarts, applies it too. An action made while Redis is down stays local until Redis
//! answers again, then is shared.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::control::{ActionError, BackendAction, Control};
use crate::pool::Snapshot;
use crate::store::Fleet;
use crate::warm::OverrideRecord;

/// How often the fleet's admin state is read even when nothing announced a change.
const RESYNC: Duration = Duration::from_secs(5);

/// What became of an admin action, for the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharing {
    /// The config names no fleet store: the action is this instance's alone.
    Local,
    /// Written to the fleet's store; the other instances apply it within a second.
    Shared,
    /// Redis did not take it: shared once it answers again.
    Pending(String),
}

impl Sharing {
    pub fn describe(&self) -> String {
        match self {
            Sharing::Local => "local".into(),
            Sharing::Shared => "shared".into(),
            Sharing::Pending(why) => format!("pending: {why}"),
        }
    }
}

/// The store the fleet shares admin actions through: the top-level `store`'s.
pub fn store(snapshot: &Snapshot) -> Option<Arc<Fleet>> {
    let name = snapshot.config.store.as_ref()?;
    snapshot.stores.iter().find(|f| &f.cfg.name == name).cloned()
}

/// An admin action: applied here at once, then shared with the fleet.
pub async fn act(
    control: &Control,
    pool: &str,
    backend: &str,
    action: BackendAction,
) -> Result<(Arc<crate::backend::Backend>, Sharing), ActionError> {
    let _step = control.fleet_step.lock().await;
    let b = control.backend_action(pool, backend, action)?;
    let Some(fleet) = store(&control.shared.snapshot.load()) else { return Ok((b, Sharing::Local)) };
    let shared = match share(control, &fleet, pool, backend).await {
        Ok(()) => Sharing::Shared,
        Err(why) => {
            tracing::warn!(pool, backend, "admin: not shared with the fleet yet: {why}");
            let mut pending = control.fleet_pending.lock().unwrap_or_else(|e| e.into_inner());
            if !pending.iter().any(|(p, b)| p == pool && b == backend) {
                pending.push((pool.to_string(), backend.to_string()));
            }
            Sharing::Pending(why)
        }
    };
    Ok((b, shared))
}

/// Writes this instance's override on one backend to the fleet's admin hash.
async fn share(control: &Control, fleet: &Fleet, pool: &str, backend: &str) -> Result<(), String> {
    let Some(o) = control.override_of(pool, backend) else { return Ok(()) };
    let record = OverrideRecord::of(o, &control.shared.snapshot.load());
    let value = serde_json::to_string(&record).map_err(|e| e.to_string())?;
    fleet.admin_set(&field(pool, backend), &value).await
}

/// A backend's field in the admin hash.
fn field(pool: &str, backend: &str) -> String {
    format!("{pool}\n{backend}")
}

/// Keeps this instance's overrides in step with the fleet's until shutdown: shares what
/// is pending, then reads the admin hash and applies it, whenever another instance
/// announces a change, Redis comes (back), or [`RESYNC`] has passed.
pub async fn keep_in_step(control: Arc<Control>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let fleet = store(&control.shared.snapshot.load());
        if let Some(f) = fleet.as_ref().filter(|f| f.is_up()) {
            step(&control, f).await;
        }
        let changed = async {
            match &fleet {
                Some(f) => f.admin_changes().notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(RESYNC) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One round: pending actions shared, the fleet's applied.
async fn step(control: &Control, fleet: &Fleet) {
    let _step = control.fleet_step.lock().await;
    let pending = std::mem::take(&mut *control.fleet_pending.lock().unwrap_or_else(|e| e.into_inner()));
    for (i, (pool, backend)) in pending.iter().enumerate() {
        if let Err(why) = share(control, fleet, pool, backend).await {
            tracing::debug!("admin actions still not shared: {why}");
            control.fleet_pending.lock().unwrap_or_else(|e| e.into_inner()).extend(pending[i..].iter().cloned());
            return;
        }
        tracing::info!(pool, backend, "admin: shared with the fleet now that Redis answers");
    }
    let fields = match fleet.admin_all().await {
        Ok(f) => f,
        Err(why) => {
            tracing::debug!("cannot read the fleet's admin actions: {why}");
            return;
        }
    };
    let records =
        fields.iter().filter_map(|(_, value)| serde_json::from_str::<OverrideRecord>(value).ok()?.saved()).collect();
    for o in control.apply_shared_overrides(records) {
        tracing::info!(
            pool = %o.pool,
            backend = %o.backend,
            "admin: from the fleet: {}",
            match (o.state, o.weight) {
                (Some(s), Some(w)) => format!("{}, weight {w}", s.as_str()),
                (Some(s), None) => s.as_str().to_string(),
                (None, Some(w)) => format!("weight {w}"),
                (None, None) => "nothing".to_string(),
            }
        );
    }
}
