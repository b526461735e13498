//! One reconcile of a `PayloadPolicy`. The catalog row is state outside
//! Kubernetes, so a policy carries a finalizer: put on before its row is
//! first stored, taken off once the row is gone (deleting the object
//! deletes the row whoever removed the finalizer). An accepted policy is
//! stored; an invalid one is removed from the catalog, so no agent goes
//! on applying a spec its owner has replaced; one that cannot be read (a
//! newer schema) keeps the row of the last version read.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource};
use payload_catalog::{CatalogError, PgRepository, Policy, SqliteRepository};

use super::compile::{compile, not_applied};
use crate::conditions::{self, reason, ACCEPTED};
use crate::crd::{PayloadPolicy, PayloadPolicyStatus};
use crate::pool::reconcile::MANAGER;

/// Marks a policy whose catalog row must go before the object does.
pub const FINALIZER: &str = "payload-manager.io/catalog-row";
/// How often a settled policy is stored again (a catalog restored from a
/// backup, a row removed by hand).
const RESYNC: Duration = Duration::from_secs(300);
const CONTROLLER: &str = "payloadpolicy";

/// Where accepted policies go: the cluster's PostgreSQL, or SQLite.
pub enum Store {
    Postgres(PgRepository),
    Sqlite(SqliteRepository),
}

impl Store {
    pub async fn put(&self, policy: &Policy) -> Result<(), CatalogError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        match self {
            Store::Postgres(repo) => repo.put_policy(policy, now).await,
            Store::Sqlite(repo) => repo.put_policy(policy, now).await,
        }
    }

    pub async fn delete(&self, namespace: &str, name: &str) -> Result<(), CatalogError> {
        match self {
            Store::Postgres(repo) => repo.delete_policy(namespace, name).await,
            Store::Sqlite(repo) => repo.delete_policy(namespace, name).await,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub store: Store,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub events: crate::events::Events,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Kube {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing the catalog: {0}")]
    Catalog(#[source] CatalogError),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "api",
            Error::Catalog(_) => "catalog",
        }
    }
}

/// Policies are watched through a guard: one that does not deserialize is
/// reported in its own status instead of stopping the watch.
pub type Watched = DeserializeGuard<PayloadPolicy>;

pub async fn reconcile(watched: Arc<Watched>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timed = ctx.metrics.reconcile(CONTROLLER);
    let done = reconcile_policy(&watched, &ctx).await;
    timed.finish(done.as_ref().map_or_else(Error::category, |_| "ok"));
    done
}

async fn reconcile_policy(watched: &Watched, ctx: &Context) -> Result<Action, Error> {
    let (meta, policy) = match &watched.0 {
        Ok(policy) => (&policy.metadata, Ok(policy)),
        Err(unreadable) => (&unreadable.metadata, Err(unreadable.error.as_str())),
    };
    let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
        return Ok(Action::await_change());
    };
    let api = Api::<PayloadPolicy>::namespaced(ctx.client.clone(), namespace);
    let ours = meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    if meta.deletion_timestamp.is_some() {
        // Whoever removed our finalizer, the row goes with the object.
        ctx.store.delete(namespace, name).await.map_err(Error::Catalog)?;
        if ours {
            let rest = meta
                .finalizers
                .iter()
                .flatten()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            set_finalizers(&api, meta, rest).await?;
            tracing::info!(policy = %format!("{namespace}/{name}"), "policy deleted; its catalog row is gone");
        }
        return Ok(Action::await_change());
    }
    let generation = meta.generation.unwrap_or_default();
    let decided = match policy {
        Ok(p) => compile(namespace, name, generation, &p.spec).map(|c| (c, not_applied(&p.spec))),
        // Likely an object of a newer schema than this operator's: the
        // row stored from the last readable spec stays in force.
        Err(why) => Err(format!(
            "the policy could not be read ({why}); the last version read stays in force"
        )),
    };
    let previous = policy
        .ok()
        .and_then(|p| p.status.as_ref())
        .map_or(&[][..], |s| &s.conditions[..]);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let condition = match decided {
        Ok((compiled, unapplied)) => {
            // Before the row exists, so it never outlives the object.
            if !ours {
                let mut with: Vec<String> = meta.finalizers.clone().unwrap_or_default();
                with.push(FINALIZER.into());
                set_finalizers(&api, meta, with).await?;
            }
            ctx.store.put(&compiled).await.map_err(Error::Catalog)?;
            let mut said = "stored in the catalog; every agent applies it within seconds".to_string();
            if !unapplied.is_empty() {
                said += &format!(" (agents do not apply {} yet)", unapplied.join(", "));
            }
            conditions::set(previous, ACCEPTED, true, reason::VALID, said, Some(generation), &now)
        }
        Err(why) => {
            tracing::warn!(policy = %format!("{namespace}/{name}"), %why, "policy not accepted");
            if policy.is_ok() {
                ctx.store.delete(namespace, name).await.map_err(Error::Catalog)?;
            }
            let said = format!("{why}; not applied until it is fixed");
            conditions::set(
                previous,
                ACCEPTED,
                false,
                reason::INVALID_SPEC,
                said,
                Some(generation),
                &now,
            )
        }
    };
    let status = PayloadPolicyStatus {
        observed_generation: Some(generation),
        conditions: vec![condition],
    };
    write_status(&api, name, status.clone()).await?;
    if let Ok(p) = policy {
        let bad = |_: &str, state: &str| state == "False";
        crate::events::changed(&ctx.events, &p.object_ref(&()), previous, &status.conditions, bad).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Transient errors retry after 5 s.
pub fn error_policy(watched: Arc<Watched>, error: &Error, _ctx: Arc<Context>) -> Action {
    let meta = match &watched.0 {
        Ok(policy) => &policy.metadata,
        Err(unreadable) => &unreadable.metadata,
    };
    let name = format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    );
    tracing::warn!(policy = %name, %error, kind = error.category(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Replaces the finalizer list, only if the object is still the version
/// read (a conflict retries the reconcile).
async fn set_finalizers(api: &Api<PayloadPolicy>, meta: &ObjectMeta, finalizers: Vec<String>) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": meta.resource_version},
    });
    api.patch(
        meta.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(drop)
    .map_err(|source| Error::Kube {
        what: "updating the policy's finalizers",
        source,
    })
}

async fn write_status(api: &Api<PayloadPolicy>, name: &str, status: PayloadPolicyStatus) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": PayloadPolicy::api_version(&()),
        "kind": PayloadPolicy::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(drop)
        .map_err(|source| Error::Kube {
            what: "writing the policy's status",
            source,
        })
}
