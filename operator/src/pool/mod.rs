//! The `PayloadPool` controller: one file per step (what a pool becomes,
//! its status, one reconcile), and the watch that drives them.

pub mod desired;
pub mod reconcile;
pub mod status;

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{watcher, Controller};
use kube::Api;

use reconcile::{error_policy, Context, Watched};

/// Reconciles every pool until SIGTERM or SIGINT; a change to an agent's
/// DaemonSet or ConfigMap (someone edited it, a node joined) reconciles
/// its pool again.
pub async fn run(ctx: Context) {
    let ns = ctx.settings.namespace.clone();
    let pools = Api::<Watched>::all(ctx.client.clone());
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=payload-operator");
    Controller::new(pools, watcher::Config::default())
        .owns(Api::<DaemonSet>::namespaced(ctx.client.clone(), &ns), owned.clone())
        .owns(Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns), owned)
        .shutdown_on_signal()
        .run(reconcile::reconcile, error_policy, Arc::new(ctx))
        .for_each(|outcome| async move {
            match outcome {
                Ok((pool, _)) => tracing::debug!(pool = %pool.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "a reconcile did not complete"),
            }
        })
        .await;
}
