//! Every tier behind one interface. The mover, the spill scheduler,
//! recovery and Stats see a tier only as a [`TierStore`]: capacity, where a
//! reader finds the bytes, copying in from another tier, freeing, and
//! whether a copy is really there. Adding a tier is one more implementation
//! registered in [`Tiers::new`]; its place in the hierarchy is its order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use payload_catalog::{PayloadId, PayloadRecord, Tier};

use crate::clock::Clock;
use crate::error::AgentError;
use crate::object::ObjectTier;
use crate::store::{digest_file, io_error, FileStore, Source};

/// Where a reader finds a payload's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// A POSIX shared-memory name (relative to `/dev/shm`, leading slash).
    Shm(String),
    /// An absolute path of a file holding the whole payload from offset 0.
    File(PathBuf),
    /// A sealed memfd: no name, reached through the native socket only.
    Sealed,
}

/// A tier's capacity figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capacity {
    /// Bytes the tier may hold (0: unbounded, as the object store).
    pub capacity: u64,
    /// Bytes reserved by copies and allocations.
    pub reserved: u64,
    /// A local cache in front of the tier: bytes in it and its bound.
    pub cache: Option<(u64, u64)>,
}

/// One tier's store.
#[async_trait]
pub trait TierStore: Send + Sync {
    fn tier(&self) -> Tier;

    fn capacity(&self) -> Capacity;

    /// The fractions of capacity above which the scheduler spills and
    /// below which it stops; `None` for tiers it never spills from.
    fn watermarks(&self) -> Option<(f64, f64)>;

    /// Reserves `bytes` for a new copy, or says how much is free.
    fn reserve(&self, bytes: u64) -> Result<(), AgentError>;

    fn unreserve(&self, bytes: u64);

    /// Counts a copy found at start-up, even past capacity.
    fn add_used(&self, bytes: u64);

    /// Where a lease reader finds the copy now, if it is readable in place.
    fn place(&self, id: PayloadId) -> Option<Place>;

    /// Whether the copy is readable in place now; asking counts as a use
    /// (for a cache's recency).
    fn readable(&self, _id: PayloadId) -> bool {
        true
    }

    /// Makes the copy readable in place before a lease on it returns (the
    /// object tier fills its block cache); `in_use` says which other
    /// payloads are leased, so their cached bytes stay.
    async fn open_for_read(
        &self,
        _id: PayloadId,
        _in_use: &(dyn Fn(PayloadId) -> bool + Sync),
    ) -> Result<(), AgentError> {
        Ok(())
    }

    /// The copy's bytes open as a local file, for copies to other tiers.
    fn file(&self, id: PayloadId) -> Option<std::io::Result<Source>>;

    /// Writes this tier's copy of `rec` into the existing region at `to`
    /// (tiers without a [`TierStore::file`] implement it).
    async fn copy_out(&self, rec: &PayloadRecord, _to: &Path) -> Result<(), AgentError> {
        Err(AgentError::InvalidState(format!(
            "payload {} cannot be copied out of the {} tier",
            rec.id,
            self.tier().name()
        )))
    }

    /// Makes a copy of `rec` here from its copy on `from`, checked against
    /// its digest before it counts (capacity is reserved by the caller). A
    /// failed copy leaves nothing behind. Gives back the payload's digest
    /// when the copy computed it.
    async fn copy_in(
        &self,
        rec: &PayloadRecord,
        from: &dyn TierStore,
        sync: bool,
    ) -> Result<Option<[u8; 32]>, AgentError>;

    /// Frees the copy and the capacity it held; a copy already gone is fine.
    fn free(&self, id: PayloadId, size: u64);

    /// Whether an intact-looking copy of `rec` is here (start-up).
    fn holds(&self, rec: &PayloadRecord) -> bool;

    /// The file tier behind this store, for what only regions have
    /// (writable allocations, sealing, the start-up scan).
    fn regions(&self) -> Option<&FileStore> {
        None
    }
}

/// The tiers configured on this node, fastest first.
pub struct Tiers {
    stores: Vec<Arc<dyn TierStore>>,
}

impl Tiers {
    pub fn new(stores: Vec<Arc<dyn TierStore>>) -> Self {
        debug_assert!(stores.windows(2).all(|w| w[0].tier().faster_than(w[1].tier())));
        Self { stores }
    }

    pub fn get(&self, tier: Tier) -> Option<&dyn TierStore> {
        self.stores.iter().find(|s| s.tier() == tier).map(|s| &**s)
    }

    pub fn all(&self) -> impl Iterator<Item = &dyn TierStore> {
        self.stores.iter().map(|s| &**s)
    }

    /// The configured tiers below `tier`, nearest first.
    pub fn below(&self, tier: Tier) -> impl Iterator<Item = Tier> + '_ {
        self.all().map(|s| s.tier()).filter(move |t| tier.faster_than(*t))
    }

    /// The file tiers, for the start-up scan.
    pub fn regions(&self) -> impl Iterator<Item = &FileStore> {
        self.all().filter_map(|s| s.regions())
    }
}

/// A file tier (RAM, DISK) with its spill watermarks.
pub struct LocalTier {
    pub files: FileStore,
    pub high_watermark: f64,
    pub low_watermark: f64,
}

#[async_trait]
impl TierStore for LocalTier {
    fn tier(&self) -> Tier {
        self.files.tier()
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            capacity: self.files.capacity(),
            reserved: self.files.used(),
            cache: None,
        }
    }

    fn watermarks(&self) -> Option<(f64, f64)> {
        Some((self.high_watermark, self.low_watermark))
    }

    fn reserve(&self, bytes: u64) -> Result<(), AgentError> {
        self.files.reserve(bytes)
    }

    fn unreserve(&self, bytes: u64) {
        self.files.unreserve(bytes)
    }

    fn add_used(&self, bytes: u64) {
        self.files.add_used(bytes)
    }

    fn place(&self, id: PayloadId) -> Option<Place> {
        Some(match self.tier() {
            _ if self.files.memfd(id).is_some() => Place::Sealed,
            Tier::Ram => Place::Shm(self.files.shm_name(id)),
            _ => Place::File(self.files.path(id)),
        })
    }

    fn file(&self, id: PayloadId) -> Option<std::io::Result<Source>> {
        Some(self.files.open(id))
    }

    async fn copy_in(
        &self,
        rec: &PayloadRecord,
        from: &dyn TierStore,
        sync: bool,
    ) -> Result<Option<[u8; 32]>, AgentError> {
        let (id, to) = (rec.id, self.files.path(rec.id));
        let Some(source) = from.file(id) else {
            // The source has no file (the object tier): it fills a region.
            self.files.create_async(id, rec.size_bytes).await?;
            let filled = from.copy_out(rec, &to).await;
            crate::failpoint!("after-download");
            let sealed = filled.and_then(|()| {
                let synced = if sync { self.files.sync(id) } else { Ok(()) };
                synced
                    .and_then(|()| self.files.seal(id))
                    .map_err(|e| io_error("sealing the promoted copy", e))
            });
            if sealed.is_err() {
                let _ = self.files.remove(id);
            }
            return sealed.map(|()| None);
        };
        let source = source.map_err(|e| io_error("opening the payload to copy", e))?;
        let mode = self.files.sealed_mode();
        let want = rec.sha256;
        let target = self.tier();
        let copy = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            crate::store::copy_file(&source.path, &to, sync, mode)?;
            Ok(want.is_none_or(|want| digest_file(&to).is_ok_and(|got| got == want)))
        });
        match copy.await {
            Ok(Ok(true)) => {
                crate::failpoint!("after-copy");
                Ok(None)
            }
            Ok(Ok(false)) => {
                let _ = self.files.remove(id);
                Err(AgentError::Integrity(format!(
                    "the copy of payload {id} on the {} tier does not match its SHA-256; the source copy is kept",
                    target.name()
                )))
            }
            Ok(Err(e)) => Err(io_error("copying the payload", e)),
            Err(e) => Err(crate::error::task_failed("copying the payload", e)),
        }
    }

    fn free(&self, id: PayloadId, size: u64) {
        if let Err(e) = self.files.remove(id) {
            tracing::warn!(%id, %e, "could not remove a payload region");
        }
        self.files.unreserve(size);
    }

    fn holds(&self, rec: &PayloadRecord) -> bool {
        self.files.region_len(rec.id) == Some(rec.size_bytes)
    }

    fn regions(&self) -> Option<&FileStore> {
        Some(&self.files)
    }
}

/// The object tier as a store: unbounded, read through its block cache,
/// copied in by uploading blocks and out by downloading them.
pub struct ObjectStore {
    pub object: Arc<ObjectTier>,
    /// The node's clock (block reference times).
    pub clock: Clock,
}

#[async_trait]
impl TierStore for ObjectStore {
    fn tier(&self) -> Tier {
        Tier::Object
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            cache: Some(self.object.cache.usage()),
            ..Capacity::default()
        }
    }

    fn watermarks(&self) -> Option<(f64, f64)> {
        None
    }

    fn reserve(&self, _bytes: u64) -> Result<(), AgentError> {
        Ok(())
    }

    fn unreserve(&self, _bytes: u64) {}

    fn add_used(&self, _bytes: u64) {}

    /// Read through the block cache: a path only once the cache file is
    /// whole (a lease makes it so).
    fn place(&self, id: PayloadId) -> Option<Place> {
        let cache = &self.object.cache;
        cache.is_complete(id).then(|| Place::File(cache.path(id)))
    }

    fn readable(&self, id: PayloadId) -> bool {
        self.object.cache.hit(id).is_some()
    }

    /// The caller holds a lease, so the blocks it fills stay.
    async fn open_for_read(
        &self,
        id: PayloadId,
        in_use: &(dyn Fn(PayloadId) -> bool + Sync),
    ) -> Result<(), AgentError> {
        let object = &self.object;
        let manifest = object.manifest(id).await?;
        object.cache.fill(object, &manifest, in_use).await.map(drop)
    }

    fn file(&self, _id: PayloadId) -> Option<std::io::Result<Source>> {
        None
    }

    async fn copy_out(&self, rec: &PayloadRecord, to: &Path) -> Result<(), AgentError> {
        self.object.download_into(rec.id, to).await
    }

    async fn copy_in(
        &self,
        rec: &PayloadRecord,
        from: &dyn TierStore,
        _sync: bool,
    ) -> Result<Option<[u8; 32]>, AgentError> {
        let source = from.file(rec.id).ok_or_else(|| {
            AgentError::InvalidState(format!(
                "payload {} cannot be uploaded from the {} tier; spill it to a local tier first",
                rec.id,
                from.tier().name()
            ))
        })?;
        let source = source.map_err(|e| io_error("opening the payload to upload", e))?;
        let now = self.clock.now_ms();
        let manifest = self.object.upload(rec.id, &source.path, rec.sha256, now).await?;
        Ok(Some(manifest.sha256))
    }

    /// The manifest's release is logged by the caller; the cached copy,
    /// the manifest object and any never-imported upload go here.
    fn free(&self, id: PayloadId, _size: u64) {
        self.object.cache.remove(id);
        let tier = self.object.clone();
        tokio::spawn(async move {
            if let Err(err) = tier.delete_manifest_object(id).await {
                tracing::warn!(%id, %err, "could not delete a manifest object; its blocks are collected anyway");
            }
            if let Err(err) = tier.delete_upload(id).await {
                tracing::warn!(%id, %err, "could not delete an upload that was never imported");
            }
        });
    }

    /// Kept even while the object store is unreachable: the bytes are there.
    fn holds(&self, _rec: &PayloadRecord) -> bool {
        true
    }
}
