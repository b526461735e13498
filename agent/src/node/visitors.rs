//! Another node's payloads, leased here. In a shared catalog (a cluster) a
//! lease on this node for a payload whose row belongs to another node is
//! served from its object-store copy, fetched into this node's block cache;
//! without such a copy the caller learns which node holds it. Such a
//! payload is a visitor: kept apart from this node's own payloads, never
//! written to the catalog, moved, expired or deleted here, asked about
//! again every few seconds while it is leased (so that a delete on its node
//! stops new leases here), and forgotten (with its cached blocks) once
//! nobody has leased it for a while.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use payload_catalog::{PayloadId, PayloadRecord, Tier};

use super::{lock, Entry, EntryRef, Node};
use crate::error::AgentError;
use crate::identity::Caller;

/// How long a visitor nobody holds a lease on is kept, so that the next
/// lease finds its blocks cached and needs no catalog call.
pub(crate) const VISITOR_IDLE_MS: u64 = 60_000;

/// How long a visitor's row is trusted before a lease asks the catalog
/// again: a payload deleted on its node is refused here this soon after.
pub(crate) const VISITOR_RECHECK_MS: u64 = 5_000;

/// How long the catalog's answer about a payload of no other node, or of
/// one not leasable here, is remembered, so that a client asking for such
/// ids costs at most one catalog call per id this often; and how many such
/// answers are kept.
const LOCATED_MS: u64 = 1_000;
const LOCATED_KEPT: usize = 4_096;

/// Another node's payload as the catalog has it, and that node's name.
pub(crate) type Located = Option<(PayloadRecord, String)>;

/// How often a catalog that cannot answer is logged.
const WARN_EVERY_MS: u64 = 10_000;

pub(crate) struct Visitor {
    entry: EntryRef,
    /// When the catalog last vouched for its row (unix ms).
    checked_ms: AtomicU64,
}

impl Node {
    /// The entry a lease pins: one of this node's payloads, or a visitor.
    pub(crate) fn lease_entry(&self, id: PayloadId) -> Result<EntryRef, AgentError> {
        self.entry(id).or_else(|missing| {
            self.visitors
                .shard(&id)
                .get(&id)
                .map(|v| v.entry.clone())
                .ok_or(missing)
        })
    }

    /// Whether payload `id` is another node's, leased here.
    pub(crate) fn is_visitor(&self, id: PayloadId) -> bool {
        self.visitors.shard(&id).contains_key(&id)
    }

    /// Makes payload `id` leasable here by `caller`: a no-op for this
    /// node's payloads; another node's becomes a visitor when its
    /// object-store copy can be read here, and is refused naming its node
    /// otherwise. A caller who may not read it learns only that.
    pub async fn reach(&self, id: PayloadId, caller: &Caller) -> Result<(), AgentError> {
        self.reach_as(id, Some(caller)).await
    }

    /// [`Node::reach`], for a caller already allowed (`None`).
    pub(crate) async fn reach_as(&self, id: PayloadId, caller: Option<&Caller>) -> Result<(), AgentError> {
        let missing = match self.entry(id) {
            Ok(_) => return Ok(()),
            Err(missing) => missing,
        };
        let now = self.now_ms();
        let known = self.visitors.shard(&id).get(&id).cloned();
        let live = known.as_ref().filter(|v| !lock(&v.entry).gone);
        if let Some(v) = live {
            let checked = v.checked_ms.load(Ordering::Relaxed);
            // Trusted for a while; past that one lease asks again while
            // the others go on.
            let asks = now >= checked.saturating_add(VISITOR_RECHECK_MS)
                && v.checked_ms
                    .compare_exchange(checked, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok();
            if !asks {
                return Ok(());
            }
        }
        let located = match self.locate(id).await {
            // Its bytes cannot change: they stay served while the catalog
            // is away.
            Err(_) if live.is_some() => return Ok(()),
            located => located?,
        };
        let refused = match located {
            None if live.is_some() => AgentError::NotFound(format!(
                "payload {id} is no longer in the catalog: it was deleted on the node that held it"
            )),
            None => missing,
            Some((rec, holder)) => {
                if let Some(caller) = caller {
                    caller.may_read(&rec, self.cfg.read_access)?;
                }
                match self.visitor_row(rec, &holder) {
                    Ok(row) => {
                        self.welcome(id, row, now);
                        return Ok(());
                    }
                    Err(refused) => refused,
                }
            }
        };
        self.disown(id);
        Err(refused)
    }

    /// Which other node holds payload `id`, with its row, by the catalog;
    /// `None` when no other node does (or the operator is of a release
    /// that cannot say).
    pub(crate) async fn locate(&self, id: PayloadId) -> Result<Located, AgentError> {
        let now = self.now_ms();
        if let Some((_, answer)) = lock(&self.located).get(&id).filter(|(until, _)| now < *until) {
            return Ok(answer.clone());
        }
        match self.repo.locate_payload(id).await {
            Ok(answer) => {
                let answer = answer.filter(|(_, holder)| *holder != self.cfg.node_name);
                let mut located = lock(&self.located);
                if located.len() >= LOCATED_KEPT {
                    located.clear();
                }
                located.insert(id, (now + LOCATED_MS, answer.clone()));
                Ok(answer)
            }
            Err(err) if payload_catalog::remote::is_unknown_call(&err) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!(
                        "the operator cannot say which node holds a payload (an older release): leases of other \
                         nodes' payloads answer NOT_FOUND here until it is upgraded"
                    );
                });
                Ok(None)
            }
            Err(err) => {
                static WARNED_MS: AtomicU64 = AtomicU64::new(0);
                let last = WARNED_MS.load(Ordering::Relaxed);
                if now >= last.saturating_add(WARN_EVERY_MS)
                    && WARNED_MS
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(%id, %err, "could not ask the catalog which node holds a payload");
                }
                Err(AgentError::Unavailable(format!(
                    "payload {id} is not on node {}, and the catalog could not say which node holds it; retry shortly",
                    self.cfg.node_name
                )))
            }
        }
    }

    /// Records `row` as visitor `id`, vouched for at `now`: a new one, or
    /// one given up on taken back (in place: its leases stay where their
    /// holders find them).
    fn welcome(&self, id: PayloadId, row: PayloadRecord, now: u64) {
        let mut shard = self.visitors.shard(&id);
        if let Some(v) = shard.get(&id) {
            let mut e = lock(&v.entry);
            if e.gone {
                // Only a disowned visitor is gone and still here (the
                // sweeper removes what it forgets at once).
                e.gone = false;
                e.rec = row;
                v.checked_ms.store(now, Ordering::Relaxed);
            }
            return;
        }
        let visitor = Visitor {
            entry: Arc::new(Mutex::new(Entry::new(row, now))),
            checked_ms: AtomicU64::new(now),
        };
        shard.insert(id, Arc::new(visitor));
    }

    /// Whether payload `id` is a visitor the catalog has not vouched for
    /// in [`VISITOR_RECHECK_MS`] (batch leases, which never ask, refuse it).
    pub(crate) fn visitor_unconfirmed(&self, id: PayloadId, now: u64) -> bool {
        self.visitors
            .shard(&id)
            .get(&id)
            .is_some_and(|v| now >= v.checked_ms.load(Ordering::Relaxed).saturating_add(VISITOR_RECHECK_MS))
    }

    /// Stops new leases on visitor `id` (its row is gone or no longer
    /// leasable here); the sweeper forgets it once its leases end.
    fn disown(&self, id: PayloadId) {
        if let Some(v) = self.visitors.shard(&id).get(&id) {
            lock(&v.entry).gone = true;
        }
    }

    /// The row a visitor is leased under: the object tier (what this node
    /// reads), no other copies.
    fn visitor_row(&self, rec: PayloadRecord, holder: &str) -> Result<PayloadRecord, AgentError> {
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

    /// What a lease on visitor `id` whose fill failed with `err` answers:
    /// when its object copy is missing, whether it was deleted on its node
    /// or this node's object store is not its node's.
    pub(crate) async fn visitor_unreadable(&self, id: PayloadId, err: AgentError) -> AgentError {
        if !matches!(err, AgentError::Integrity(_)) || !self.is_visitor(id) {
            return err;
        }
        lock(&self.located).remove(&id);
        match self.locate(id).await {
            Ok(Some((rec, holder))) if rec.in_object_store() => {
                let store = self.object.as_ref().map(|o| o.url()).unwrap_or_default();
                AgentError::InvalidState(format!(
                    "payload {id} of node {holder} has an object-store copy, but node {} cannot read it from {store} \
                     ({err}): give this agent the --object-store of node {holder}, or, if node {holder} is deleting \
                     it, retry shortly",
                    self.cfg.node_name
                ))
            }
            Ok(Some((rec, holder))) => {
                self.disown(id);
                self.visitor_row(rec, &holder).err().unwrap_or(err)
            }
            Ok(None) => {
                self.disown(id);
                AgentError::NotFound(format!(
                    "payload {id} is no longer in the catalog: it was deleted on the node that held it"
                ))
            }
            Err(_) => err,
        }
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

    /// Forgets visitors nobody has leased for [`VISITOR_IDLE_MS`] (or
    /// given up on, once their leases end), with their cached blocks
    /// (sweeper).
    pub(crate) fn sweep_visitors(&self, now: u64) {
        let mut forgotten = Vec::new();
        // A fill may outlive the lease that started it: its blocks stay.
        let filling = self.object.as_ref().map(|o| o.cache.filling()).unwrap_or_default();
        // Blocks used after this were found by a lease of a new visitor.
        let tick = self.object.as_ref().map_or(0, |o| o.cache.tick());
        self.visitors.retain(|id, v| {
            let mut e = lock(&v.entry);
            let keep = e.live_leases(now) > 0
                || filling.contains(id)
                || (!e.gone && now < e.last_access_ms.saturating_add(VISITOR_IDLE_MS));
            if !keep {
                // A grant that found it just before sees this and retries.
                e.gone = true;
                forgotten.push(*id);
            }
            keep
        });
        let Some(object) = &self.object else { return };
        // Blocks a fill or a new visitor kept are tried again next sweep,
        // once nobody uses them.
        let mut strays = lock(&self.strays);
        strays.extend(forgotten);
        strays.retain(|id| {
            let claimed = self.entry(*id).is_ok() || self.is_visitor(*id);
            !claimed && !object.cache.remove_unused_since(*id, tick)
        });
    }
}
