//! The nodes the catalog has heard from, by name: what their tiers hold
//! and when they last said so. Kept in memory, and in the catalog's node
//! table (name, pool, version, last heard from) at a node's first
//! heartbeat and about once a [`SAVE_EVERY`] after, so a node that went
//! down is still listed, and its payloads marked unavailable, after the
//! operator restarts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use payload_catalog::NodeRow;
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
/// How stale a live node's row may grow: a restarted operator shows a
/// node that is down as last heard from at most this much before it was.
pub const SAVE_EVERY: Duration = Duration::from_secs(60);

pub struct Nodes {
    known: Mutex<BTreeMap<String, Known>>,
    /// How often agents send heartbeats.
    pub interval: Duration,
    /// When this operator started: a node restored from the table is live
    /// until it has missed its heartbeats counting from here, as nothing
    /// could hear it before.
    started_ms: u64,
}

struct Known {
    info: NodeInfo,
    /// What the node table holds of it, if anything.
    saved: Option<NodeRow>,
    /// A write of its row is under way: no second one meanwhile.
    saving: bool,
}

impl Nodes {
    /// The nodes of the catalog's table (`restored`), none of them heard
    /// from yet by this operator, which starts at `now_ms`.
    pub fn new(interval: Duration, restored: Vec<NodeRow>, now_ms: u64) -> Self {
        let known = restored
            .into_iter()
            .map(|row| {
                let info = NodeInfo {
                    name: row.name.clone(),
                    // Written by an earlier operator's clock, maybe ahead
                    // of this one's: never later than now.
                    last_seen_ms: row.last_seen_ms.min(now_ms),
                    pool: row.pool.clone(),
                    version: row.version.clone(),
                    ..Default::default()
                };
                let known = Known {
                    info,
                    saved: Some(row.clone()),
                    saving: false,
                };
                (row.name, known)
            })
            .collect();
        Nodes {
            known: Mutex::new(known),
            interval,
            started_ms: now_ms,
        }
    }

    /// Takes a node's heartbeat; returns its row when the table should be
    /// told (first heard of, another pool or version, or [`SAVE_EVERY`]
    /// since) and no write of it is under way: write it, then call
    /// [`Nodes::saved`] with the outcome.
    pub fn beat(&self, node: &str, beat: HeartbeatRequest, now_ms: u64) -> Option<NodeRow> {
        let info = NodeInfo {
            name: node.to_string(),
            last_seen_ms: now_ms,
            live: true,
            tiers: beat.tiers,
            version: beat.version,
            backlog: beat.backlog,
            pool: beat.pool,
        };
        let row = NodeRow {
            name: node.to_string(),
            pool: info.pool.clone(),
            version: info.version.clone(),
            last_seen_ms: now_ms,
        };
        let mut known = crate::lock(&self.known);
        let (saved, saving) = known.remove(node).map_or((None, false), |k| (k.saved, k.saving));
        let due = !saving
            && saved.as_ref().is_none_or(|s| {
                s.pool != row.pool
                    || s.version != row.version
                    || now_ms.saturating_sub(s.last_seen_ms) >= SAVE_EVERY.as_millis() as u64
            });
        known.insert(
            node.to_string(),
            Known {
                info,
                saved,
                saving: due,
            },
        );
        due.then_some(row)
    }

    /// The write of `row` ended: the table holds it if `stored`.
    pub fn saved(&self, row: NodeRow, stored: bool) {
        if let Some(known) = crate::lock(&self.known).get_mut(&row.name) {
            known.saving = false;
            if stored {
                known.saved = Some(row);
            }
        }
    }

    /// Every node, with `live` false for those whose heartbeats stopped.
    pub fn list(&self, now_ms: u64) -> Vec<NodeInfo> {
        let expiry = MISSED * self.interval.as_millis() as u64;
        crate::lock(&self.known)
            .values()
            .map(|k| NodeInfo {
                live: now_ms.saturating_sub(k.info.last_seen_ms.max(self.started_ms)) < expiry,
                ..k.info.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_heartbeats_stop_is_listed_as_not_live() {
        let nodes = Nodes::new(INTERVAL, vec![], 0);
        nodes.beat("a", HeartbeatRequest::default(), 1_000);
        nodes.beat("b", HeartbeatRequest::default(), 14_000);
        let listed = nodes.list(16_500);
        let live: Vec<_> = listed.iter().map(|n| (n.name.as_str(), n.live)).collect();
        assert_eq!(live, [("a", false), ("b", true)]);
        nodes.beat("a", HeartbeatRequest::default(), 17_000);
        assert!(nodes.list(17_000).iter().all(|n| n.live));
    }

    fn row(name: &str, last_seen_ms: u64) -> NodeRow {
        NodeRow {
            name: name.into(),
            pool: "gpu".into(),
            version: "1".into(),
            last_seen_ms,
        }
    }

    fn beat(version: &str) -> HeartbeatRequest {
        HeartbeatRequest {
            pool: "gpu".into(),
            version: version.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_restored_node_is_live_until_it_misses_its_beats_from_the_restart() {
        // Restarted at 100 s: "down" was last heard from at 40 s.
        let nodes = Nodes::new(INTERVAL, vec![row("down", 40_000)], 100_000);
        let listed = nodes.list(100_000);
        assert_eq!((listed[0].name.as_str(), listed[0].live), ("down", true));
        assert_eq!(listed[0].last_seen_ms, 40_000, "as last heard, not as restored");
        assert_eq!(listed[0].pool, "gpu");
        assert!(!nodes.list(115_000)[0].live, "three intervals after the restart");
        // A row from a clock ahead of this one's counts from now.
        let nodes = Nodes::new(INTERVAL, vec![row("ahead", 500_000)], 100_000);
        assert_eq!(nodes.list(100_000)[0].last_seen_ms, 100_000);
        assert!(!nodes.list(115_000)[0].live);
    }

    #[test]
    fn a_node_is_saved_when_new_changed_or_a_minute_stale() {
        let nodes = Nodes::new(INTERVAL, vec![row("old", 1_000)], 2_000);
        assert_eq!(nodes.beat("old", beat("1"), 2_000), None, "the table holds it");
        let new = nodes.beat("new", beat("1"), 2_000).expect("first heard of");
        assert_eq!(nodes.beat("new", beat("1"), 3_000), None, "its write is under way");
        nodes.saved(new.clone(), false);
        assert_eq!(
            nodes.beat("new", beat("1"), 3_500),
            Some(row("new", 3_500)),
            "that write failed"
        );
        nodes.saved(new, true);
        assert_eq!(nodes.beat("new", beat("1"), 61_999), None);
        assert_eq!(nodes.beat("new", beat("1"), 62_000), Some(row("new", 62_000)));
        assert_eq!(
            nodes.beat("old", beat("2"), 4_000).map(|r| r.version),
            Some("2".to_string()),
            "upgraded"
        );
    }
}
