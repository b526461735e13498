//! Start-up: rebuild the in-memory view from the catalog, check every copy
//! against what is really in shm and on disk, drop half-written allocations,
//! remove orphan regions, and restore leases that are still live.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use payload_catalog::{PayloadId, Repository, Tier, Write};
use tokio::sync::{Notify, Semaphore};

use super::{lock, Entry, LeaseSlot, Node, NodeConfig, Sharded};
use crate::journal::Journal;
use crate::store::FileStore;
use crate::writer::Writer;

/// What start-up found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub payloads: usize,
    pub dropped_allocations: usize,
    pub lost: usize,
    pub orphans_removed: usize,
    pub leases_restored: usize,
}

impl Node {
    /// Opens the node over its stores, catalog and lease journal.
    /// `state_dir` holds the lease journal and the catalog write log.
    pub async fn open(
        cfg: NodeConfig,
        repo: Arc<dyn Repository>,
        ram: FileStore,
        disk: FileStore,
        state_dir: &Path,
    ) -> anyhow::Result<(Arc<Node>, Recovery)> {
        // The catalog scopes payload rows by node: a mismatch would load (and
        // recover, deleting rows) as another node.
        anyhow::ensure!(
            repo.node() == cfg.node_name,
            "the catalog was opened for node {:?} but this agent is node {:?}",
            repo.node(),
            cfg.node_name
        );
        let writer = Writer::open(repo.clone(), &state_dir.join("catalog.log")).await?;
        let journal_path = state_dir.join("leases.journal");
        let (journal, journaled) = Journal::open(&journal_path)
            .map_err(|e| anyhow::anyhow!("opening the lease journal {}: {e}", journal_path.display()))?;
        let (digests, pending_digests) = std::sync::mpsc::channel();
        let node = Node {
            cfg,
            repo,
            writer,
            ram,
            disk,
            payloads: Sharded::new(),
            leases: Sharded::new(),
            journal,
            spill_wanted: Notify::new(),
            hashing: Semaphore::new(1),
            digests: std::sync::Mutex::new(digests),
        };
        let mut report = Recovery::default();
        node.load(&mut report).await?;
        node.remove_orphans(&mut report)?;
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
        tracing::info!(?report, "node recovered");
        let node = Arc::new(node);
        let weak = Arc::downgrade(&node);
        std::thread::Builder::new()
            .name("payload-digest".into())
            .spawn(move || {
                // Ends when the node is gone.
                while let Ok(id) = pending_digests.recv() {
                    match weak.upgrade() {
                        Some(node) => node.record_digest(id),
                        None => return,
                    }
                }
            })?;
        // Digests a crash interrupted are computed again.
        node.payloads.for_each(|id, e| {
            if lock(e).rec.sha256.is_none() {
                node.spawn_digest(*id);
            }
        });
        Ok((node, report))
    }

    async fn load(&self, report: &mut Recovery) -> anyhow::Result<()> {
        let now = self.now_ms();
        let mut drops = Vec::new();
        for rec in self.repo.load_payloads().await? {
            let store = match self.store(rec.tier) {
                Ok(store) => store,
                Err(err) => {
                    tracing::warn!(id = %rec.id, %err, "skipping a payload on an unconfigured tier");
                    continue;
                }
            };
            if !rec.state.is_readable() {
                let _ = store.remove(rec.id);
                drops.push(Write::Delete(rec.id));
                report.dropped_allocations += 1;
                continue;
            }
            if store.region_len(rec.id) != Some(rec.size_bytes) {
                tracing::error!(id = %rec.id, tier = rec.tier.name(), "committed payload has no intact region; dropping its row");
                drops.push(Write::Delete(rec.id));
                report.lost += 1;
                continue;
            }
            store.add_used(rec.size_bytes);
            self.payloads
                .shard(&rec.id)
                .insert(rec.id, Arc::new(std::sync::Mutex::new(Entry::new(rec, now))));
            report.payloads += 1;
        }
        if !drops.is_empty() {
            self.repo.write_batch(&drops).await?;
        }
        Ok(())
    }

    fn remove_orphans(&self, report: &mut Recovery) -> anyhow::Result<()> {
        for store in [&self.ram, &self.disk] {
            let mut owned = HashSet::new();
            self.payloads.for_each(|id, e| {
                if lock(e).rec.tier == store.tier() {
                    owned.insert(*id);
                }
            });
            for id in store.scan()? {
                if !owned.contains(&id) {
                    store.remove(id)?;
                    report.orphans_removed += 1;
                }
            }
        }
        Ok(())
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
