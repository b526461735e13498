//! Start-up: rebuild the in-memory view from the catalog, check every copy
//! against what is really in shm and on disk, drop half-written allocations,
//! put interrupted moves back on their source copy, remove this node's
//! orphan regions (and nothing else), and restore leases that are still live.

use std::collections::HashSet;
use std::sync::Arc;

use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::{PayloadId, PayloadState, Repository, Tier, Write};
use tokio::sync::{Notify, Semaphore};

use super::{lock, Entry, LeaseSlot, Node, NodeConfig, Sharded};
use crate::journal::Journal;
use crate::object::ObjectTier;
use crate::state::StateDir;
use crate::store::{FileStore, Scan};
use crate::tiers::{LocalTier, ObjectStore, TierStore, Tiers};
use crate::writer::Writer;
use anyhow::Context as _;

/// Committed payloads waiting for the hashing thread, at most; past it
/// commits wait for room (backpressure).
const DIGEST_QUEUE: usize = 65_536;

/// The node's tiers, fastest first, each with its spill watermarks.
fn tiers(cfg: &NodeConfig, ram: FileStore, disk: FileStore, object: Option<Arc<ObjectTier>>) -> Tiers {
    let local = |files, high_watermark, low_watermark| -> Arc<dyn TierStore> {
        Arc::new(LocalTier {
            files,
            high_watermark,
            low_watermark,
        })
    };
    let mut stores = vec![
        local(ram, cfg.ram_high_watermark, cfg.ram_low_watermark),
        local(disk, cfg.disk_high_watermark, cfg.disk_low_watermark),
    ];
    if let Some(object) = object {
        stores.push(Arc::new(ObjectStore {
            object,
            clock: cfg.clock.clone(),
        }));
    }
    Tiers::new(stores)
}

/// Payload ids named by the writes in `catalog.rejected` (one JSON object a line).
fn rejected_ids(path: &std::path::Path) -> HashSet<PayloadId> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashSet::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| serde_json::from_value::<Write>(line["write"].clone()).ok())
        .filter_map(|write| match write {
            Write::Insert(rec) | Write::Update(rec) => Some(rec.id),
            Write::Delete(id) => Some(id),
            Write::Lineage { .. }
            | Write::Metadata { .. }
            | Write::ReleaseManifest { .. }
            | Write::CommitOffset { .. } => None,
        })
        .collect()
}

/// What start-up found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub payloads: usize,
    pub dropped_allocations: usize,
    pub lost: usize,
    /// Disk copies whose bytes no longer match their digest after a reboot
    /// (never synced before a power cut): dropped, never served.
    pub corrupt: usize,
    pub orphans_removed: usize,
    /// Moves a crash interrupted: the payload is back on its source copy.
    pub moves_undone: usize,
    /// Regions named before node ids, renamed to this node's names.
    pub legacy_adopted: usize,
    /// Files this node cannot prove it created (another agent's, or older
    /// names without a catalog row): reported, never touched.
    pub foreign_skipped: usize,
    pub leases_restored: usize,
    /// Manifests no payload counts on (uploads a crash cut short), released.
    pub uploads_released: usize,
    /// Block-cache files of payloads that no longer have an object copy.
    pub cache_dropped: usize,
    /// Payloads whose local copy was gone, now read from their object copy.
    pub fell_back_to_object: usize,
}

impl Node {
    /// Opens the node over its stores, catalog and lease journal; `state`
    /// holds the lease journal and the catalog write log.
    pub async fn open(
        cfg: NodeConfig,
        repo: Arc<dyn Repository>,
        ram: FileStore,
        disk: FileStore,
        object: Option<ObjectTier>,
        state: StateDir,
    ) -> anyhow::Result<(Arc<Node>, Recovery)> {
        // The catalog scopes payload rows by node: a mismatch would load (and
        // recover, deleting rows) as another node.
        anyhow::ensure!(
            repo.node() == cfg.node_name,
            "the catalog was opened for node {:?} but this agent is node {:?}",
            repo.node(),
            cfg.node_name
        );
        let writer = Writer::open(repo.clone(), &state.join("catalog.log"), cfg.catalog_backlog).await?;
        let journal_path = state.join("leases.journal");
        let (journal, journaled) = Journal::open(&journal_path)
            .map_err(|e| anyhow::anyhow!("opening the lease journal {}: {e}", journal_path.display()))?;
        let (digests, mut pending_digests) = tokio::sync::mpsc::channel(DIGEST_QUEUE);
        let object = object.map(Arc::new);
        let tiers = tiers(&cfg, ram, disk, object.clone());
        let node = Node {
            cfg,
            state,
            repo,
            writer,
            tiers,
            object,
            payloads: Sharded::new(),
            leases: Sharded::new(),
            visitors: Sharded::new(),
            located: Default::default(),
            strays: Default::default(),
            policies: Default::default(),
            metrics: Default::default(),
            journal,
            spill_wanted: Notify::new(),
            hashing: Semaphore::new(1),
            digests,
            operator: std::sync::OnceLock::new(),
        };
        let mut report = Recovery::default();
        let rebooted = node.state.rebooted() == Some(true);
        // An unreadable root is a tier that cannot work; a scan is also what
        // tells a replaced node id apart from lost regions.
        let scan = |store: &FileStore| {
            store
                .scan()
                .with_context(|| format!("reading the {} root {}", store.tier().name(), store.root().display()))
        };
        let scans = node.tiers.regions().map(scan).collect::<anyhow::Result<Vec<_>>>()?;
        let foreign: HashSet<PayloadId> = scans.iter().flat_map(|s| s.foreign.iter().copied()).collect();
        let rejected = rejected_ids(&node.state.join("catalog.rejected"));
        node.load(&mut report, rebooted, &foreign, &rejected).await?;
        node.remove_orphans(&mut report, scans, &rejected);
        if let Some(object) = &node.object {
            report.uploads_released = node.release_unused_manifests().await?;
            // Cached copies of payloads deleted while the agent was down (a
            // promoted payload keeps its object copy, and a lease on it may
            // still read its cache file).
            report.cache_dropped = object
                .cache
                .retain(|id| node.entry(id).is_ok_and(|e| lock(&e).rec.in_object_store()));
        }
        node.state.record_boot()?;
        for store in node.tiers.regions() {
            store.check_capacity()?;
        }
        let now = node.now_ms();
        for lease in journaled.into_iter().filter(|l| l.expires_ms > now) {
            let Ok(entry) = node.entry(lease.payload) else {
                continue;
            };
            lock(&entry).leases.insert(lease.lease, lease.expires_ms);
            node.leases.shard(&lease.lease).insert(
                lease.lease,
                LeaseSlot::Live {
                    payload: lease.payload,
                    expires_ms: lease.expires_ms,
                },
            );
            report.leases_restored += 1;
        }
        tracing::info!(node_id = node.state.node_id(), ?report, "node recovered");
        let node = Arc::new(node);
        let weak = Arc::downgrade(&node);
        std::thread::Builder::new()
            .name("payload-digest".into())
            .spawn(move || {
                // Ends when the node is gone.
                while let Some(id) = pending_digests.blocking_recv() {
                    match weak.upgrade() {
                        Some(node) => node.record_digest(id),
                        None => return,
                    }
                }
            })?;
        // Digests a crash interrupted are computed again, fed as the
        // hashing thread takes them (the queue is bounded).
        let mut missing = Vec::new();
        node.payloads.for_each(|id, e| {
            if lock(e).rec.sha256.is_none() {
                missing.push(*id);
            }
        });
        if !missing.is_empty() {
            let queue = node.digests.clone();
            std::thread::Builder::new()
                .name("payload-digest-feed".into())
                .spawn(move || missing.into_iter().try_for_each(|id| queue.blocking_send(id)))?;
        }
        Ok((node, report))
    }

    /// After a reboot every disk copy with a digest is read and checked
    /// (once): a commit without `sync` survives SIGKILL, not power loss.
    /// `foreign`: uuids of regions named for other nodes. A row of ours
    /// whose region is missing while one of those has its uuid means the
    /// node id changed (a lost or replaced state dir): start-up stops
    /// rather than drop the row.
    /// `rejected`: payloads with a write in `catalog.rejected`, whose row
    /// may be behind what the client was told: their regions are kept.
    async fn load(
        &self,
        report: &mut Recovery,
        rebooted: bool,
        foreign: &HashSet<PayloadId>,
        rejected: &HashSet<PayloadId>,
    ) -> anyhow::Result<()> {
        let now = self.now_ms();
        for mut rec in self.repo.load_payloads().await? {
            let tier = match self.tier(rec.tier) {
                Ok(tier) => tier,
                Err(err) => {
                    tracing::warn!(id = %rec.id, %err, "skipping a payload on an unconfigured tier");
                    continue;
                }
            };
            let Some(store) = tier.regions() else {
                // Its bytes are elsewhere (the object store); an ALLOCATED
                // one waits for its client's upload (or its write deadline).
                self.check_copies(&mut rec)?;
                self.payloads
                    .shard(&rec.id)
                    .insert(rec.id, Arc::new(std::sync::Mutex::new(Entry::new(rec, now))));
                report.payloads += 1;
                continue;
            };
            let mut len = store.region_len(rec.id);
            // This node's row proves an old-style name is this node's file.
            if len.is_none() && store.adopt_legacy(rec.id) {
                report.legacy_adopted += 1;
                len = store.region_len(rec.id);
            }
            if !rec.state.is_readable() && rejected.contains(&rec.id) {
                tracing::warn!(id = %rec.id, "kept a region whose catalog write was refused (see catalog.rejected)");
                report.foreign_skipped += 1;
                continue;
            }
            if !rec.state.is_readable() {
                if len.is_some() {
                    let _ = store.remove(rec.id);
                }
                self.writer.write(Write::Delete(rec.id))?;
                report.dropped_allocations += 1;
                continue;
            }
            if len.is_none() && foreign.contains(&rec.id) {
                anyhow::bail!(
                    "payload {} of this node's catalog has its region under another node id in {} (node-id here: {}): \
                     was {} replaced or lost? Restore it, or move the files aside, before starting again",
                    rec.id,
                    store.root().display(),
                    self.state.node_id(),
                    self.state.join("node-id").display()
                );
            }
            if len != Some(rec.size_bytes) && self.fall_back_to_object(&mut rec, now, report)? {
                continue;
            }
            if len != Some(rec.size_bytes) {
                tracing::error!(id = %rec.id, tier = rec.tier.name(), "committed payload has no intact region; dropping its row");
                self.writer.write(Write::Delete(rec.id))?;
                report.lost += 1;
                continue;
            }
            if rebooted && rec.tier.is_durable() && !self.intact(store, &rec).await {
                let _ = store.remove(rec.id);
                if self.fall_back_to_object(&mut rec, now, report)? {
                    continue;
                }
                tracing::error!(id = %rec.id, "after a reboot the payload's bytes do not match its SHA-256; dropping it");
                let _ = store.remove(rec.id);
                self.writer.write(Write::Delete(rec.id))?;
                report.corrupt += 1;
                continue;
            }
            if rec.state == PayloadState::Spilling {
                // The row still names the source copy: the move never switched.
                rec.state = transition(
                    rec.state,
                    Event::CancelMove {
                        durable: rec.tier.is_durable() || rec.in_object_store(),
                    },
                )?;
                self.writer.write(Write::Update(rec.clone()))?;
                report.moves_undone += 1;
            }
            self.check_copies(&mut rec)?;
            store.add_used(rec.size_bytes);
            self.payloads
                .shard(&rec.id)
                .insert(rec.id, Arc::new(std::sync::Mutex::new(Entry::new(rec, now))));
            report.payloads += 1;
        }
        Ok(())
    }

    /// A payload whose local copy is gone (a reboot emptied /dev/shm, say)
    /// but that has an object copy is read from the object tier from now
    /// on. Returns whether it did that.
    fn fall_back_to_object(
        &self,
        rec: &mut payload_catalog::PayloadRecord,
        now: u64,
        report: &mut Recovery,
    ) -> anyhow::Result<bool> {
        if self.object.is_none() || !rec.has_copy(Tier::Object) {
            return Ok(false);
        }
        tracing::warn!(id = %rec.id, tier = rec.tier.name(), "the local copy is gone; reading the payload from the object tier");
        rec.tier = Tier::Object;
        rec.copies.retain(|c| c.tier != Tier::Object);
        rec.state = PayloadState::Durable;
        rec.version += 1;
        self.check_copies(rec)?;
        self.writer.write(Write::Update(rec.clone()))?;
        self.payloads
            .shard(&rec.id)
            .insert(rec.id, Arc::new(std::sync::Mutex::new(Entry::new(rec.clone(), now))));
        report.payloads += 1;
        report.fell_back_to_object += 1;
        Ok(true)
    }

    /// Keeps the copies besides the authoritative one that are really here
    /// (counting their capacity) and drops the rest from the row.
    fn check_copies(&self, rec: &mut payload_catalog::PayloadRecord) -> anyhow::Result<()> {
        let before = rec.copies.len();
        let probe = rec.clone();
        rec.copies.retain(|copy| match self.tier(copy.tier) {
            Ok(store) if store.holds(&probe) => {
                store.add_used(probe.size_bytes);
                true
            }
            Ok(_) => false,
            // Kept while its tier is not configured here (an object store
            // left out of this start): the bytes are still there.
            Err(_) => copy.tier.off_node(),
        });
        if rec.copies.len() != before {
            self.writer.write(Write::Update(rec.clone()))?;
        }
        Ok(())
    }

    /// Whether the copy's bytes hash to its digest (true when it has none).
    async fn intact(&self, store: &FileStore, rec: &payload_catalog::PayloadRecord) -> bool {
        let Some(want) = rec.sha256 else { return true };
        let path = store.path(rec.id);
        let got = tokio::task::spawn_blocking(move || crate::store::digest_file(&path)).await;
        matches!(got, Ok(Ok(digest)) if digest == want)
    }

    /// Removes this node's regions that no row names (a crash between
    /// creating and logging, or between copying and switching). Anything
    /// the node cannot prove it created is counted and left alone, and so
    /// is a region whose write the catalog refused (`catalog.rejected`:
    /// the operator decides); a region that cannot be removed is reported,
    /// never fatal.
    fn remove_orphans(&self, report: &mut Recovery, scans: Vec<Scan>, rejected: &HashSet<PayloadId>) {
        for (store, scan) in self.tiers.regions().zip(scans) {
            let mut owned = HashSet::new();
            self.payloads.for_each(|id, e| {
                let e = lock(e);
                if e.rec.tier == store.tier() || e.rec.has_copy(store.tier()) {
                    owned.insert(*id);
                }
            });
            // (Regions load dropped are gone already; another user's file
            // with this node's name is not ours to remove.)
            // Memfds the keeper held for payloads no row names.
            for id in store.memfd_ids() {
                if !owned.contains(&id) && !rejected.contains(&id) && store.remove(id).is_ok() {
                    report.orphans_removed += 1;
                }
            }
            let mut not_owned = 0;
            let orphans = scan
                .ours
                .into_iter()
                .filter(|id| !owned.contains(id) && store.path(*id).exists());
            for id in orphans {
                if !store.owns(id) {
                    not_owned += 1;
                    continue;
                }
                if rejected.contains(&id) {
                    report.foreign_skipped += 1;
                    tracing::warn!(%id, "kept a region whose catalog write was refused (see catalog.rejected)");
                    continue;
                }
                match store.remove(id) {
                    Ok(()) => report.orphans_removed += 1,
                    Err(err) => tracing::warn!(%id, %err, "could not remove an orphan region"),
                }
            }
            let skipped = scan.foreign.len() + scan.legacy.len() + not_owned;
            if skipped > 0 {
                tracing::info!(
                    root = %store.root().display(),
                    skipped,
                    "left alone regions this node did not create (other agents', other users', or older names with no row here)"
                );
            }
            report.foreign_skipped += skipped;
        }
    }

    /// Payload ids held on `tier`, for tests and tools.
    pub fn ids_on(&self, tier: Tier) -> Vec<PayloadId> {
        let mut ids = Vec::new();
        self.payloads.for_each(|id, e| {
            if lock(e).rec.tier == tier {
                ids.push(*id);
            }
        });
        ids
    }
}
