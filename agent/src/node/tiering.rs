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
use crate::tiers::TierStore;

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
                // What an upload left behind (a manifest) is kept: a retried
                // spill reuses it, a delete releases it, a restart releases
                // it if it never completed.
                if reserved.is_ok() && fresh && !target.off_node() {
                    self.free_copy(target, id, size);
                }
                Err(self.undo_move(&entry, err))
            }
        }
    }

    /// Copies the payload from its authoritative copy to `target`, checked
    /// against its digest before it counts; how the bytes travel is the
    /// target store's business. Gives back the payload's digest when the
    /// copy computed it (an upload hashes the whole payload).
    async fn copy_to(&self, source: &PayloadRecord, target: Tier, sync: bool) -> Result<Option<[u8; 32]>, AgentError> {
        let from = self.tier(source.tier)?;
        self.tier(target)?.copy_in(source, from, sync).await
    }

    /// Capacity for a new copy on `target`; a full tier makes room by
    /// spilling.
    async fn reserve_copy(self: &Arc<Self>, target: Tier, bytes: u64) -> Result<(), AgentError> {
        let to = self.tier(target)?;
        if to.reserve(bytes).is_ok() {
            return Ok(());
        }
        self.make_room(target, bytes).await;
        to.reserve(bytes)
    }

    /// Frees one copy and its capacity (an object copy's manifest release
    /// is the caller's to log).
    pub(crate) fn free_copy(&self, tier: Tier, id: PayloadId, size: u64) {
        if let Ok(store) = self.tier(tier) {
            store.free(id, size);
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
        let keep = rec.tier.off_node() || (upward && leased);
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
                self.release_raced_upload(rec.id);
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
        self.tiers.below(rec.tier).next()
    }

    /// The tier's store and its watermarks as byte counts, for tiers the
    /// scheduler spills from.
    fn watermarks(&self, tier: Tier) -> Option<(&dyn TierStore, u64, u64)> {
        let store = self.tiers.get(tier)?;
        let (high, low) = store.watermarks()?;
        let capacity = store.capacity().capacity as f64;
        Some((store, (capacity * high) as u64, (capacity * low) as u64))
    }

    pub(crate) fn kick_spill_if_needed(&self) {
        let above = |store: &dyn TierStore| {
            self.watermarks(store.tier())
                .is_some_and(|(store, high, _)| store.capacity().reserved > high)
        };
        if self.tiers.all().any(above) {
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
        let Ok(store) = self.tier(tier) else {
            return;
        };
        for (id, target) in self.spill_candidates(tier) {
            let c = store.capacity();
            if c.capacity.saturating_sub(c.reserved) >= free {
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
        let mut moved = 0;
        for (id, target) in self.spill_candidates(tier) {
            if store.capacity().reserved <= low {
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
    /// and spills each tier above its high watermark, fastest first (a
    /// spill from RAM may push the disk over).
    pub async fn run_spiller(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.spill_wanted.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = super::stopped(&mut stop) => return,
            }
            let tiers: Vec<Tier> = self.tiers.all().map(|s| s.tier()).collect();
            for tier in tiers {
                let Some((store, high, _)) = self.watermarks(tier) else {
                    continue;
                };
                if store.capacity().reserved > high {
                    let moved = self.spill_to_low_watermark(tier).await;
                    // Nothing movable (no tier below, all leased) is not news every second.
                    if moved > 0 {
                        tracing::info!(
                            tier = tier.name(),
                            moved,
                            used = store.capacity().reserved,
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
