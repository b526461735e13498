//! Allocate, commit, abort, delete, pin: the write side of a payload's life.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::AgentError;
use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::{PayloadId, PayloadRecord, PayloadState, Priority, Tier, Write};

use super::{lock, Entry, Node};
use crate::store::io_error;

/// What backs a new allocation's region.
#[derive(Debug)]
pub(crate) enum NewRegion {
    /// A file in the tier's root (v1 clients open it by name).
    Named,
    /// A memfd the agent creates (RAM; the native socket hands it out).
    Memfd,
    /// A memfd a client wrote, checked by the caller (RAM).
    Given(std::fs::File),
}

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
    /// The caller that allocates it (see [`crate::identity`]).
    pub owner: Option<String>,
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
            owner: None,
        }
    }
}

impl Node {
    /// Reserves capacity and creates the region; the caller writes, then
    /// commits. Every step taken is undone if a later one fails, and the
    /// work runs as a task of its own: a caller that goes away (a client
    /// deadline) cannot leave capacity reserved for a region nobody owns.
    pub async fn allocate(self: &Arc<Self>, req: AllocateRequest) -> Result<PayloadRecord, AgentError> {
        let node = self.clone();
        tokio::spawn(async move { node.allocate_now(req, NewRegion::Named).await })
            .await
            .map_err(|e| crate::error::task_failed("allocating", e))?
    }

    pub(super) async fn allocate_now(
        self: &Arc<Self>,
        mut req: AllocateRequest,
        region: NewRegion,
    ) -> Result<PayloadRecord, AgentError> {
        let charge = self.check_allocation(&mut req)?;
        let id = crate::ids::payload();
        if req.tier == Tier::Object {
            // The client uploads the bytes itself; ImportPayload adopts them.
            self.object()?;
        } else {
            self.reserve_region(req.tier, id, req.size_bytes, region).await?;
        }
        crate::failpoint!("after-region-create");
        let now = self.now_ms();
        let tier = req.tier;
        let rec = self.allocation_record(req, id, now);
        if let Err(err) = self.writer.write(Write::Insert(rec.clone())) {
            if tier != Tier::Object {
                self.free_copy(tier, id, rec.size_bytes);
            }
            return Err(err);
        }
        crate::failpoint!("after-log-append");
        self.payloads
            .shard(&id)
            .insert(id, Arc::new(std::sync::Mutex::new(Entry::new(rec.clone(), now))));
        charge.keep();
        self.kick_spill_if_needed();
        Ok(rec)
    }

    /// Seals the region and makes the payload readable. With `expected` the
    /// bytes are hashed now and must match; otherwise the digest is computed
    /// in the background. With `sync` the bytes, their name and the catalog
    /// record survive power loss before this returns. With `object` every
    /// block and the manifest are in the object store before it returns.
    /// Runs as a task of its own, so a client that goes away mid-commit
    /// cannot cut it off between the log write and the fsync it asked for.
    pub async fn commit(
        self: &Arc<Self>,
        id: PayloadId,
        expected: Option<[u8; 32]>,
        sync: bool,
        object: bool,
    ) -> Result<PayloadRecord, AgentError> {
        let node = self.clone();
        tokio::spawn(async move { node.commit_now(id, expected, sync, object).await })
            .await
            .map_err(|e| crate::error::task_failed("committing", e))?
    }

    pub(super) async fn commit_now(
        &self,
        id: PayloadId,
        expected: Option<[u8; 32]>,
        sync: bool,
        object: bool,
    ) -> Result<PayloadRecord, AgentError> {
        let entry = self.entry(id)?;
        let (tier, size) = {
            let e = lock(&entry);
            transition(
                e.rec.state,
                Event::Commit {
                    durable: e.rec.tier.is_durable(),
                },
            )?;
            (e.rec.tier, e.rec.size_bytes)
        };
        if tier == Tier::Object {
            return Err(AgentError::InvalidState(format!(
                "payload {id} was allocated on the object tier: upload its bytes to the object_upload_path the \
                 allocation returned, then call ImportPayload (Commit is for RAM and DISK allocations)"
            )));
        }
        let object = if object { Some(self.object()?.clone()) } else { None };
        self.writer.admit()?;
        let store = self.store(tier)?;
        if store.memfd(id).is_some() {
            // Sealed first, so that the length checked and the bytes hashed
            // are the bytes that stay.
            store.seal(id).map_err(|e| seal_error(id, e))?;
        }
        match store.region_len(id) {
            Some(len) if len == size => {}
            Some(len) => {
                return Err(AgentError::InvalidArgument(format!(
                    "the region of payload {id} is {len} bytes but was allocated as {size}: a write went past the \
                     region or truncated it; abort and allocate again"
                )))
            }
            None => {
                return Err(AgentError::InvalidState(format!(
                    "the region of payload {id} has disappeared; abort and allocate again"
                )))
            }
        }
        let digest = match expected {
            Some(want) => {
                let got = self.hash_region(tier, id).await?;
                if got != want {
                    // A sealed memfd can never be written again.
                    let next = if store.memfd(id).is_some() {
                        "abort and put again"
                    } else {
                        "rewrite the region and commit again, or abort"
                    };
                    return Err(AgentError::InvalidArgument(format!(
                        "the bytes written hash to {} but the commit expected {}; {next}",
                        hex::encode(got),
                        hex::encode(want)
                    )));
                }
                Some(got)
            }
            None => None,
        };
        if sync && store.memfd(id).is_none() {
            let path = store.path(id);
            let synced = tokio::task::spawn_blocking(move || {
                std::fs::File::open(&path)?.sync_all()?;
                crate::durable::fsync_parent(&path)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(e) = synced {
                // After a failed fsync the kernel may have dropped the pages,
                // and a second fsync would say nothing about them: no later
                // synced commit on this node can be promised.
                self.writer.poison(format!("fsync of payload {id}: {e}"));
                if let Err(err) = self.abort(id).await {
                    tracing::warn!(%id, %err, "could not abort a payload whose fsync failed");
                }
                return Err(io_error(
                    "syncing the payload (the allocation is aborted: put the payload again)",
                    e,
                ));
            }
        }
        store.seal(id).map_err(|e| seal_error(id, e))?;
        let digest = match &object {
            // Uploaded sealed, before the commit shows: a failure leaves the
            // allocation to retry or abort; the upload checks `digest`.
            Some(object) => match upload(object, store, id, digest, self.now_ms()).await {
                Ok(manifest) => Some(manifest.sha256),
                Err(err) => {
                    let _ = store.unseal(id);
                    if lock(&entry).gone {
                        // Its release may have landed before the upload's claim.
                        self.release_raced_upload(id);
                    }
                    return Err(err);
                }
            },
            None => digest,
        };
        let (rec, seq) = {
            let mut e = lock(&entry);
            // Re-check under the lock: a concurrent commit or abort may have won.
            let mut rec = e.rec.clone();
            let next = transition(
                rec.state,
                Event::Commit {
                    durable: tier.is_durable() || object.is_some(),
                },
            );
            if next.is_err() && object.is_some() && e.gone {
                // Ended during the upload: its release may have landed
                // before the upload claimed the manifest.
                self.release_raced_upload(id);
            }
            rec.state = next?;
            rec.version += 1;
            rec.sha256 = digest;
            if object.is_some() {
                rec.copies = vec![payload_catalog::CopyRecord {
                    tier: Tier::Object,
                    verified: true,
                }];
            }
            // Logged under the lock, before the node shows it: log order is
            // the order of effect, and a failed write changes nothing (the
            // writer may rewrite the region and commit again).
            let seq = match self.writer.write(Write::Update(rec.clone())) {
                Ok(seq) => seq,
                Err(err) => {
                    let _ = store.unseal(id);
                    return Err(err);
                }
            };
            e.rec = rec.clone();
            e.last_access_ms = self.now_ms();
            (rec, seq)
        };
        crate::failpoint!("after-commit-log");
        // Queued first: the payload is committed whether or not the sync holds.
        if digest.is_none() {
            self.queue_digest(id).await;
        }
        if sync {
            self.writer.sync(seq).await?;
        }
        Ok(rec)
    }

    /// Reserves capacity on a local tier (RAM makes room by spilling) and
    /// creates the region; on failure nothing is left taken.
    /// Bounds every allocation is checked against, and the policies that
    /// govern it (which may shorten its TTL and take from a quota).
    pub(super) fn check_allocation(
        &self,
        req: &mut AllocateRequest,
    ) -> Result<super::policies::Charge<'_>, AgentError> {
        if req.size_bytes == 0 {
            return Err(AgentError::InvalidArgument("size_bytes must be greater than 0".into()));
        }
        if req.size_bytes > self.cfg.max_payload_bytes {
            return Err(AgentError::InvalidArgument(format!(
                "size_bytes {} exceeds the maximum payload size of {} bytes; split the payload",
                req.size_bytes, self.cfg.max_payload_bytes
            )));
        }
        self.writer.admit()?;
        self.apply_policies(req)
    }

    /// The row of a new allocation.
    pub(super) fn allocation_record(&self, req: AllocateRequest, id: PayloadId, now: u64) -> PayloadRecord {
        let never = req.no_evict || req.priority == Priority::Never;
        let deadline = if req.write_deadline_ms == 0 {
            self.cfg.write_deadline_ms
        } else {
            req.write_deadline_ms
        };
        PayloadRecord {
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
            owner: req.owner,
            ..PayloadRecord::allocated(id, req.tier, req.size_bytes, now)
        }
    }

    pub(super) async fn reserve_region(
        self: &Arc<Self>,
        tier: Tier,
        id: PayloadId,
        size: u64,
        region: NewRegion,
    ) -> Result<(), AgentError> {
        let store = self.store(tier)?;
        if tier != Tier::Ram && !matches!(region, NewRegion::Named) {
            return Err(AgentError::InvalidArgument(format!(
                "sealed regions are RAM only; the {} tier takes named files",
                tier.name()
            )));
        }
        if !matches!(region, NewRegion::Named) {
            store.check_memfd_room()?;
        }
        if store.reserve(size).is_err() {
            self.make_room(tier, size).await;
            store.reserve(size)?;
        }
        let created = match region {
            NewRegion::Named => store.create_async(id, size).await,
            NewRegion::Memfd => super::sealed::create_memfd(self, id, size).await,
            NewRegion::Given(file) => store
                .adopt_memfd(id, file)
                .map(drop)
                .map_err(|e| io_error("handing the memfd to its keeper", e)),
        };
        if let Err(e) = created {
            store.unreserve(size);
            return Err(e);
        }
        Ok(())
    }

    async fn hash_region(&self, tier: Tier, id: PayloadId) -> Result<[u8; 32], AgentError> {
        let source = self
            .store(tier)?
            .open(id)
            .map_err(|e| io_error("opening the payload to hash it", e))?;
        let _permit = self.hashing.acquire().await;
        tokio::task::spawn_blocking(move || crate::store::digest(source.file))
            .await
            .map_err(|e| crate::error::task_failed("hashing the payload", e))?
            .map_err(|e| io_error("hashing the payload", e))
    }

    /// Queues the digest for the hashing thread, off the request path; a
    /// full queue makes the commit wait for room.
    pub(crate) async fn queue_digest(&self, id: PayloadId) {
        // Closed only when the node is going away.
        let _ = self.digests.send(id).await;
    }

    /// Hashes a committed payload and records its digest (hashing thread).
    pub(crate) fn record_digest(&self, id: PayloadId) {
        let Ok(entry) = self.entry(id) else { return };
        let tier = lock(&entry).rec.tier;
        let Ok(store) = self.store(tier) else { return };
        match store.open(id).and_then(|source| crate::store::digest(source.file)) {
            Ok(digest) => {
                let mut e = lock(&entry);
                // A move may have happened meanwhile; the bytes are the same.
                if e.gone || e.rec.sha256.is_some() {
                    return;
                }
                let mut rec = e.rec.clone();
                rec.sha256 = Some(digest);
                match self.writer.write(Write::Update(logged(&rec))) {
                    Ok(_) => e.rec = rec,
                    Err(err) => tracing::warn!(%id, %err, "could not record the payload digest"),
                }
            }
            Err(err) => tracing::debug!(%id, %err, "could not hash the committed payload (moved or deleted?)"),
        }
    }

    /// Abandons an uncommitted allocation and frees its region.
    pub async fn abort(&self, id: PayloadId) -> Result<(), AgentError> {
        let entry = self.entry(id)?;
        let rec = {
            let mut e = lock(&entry);
            self.end(&mut e, Event::Abort)?;
            e.rec.clone()
        };
        self.free_all(&rec);
        Ok(())
    }

    /// Deletes a payload. Live leases refuse it unless `force`, which revokes
    /// them at once.
    pub async fn delete(&self, id: PayloadId, force: bool) -> Result<(), AgentError> {
        let entry = self.entry(id)?;
        let now = self.now_ms();
        let (rec, revoked, moving) = {
            let mut e = lock(&entry);
            let live = e.live_leases(now);
            if live > 0 && !force {
                return Err(AgentError::Conflict(format!(
                    "payload {id} has {live} live lease(s); wait for their release or delete with force=true"
                )));
            }
            self.end(&mut e, Event::Delete)?;
            let revoked: Vec<_> = e.leases.drain().map(|(lease, _)| lease).collect();
            (e.rec.clone(), revoked, e.moving)
        };
        self.revoke(&revoked, id);
        if moving {
            // The mover sees `gone` and frees both copies itself.
            self.payloads.shard(&id).remove(&id);
        } else {
            self.free_all(&rec);
        }
        Ok(())
    }

    /// Ends a payload's life, under its lock: the Delete is logged first,
    /// so a failed log write leaves the payload as it was.
    pub(crate) fn end(&self, e: &mut Entry, event: Event) -> Result<(), AgentError> {
        let next = transition(e.rec.state, event)?;
        self.writer.write(Write::Delete(e.rec.id))?;
        if self.object.is_some() {
            // Logged even without an object copy on record: an upload whose
            // switch a crash cut off may have left a manifest (a replayed or
            // needless release changes nothing).
            self.log_release(e.rec.id);
        }
        e.rec.state = next;
        e.gone = true;
        Ok(())
    }

    /// Frees what an ended payload held: entry, every copy, capacity.
    pub(crate) fn free_all(&self, rec: &PayloadRecord) {
        self.payloads.shard(&rec.id).remove(&rec.id);
        crate::failpoint!("before-free");
        self.free_copy(rec.tier, rec.id, rec.size_bytes);
        for copy in &rec.copies {
            self.free_copy(copy.tier, rec.id, rec.size_bytes);
        }
    }

    /// Pins the payload in its tier for `duration_ms` (0 = until unpinned).
    pub async fn pin(&self, id: PayloadId, duration_ms: u64) -> Result<(), AgentError> {
        let until = if duration_ms == 0 {
            u64::MAX
        } else {
            self.now_ms().saturating_add(duration_ms)
        };
        self.writer.admit()?;
        self.set_pin(id, until).await
    }

    /// Unpins; unknown payloads are fine (idempotent, as the reference).
    pub async fn unpin(&self, id: PayloadId) -> Result<(), AgentError> {
        match self.set_pin(id, 0).await {
            Err(AgentError::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    async fn set_pin(&self, id: PayloadId, until: u64) -> Result<(), AgentError> {
        let entry = self.entry(id)?;
        let mut e = lock(&entry);
        if e.gone {
            return Err(AgentError::NotFound(format!("payload {id} was deleted")));
        }
        let mut rec = e.rec.clone();
        rec.pinned_until_ms = until;
        self.writer.write(Write::Update(logged(&rec)))?;
        e.rec = rec;
        Ok(())
    }
}

/// Uploads a local region to the object store.
async fn upload(
    object: &crate::object::ObjectTier,
    store: &crate::store::FileStore,
    id: PayloadId,
    digest: Option<[u8; 32]>,
    now_ms: u64,
) -> Result<payload_catalog::Manifest, AgentError> {
    let source = store
        .open(id)
        .map_err(|e| io_error("opening the payload to upload it", e))?;
    object.upload(id, &source.path, digest, now_ms).await
}

/// A region that could not be sealed, in words that say what to do.
fn seal_error(id: PayloadId, err: std::io::Error) -> AgentError {
    if err.raw_os_error() == Some(libc::EBUSY) {
        return AgentError::InvalidState(format!(
            "payload {id} is still mapped writable by its writer: unmap it (drop the writable region) and commit \
             again; sealed bytes can never change, so they cannot be sealed while a writer can change them"
        ));
    }
    io_error("sealing the payload", err)
}

/// The row to log for a payload as it is now. A move in progress is never
/// logged: until its switch, the row names the source copy as it was, so a
/// crash mid-move leaves a payload that can still move, expire and spill.
pub(crate) fn logged(rec: &PayloadRecord) -> PayloadRecord {
    let mut rec = rec.clone();
    if rec.state == PayloadState::Spilling {
        rec.state = if rec.tier.is_durable() {
            PayloadState::Durable
        } else {
            PayloadState::Active
        };
    }
    rec
}
