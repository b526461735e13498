//! The `PayloadPolicy` controller: each policy is compiled (`compile.rs`),
//! stored in the catalog for agents to apply, and told in its status
//! whether it was accepted (`reconcile.rs`). It runs in `payload-operator
//! catalog`, the one process with the database's credentials.

pub mod cli;
pub mod compile;
pub mod reconcile;

use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::{watcher, Controller};
use kube::Api;

use reconcile::{error_policy, Context, Watched};

/// Reconciles every policy until SIGTERM or SIGINT.
pub async fn run(ctx: Context) {
    let policies = Api::<Watched>::all(ctx.client.clone());
    Controller::new(policies, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile::reconcile, error_policy, Arc::new(ctx))
        .for_each(|outcome| async move {
            match outcome {
                Ok((policy, _)) => tracing::debug!(policy = %policy.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "a policy reconcile did not complete"),
            }
        })
        .await;
}
