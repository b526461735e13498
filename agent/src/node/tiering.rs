//! Moving payloads between tiers: promote, spill, and the scheduler that
//! spills cold, unleased, unpinned payloads when RAM passes its high
//! watermark. A move copies, switches the authoritative row, then frees the
//! source: a crash at any point leaves one valid copy, and start-up removes
//! the other.

use std::sync::Arc;
use std::time::Duration;

use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::{CatalogError, PayloadId, PayloadRecord, Priority, Tier, Write};

use super::{lock, Node};
use crate::store::{digest_file, io_error};

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
    /// while pinned (downward moves), and against the payload's policy.
    pub async fn relocate(
        &self,
        id: PayloadId,
        target: Tier,
        wait_for_leases: bool,
        sync: bool,
    ) -> Result<MoveOutcome, CatalogError> {
        if target == Tier::Void {
            self.delete(id, false).await?;
            return Ok(MoveOutcome::Deleted);
        }
        let to = self.store(target)?;
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
                if e.moving {
                    return Err(CatalogError::InvalidState(format!(
                        "payload {id} is already moving between tiers; retry shortly"
                    )));
                }
                let live = e.live_leases(now);
                if live == 0 {
                    e.rec.state = transition(e.rec.state, Event::BeginMove)?;
                    e.rec.version += 1;
                    e.moving = true;
                    break e.rec.clone();
                }
                if now >= deadline {
                    return Err(CatalogError::Conflict(format!(
                        "payload {id} has {live} live lease(s) pinning it to the {} tier; release them, or spill with wait_for_leases",
                        e.rec.tier.name()
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if let Err(err) = self.reserve_for_move(to, source.size_bytes).await {
            self.cancel_move(&entry);
            return Err(err);
        }
        let from = self.store(source.tier)?;
        let copied = {
            let (from_path, to_path) = (from.path(id), to.path(id));
            let want = source.sha256;
            let copy = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
                crate::store::copy_file(&from_path, &to_path, sync)?;
                Ok(want.is_none_or(|want| digest_file(&to_path).is_ok_and(|got| got == want)))
            });
            copy.await
                .map_err(|e| CatalogError::Storage(format!("copy task failed: {e}")))?
        };
        let failure = match copied {
            Ok(true) => None,
            Ok(false) => Some(CatalogError::Storage(format!(
                "the copy of payload {id} on the {} tier does not match its SHA-256; the source copy is kept",
                target.name()
            ))),
            Err(e) => Some(io_error("copying the payload", e)),
        };
        let switched = {
            let mut e = lock(&entry);
            if e.gone || failure.is_some() || e.live_leases(self.now_ms()) > 0 {
                None
            } else {
                e.rec.tier = target;
                e.rec.state = transition(
                    e.rec.state,
                    Event::FinishMove {
                        durable: target.is_durable(),
                    },
                )?;
                e.rec.version += 1;
                e.moving = false;
                Some(e.rec.clone())
            }
        };
        let Some(rec) = switched else {
            let _ = to.remove(id);
            to.unreserve(source.size_bytes);
            let gone = lock(&entry).gone;
            if gone {
                // Deleted during the move: the delete left the source to us.
                let _ = from.remove(id);
                from.unreserve(source.size_bytes);
                return Err(CatalogError::NotFound(format!(
                    "payload {id} was deleted during the move"
                )));
            }
            self.cancel_move(&entry);
            return Err(failure.unwrap_or_else(|| {
                CatalogError::Conflict(format!(
                    "payload {id} was leased during the move; it stays where it was"
                ))
            }));
        };
        // The row must name the new copy before the old one is freed.
        self.writer.write(Write::Update(rec.clone()))?;
        if let Err(e) = from.remove(id) {
            tracing::warn!(%id, %e, "could not remove the source copy after a move");
        }
        from.unreserve(source.size_bytes);
        Ok(MoveOutcome::Moved(rec))
    }

    fn cancel_move(&self, entry: &super::EntryRef) {
        let mut e = lock(entry);
        e.moving = false;
        let durable = e.rec.tier.is_durable();
        if let Ok(state) = transition(e.rec.state, Event::CancelMove { durable }) {
            e.rec.state = state;
            e.rec.version += 1;
        }
    }

    async fn reserve_for_move(&self, to: &crate::store::FileStore, bytes: u64) -> Result<(), CatalogError> {
        if to.reserve(bytes).is_ok() {
            return Ok(());
        }
        if to.tier() == Tier::Ram {
            self.make_room(bytes).await;
        }
        to.reserve(bytes)
    }

    /// Starts a move in the background (BEST_EFFORT policies).
    pub fn spawn_relocate(self: &Arc<Self>, id: PayloadId, target: Tier) {
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(err) = node.relocate(id, target, false, false).await {
                tracing::info!(%id, target = target.name(), %err, "background move did not happen");
            }
        });
    }

    /// The spill target of a payload unless the request names one.
    pub fn spill_target(&self, id: PayloadId, requested: Option<Tier>) -> Result<Tier, CatalogError> {
        match requested {
            Some(tier) => Ok(tier),
            None => {
                let entry = self.entry(id)?;
                let target = lock(&entry).rec.spill_target;
                Ok(target)
            }
        }
    }

    pub(crate) fn kick_spill_if_needed(&self) {
        if self.ram.used() as f64 > self.ram.capacity() as f64 * self.cfg.ram_high_watermark {
            self.spill_wanted.notify_one();
        }
    }

    /// Committed RAM payloads that may be spilled, coldest and least
    /// important first.
    fn spill_candidates(&self) -> Vec<(PayloadId, u64)> {
        let now = self.now_ms();
        let mut candidates = Vec::new();
        for entry in self.entries() {
            let e = lock(&entry);
            let rec = &e.rec;
            if rec.tier == Tier::Ram
                && rec.state.is_readable()
                && !e.moving
                && !rec.is_pinned(now)
                && e.live_leases(now) == 0
                && check_move(rec, Tier::Disk, now).is_ok()
            {
                candidates.push((rec.priority, e.last_access_ms, rec.id, rec.size_bytes));
            }
        }
        candidates.sort();
        candidates.into_iter().map(|(_, _, id, size)| (id, size)).collect()
    }

    /// Spills until `free` bytes of RAM are available, or nothing more can go.
    pub(crate) async fn make_room(&self, free: u64) {
        for (id, _) in self.spill_candidates() {
            if self.ram.capacity().saturating_sub(self.ram.used()) >= free {
                return;
            }
            // Boxed: a promotion into RAM can land here and move others down.
            if let Err(err) = Box::pin(self.relocate(id, Tier::Disk, false, false)).await {
                tracing::debug!(%id, %err, "could not spill to make room");
            }
        }
    }

    /// Spills down to the low watermark.
    pub async fn spill_to_low_watermark(&self) -> usize {
        let low = (self.ram.capacity() as f64 * self.cfg.ram_low_watermark) as u64;
        let mut moved = 0;
        for (id, _) in self.spill_candidates() {
            if self.ram.used() <= low {
                break;
            }
            match self.relocate(id, Tier::Disk, false, false).await {
                Ok(MoveOutcome::Moved(_)) => moved += 1,
                Ok(_) => {}
                Err(err) => tracing::debug!(%id, %err, "watermark spill skipped a payload"),
            }
        }
        moved
    }

    /// The spill scheduler: wakes on allocation pressure or every second.
    pub async fn run_spiller(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.spill_wanted.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = super::stopped(&mut stop) => return,
            }
            let high = (self.ram.capacity() as f64 * self.cfg.ram_high_watermark) as u64;
            if self.ram.used() > high {
                let moved = self.spill_to_low_watermark().await;
                tracing::info!(moved, used = self.ram.used(), "spilled RAM down to the low watermark");
            }
        }
    }
}

/// Whether policy allows moving `rec` to `target` now.
fn check_move(rec: &PayloadRecord, target: Tier, now_ms: u64) -> Result<(), CatalogError> {
    let id = rec.id;
    if !rec.state.is_readable() {
        return Err(CatalogError::InvalidState(format!(
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
        return Err(CatalogError::InvalidState(format!(
            "payload {id} is {why}; unpin it before spilling"
        )));
    }
    if let Some(min) = rec.min_residency_tier {
        if min.faster_than(target) {
            return Err(CatalogError::InvalidState(format!(
                "payload {id} must stay at the {} tier or faster by its eviction policy",
                min.name()
            )));
        }
    }
    if rec.require_durable && !target.is_durable() && downward {
        return Err(CatalogError::InvalidState(format!(
            "payload {id} requires a durable tier; {} is not durable",
            target.name()
        )));
    }
    Ok(())
}
