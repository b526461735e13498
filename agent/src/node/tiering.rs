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
use payload_catalog::{PayloadId, PayloadRecord, Priority, Tier, Write};

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
                let live = e.live_leases(now);
                if e.moving {
                    // Another move is under way (moves always end): see where it lands.
                } else if live == 0 {
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
        let from = self.store(source.tier)?;
        // From here every exit either switches or undoes what was taken.
        let reserved = self.reserve_for_move(to, source.size_bytes).await;
        let copied = match &reserved {
            Ok(()) => copy_verified(from, to, &source, sync).await,
            Err(err) => Err(err.clone()),
        };
        match copied.and_then(|()| self.switch(&entry, target)) {
            Ok(rec) => {
                crate::failpoint!("after-switch");
                if let Err(e) = from.remove(id) {
                    tracing::warn!(%id, %e, "could not remove the source copy after a move");
                }
                from.unreserve(source.size_bytes);
                Ok(MoveOutcome::Moved(rec))
            }
            Err(err) => {
                if reserved.is_ok() {
                    let _ = to.remove(id);
                    to.unreserve(source.size_bytes);
                }
                Err(self.undo_move(&entry, from, err))
            }
        }
    }

    /// Makes the new copy authoritative: logged under the payload's lock,
    /// unless the payload was deleted or leased meanwhile.
    fn switch(&self, entry: &super::EntryRef, target: Tier) -> Result<PayloadRecord, AgentError> {
        let mut e = lock(entry);
        let id = e.rec.id;
        if e.gone {
            return Err(AgentError::NotFound(format!(
                "payload {id} was deleted during the move"
            )));
        }
        if e.live_leases(self.now_ms()) > 0 {
            return Err(AgentError::Conflict(format!(
                "payload {id} was leased during the move; it stays where it was"
            )));
        }
        let mut rec = e.rec.clone();
        rec.tier = target;
        rec.state = transition(
            rec.state,
            Event::FinishMove {
                durable: target.is_durable(),
            },
        )?;
        rec.version += 1;
        // The row must name the new copy before the old one is freed.
        self.writer.write(Write::Update(rec.clone()))?;
        e.rec = rec.clone();
        e.moving = false;
        Ok(rec)
    }

    /// Ends a move that did not switch: the payload stays on its source
    /// copy, or, if it was deleted meanwhile, the source is freed here (the
    /// delete left it to the mover).
    fn undo_move(&self, entry: &super::EntryRef, from: &FileStore, err: AgentError) -> AgentError {
        let mut e = lock(entry);
        e.moving = false;
        if e.gone {
            let (id, size) = (e.rec.id, e.rec.size_bytes);
            drop(e);
            let _ = from.remove(id);
            from.unreserve(size);
            return AgentError::NotFound(format!("payload {id} was deleted during the move"));
        }
        let durable = e.rec.tier.is_durable();
        if let Ok(state) = transition(e.rec.state, Event::CancelMove { durable }) {
            e.rec.state = state;
            e.rec.version += 1;
        }
        err
    }

    async fn reserve_for_move(self: &Arc<Self>, to: &FileStore, bytes: u64) -> Result<(), AgentError> {
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
    pub(crate) async fn make_room(self: &Arc<Self>, free: u64) {
        for (id, _) in self.spill_candidates() {
            if self.ram.capacity().saturating_sub(self.ram.used()) >= free {
                return;
            }
            // A promotion into RAM can land here and move others down.
            if let Err(err) = self.relocate(id, Tier::Disk, false, false).await {
                tracing::debug!(%id, %err, "could not spill to make room");
            }
        }
    }

    /// Spills down to the low watermark.
    pub async fn spill_to_low_watermark(self: &Arc<Self>) -> usize {
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
