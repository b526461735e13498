//! The node: every payload this agent holds, in memory, sharded so that no
//! global lock sits on the lease path. The catalog (through the group-commit
//! writer) keeps the rows durable; the journal keeps the leases; the stores
//! keep the bytes.

mod leases;
mod lifecycle;
mod objects;
mod policies;
mod recovery;
mod sealed;
mod sweep;
mod tiering;
mod visitors;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::AgentError;
use payload_catalog::{LeaseId, PayloadId, PayloadRecord, Repository, Tier};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::identity::Caller;
use crate::journal::Journal;
use crate::object::ObjectTier;
use crate::state::StateDir;
use crate::store::FileStore;
use crate::tiers::{TierStore, Tiers};
use crate::writer::Writer;

pub use leases::LeaseGrant;
pub(crate) use leases::LeaseSlot;
pub use lifecycle::AllocateRequest;
pub use recovery::Recovery;
pub use sealed::{CommitOptions, PutBody};
pub use tiering::MoveOutcome;

const SHARDS: usize = 64;

/// Settings of a node, from the command line.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_name: String,
    pub lease_default_ms: u64,
    pub lease_max_ms: u64,
    pub write_deadline_ms: u64,
    pub max_payload_bytes: u64,
    /// Spill starts above this fraction of RAM capacity...
    pub ram_high_watermark: f64,
    /// ...and stops below this one.
    pub ram_low_watermark: f64,
    /// The disk tier's watermarks (spilling to the object tier).
    pub disk_high_watermark: f64,
    pub disk_low_watermark: f64,
    /// Unreferenced object-store blocks are deleted after this long...
    pub object_gc_grace_ms: u64,
    /// ...by a collection that runs this often.
    pub object_gc_interval_ms: u64,
    /// Catalog writes that may wait in the log before new payloads are refused.
    pub catalog_backlog: usize,
    /// Bounds on requests, checked at the gRPC edge.
    pub limits: crate::limits::Limits,
    /// Who may read a payload besides its owner.
    pub read_access: crate::identity::ReadAccess,
    /// How long an idle native connection is polled before parking.
    pub native_spin: std::time::Duration,
    /// The node's time source; tests pass one they can advance.
    pub clock: Clock,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_name: "standalone".into(),
            lease_default_ms: 20_000,
            lease_max_ms: 120_000,
            write_deadline_ms: 600_000,
            max_payload_bytes: 128 << 30,
            ram_high_watermark: 0.9,
            ram_low_watermark: 0.7,
            disk_high_watermark: 0.9,
            disk_low_watermark: 0.7,
            object_gc_grace_ms: 3_600_000,
            object_gc_interval_ms: 600_000,
            catalog_backlog: 100_000,
            limits: crate::limits::Limits::default(),
            read_access: crate::identity::ReadAccess::default(),
            native_spin: std::time::Duration::from_micros(50),
            clock: Clock::new(),
        }
    }
}

/// What the node knows about one payload besides its catalog row.
#[derive(Debug)]
pub(crate) struct Entry {
    pub rec: PayloadRecord,
    /// Live leases on the current copy: lease -> expiry (unix ms).
    pub leases: IdMap<LeaseId, u64>,
    /// Expired leases are dropped from `leases` once it grows to this size
    /// (then twice what is live), so granting stays O(1) amortised.
    pub prune_at: usize,
    /// When `leases` was last pruned (unix ms).
    pub pruned_ms: u64,
    /// A move between tiers is under way.
    pub moving: bool,
    /// Set when the payload was deleted while a move was under way.
    pub gone: bool,
    pub last_access_ms: u64,
}

impl Entry {
    fn new(rec: PayloadRecord, now_ms: u64) -> Self {
        Self {
            rec,
            leases: IdMap::default(),
            prune_at: 64,
            pruned_ms: 0,
            moving: false,
            gone: false,
            last_access_ms: now_ms,
        }
    }

    pub fn live_leases(&self, now_ms: u64) -> usize {
        self.leases.values().filter(|exp| **exp > now_ms).count()
    }
}

pub(crate) type EntryRef = Arc<Mutex<Entry>>;

/// Maps keyed by payload and lease ids, on the lease hot path. foldhash
/// (randomly seeded per process) hashes a 16-byte id several times faster
/// than SipHash; the ids are random UUIDs, so flooding one bucket would
/// need the seed.
pub(crate) type IdMap<K, V> = HashMap<K, V, foldhash::quality::RandomState>;
pub(crate) type IdSet<K> = std::collections::HashSet<K, foldhash::quality::RandomState>;

/// A map split into independently locked shards.
pub(crate) struct Sharded<K, V> {
    shards: Vec<Mutex<IdMap<K, V>>>,
}

pub(crate) trait ShardKey {
    fn shard(&self) -> usize;
}

impl ShardKey for PayloadId {
    fn shard(&self) -> usize {
        self.as_bytes()[15] as usize % SHARDS
    }
}

impl ShardKey for LeaseId {
    fn shard(&self) -> usize {
        self.as_bytes()[15] as usize % SHARDS
    }
}

impl<K: ShardKey + Eq + std::hash::Hash, V> Sharded<K, V> {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(IdMap::default())).collect(),
        }
    }

    pub fn shard(&self, key: &K) -> MutexGuard<'_, IdMap<K, V>> {
        lock(&self.shards[key.shard()])
    }

    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        for shard in &self.shards {
            lock(shard).retain(|k, v| keep(k, v));
        }
    }

    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for shard in &self.shards {
            for (k, v) in lock(shard).iter() {
                f(k, v);
            }
        }
    }
}

/// Resolves once the shutdown flag is set.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Locks a mutex; a panic elsewhere must not take the node down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct Node {
    pub(crate) cfg: NodeConfig,
    /// Locked for as long as the node lives.
    pub(crate) state: StateDir,
    pub(crate) repo: Arc<dyn Repository>,
    pub(crate) writer: Writer,
    /// Every configured tier, fastest first.
    pub(crate) tiers: Tiers,
    /// The object tier again, for what only it does (imports, collection,
    /// its block cache), when `--object-store` names one.
    pub(crate) object: Option<Arc<ObjectTier>>,
    pub(crate) payloads: Sharded<PayloadId, EntryRef>,
    /// Other nodes' payloads leased here (see `visitors.rs`).
    pub(crate) visitors: Sharded<PayloadId, Arc<visitors::Visitor>>,
    /// The catalog's answers about other nodes' payloads, until when
    /// (unix ms), and forgotten visitors whose cached blocks are still to
    /// go: see `visitors.rs`.
    pub(crate) located: Mutex<IdMap<PayloadId, (u64, visitors::Located)>>,
    pub(crate) strays: Mutex<std::collections::HashSet<PayloadId>>,
    /// The PayloadPolicies in force here (see `policies.rs`).
    pub(crate) policies: policies::Policies,
    /// What `/metrics` shows of the calls served (see `metrics.rs`).
    pub metrics: Arc<crate::metrics::Metrics>,
    pub(crate) leases: Sharded<LeaseId, leases::LeaseSlot>,
    pub(crate) journal: Journal,
    /// Wakes the spill scheduler when RAM crosses its high watermark.
    pub(crate) spill_wanted: Notify,
    /// Bounds hashing on the request path (verified commits) to one core.
    pub(crate) hashing: tokio::sync::Semaphore,
    /// Committed payloads waiting for the hashing thread (bounded).
    pub(crate) digests: tokio::sync::mpsc::Sender<PayloadId>,
    /// The operator, on a cluster node (`payload-agent node`).
    pub(crate) operator: std::sync::OnceLock<Arc<crate::cluster::OperatorLink>>,
}

impl Node {
    /// Makes this a cluster node, whose catalog is `operator`'s.
    pub fn join(&self, operator: Arc<crate::cluster::OperatorLink>) {
        let _ = self.operator.set(operator);
    }

    pub fn operator(&self) -> Option<&Arc<crate::cluster::OperatorLink>> {
        self.operator.get()
    }

    /// The tier's store, or an error saying it is not configured here.
    pub fn tier(&self, tier: Tier) -> Result<&dyn TierStore, AgentError> {
        if tier == Tier::Void {
            return Err(AgentError::InvalidArgument(
                "TIER_VOID is not a place to store bytes; spill to VOID deletes a payload".into(),
            ));
        }
        self.tiers.get(tier).ok_or_else(|| self.not_configured(tier))
    }

    /// The regions of a file tier: where clients write allocations.
    pub fn store(&self, tier: Tier) -> Result<&FileStore, AgentError> {
        self.tier(tier)?.regions().ok_or_else(|| {
            AgentError::InvalidState(format!(
                "the {} tier has no regions to write into; allocate on RAM or DISK",
                tier.name()
            ))
        })
    }

    fn not_configured(&self, tier: Tier) -> AgentError {
        let hint = if tier == Tier::Object {
            " (start the agent with --object-store s3://BUCKET/PREFIX)"
        } else {
            ""
        };
        AgentError::InvalidState(format!(
            "the {} tier is not configured on node {}{hint}",
            tier.name(),
            self.cfg.node_name
        ))
    }

    /// The object tier, or an error saying it is not configured.
    pub fn object(&self) -> Result<&Arc<ObjectTier>, AgentError> {
        self.object.as_ref().ok_or_else(|| self.not_configured(Tier::Object))
    }

    /// Whether payloads can be placed on `tier` here.
    pub fn check_tier(&self, tier: Tier) -> Result<(), AgentError> {
        self.tier(tier).map(drop)
    }

    /// Whether anyone holds a live lease on the payload.
    pub(crate) fn is_leased(&self, id: PayloadId) -> bool {
        let now = self.now_ms();
        self.lease_entry(id).is_ok_and(|e| lock(&e).live_leases(now) > 0)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn now_ms(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    pub fn clock(&self) -> &Clock {
        &self.cfg.clock
    }

    pub(crate) fn entry(&self, id: PayloadId) -> Result<EntryRef, AgentError> {
        self.payloads
            .shard(&id)
            .get(&id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("payload {id} not found on node {}", self.cfg.node_name)))
    }

    /// A copy of the payload's row and its live lease count.
    pub fn get(&self, id: PayloadId) -> Result<(PayloadRecord, usize), AgentError> {
        let entry = self.entry(id)?;
        let e = lock(&entry);
        Ok((e.rec.clone(), e.live_leases(self.now_ms())))
    }

    /// Every entry, for scans (stats, spill candidates, sweeps).
    pub(crate) fn entries(&self) -> Vec<EntryRef> {
        let mut all = Vec::new();
        self.payloads.for_each(|_, e| all.push(e.clone()));
        all
    }

    pub fn repo(&self) -> &Arc<dyn Repository> {
        &self.repo
    }

    /// Whether `caller` may change payload `id` (`what`: "deleting", say).
    pub fn authorize_change(&self, id: PayloadId, caller: &Caller, what: &str) -> Result<(), AgentError> {
        let entry = self.entry(id)?;
        let e = lock(&entry);
        caller.may_change(&e.rec, what)
    }

    /// Whether `caller` may read payload `id` under the node's read rule.
    pub fn authorize_read(&self, id: PayloadId, caller: &Caller) -> Result<(), AgentError> {
        let entry = self.lease_entry(id)?;
        let e = lock(&entry);
        caller.may_read(&e.rec, self.cfg.read_access)
    }
}

/// Usage figures gathered by one scan of the node.
pub struct Usage {
    pub tiers: Vec<payload_proto::admin::TierUsage>,
    /// Payloads being moved between tiers right now.
    pub moving: u64,
}

impl Node {
    pub fn usage(&self) -> Usage {
        let now = self.now_ms();
        let mut tiers: Vec<_> = self
            .tiers
            .all()
            .map(|s| {
                let c = s.capacity();
                let (cache_bytes, cache_capacity_bytes) = c.cache.unwrap_or_default();
                payload_proto::admin::TierUsage {
                    tier: s.tier() as u32,
                    capacity_bytes: c.capacity,
                    reserved_bytes: c.reserved,
                    cache_bytes,
                    cache_capacity_bytes,
                    ..Default::default()
                }
            })
            .collect();
        let mut moving = 0;
        self.payloads.for_each(|_, entry| {
            let e = lock(entry);
            moving += e.moving as u64;
            let Some(t) = tiers.iter_mut().find(|t| t.tier == e.rec.tier as u32) else {
                return;
            };
            t.payloads += 1;
            t.bytes += e.rec.size_bytes;
            if e.rec.is_pinned(now) {
                t.pinned_bytes += e.rec.size_bytes;
            }
            if e.live_leases(now) > 0 {
                t.leased_bytes += e.rec.size_bytes;
            }
        });
        Usage { tiers, moving }
    }
}

impl Node {
    /// Waits until every queued catalog write is committed.
    pub async fn flush(&self) -> Result<(), AgentError> {
        self.writer.flush().await
    }
}
