//! One reconcile of a `PayloadPool`: build its objects (pure), apply them
//! with server-side apply under one field manager, then write the status
//! from what the API server returned. A pool that cannot be built gets a
//! Degraded status saying why and waits for its next change; an API error
//! is retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::desired::{desired, Settings};
use super::status;
use crate::crd::{PayloadPool, PayloadPoolStatus};

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "payload-operator";
/// How often a settled pool is looked at again, in case a watch missed
/// something.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a pool whose agents are still starting is looked at again.
const SETTLING: Duration = Duration::from_secs(10);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub events: crate::events::Events,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {what}: {source}")]
    Apply {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing the pool's status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    /// A bounded label for metrics (never the object's name or the text).
    pub fn category(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Status(_) => "status",
        }
    }
}

/// Pools are watched through a guard: one that does not deserialize (an
/// older schema, a hand-edited object) is reported in its own status
/// instead of stopping the watch.
pub type Watched = DeserializeGuard<PayloadPool>;

/// The controller's name in metrics.
const CONTROLLER: &str = "payloadpool";

pub async fn reconcile(watched: Arc<Watched>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timed = ctx.metrics.reconcile(CONTROLLER);
    let done = reconcile_pool(&watched, &ctx).await;
    timed.finish(done.as_ref().map_or_else(Error::category, |_| "ok"));
    done
}

async fn reconcile_pool(watched: &Watched, ctx: &Context) -> Result<Action, Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let pool = match &watched.0 {
        Ok(pool) => pool,
        Err(unreadable) => {
            let shell = PayloadPool {
                metadata: unreadable.metadata.clone(),
                spec: Default::default(),
                status: None,
            };
            let why = format!("the pool could not be read ({})", unreadable.error);
            tracing::warn!(pool = %shell.name_any(), %why, "an unreadable pool");
            let status = status::invalid(&shell, &why, &now);
            write_status(&ctx.client, &shell, status.clone()).await?;
            announce(ctx, &shell, &status).await;
            return Ok(Action::await_change());
        }
    };
    let objects = match desired(pool, &ctx.settings) {
        Ok(objects) => objects,
        Err(why) => {
            tracing::warn!(pool = %pool.name_any(), %why, "the pool cannot be built");
            let status = status::invalid(pool, &why, &now);
            write_status(&ctx.client, pool, status.clone()).await?;
            announce(ctx, pool, &status).await;
            return Ok(Action::await_change());
        }
    };
    let ns = &ctx.settings.namespace;
    apply::<ServiceAccount>(&ctx.client, ns, &objects.service_account, "the agents' ServiceAccount").await?;
    apply::<ConfigMap>(&ctx.client, ns, &objects.config_map, "the agents' ConfigMap").await?;
    let ds = apply::<DaemonSet>(&ctx.client, ns, &objects.daemon_set, "the agents' DaemonSet").await?;
    let status = status::applied(pool, &ds, &now);
    let settled = status.nodes_ready == status.nodes_desired && status.nodes_desired > 0;
    write_status(&ctx.client, pool, status.clone()).await?;
    announce(ctx, pool, &status).await;
    Ok(Action::requeue(if settled { RESYNC } else { SETTLING }))
}

/// An Event for each condition the status changed; Ready False and
/// Degraded True warn.
async fn announce(ctx: &Context, pool: &PayloadPool, status: &PayloadPoolStatus) {
    let before = pool.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let bad = |type_: &str, state: &str| {
        (type_ == crate::conditions::READY && state == "False")
            || (type_ == crate::conditions::DEGRADED && state == "True")
    };
    crate::events::changed(&ctx.events, &pool.object_ref(&()), before, &status.conditions, bad).await;
}

/// Transient errors retry soon; the controller backs off on repeats.
pub fn error_policy(watched: Arc<Watched>, error: &Error, _ctx: Arc<Context>) -> Action {
    let name = match &watched.0 {
        Ok(pool) => pool.name_any(),
        Err(unreadable) => unreadable.metadata.name.clone().unwrap_or_default(),
    };
    tracing::warn!(pool = %name, %error, kind = error.category(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn apply<K>(client: &Client, ns: &str, object: &K, what: &'static str) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), ns)
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply { what, source })
}

async fn write_status(client: &Client, pool: &PayloadPool, status: PayloadPoolStatus) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": PayloadPool::api_version(&()),
        "kind": PayloadPool::kind(&()),
        "status": status,
    });
    Api::<PayloadPool>::all(client.clone())
        .patch_status(
            &pool.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(drop)
        .map_err(Error::Status)
}
