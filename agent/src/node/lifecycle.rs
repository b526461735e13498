//! Allocate, commit, abort, delete, pin: the write side of a payload's life.

use std::collections::BTreeMap;
use std::sync::Arc;

use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::{CatalogError, PayloadId, PayloadRecord, Priority, Tier, Write};

use super::{lock, Entry, Node};
use crate::store::io_error;

/// A validated allocation request.
#[derive(Clone, Debug)]
pub struct AllocateRequest {
    pub size_bytes: u64,
    pub tier: Tier,
    pub ttl_ms: u64,
    pub no_evict: bool,
    pub priority: Priority,
    pub spill_target: Option<Tier>,
    pub min_residency_tier: Option<Tier>,
    pub require_durable: bool,
    pub labels: BTreeMap<String, String>,
    pub write_deadline_ms: u64,
}

impl AllocateRequest {
    pub fn new(size_bytes: u64, tier: Tier) -> Self {
        Self {
            size_bytes,
            tier,
            ttl_ms: 0,
            no_evict: false,
            priority: Priority::Normal,
            spill_target: None,
            min_residency_tier: None,
            require_durable: false,
            labels: BTreeMap::new(),
            write_deadline_ms: 0,
        }
    }
}

impl Node {
    /// Reserves capacity and creates the region; the caller writes, then commits.
    pub async fn allocate(&self, req: AllocateRequest) -> Result<PayloadRecord, CatalogError> {
        if req.size_bytes == 0 {
            return Err(CatalogError::InvalidArgument(
                "size_bytes must be greater than 0".into(),
            ));
        }
        if req.size_bytes > self.cfg.max_payload_bytes {
            return Err(CatalogError::InvalidArgument(format!(
                "size_bytes {} exceeds the maximum payload size of {} bytes; split the payload",
                req.size_bytes, self.cfg.max_payload_bytes
            )));
        }
        let store = self.store(req.tier)?;
        if let Err(full) = store.reserve(req.size_bytes) {
            if req.tier != Tier::Ram {
                return Err(full);
            }
            self.make_room(req.size_bytes).await;
            store.reserve(req.size_bytes)?;
        }
        let id = PayloadId::random();
        if let Err(e) = store.create(id, req.size_bytes) {
            store.unreserve(req.size_bytes);
            return Err(io_error("creating the payload region", e));
        }
        let now = self.now_ms();
        let never = req.no_evict || req.priority == Priority::Never;
        let deadline = if req.write_deadline_ms == 0 {
            self.cfg.write_deadline_ms
        } else {
            req.write_deadline_ms
        };
        let rec = PayloadRecord {
            expires_at_ms: if req.ttl_ms > 0 && !never {
                now.saturating_add(req.ttl_ms)
            } else {
                0
            },
            write_deadline_ms: now.saturating_add(deadline),
            priority: if req.no_evict { Priority::Never } else { req.priority },
            spill_target: req.spill_target.unwrap_or(Tier::Disk),
            min_residency_tier: req.min_residency_tier,
            require_durable: req.require_durable,
            labels: req.labels,
            ..PayloadRecord::allocated(id, req.tier, req.size_bytes, now)
        };
        self.writer.write(Write::Insert(rec.clone()))?;
        self.payloads
            .shard(&id)
            .insert(id, Arc::new(std::sync::Mutex::new(Entry::new(rec.clone(), now))));
        self.kick_spill_if_needed();
        Ok(rec)
    }

    /// Seals the region and makes the payload readable. With `expected` the
    /// bytes are hashed now and must match; otherwise the digest is computed
    /// in the background.
    pub async fn commit(
        &self,
        id: PayloadId,
        expected: Option<[u8; 32]>,
        sync: bool,
    ) -> Result<PayloadRecord, CatalogError> {
        let entry = self.entry(id)?;
        let tier = {
            let e = lock(&entry);
            transition(
                e.rec.state,
                Event::Commit {
                    durable: e.rec.tier.is_durable(),
                },
            )?;
            e.rec.tier
        };
        let store = self.store(tier)?;
        let size = lock(&entry).rec.size_bytes;
        match store.region_len(id) {
            Some(len) if len == size => {}
            Some(len) => {
                return Err(CatalogError::InvalidArgument(format!(
                    "the region of payload {id} is {len} bytes but was allocated as {size}: a write went past the \
                     region or truncated it; abort and allocate again"
                )))
            }
            None => {
                return Err(CatalogError::InvalidState(format!(
                    "the region of payload {id} has disappeared; abort and allocate again"
                )))
            }
        }
        let digest = match expected {
            Some(want) => {
                let got = self.hash_region(tier, id).await?;
                if got != want {
                    return Err(CatalogError::InvalidArgument(format!(
                        "the bytes written hash to {} but the commit expected {}; rewrite the region and commit again, or abort",
                        hex::encode(got),
                        hex::encode(want)
                    )));
                }
                Some(got)
            }
            None => None,
        };
        if sync {
            store.sync(id).map_err(|e| io_error("syncing the payload", e))?;
        }
        store.seal(id).map_err(|e| io_error("sealing the payload", e))?;
        let rec = {
            let mut e = lock(&entry);
            // Re-check under the lock: a concurrent commit or abort may have won.
            e.rec.state = transition(
                e.rec.state,
                Event::Commit {
                    durable: tier.is_durable(),
                },
            )?;
            e.rec.version += 1;
            e.rec.sha256 = digest;
            e.last_access_ms = self.now_ms();
            e.rec.clone()
        };
        self.writer.write(Write::Update(rec.clone()))?;
        if digest.is_none() {
            self.spawn_digest(id);
        }
        Ok(rec)
    }

    async fn hash_region(&self, tier: Tier, id: PayloadId) -> Result<[u8; 32], CatalogError> {
        let path_store = self.store(tier)?;
        let path = path_store.path(id);
        let _permit = self.hashing.acquire().await;
        tokio::task::spawn_blocking(move || crate::store::digest_file(&path))
            .await
            .map_err(|e| CatalogError::Storage(format!("hashing task failed: {e}")))?
            .map_err(|e| io_error("hashing the payload", e))
    }

    /// Queues the digest for the hashing thread, off the request path.
    pub(crate) fn spawn_digest(&self, id: PayloadId) {
        let _ = lock(&self.digests).send(id);
    }

    /// Hashes a committed payload and records its digest (hashing thread).
    pub(crate) fn record_digest(&self, id: PayloadId) {
        let Ok(entry) = self.entry(id) else { return };
        let tier = lock(&entry).rec.tier;
        let Ok(store) = self.store(tier) else { return };
        match crate::store::digest_file(&store.path(id)) {
            Ok(digest) => {
                let mut e = lock(&entry);
                // A move may have happened meanwhile; the bytes are the same.
                if e.gone || e.rec.sha256.is_some() {
                    return;
                }
                e.rec.sha256 = Some(digest);
                if let Err(err) = self.writer.write(Write::Update(e.rec.clone())) {
                    tracing::warn!(%id, %err, "could not record the payload digest");
                }
            }
            Err(err) => tracing::debug!(%id, %err, "could not hash the committed payload (moved or deleted?)"),
        }
    }

    /// Abandons an uncommitted allocation and frees its region.
    pub async fn abort(&self, id: PayloadId) -> Result<(), CatalogError> {
        let entry = self.entry(id)?;
        let rec = {
            let mut e = lock(&entry);
            e.rec.state = transition(e.rec.state, Event::Abort)?;
            e.gone = true;
            e.rec.clone()
        };
        self.forget(&rec).await
    }

    /// Deletes a payload. Live leases refuse it unless `force`, which revokes
    /// them at once.
    pub async fn delete(&self, id: PayloadId, force: bool) -> Result<(), CatalogError> {
        let entry = self.entry(id)?;
        let now = self.now_ms();
        let (rec, revoked, moving) = {
            let mut e = lock(&entry);
            let live = e.live_leases(now);
            if live > 0 && !force {
                return Err(CatalogError::Conflict(format!(
                    "payload {id} has {live} live lease(s); wait for their release or delete with force=true"
                )));
            }
            e.rec.state = transition(e.rec.state, Event::Delete)?;
            e.gone = true;
            let revoked: Vec<_> = e.leases.drain().map(|(lease, _)| lease).collect();
            (e.rec.clone(), revoked, e.moving)
        };
        self.revoke(&revoked, id);
        if moving {
            // The mover sees `gone` and frees both copies itself.
            self.payloads.shard(&id).remove(&id);
            return self.writer.write(Write::Delete(id));
        }
        self.forget(&rec).await
    }

    /// Removes a payload that is no longer live: row, entry, region, capacity.
    pub(crate) async fn forget(&self, rec: &PayloadRecord) -> Result<(), CatalogError> {
        self.payloads.shard(&rec.id).remove(&rec.id);
        self.writer.write(Write::Delete(rec.id))?;
        let store = self.store(rec.tier)?;
        if let Err(e) = store.remove(rec.id) {
            tracing::warn!(id = %rec.id, %e, "could not remove the payload region");
        }
        store.unreserve(rec.size_bytes);
        Ok(())
    }

    /// Pins the payload in its tier for `duration_ms` (0 = until unpinned).
    pub async fn pin(&self, id: PayloadId, duration_ms: u64) -> Result<(), CatalogError> {
        let until = if duration_ms == 0 {
            u64::MAX
        } else {
            self.now_ms().saturating_add(duration_ms)
        };
        self.set_pin(id, until).await
    }

    /// Unpins; unknown payloads are fine (idempotent, as the reference).
    pub async fn unpin(&self, id: PayloadId) -> Result<(), CatalogError> {
        match self.set_pin(id, 0).await {
            Err(CatalogError::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    async fn set_pin(&self, id: PayloadId, until: u64) -> Result<(), CatalogError> {
        let entry = self.entry(id)?;
        let rec = {
            let mut e = lock(&entry);
            e.rec.pinned_until_ms = until;
            e.rec.clone()
        };
        self.writer.write(Write::Update(rec))
    }
}
