//! The object tier's flags (flattened into `payload-agent standalone`).

// Doc comments here are `--help` text, written for people, not rustdoc.
#![allow(rustdoc::invalid_html_tags)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use payload_catalog::Repository;

use super::bucket::S3Bucket;
use super::{BlockCache, ObjectTier};

#[derive(Args, Debug, Clone)]
pub struct ObjectArgs {
    /// The object tier: s3://BUCKET/PREFIX. Endpoint, region and credentials
    /// come from the standard AWS environment and files (AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
    /// ~/.aws/config); a custom endpoint gets path-style addressing. The
    /// bucket is checked at start-up. Unset: no object tier.
    #[arg(long, env = "PM_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// Where object-tier payloads are cached for reading. Default:
    /// <state-dir>/object-cache.
    #[arg(long, env = "PM_OBJECT_CACHE_DIR")]
    pub object_cache_dir: Option<PathBuf>,
    /// Block cache capacity (bytes, or with a unit).
    #[arg(long, env = "PM_OBJECT_CACHE_CAPACITY", default_value = "10GiB", value_parser = crate::cli::parse_size)]
    pub object_cache_capacity: u64,
    /// Block uploads or downloads in flight per transfer. A download holds
    /// each block (4 MiB) in memory, and all downloads of the node together
    /// hold at most four times this many blocks.
    #[arg(long, env = "PM_OBJECT_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub object_concurrency: u16,
    /// Blocks no manifest has named for this long are deleted (ms).
    #[arg(long, env = "PM_OBJECT_GC_GRACE_MS", default_value_t = 3_600_000)]
    pub object_gc_grace_ms: u64,
    /// How often unreferenced blocks are collected (ms).
    #[arg(long, env = "PM_OBJECT_GC_INTERVAL_MS", default_value_t = 600_000)]
    pub object_gc_interval_ms: u64,
    /// Spill disk to the object tier above this fraction of its capacity...
    #[arg(long, env = "PM_DISK_HIGH_WATERMARK", default_value_t = 0.9)]
    pub disk_high_watermark: f64,
    /// ...down to this fraction.
    #[arg(long, env = "PM_DISK_LOW_WATERMARK", default_value_t = 0.7)]
    pub disk_low_watermark: f64,
}

impl ObjectArgs {
    /// Connects to and checks the bucket, and opens the block cache.
    pub async fn open(&self, repo: Arc<dyn Repository>, state_dir: &Path) -> anyhow::Result<Option<ObjectTier>> {
        let low = self.disk_low_watermark;
        let high = self.disk_high_watermark;
        anyhow::ensure!(
            0.0 < low && low <= high && high <= 1.0,
            "disk watermarks must satisfy 0 < low <= high <= 1 (got low {low}, high {high})"
        );
        let Some(url) = &self.object_store else {
            return Ok(None);
        };
        pin_store(state_dir, url)?;
        let bucket = S3Bucket::connect(url).await?;
        bucket.check().await?;
        let dir = self
            .object_cache_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("object-cache"));
        let cache = BlockCache::open(&dir, self.object_cache_capacity)?;
        tracing::info!(url, cache = %dir.display(), "object tier ready");
        Ok(Some(ObjectTier::new(
            Box::new(bucket),
            repo,
            usize::from(self.object_concurrency),
            cache,
        )))
    }
}

/// The catalog's block rows say which blocks the store holds, so one node
/// keeps one store: the first URL used is recorded in the state dir and
/// another one is refused (it would skip uploading blocks only the old
/// store has).
fn pin_store(state_dir: &Path, url: &str) -> anyhow::Result<()> {
    let (bucket, prefix) = super::bucket::parse_url(url)?;
    let url = format!("s3://{bucket}/{prefix}");
    let path = state_dir.join("object-store");
    match std::fs::read_to_string(&path) {
        Ok(pinned) if pinned.trim() == url => Ok(()),
        Ok(pinned) => anyhow::bail!(
            "this node's catalog records blocks stored in {}, not {url}: start with --object-store {} (or a fresh \
             state dir and catalog for the new store)",
            pinned.trim(),
            pinned.trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => crate::durable::write_durably(&path, url.as_bytes())
            .map_err(|e| anyhow::anyhow!("recording the object store in {}: {e}", path.display())),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}
