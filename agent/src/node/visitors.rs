//! Another node's payloads, leased here. In a shared catalog (a cluster) a
//! lease on this node for a payload whose row belongs to another node is
//! served from its object-store copy, fetched into this node's block cache;
//! without such a copy the caller learns which node holds it. Such a
//! payload is a visitor: kept apart from this node's own payloads, never
//! written to the catalog, moved, expired or deleted here, and forgotten
//! (with its cached blocks) once nobody has leased it for a while.

use std::sync::{Arc, Mutex};

use payload_catalog::{PayloadId, PayloadRecord, Tier};

use super::{lock, Entry, EntryRef, Node};
use crate::error::AgentError;

/// How long a visitor nobody holds a lease on is kept, so that the next
/// lease finds its blocks cached and needs no catalog call.
pub(crate) const VISITOR_IDLE_MS: u64 = 60_000;

impl Node {
    /// The entry a lease pins: one of this node's payloads, or a visitor.
    pub(crate) fn lease_entry(&self, id: PayloadId) -> Result<EntryRef, AgentError> {
        self.entry(id)
            .or_else(|missing| self.visitors.shard(&id).get(&id).cloned().ok_or(missing))
    }

    /// Whether payload `id` is another node's, leased here.
    pub(crate) fn is_visitor(&self, id: PayloadId) -> bool {
        self.visitors.shard(&id).contains_key(&id)
    }

    /// Makes payload `id` leasable here: a no-op for this node's payloads;
    /// another node's becomes a visitor when its object-store copy can be
    /// read here, and is refused naming its node otherwise.
    pub async fn reach(&self, id: PayloadId) -> Result<(), AgentError> {
        let missing = match self.lease_entry(id) {
            Ok(_) => return Ok(()),
            Err(missing) => missing,
        };
        let located = self.repo.locate_payload(id).await.map_err(|err| {
            tracing::warn!(%id, %err, "could not ask the catalog which node holds a payload");
            AgentError::Unavailable(format!(
                "payload {id} is not on node {}, and the catalog could not say which node holds it; retry shortly",
                self.cfg.node_name
            ))
        })?;
        let Some((rec, holder)) = located else {
            return Err(missing);
        };
        if holder == self.cfg.node_name {
            return Err(missing);
        }
        let visitor = self.visitor(rec, &holder)?;
        let now = self.now_ms();
        self.visitors
            .shard(&id)
            .entry(id)
            .or_insert_with(|| Arc::new(Mutex::new(Entry::new(visitor, now))));
        Ok(())
    }

    /// The row a visitor is leased under: the object tier (what this node
    /// reads), no other copies.
    fn visitor(&self, rec: PayloadRecord, holder: &str) -> Result<PayloadRecord, AgentError> {
        let id = rec.id;
        if !rec.state.is_readable() {
            return Err(AgentError::InvalidState(format!(
                "payload {id} is {} on node {holder}; only committed payloads can be leased (commit it first)",
                rec.state.name()
            )));
        }
        if !rec.in_object_store() {
            return Err(AgentError::InvalidState(format!(
                "payload {id} is held by node {holder} on its {} tier and has no object-store copy; lease it \
                 through node {holder}'s agent, or spill it to the object tier there so any node can read it",
                rec.tier.name()
            )));
        }
        if self.object.is_none() {
            return Err(AgentError::InvalidState(format!(
                "payload {id} is held by node {holder}; its object-store copy cannot be read on node {} because \
                 this agent has no object tier (start it with the --object-store of node {holder})",
                self.cfg.node_name
            )));
        }
        Ok(PayloadRecord {
            tier: Tier::Object,
            copies: Vec::new(),
            ..rec
        })
    }

    /// The refusal of a lease on a visitor that asks for a faster tier.
    pub(crate) fn visitor_too_slow(&self, id: PayloadId, wanted: Tier) -> AgentError {
        AgentError::InvalidState(format!(
            "payload {id} belongs to another node; node {} serves it from the object tier only (through its \
             block cache), not on the {} tier: lease it without min_tier, or on its node",
            self.cfg.node_name,
            wanted.name()
        ))
    }

    /// Forgets visitors nobody has leased for [`VISITOR_IDLE_MS`], with
    /// their cached blocks (sweeper).
    pub(crate) fn sweep_visitors(&self, now: u64) {
        let mut forgotten = Vec::new();
        // A fill may outlive the lease that started it: its blocks stay.
        let filling = self.object.as_ref().map(|o| o.cache.filling()).unwrap_or_default();
        self.visitors.retain(|id, entry| {
            let mut e = lock(entry);
            let keep = e.live_leases(now) > 0
                || filling.contains(id)
                || now < e.last_access_ms.saturating_add(VISITOR_IDLE_MS);
            if !keep {
                // A grant that found it just before sees this and retries.
                e.gone = true;
                forgotten.push(*id);
            }
            keep
        });
        if let Some(object) = &self.object {
            for id in forgotten {
                object.cache.remove(id);
            }
        }
    }
}
