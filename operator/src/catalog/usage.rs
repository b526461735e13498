//! Each pool's tier capacity and use, summed over its live agents'
//! heartbeats, written into the PayloadPool's status by the catalog under
//! a field manager of its own, so the pool controller's status writes and
//! these leave each other's fields alone.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use payload_proto::cluster::NodeInfo;

use super::nodes::Nodes;
use crate::crd::{PayloadPool, Tier, TierUsage};

/// The field manager of `status.tiers`.
pub const MANAGER: &str = "payload-operator-catalog";
/// How often the sums are written (when they changed).
const EVERY: Duration = Duration::from_secs(15);

/// The tiers of each pool's live nodes, summed, fastest first.
pub fn by_pool(nodes: &[NodeInfo]) -> BTreeMap<String, Vec<TierUsage>> {
    let mut sums: BTreeMap<String, BTreeMap<Tier, (u64, u64)>> = BTreeMap::new();
    for node in nodes.iter().filter(|n| n.live && !n.pool.is_empty()) {
        let pool = sums.entry(node.pool.clone()).or_default();
        for t in &node.tiers {
            let Some(tier) = tier(t.tier) else { continue };
            let sum = pool.entry(tier).or_default();
            sum.0 = sum.0.saturating_add(t.capacity_bytes);
            sum.1 = sum.1.saturating_add(t.used_bytes);
        }
    }
    let bytes = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
    sums.into_iter()
        .map(|(pool, tiers)| {
            let tiers = tiers
                .into_iter()
                .map(|(tier, (capacity, used))| TierUsage {
                    tier,
                    capacity_bytes: bytes(capacity),
                    used_bytes: bytes(used),
                })
                .collect();
            (pool, tiers)
        })
        .collect()
}

fn tier(wire: i32) -> Option<Tier> {
    match wire {
        1 => Some(Tier::Gpu),
        2 => Some(Tier::Ram),
        3 => Some(Tier::Disk),
        4 => Some(Tier::Object),
        _ => None,
    }
}

/// Writes the sums that changed since `written` (what was last written,
/// updated here); a pool whose agents all went quiet gets an empty list.
pub async fn publish(client: &Client, nodes: &[NodeInfo], written: &mut BTreeMap<String, Vec<TierUsage>>) {
    let mut now = by_pool(nodes);
    for pool in written.keys() {
        now.entry(pool.clone()).or_default();
    }
    let api = Api::<PayloadPool>::all(client.clone());
    for (pool, tiers) in now {
        if written.get(&pool) == Some(&tiers) {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": PayloadPool::api_version(&()),
            "kind": PayloadPool::kind(&()),
            "status": {"tiers": tiers},
        });
        match api
            .patch_status(&pool, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                written.insert(pool, tiers);
            }
            // Agents of a pool that is gone (or never was, outside the chart).
            Err(kube::Error::Api(status)) if status.code == 404 => {
                written.remove(&pool);
            }
            Err(e) => tracing::warn!(%pool, error = %e, "could not write the pool's tier use; trying again"),
        }
    }
}

/// Keeps every pool's `status.tiers` current until the process ends.
pub async fn run(client: Client, nodes: std::sync::Arc<Nodes>) {
    let mut written = BTreeMap::new();
    loop {
        tokio::time::sleep(EVERY).await;
        let listed = nodes.list(super::now_ms());
        publish(&client, &listed, &mut written).await;
    }
}
