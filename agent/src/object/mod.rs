//! The object tier: payloads cut into content-addressed 4 MiB blocks in an
//! S3 bucket, a manifest per payload, reference counts in the catalog, and
//! an on-disk block cache that object-tier leases read from.
//!
//! Layout under the bucket's prefix: `blocks/<sha256 hex>` (one object per
//! distinct block, shared by every payload that has it), `manifests/<payload
//! id>.json` (the block list, so the bucket describes itself) and
//! `uploads/<payload id>` (where clients put objects for `ImportPayload`).

pub mod args;
pub mod bucket;
pub mod cache;
#[cfg(feature = "failpoints")]
pub mod faults;
pub mod traffic;
mod transfer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use payload_catalog::{BlockHash, BlockStats, Manifest, PayloadId, Repository};

use crate::backoff::Backoff;
use crate::error::AgentError;
use bucket::{Bucket, StoreError};
pub use cache::BlockCache;

/// Attempts per object store call before a transient failure is given up.
const ATTEMPTS: u32 = 8;
/// Downloads that may hold their full `concurrency` of blocks in memory at
/// once; past that they share the node's bound.
const BUFFERED_TRANSFERS: usize = 4;
/// Blocks a collection takes per round.
const GC_BATCH: u32 = 1000;

pub struct ObjectTier {
    bucket: Box<dyn Bucket>,
    repo: Arc<dyn Repository>,
    /// Transfers in flight per upload or download (each holds one block).
    concurrency: usize,
    /// Blocks held in memory by all downloads of the node together (an
    /// upload reads its blocks from the mapped file instead).
    buffers: tokio::sync::Semaphore,
    pub cache: BlockCache,
    /// Requests to the store that succeeded, and their bytes.
    pub traffic: Arc<traffic::Traffic>,
    /// The catalog's block figures and when they were read: Stats is
    /// polled (progress bars) and the figures are a scan of every block row.
    block_stats: std::sync::Mutex<Option<(std::time::Instant, BlockStats)>>,
    /// Payloads being imported now (one import of an id at a time).
    imports: std::sync::Mutex<std::collections::HashSet<PayloadId>>,
    /// One collection at a time on this node: two would share the blocks
    /// marked deleting, and the slower could delete one re-uploaded since.
    collecting: tokio::sync::Mutex<()>,
}

/// An import under way; see [`ObjectTier::begin_import`].
pub struct ImportGuard<'a> {
    tier: &'a ObjectTier,
    id: PayloadId,
}

impl Drop for ImportGuard<'_> {
    fn drop(&mut self) {
        crate::node::lock(&self.tier.imports).remove(&self.id);
    }
}

/// What one garbage collection removed.
#[derive(Clone, Copy, Debug, Default)]
pub struct GcReport {
    pub blocks: u64,
}

pub fn block_key(hash: &BlockHash) -> String {
    format!("blocks/{}", hex::encode(hash))
}

pub fn manifest_key(id: PayloadId) -> String {
    format!("manifests/{id}.json")
}

pub fn upload_key(id: PayloadId) -> String {
    format!("uploads/{id}")
}

impl ObjectTier {
    pub fn new(bucket: Box<dyn Bucket>, repo: Arc<dyn Repository>, concurrency: usize, cache: BlockCache) -> Self {
        #[cfg(feature = "failpoints")]
        let bucket = faults::Faulty::from_env(bucket);
        let traffic = Arc::new(traffic::Traffic::default());
        let bucket = Box::new(traffic::Counted {
            inner: bucket,
            traffic: traffic.clone(),
        });
        Self {
            bucket,
            traffic,
            repo,
            concurrency: concurrency.max(1),
            buffers: tokio::sync::Semaphore::new(BUFFERED_TRANSFERS * concurrency.max(1)),
            cache,
            block_stats: std::sync::Mutex::new(None),
            imports: std::sync::Mutex::new(std::collections::HashSet::new()),
            collecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The store as `--object-store` names it.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket.bucket(), self.bucket.prefix())
    }

    pub fn bucket_name(&self) -> &str {
        self.bucket.bucket()
    }

    /// A key as the bucket holds it (with the prefix).
    pub fn full_key(&self, key: &str) -> String {
        match self.bucket.prefix() {
            "" => key.to_string(),
            prefix => format!("{prefix}/{key}"),
        }
    }

    /// Where a client uploads the object of an OBJECT allocation.
    pub fn upload_url(&self, id: PayloadId) -> String {
        format!("s3://{}/{}", self.bucket.bucket(), self.full_key(&upload_key(id)))
    }

    /// Runs `op` until it succeeds, fails for good, or has failed
    /// transiently [`ATTEMPTS`] times, backing off with jitter in between.
    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut attempt = 1;
        loop {
            match op().await {
                Err(StoreError::Transient(e)) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, %e, "object store call failed; retrying");
                    attempt += 1;
                    backoff.wait().await;
                }
                other => return other,
            }
        }
    }

    /// Marks payload `id` as being imported until the guard drops; `None`
    /// while another import of it runs.
    pub fn begin_import(&self, id: PayloadId) -> Option<ImportGuard<'_>> {
        // (The lock is let go before a guard exists: dropping one locks it.)
        let first = crate::node::lock(&self.imports).insert(id);
        first.then(|| ImportGuard { tier: self, id })
    }

    /// The catalog's block figures, at most a second old; `None` while the
    /// catalog cannot answer (Stats still reports what the node knows).
    pub async fn block_stats(&self) -> Option<BlockStats> {
        let fresh = |at: &std::time::Instant| at.elapsed() < Duration::from_secs(1);
        if let Some((at, stats)) = *crate::node::lock(&self.block_stats) {
            if fresh(&at) {
                return Some(stats);
            }
        }
        match self.repo.block_stats().await {
            Ok(stats) => {
                *crate::node::lock(&self.block_stats) = Some((std::time::Instant::now(), stats));
                Some(stats)
            }
            Err(err) => {
                tracing::debug!(%err, "could not read the object store's block figures");
                None
            }
        }
    }

    /// Removes blocks no manifest has named for `grace_ms`: their objects
    /// first, then their rows (see the catalog's `gc_begin`).
    pub async fn collect_garbage(&self, now_ms: u64, grace_ms: u64) -> Result<GcReport, AgentError> {
        let _one = self.collecting.lock().await;
        // And one across every agent of the catalog.
        let catalog = self.repo.gc_lock().await?;
        let collected = self.collect(catalog.lost(), now_ms, grace_ms).await;
        drop(catalog);
        // What it changed shows in the next Stats.
        *crate::node::lock(&self.block_stats) = None;
        collected
    }

    async fn collect(
        &self,
        lost: Option<tokio::sync::watch::Receiver<bool>>,
        now_ms: u64,
        grace_ms: u64,
    ) -> Result<GcReport, AgentError> {
        let mut report = GcReport::default();
        // A lock held through the operator can go mid-collection: then
        // another collector may take over, and no block is deleted here.
        let lost = &lost;
        let held = move || {
            match lost.as_ref().is_some_and(|l| *l.borrow()) {
            false => Ok(()),
            true => Err(AgentError::Unavailable(
                "the catalog's GC lock was lost mid-collection (the operator restarted?); it stops and runs again later"
                    .into(),
            )),
        }
        };
        loop {
            held()?;
            let doomed = self.repo.gc_begin(now_ms.saturating_sub(grace_ms), GC_BATCH).await?;
            if doomed.is_empty() {
                return Ok(report);
            }
            use futures_util::{StreamExt, TryStreamExt};
            futures_util::stream::iter(doomed.iter().copied())
                .map(|hash| async move {
                    held()?;
                    let key = block_key(&hash);
                    self.retry(|| self.bucket.delete(&key))
                        .await
                        .map_err(|e| store_error("collecting unreferenced blocks", e))
                })
                .buffer_unordered(self.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            crate::failpoint!("gc-after-delete");
            self.repo.gc_finish(&doomed).await?;
            report.blocks += doomed.len() as u64;
            if (doomed.len() as u32) < GC_BATCH {
                return Ok(report);
            }
        }
    }

    /// The complete manifest of a payload in the object store.
    pub async fn manifest(&self, id: PayloadId) -> Result<Manifest, AgentError> {
        match self.repo.get_manifest(id).await? {
            Some((manifest, true)) => Ok(manifest),
            _ => Err(AgentError::Integrity(format!(
                "payload {id} is recorded on the object tier but its manifest is missing or incomplete"
            ))),
        }
    }

    /// Downloads the payload's blocks into the existing region at `path`.
    pub async fn download_into(&self, id: PayloadId, path: &std::path::Path) -> Result<(), AgentError> {
        let manifest = self.manifest(id).await?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| crate::store::io_error("opening the region to download into", e))?;
        let all = (0..manifest.blocks.len()).collect();
        self.download(&manifest, Arc::new(file), all).await
    }

    /// Deletes a payload's manifest object (its blocks are collected once
    /// no manifest names them).
    pub async fn delete_manifest_object(&self, id: PayloadId) -> Result<(), AgentError> {
        let key = manifest_key(id);
        self.retry(|| self.bucket.delete(&key))
            .await
            .map_err(|e| store_error("deleting the manifest", e))
    }
}

/// Maps an object store failure to the agent's vocabulary.
pub(crate) fn store_error(what: &str, err: StoreError) -> AgentError {
    match err {
        StoreError::Transient(e) => {
            AgentError::Unavailable(format!("{what}: the object store keeps failing ({e}); retry later"))
        }
        // Keys the agent asks for are named by a manifest or an upload it
        // checked: gone means lost.
        StoreError::NotFound(e) => AgentError::Integrity(format!("{what}: the object is missing ({e})")),
        StoreError::Permanent(e) => AgentError::InvalidState(format!(
            "{what}: the object store refused ({e}); check the bucket and the agent's credentials"
        )),
    }
}
