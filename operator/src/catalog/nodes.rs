//! The nodes the catalog has heard from, by name: what their tiers hold
//! and when they last said so. Kept in memory: after an operator restart
//! every live agent is known again within one heartbeat interval.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use payload_proto::cluster::{HeartbeatRequest, NodeInfo};

/// How often agents are asked to send heartbeats, unless told otherwise.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// The most a heartbeat may carry.
pub const MAX_TIERS: usize = 8;
pub const MAX_VERSION: usize = 64;
/// A pool's name is a Kubernetes object name.
pub const MAX_POOL: usize = 253;
/// Heartbeats missed before a node is no longer live.
const MISSED: u64 = 3;

pub struct Nodes {
    known: Mutex<BTreeMap<String, NodeInfo>>,
    /// How often agents send heartbeats.
    pub interval: Duration,
}

impl Nodes {
    pub fn new(interval: Duration) -> Self {
        Nodes {
            known: Mutex::default(),
            interval,
        }
    }

    pub fn beat(&self, node: &str, beat: HeartbeatRequest, now_ms: u64) {
        let info = NodeInfo {
            name: node.to_string(),
            last_seen_ms: now_ms,
            live: true,
            tiers: beat.tiers,
            version: beat.version,
            backlog: beat.backlog,
            pool: beat.pool,
        };
        crate::lock(&self.known).insert(node.to_string(), info);
    }

    /// Every node, with `live` false for those whose heartbeats stopped.
    pub fn list(&self, now_ms: u64) -> Vec<NodeInfo> {
        let expiry = MISSED * self.interval.as_millis() as u64;
        crate::lock(&self.known)
            .values()
            .map(|info| NodeInfo {
                live: now_ms.saturating_sub(info.last_seen_ms) < expiry,
                ..info.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_heartbeats_stop_is_listed_as_not_live() {
        let nodes = Nodes::new(INTERVAL);
        nodes.beat("a", HeartbeatRequest::default(), 1_000);
        nodes.beat("b", HeartbeatRequest::default(), 14_000);
        let listed = nodes.list(16_500);
        let live: Vec<_> = listed.iter().map(|n| (n.name.as_str(), n.live)).collect();
        assert_eq!(live, [("a", false), ("b", true)]);
        nodes.beat("a", HeartbeatRequest::default(), 17_000);
        assert!(nodes.list(17_000).iter().all(|n| n.live));
    }
}
