//! Moving payloads between tiers: promote, spill, and the scheduler that
//! spills cold, unleased, unpinned payloads when RAM passes its high
//! watermark. A move copies, switches the authoritative row, then frees the
//! source: a crash at any point leaves one valid copy, and start-up removes
//! the other.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::AgentError;
use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::{CopyRecord, PayloadId, PayloadRecord, Priority, Tier, Write};

use super::{lock, Node};
use crate::store::{digest_file, io_error, FileStore};

/// What a move did.
#[derive(Clone, Debug)]
pub enum MoveOutcome {
    Moved(PayloadRecord),
    /// Already on the target tier.
    Unchanged(PayloadRecord),
    /// Spilled to VOID: the payload was deleted.
    Deleted,
}

impl MoveOutcome {
    pub fn record(&self) -> Option<&PayloadRecord> {
        match self {
            MoveOutcome::Moved(rec) | MoveOutcome::Unchanged(rec) => Some(rec),
            MoveOutcome::Deleted => None,
        }
    }
}

impl Node {
    /// Moves a committed payload to `target`. Refused while leased (unless
    /// `wait_for_leases`, which waits up to the maximum lease duration),
    /// while pinned (downward moves), and against the payload's policy. The
    /// move runs as a task of its own: a caller that goes away (a cancelled
    /// RPC) cannot leave it half done.
    /// (A named future type: moves nest, through `make_room`, and an
    /// `async fn` here would make the spawned future's type recursive.)
    pub fn relocate(
        self: &Arc<Self>,
        id: PayloadId,
        target: Tier,
        wait_for_leases: bool,
        sync: bool,
    ) -> Pin<Box<dyn Future<Output = Result<MoveOutcome, AgentError>> + Send>> {
        let node = self.clone();
        let task = tokio::spawn(async move { node.relocate_now(id, target, wait_for_leases, sync).await });
        Box::pin(async move {
            task.await
                .map_err(|e| crate::error::task_failed(&format!("moving payload {id}"), e))?
        })
    }

    async fn relocate_now(
        self: &Arc<Self>,
        id: PayloadId,
        target: Tier,
        wait_for_leases: bool,
        sync: bool,
    ) -> Result<MoveOutcome, AgentError> {
        if target == Tier::Void {
            self.delete(id, false).await?;
            return Ok(MoveOutcome::Deleted);
        }
        self.check_tier(target)?;
        let deadline = self.now_ms() + if wait_for_leases { self.cfg.lease_max_ms } else { 0 };
        let entry = self.entry(id)?;
        let source = loop {
            let now = self.now_ms();
            {
                let mut e = lock(&entry);
                if e.rec.tier == target {
                    return Ok(MoveOutcome::Unchanged(e.rec.clone()));
                }
                check_move(&e.rec, target, now)?;
                let live = e.live_leases(now);
                // A lease pins the copy it was granted on: an upward move
                // copies past it and keeps that copy while it is leased.
                let upward = target.faster_than(e.rec.tier);
                if e.moving {
                    // Another move is under way (moves always end): see where it lands.
                } else if live == 0 || upward {
                    // Not logged: the row keeps naming the source until the switch.
                    e.rec.state = transition(e.rec.state, Event::BeginMove)?;
                    e.rec.version += 1;
                    e.moving = true;
                    break e.rec.clone();
                } else if now >= deadline {
                    return Err(AgentError::Conflict(format!(
                        "payload {id} has {live} live lease(s) pinning it to the {} tier; release them, or spill with wait_for_leases",
                        e.rec.tier.name()
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // From here every exit either switches or undoes what was taken.
        let size = source.size_bytes;
        let fresh = !source.has_copy(target);
        let reserved = if fresh {
            self.reserve_copy(target, size).await
        } else {
            Ok(())
        };
        let copied = match &reserved {
            Ok(()) if fresh => self.copy_to(&source, target, sync).await,
            Ok(()) => Ok(None),
            Err(err) => Err(err.clone()),
        };
        match copied.and_then(|digest| self.switch(&entry, target, digest)) {
            Ok((rec, kept)) => {
                crate::failpoint!("after-switch");
                if !kept {
                    self.free_copy(source.tier, id, size);
                }
                Ok(MoveOutcome::Moved(rec))
            }
            Err(err) => {
                // A manifest an upload left behind is kept: a retried spill
                // reuses it, a delete releases it, a restart releases it if
                // it never completed.
                if reserved.is_ok() && fresh && target != Tier::Object {
                    self.free_copy(target, id, size);
                }
                Err(self.undo_move(&entry, err))
            }
        }
    }

    /// Copies the payload from its authoritative copy to `target`, checked
    /// against its digest before it counts. The one place that knows how
    /// bytes travel between tiers. Gives back the payload's digest when the
    /// copy computed it (an upload hashes the whole payload).
    async fn copy_to(&self, source: &PayloadRecord, target: Tier, sync: bool) -> Result<Option<[u8; 32]>, AgentError> {
        let id = source.id;
        match (source.tier, target) {
            (from, Tier::Object) => {
                let object = self.object()?;
                let path = self.store(from)?.path(id);
                let manifest = object.upload(id, &path, source.sha256, self.now_ms()).await?;
                Ok(Some(manifest.sha256))
            }
            (Tier::Object, to) => {
                let store = self.store(to)?;
                self.create_region(to, id, source.size_bytes).await?;
                let fetched = self.fetch_object(source, &store.path(id)).await;
                crate::failpoint!("after-download");
                let sealed = fetched.and_then(|()| {
                    let synced = if sync { store.sync(id) } else { Ok(()) };
                    synced
                        .and_then(|()| store.seal(id))
                        .map_err(|e| io_error("sealing the promoted copy", e))
                });
                if sealed.is_err() {
                    let _ = store.remove(id);
                }
                sealed.map(|()| None)
            }
            (from, to) => copy_verified(self.store(from)?, self.store(to)?, source, sync)
                .await
                .map(|()| None),
        }
    }

    /// Capacity for a new copy on `target`; RAM makes room by spilling.
    async fn reserve_copy(self: &Arc<Self>, target: Tier, bytes: u64) -> Result<(), AgentError> {
        if target == Tier::Object {
            return Ok(());
        }
        let to = self.store(target)?;
        if to.reserve(bytes).is_ok() {
            return Ok(());
        }
        self.make_room(target, bytes).await;
        to.reserve(bytes)
    }

    /// Frees one copy: a local region and its capacity, or the object copy
    /// (whose manifest release the caller has logged).
    pub(crate) fn free_copy(&self, tier: Tier, id: PayloadId, size: u64) {
        match tier {
            Tier::Object => {
                if let Some(object) = &self.object {
                    object.cache.remove(id);
                    let object = object.clone();
                    tokio::spawn(async move {
                        if let Err(err) = object.delete_manifest_object(id).await {
                            tracing::warn!(%id, %err, "could not delete a manifest object; its blocks are collected anyway");
                        }
                        // An allocation on the object tier that never got
                        // imported may have left its client's upload.
                        if let Err(err) = object.delete_upload(id).await {
                            tracing::warn!(%id, %err, "could not delete an upload that was never imported");
                        }
                    });
                }
            }
            tier => {
                if let Ok(store) = self.store(tier) {
                    if let Err(e) = store.remove(id) {
                        tracing::warn!(%id, %e, "could not remove a payload region");
                    }
                    store.unreserve(size);
                }
            }
        }
    }

    /// Makes the new copy authoritative: logged under the payload's lock,
    /// unless the payload was deleted, or leased meanwhile on a downward
    /// move. Says whether the source copy stays, as a copy under the new
    /// one: the object copy always, a local copy while it is leased.
    fn switch(
        &self,
        entry: &super::EntryRef,
        target: Tier,
        digest: Option<[u8; 32]>,
    ) -> Result<(PayloadRecord, bool), AgentError> {
        let mut e = lock(entry);
        let id = e.rec.id;
        if e.gone {
            return Err(AgentError::NotFound(format!(
                "payload {id} was deleted during the move"
            )));
        }
        let leased = e.live_leases(self.now_ms()) > 0;
        let upward = target.faster_than(e.rec.tier);
        if leased && !upward {
            return Err(AgentError::Conflict(format!(
                "payload {id} was leased during the move; it stays where it was"
            )));
        }
        let mut rec = e.rec.clone();
        let keep = rec.tier == Tier::Object || (upward && leased);
        rec.copies.retain(|c| c.tier != target);
        if keep {
            rec.copies.push(CopyRecord {
                tier: rec.tier,
                verified: true,
            });
        }
        rec.tier = target;
        // A payload spilled before the hashing thread reached it learns
        // its digest from the upload (nothing can hash it once it is gone).
        rec.sha256 = rec.sha256.or(digest);
        rec.state = transition(
            rec.state,
            Event::FinishMove {
                durable: target.is_durable() || rec.in_object_store(),
            },
        )?;
        rec.version += 1;
        // The row must name the new copy before the old one is freed.
        self.writer.write(Write::Update(rec.clone()))?;
        e.rec = rec.clone();
        e.moving = false;
        Ok((rec, keep))
    }

    /// Ends a move that did not switch: the payload stays on its source
    /// copy, or, if it was deleted meanwhile, its copies are freed here (the
    /// delete left them to the mover).
    fn undo_move(&self, entry: &super::EntryRef, err: AgentError) -> AgentError {
        let mut e = lock(entry);
        e.moving = false;
        if e.gone {
            let rec = e.rec.clone();
            drop(e);
            if self.object.is_some() {
                // The delete logged its release before this move's upload
                // may have claimed a manifest: release it again.
                let release = Write::ReleaseManifest {
                    id: rec.id,
                    now_ms: self.now_ms(),
                };
                if let Err(err) = self.writer.write(release) {
                    tracing::warn!(id = %rec.id, %err, "could not log a manifest release; its blocks stay referenced");
                }
            }
            self.free_all(&rec);
            return AgentError::NotFound(format!("payload {} was deleted during the move", rec.id));
        }
        let durable = e.rec.tier.is_durable() || e.rec.in_object_store();
        if let Ok(state) = transition(e.rec.state, Event::CancelMove { durable }) {
            e.rec.state = state;
            e.rec.version += 1;
        }
        err
    }

    /// Starts a move in the background (BEST_EFFORT policies).
    pub fn spawn_relocate(self: &Arc<Self>, id: PayloadId, target: Tier) {
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(err) = node.relocate_now(id, target, false, false).await {
                tracing::info!(%id, target = target.name(), %err, "background move did not happen");
            }
        });
    }

    /// The spill target of a payload unless the request names one.
    pub fn spill_target(&self, id: PayloadId, requested: Option<Tier>) -> Result<Tier, AgentError> {
        match requested {
            Some(tier) => Ok(tier),
            None => {
                let entry = self.entry(id)?;
                let target = lock(&entry).rec.spill_target;
                Ok(target)
            }
        }
    }

    /// Where the scheduler sends a payload from its tier: its spill target
    /// when that is below it and configured here, else the next configured
    /// tier down (none below the lowest).
    fn scheduled_target(&self, rec: &PayloadRecord) -> Option<Tier> {
        let configured = |tier: Tier| tier == Tier::Void || self.check_tier(tier).is_ok();
        if rec.tier.faster_than(rec.spill_target) && configured(rec.spill_target) {
            return Some(rec.spill_target);
        }
        [Tier::Disk, Tier::Object]
            .into_iter()
            .find(|t| rec.tier.faster_than(*t) && self.check_tier(*t).is_ok())
    }

    /// The local tier's store and watermarks, for the scheduler.
    fn watermarks(&self, tier: Tier) -> Option<(&FileStore, f64, f64)> {
        match tier {
            Tier::Ram => Some((&self.ram, self.cfg.ram_high_watermark, self.cfg.ram_low_watermark)),
            Tier::Disk => Some((&self.disk, self.cfg.disk_high_watermark, self.cfg.disk_low_watermark)),
            _ => None,
        }
    }

    pub(crate) fn kick_spill_if_needed(&self) {
        let above = |tier| {
            self.watermarks(tier)
                .is_some_and(|(store, high, _)| store.used() as f64 > store.capacity() as f64 * high)
        };
        if above(Tier::Ram) || above(Tier::Disk) {
            self.spill_wanted.notify_one();
        }
    }

    /// Committed payloads on `tier` that may be spilled, with where each
    /// goes: unleased, unpinned, allowed by policy; lowest priority first,
    /// then least recently leased.
    fn spill_candidates(&self, tier: Tier) -> Vec<(PayloadId, Tier)> {
        let now = self.now_ms();
        let mut candidates = Vec::new();
        for entry in self.entries() {
            let e = lock(&entry);
            let rec = &e.rec;
            if rec.tier != tier || !rec.state.is_readable() || e.moving || rec.is_pinned(now) || e.live_leases(now) > 0
            {
                continue;
            }
            let Some(target) = self.scheduled_target(rec) else {
                continue;
            };
            if check_move(rec, target, now).is_ok() {
                candidates.push((rec.priority, e.last_access_ms, rec.id, target));
            }
        }
        candidates.sort();
        candidates.into_iter().map(|(_, _, id, target)| (id, target)).collect()
    }

    /// Spills from `tier` until `free` bytes are available there, or
    /// nothing more can go.
    pub(crate) async fn make_room(self: &Arc<Self>, tier: Tier, free: u64) {
        let Some((store, _, _)) = self.watermarks(tier) else {
            return;
        };
        for (id, target) in self.spill_candidates(tier) {
            if store.capacity().saturating_sub(store.used()) >= free {
                return;
            }
            // A promotion into RAM can land here and move others down.
            if let Err(err) = self.relocate(id, target, false, false).await {
                tracing::debug!(%id, %err, "could not spill to make room");
            }
        }
    }

    /// Spills `tier` down to its low watermark; returns how many moved.
    pub async fn spill_to_low_watermark(self: &Arc<Self>, tier: Tier) -> usize {
        let Some((store, _, low)) = self.watermarks(tier) else {
            return 0;
        };
        let low = (store.capacity() as f64 * low) as u64;
        let mut moved = 0;
        for (id, target) in self.spill_candidates(tier) {
            if store.used() <= low {
                break;
            }
            match self.relocate(id, target, false, false).await {
                Ok(MoveOutcome::Moved(_) | MoveOutcome::Deleted) => moved += 1,
                Ok(_) => {}
                Err(err) => tracing::debug!(%id, %err, "watermark spill skipped a payload"),
            }
        }
        moved
    }

    /// The spill scheduler: wakes on allocation pressure or every second,
    /// and spills each local tier above its high watermark, RAM first (a
    /// spill from RAM may push the disk over).
    pub async fn run_spiller(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.spill_wanted.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = super::stopped(&mut stop) => return,
            }
            for tier in [Tier::Ram, Tier::Disk] {
                let Some((store, high, _)) = self.watermarks(tier) else {
                    continue;
                };
                if store.used() as f64 > store.capacity() as f64 * high {
                    let moved = self.spill_to_low_watermark(tier).await;
                    // Nothing movable (no tier below, all leased) is not news every second.
                    if moved > 0 {
                        tracing::info!(
                            tier = tier.name(),
                            moved,
                            used = store.used(),
                            "spilled down to the low watermark"
                        );
                    }
                }
            }
        }
    }
}

/// Whether policy allows moving `rec` to `target` now.
fn check_move(rec: &PayloadRecord, target: Tier, now_ms: u64) -> Result<(), AgentError> {
    let id = rec.id;
    if !rec.state.is_readable() {
        return Err(AgentError::InvalidState(format!(
            "payload {id} is {}; only committed payloads move between tiers",
            rec.state.name()
        )));
    }
    let downward = rec.tier.faster_than(target);
    if downward && rec.is_pinned(now_ms) {
        let why = if rec.priority == Priority::Never {
            "marked never-evict"
        } else {
            "pinned"
        };
        return Err(AgentError::InvalidState(format!(
            "payload {id} is {why}; unpin it before spilling"
        )));
    }
    if let Some(min) = rec.min_residency_tier {
        if min.faster_than(target) {
            return Err(AgentError::InvalidState(format!(
                "payload {id} must stay at the {} tier or faster by its eviction policy",
                min.name()
            )));
        }
    }
    if rec.require_durable && !target.is_durable() && downward {
        return Err(AgentError::InvalidState(format!(
            "payload {id} requires a durable tier; {} is not durable",
            target.name()
        )));
    }
    Ok(())
}

/// Copies the source region to the target tier and checks the copy against
/// the payload's digest; a failed copy leaves no file behind.
async fn copy_verified(from: &FileStore, to: &FileStore, source: &PayloadRecord, sync: bool) -> Result<(), AgentError> {
    let (id, target) = (source.id, to.tier());
    let (from_path, to_path) = (from.path(id), to.path(id));
    let want = source.sha256;
    let copy = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        crate::store::copy_file(&from_path, &to_path, sync)?;
        Ok(want.is_none_or(|want| digest_file(&to_path).is_ok_and(|got| got == want)))
    });
    match copy.await {
        Ok(Ok(true)) => {
            crate::failpoint!("after-copy");
            Ok(())
        }
        Ok(Ok(false)) => Err(AgentError::Integrity(format!(
            "the copy of payload {id} on the {} tier does not match its SHA-256; the source copy is kept",
            target.name()
        ))),
        Ok(Err(e)) => Err(io_error("copying the payload", e)),
        Err(e) => Err(crate::error::task_failed("copying the payload", e)),
    }
}
