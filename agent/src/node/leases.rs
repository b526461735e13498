//! Read leases: in memory, sharded by lease id, journaled with one append per
//! call (batched calls append once). A lease pins its payload's current copy
//! until it expires or is released; force-delete revokes it, and a revoked
//! lease answers renew with its own error until its original expiry.

use crate::error::AgentError;
use payload_catalog::{LeaseId, PayloadId, PayloadRecord, Tier};

use super::{lock, Node};
use crate::journal::JournaledLease;
use crate::store::io_error;

#[derive(Clone, Copy, Debug)]
pub(crate) enum LeaseSlot {
    Live {
        payload: PayloadId,
        expires_ms: u64,
    },
    /// Kept until `until_ms` so that renew can say why the lease is gone.
    Revoked {
        until_ms: u64,
    },
}

/// A granted lease and the placement it pins.
#[derive(Clone, Debug)]
pub struct LeaseGrant {
    pub lease: LeaseId,
    pub expires_ms: u64,
    pub rec: PayloadRecord,
}

/// How long a lease lasts.
#[derive(Clone, Copy, Debug)]
enum Lasts {
    /// A timed lease: this many ms (0 = the default), capped at the maximum.
    Ms(u64),
    /// A session lease: until released or its connection closes (after an
    /// agent restart, at most `--lease-max-ms`). Only the native socket asks.
    Session,
}

/// The in-memory expiry of a session lease.
const SESSION_EXPIRY: u64 = u64::MAX;
/// How long the journal may keep the grant of an inline session lease
/// before writing it.
const JOURNAL_LATER: std::time::Duration = std::time::Duration::from_millis(5);

impl Node {
    /// How long a lease on a payload with these labels lasts: as asked
    /// (0: the default), at most `--lease-max-ms` and what its policies allow.
    fn lease_duration(&self, requested_ms: u64, labels: &std::collections::BTreeMap<String, String>) -> u64 {
        let wanted = if requested_ms == 0 {
            self.cfg.lease_default_ms
        } else {
            requested_ms
        };
        let cap = self.policy_lease_cap(labels).unwrap_or(u64::MAX);
        wanted.min(self.cfg.lease_max_ms).min(cap)
    }

    /// Grants a read lease on a committed payload at `min_tier` or faster.
    /// Below that tier, `blocking` promotes first; otherwise the call fails
    /// fast and queues the promotion.
    pub async fn acquire(
        self: &std::sync::Arc<Self>,
        id: PayloadId,
        min_tier: Option<Tier>,
        blocking: bool,
        duration_ms: u64,
    ) -> Result<LeaseGrant, AgentError> {
        self.acquire_for(id, min_tier, blocking, Lasts::Ms(duration_ms), 0)
            .await
    }

    /// [`Node::acquire`] of a session lease: no expiry while its holder's
    /// connection lives; the caller releases it when the connection closes.
    /// A payload of at most `inline_max` bytes goes out inline, so its
    /// lease is journaled a moment later (see [`Journal::grant_later`]).
    ///
    /// [`Journal::grant_later`]: crate::journal::Journal::grant_later
    pub async fn acquire_session(
        self: &std::sync::Arc<Self>,
        id: PayloadId,
        min_tier: Option<Tier>,
        blocking: bool,
        inline_max: u64,
    ) -> Result<LeaseGrant, AgentError> {
        self.acquire_for(id, min_tier, blocking, Lasts::Session, inline_max)
            .await
    }

    async fn acquire_for(
        self: &std::sync::Arc<Self>,
        id: PayloadId,
        min_tier: Option<Tier>,
        blocking: bool,
        lasts: Lasts,
        inline_max: u64,
    ) -> Result<LeaseGrant, AgentError> {
        self.reach_as(id, None).await?;
        let (mut promoted, mut reached) = (false, false);
        loop {
            match self.try_grant(id, min_tier, lasts) {
                Err(Grant::TooSlow(target)) if self.is_visitor(id) => {
                    return Err(self.visitor_too_slow(id, target));
                }
                Err(Grant::Forgotten) if !reached => {
                    self.reach_as(id, None).await?;
                    reached = true;
                }
                Err(Grant::Forgotten) => return Err(forgotten(id)),
                // Below its policy's minLeaseTier (faster than asked), a
                // payload is promoted whatever the caller asked.
                Err(Grant::TooSlow(target))
                    if (blocking || min_tier.is_none_or(|m| target.faster_than(m))) && !promoted =>
                {
                    self.relocate(id, target, false, false).await?;
                    promoted = true;
                }
                Err(Grant::TooSlow(target)) => {
                    if !blocking {
                        self.spawn_relocate(id, target);
                    }
                    return Err(AgentError::InvalidState(format!(
                        "payload {id} is below the requested tier {}; a promotion was queued, retry shortly or ask with PROMOTION_POLICY_BLOCKING",
                        target.name()
                    )));
                }
                Err(Grant::Failed(err)) => return Err(err),
                Ok(grant) => {
                    if !self.tier(grant.rec.tier).is_ok_and(|t| t.readable(id)) {
                        // The lease is held while the copy is made readable
                        // (the block cache fills), so no eviction takes the
                        // blocks it is waiting for. A task of its own: a
                        // caller that goes away must not cut a fill off
                        // with its bytes counted.
                        let (node, tier) = (self.clone(), grant.rec.tier);
                        let filled = tokio::spawn(async move {
                            node.tier(tier)?.open_for_read(id, &|other| node.is_leased(other)).await
                        })
                        .await
                        .unwrap_or_else(|e| Err(crate::error::task_failed("filling the block cache", e)));
                        if let Err(err) = filled {
                            self.release(grant.lease);
                            return Err(self.visitor_unreadable(id, err).await);
                        }
                    }
                    let record = JournaledLease {
                        lease: grant.lease,
                        payload: id,
                        expires_ms: self.journaled_expiry(grant.expires_ms, self.now_ms()),
                    };
                    let journaled = match lasts {
                        Lasts::Session if grant.rec.size_bytes <= inline_max => {
                            self.journal.grant_later(record).map(|first| {
                                if first {
                                    self.flush_journal_soon();
                                }
                            })
                        }
                        _ => self.journal.grant(&[record]),
                    };
                    if let Err(e) = journaled {
                        // A lease the journal does not hold would not survive a restart: take it back.
                        self.release(grant.lease);
                        return Err(io_error("writing the lease journal", e));
                    }
                    return Ok(grant);
                }
            }
        }
    }

    /// Grants many leases with one journal append; results keep request order.
    pub fn acquire_many(&self, requests: &[(PayloadId, Option<Tier>, u64)]) -> Vec<Result<LeaseGrant, AgentError>> {
        let requests: Vec<_> = requests
            .iter()
            .map(|(id, tier, ms)| (*id, *tier, Lasts::Ms(*ms)))
            .collect();
        self.acquire_many_for(&requests, |rec| Ok(rec.clone()))
            .into_iter()
            .map(|r| r.map(|(lease, expires_ms, rec)| LeaseGrant { lease, expires_ms, rec }))
            .collect()
    }

    /// [`Node::acquire_many`] of session leases (the native socket's), each
    /// granted only where `check` (the caller's right to read) allows.
    pub fn acquire_many_session(
        &self,
        ids: &[PayloadId],
        check: impl Fn(&PayloadRecord) -> Result<(), AgentError>,
    ) -> Vec<Result<LeaseId, AgentError>> {
        let requests: Vec<_> = ids.iter().map(|id| (*id, None, Lasts::Session)).collect();
        self.acquire_many_for(&requests, check)
            .into_iter()
            .map(|r| r.map(|(lease, _, ())| lease))
            .collect()
    }

    fn acquire_many_for<T>(
        &self,
        requests: &[(PayloadId, Option<Tier>, Lasts)],
        take: impl Fn(&PayloadRecord) -> Result<T, AgentError>,
    ) -> Vec<Result<(LeaseId, u64, T), AgentError>> {
        // One reading of the clock for the batch (it costs about as much as
        // a lookup): a lease granted late in a long batch ends that much
        // sooner, never later.
        let now = self.now_ms();
        let results: Vec<_> = requests
            .iter()
            .map(|(id, min_tier, lasts)| {
                if self.visitor_unconfirmed(*id, now) {
                    return Err(AgentError::InvalidState(format!(
                        "payload {id} belongs to another node and this node has not asked the catalog about it for \
                         a while; batch leases never ask, use AcquireReadLease"
                    )));
                }
                let granted = self.try_grant_with(*id, *min_tier, *lasts, now, |rec| Ok((rec.tier, take(rec)?)));
                let (lease, expires_ms, (tier, taken)) = granted.map_err(|e| match e {
                    Grant::Failed(err) => err,
                    Grant::Forgotten => forgotten(*id),
                    Grant::TooSlow(target) => AgentError::InvalidState(format!(
                        "payload {id} is below the tier {} (asked for, or its PayloadPolicy's minLeaseTier); \
                         batch leases never promote, use AcquireReadLease",
                        target.name()
                    )),
                })?;
                let readable = self.tier(tier).is_ok_and(|t| t.readable(*id));
                if !readable {
                    self.release(lease);
                    return Err(AgentError::InvalidState(format!(
                        "payload {id} is on the {} tier and not cached on this node; batch leases never \
                         download, use AcquireReadLease",
                        tier.name()
                    )));
                }
                Ok((lease, expires_ms, taken))
            })
            .collect();
        let journaled: Vec<_> = results
            .iter()
            .zip(requests)
            .filter_map(|(r, (id, _, _))| {
                r.as_ref().ok().map(|(lease, expires_ms, _)| JournaledLease {
                    lease: *lease,
                    payload: *id,
                    expires_ms: self.journaled_expiry(*expires_ms, now),
                })
            })
            .collect();
        if let Err(e) = self.journal.grant(&journaled) {
            let release: Vec<LeaseId> = journaled.iter().map(|l| l.lease).collect();
            self.release_many(&release);
            let err = io_error("writing the lease journal", e);
            return requests.iter().map(|_| Err(err.clone())).collect();
        }
        results
    }

    fn try_grant(&self, id: PayloadId, min_tier: Option<Tier>, lasts: Lasts) -> Result<LeaseGrant, Grant> {
        self.try_grant_with(id, min_tier, lasts, self.now_ms(), |rec| Ok(rec.clone()))
            .map(|(lease, expires_ms, rec)| LeaseGrant { lease, expires_ms, rec })
    }

    /// Grants a lease, taking what the caller needs of the row with `take`
    /// under the payload's lock (a refusal there grants nothing).
    fn try_grant_with<T>(
        &self,
        id: PayloadId,
        min_tier: Option<Tier>,
        lasts: Lasts,
        now: u64,
        take: impl FnOnce(&PayloadRecord) -> Result<T, AgentError>,
    ) -> Result<(LeaseId, u64, T), Grant> {
        let entry = self.lease_entry(id).map_err(Grant::Failed)?;
        // Before the entry's lock: the visitors' sweep takes their shard's
        // lock, then an entry's.
        let visitor = self.is_visitor(id);
        let mut e = lock(&entry);
        // First, so a caller who may not read learns only that.
        let taken = take(&e.rec).map_err(Grant::Failed)?;
        if !e.rec.state.is_readable() {
            return Err(Grant::Failed(AgentError::InvalidState(format!(
                "payload {id} is {}; only committed payloads can be leased (commit it first)",
                e.rec.state.name()
            ))));
        }
        if e.gone {
            // A visitor forgotten since it was looked up.
            return Err(Grant::Forgotten);
        }
        if let Some(min) = self.lease_floor(visitor, min_tier, &e.rec.labels) {
            if min.faster_than(e.rec.tier) {
                return Err(Grant::TooSlow(min));
            }
        }
        let cap = self.cfg.limits.leases_per_payload;
        // At the cap, prune at most every PRUNE_AT_CAP_MS: a client that
        // keeps asking must not buy a scan of every lease with each attempt.
        let at_cap = e.leases.len() >= cap && now >= e.pruned_ms.saturating_add(PRUNE_AT_CAP_MS);
        if e.leases.len() >= e.prune_at || at_cap {
            e.leases.retain(|_, exp| *exp > now);
            e.prune_at = (2 * e.leases.len()).max(64);
            e.pruned_ms = now;
        }
        if e.leases.len() >= cap {
            return Err(Grant::Failed(AgentError::ResourceExhausted(format!(
                "payload {id} has {cap} live leases, the limit (--max-leases-per-payload); release some first"
            ))));
        }
        let lease = crate::ids::lease();
        let expires_ms = match lasts {
            Lasts::Ms(ms) => now.saturating_add(self.lease_duration(ms, &e.rec.labels)),
            Lasts::Session => SESSION_EXPIRY,
        };
        e.leases.insert(lease, expires_ms);
        e.last_access_ms = now;
        drop(e);
        self.leases.shard(&lease).insert(
            lease,
            LeaseSlot::Live {
                payload: id,
                expires_ms,
            },
        );
        Ok((lease, expires_ms, taken))
    }

    /// Writes the grants the journal keeps for later within
    /// [`JOURNAL_LATER`].
    fn flush_journal_soon(self: &std::sync::Arc<Self>) {
        let node = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(JOURNAL_LATER).await;
            if let Some(node) = node.upgrade() {
                if let Err(e) = node.journal.flush_later() {
                    tracing::warn!(%e, "could not write session leases to the lease journal");
                }
            }
        });
    }

    /// A session lease has no expiry while its connection lives; after a
    /// restart (its connection gone with the agent) it is honoured for at
    /// most `--lease-max-ms` from when it was last written.
    fn journaled_expiry(&self, expires_ms: u64, now: u64) -> u64 {
        expires_ms.min(now.saturating_add(self.cfg.lease_max_ms))
    }

    /// Whether `lease` is still in the lease table (not released or revoked).
    pub fn lease_is_live(&self, lease: &LeaseId) -> bool {
        matches!(self.leases.shard(lease).get(lease), Some(LeaseSlot::Live { .. }))
    }

    /// Releases a lease; unknown or expired leases are fine (idempotent).
    pub fn release(&self, lease: LeaseId) -> bool {
        self.release_many(&[lease]) == 1
    }

    /// Releases leases; returns how many were live.
    pub fn release_many(&self, leases: &[LeaseId]) -> usize {
        let mut journal = Vec::new();
        let now = self.now_ms();
        for lease in leases {
            let slot = self.leases.shard(lease).remove(lease);
            if let Some(LeaseSlot::Live { payload, expires_ms }) = slot {
                if let Ok(entry) = self.lease_entry(payload) {
                    let mut e = lock(&entry);
                    e.leases.remove(lease);
                    // Read until now (a visitor's idle time counts from here).
                    e.last_access_ms = e.last_access_ms.max(now);
                }
                journal.push(JournaledLease {
                    lease: *lease,
                    payload,
                    expires_ms,
                });
            }
        }
        if let Err(e) = self.journal.release(&journal) {
            // A lost release only makes the lease live until it expires.
            tracing::warn!(%e, "could not journal lease releases");
        }
        journal.len()
    }

    /// Extends a live lease to now + `extend_ms` (0 = default duration).
    pub fn renew(&self, lease: LeaseId, extend_ms: u64) -> Result<u64, AgentError> {
        let now = self.now_ms();
        let slot = self.leases.shard(&lease).get(&lease).copied();
        let payload = match slot {
            Some(LeaseSlot::Live { payload, expires_ms }) if expires_ms > now => payload,
            Some(LeaseSlot::Revoked { .. }) => {
                return Err(AgentError::InvalidState(format!(
                    "lease {lease} was revoked because its payload was force-deleted; do not read the old location"
                )))
            }
            _ => {
                return Err(AgentError::NotFound(format!(
                    "lease {lease} is unknown or has expired; acquire a new lease"
                )))
            }
        };
        let entry = self.lease_entry(payload)?;
        // Under the payload's lock, which a force delete holds while it
        // revokes: a renew either lands before the revoke or sees it.
        let e = &mut *lock(&entry);
        let expires_ms = now.saturating_add(self.lease_duration(extend_ms, &e.rec.labels));
        let Some(exp) = e.leases.get_mut(&lease) else {
            return Err(AgentError::NotFound(format!("lease {lease} is no longer live")));
        };
        if *exp == SESSION_EXPIRY {
            // A session lease lasts as long as its connection: nothing to extend.
            return Ok(SESSION_EXPIRY);
        }
        // The table first, then the journal: a compaction in between reads
        // the new expiry, one before it is followed by this record.
        let before = std::mem::replace(exp, expires_ms);
        let set_slot = |expiry: u64| {
            if let Some(LeaseSlot::Live { expires_ms: slot, .. }) = self.leases.shard(&lease).get_mut(&lease) {
                *slot = expiry;
            }
        };
        set_slot(expires_ms);
        let renewed = JournaledLease {
            lease,
            payload,
            expires_ms,
        };
        if let Err(err) = self.journal.grant(&[renewed]) {
            e.leases.insert(lease, before);
            set_slot(before);
            return Err(io_error("writing the lease journal", err));
        }
        Ok(expires_ms)
    }

    /// Marks leases revoked (force delete); their holders learn it on renew.
    pub(crate) fn revoke(&self, leases: &[LeaseId], payload: PayloadId) {
        let mut journal = Vec::new();
        for lease in leases {
            let mut shard = self.leases.shard(lease);
            if let Some(LeaseSlot::Live { expires_ms, .. }) = shard.get(lease).copied() {
                shard.insert(*lease, LeaseSlot::Revoked { until_ms: expires_ms });
                journal.push(JournaledLease {
                    lease: *lease,
                    payload,
                    expires_ms,
                });
            }
        }
        if let Err(e) = self.journal.release(&journal) {
            tracing::warn!(%e, "could not journal lease revocations");
        }
    }

    /// Live leases in the table, as the journal records them.
    fn live_journal(&self) -> Vec<JournaledLease> {
        let now = self.now_ms();
        let mut live = Vec::new();
        self.leases.for_each(|lease, slot| {
            if let LeaseSlot::Live { payload, expires_ms } = slot {
                if *expires_ms > now {
                    live.push(JournaledLease {
                        lease: *lease,
                        payload: *payload,
                        expires_ms: self.journaled_expiry(*expires_ms, now),
                    });
                }
            }
        });
        live
    }

    /// Blocking (a scan, a write, fsyncs): the sweeper runs it on a blocking thread.
    pub(crate) fn maybe_compact_journal(&self) {
        if let Err(e) = self.journal.maybe_compact(|| self.live_journal()) {
            tracing::warn!(%e, "could not compact the lease journal");
        }
    }

    /// Drops expired leases and old revocation markers.
    pub(crate) fn sweep_leases(&self) {
        let now = self.now_ms();
        let mut expired = Vec::new();
        self.leases.for_each(|lease, slot| match slot {
            LeaseSlot::Live { payload, expires_ms } if *expires_ms <= now => expired.push((*lease, Some(*payload))),
            LeaseSlot::Revoked { until_ms } if *until_ms <= now => expired.push((*lease, None)),
            _ => {}
        });
        for (lease, payload) in expired {
            self.leases.shard(&lease).remove(&lease);
            if let Some(entry) = payload.and_then(|p| self.lease_entry(p).ok()) {
                let mut e = lock(&entry);
                if let Some(expired_ms) = e.leases.remove(&lease) {
                    e.last_access_ms = e.last_access_ms.max(expired_ms);
                }
            }
        }
    }

    pub fn lease_count(&self) -> usize {
        let now = self.now_ms();
        let mut count = 0;
        self.leases.for_each(|_, slot| {
            if matches!(slot, LeaseSlot::Live { expires_ms, .. } if *expires_ms > now) {
                count += 1;
            }
        });
        count
    }
}

/// How often a payload at its lease cap may be pruned.
const PRUNE_AT_CAP_MS: u64 = 100;

enum Grant {
    TooSlow(Tier),
    /// The payload is a visitor the sweeper forgot meanwhile.
    Forgotten,
    Failed(AgentError),
}

fn forgotten(id: PayloadId) -> AgentError {
    AgentError::Unavailable(format!(
        "payload {id} (another node's) was dropped from this node's cache while it was leased; retry"
    ))
}
