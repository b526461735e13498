//! Moving bytes between local files and the object store: upload cuts a
//! file into blocks, hashes them, claims the manifest (which says which
//! blocks the store already has) and uploads only the rest; download
//! fetches blocks in parallel, checks each against its hash and writes it
//! in place. Both keep at most `concurrency` blocks in flight; downloads
//! also share a node-wide bound on the blocks they hold in memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use payload_catalog::{BlockHash, BlockState, Manifest, PayloadId, BLOCK_SIZE};
use sha2::{Digest, Sha256};

use super::bucket::StoreError;
use super::{block_key, manifest_key, store_error, upload_key, ObjectTier};
use crate::error::{task_failed, AgentError};
use crate::store::io_error;

/// Landed blocks recorded per catalog transaction, at most.
const MARK_BATCH: usize = 16;
/// How long an upload waits for a collection deleting one of its blocks.
const DELETING_WAIT: Duration = Duration::from_secs(60);

/// A read-only mapping of a whole file (none for an empty one).
struct Mapped(Option<memmap2::Mmap>);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// One block of a mapping, handed to the SDK without a copy.
struct Slice(Arc<Mapped>, std::ops::Range<usize>);

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        &self.0.as_ref().as_ref()[self.1.clone()]
    }
}

fn map(path: &Path) -> std::io::Result<Mapped> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Mapped(None));
    }
    // SAFETY: payload regions are sealed (read-only) once committed, and
    // uploads read committed or fully written regions only.
    Ok(Mapped(Some(unsafe { memmap2::Mmap::map(&file)? })))
}

/// SHA-256 of every block on two threads, and of the whole (on a third)
/// when `whole` asks for it.
fn hash_blocks(bytes: &[u8], whole: bool) -> std::io::Result<(Option<[u8; 32]>, Vec<BlockHash>)> {
    let chunks: Vec<&[u8]> = bytes.chunks(BLOCK_SIZE as usize).collect();
    std::thread::scope(|s| {
        let whole = whole.then(|| s.spawn(move || <[u8; 32]>::from(Sha256::digest(bytes))));
        let half = chunks.len().div_ceil(2);
        let digest = |c: &&[u8]| -> BlockHash { Sha256::digest(c).into() };
        let (first, rest) = chunks.split_at(half);
        let second = s.spawn(move || rest.iter().map(digest).collect::<Vec<_>>());
        let mut blocks: Vec<BlockHash> = first.iter().map(digest).collect();
        // A hashing thread that died must not leave a short block list.
        let died = || std::io::Error::other("a hashing thread panicked");
        blocks.extend(second.join().map_err(|_| died())?);
        let whole = whole.map(|w| w.join().map_err(|_| died())).transpose()?;
        Ok((whole, blocks))
    })
}

impl ObjectTier {
    /// Makes the object store hold payload `id` from the file at `path`:
    /// every block and the manifest. Blocks the store has are not sent
    /// again; an upload cut short (a crash) resumes where it stopped, since
    /// its blocks are marked stored as they land. With `expected` the
    /// file's SHA-256 must match it: a copy is checked before it counts.
    pub async fn upload(
        &self,
        id: PayloadId,
        path: &Path,
        expected: Option<[u8; 32]>,
        now_ms: u64,
    ) -> Result<Manifest, AgentError> {
        let existing = self.repo.get_manifest(id).await?;
        // Stored already (a promoted payload spilled again): nothing to send.
        // (Claimed again, which takes nothing more, so that another node's
        // manifest is refused rather than counted on.)
        if let (Some((m, true)), Some(want)) = (&existing, expected) {
            if m.sha256 == want {
                self.claim(m, now_ms).await?;
                return Ok(m.clone());
            }
        }
        let path = path.to_path_buf();
        let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mapped = Arc::new(map(&path)?);
            let (whole, blocks) = hash_blocks(mapped.as_ref().as_ref(), expected.is_none())?;
            Ok((mapped, whole, blocks))
        });
        let (mapped, whole, blocks) = hashed
            .await
            .map_err(|e| task_failed("hashing the payload's blocks", e))?
            .map_err(|e| io_error("reading the payload for upload", e))?;
        // A known digest is checked while the blocks upload, before the
        // manifest is written: a copy counts only once it matches.
        let check = expected.map(|want| {
            let mapped = mapped.clone();
            tokio::task::spawn_blocking(move || <[u8; 32]>::from(Sha256::digest(mapped.as_ref().as_ref())) == want)
        });
        let manifest = Manifest {
            payload: id,
            size_bytes: mapped.as_ref().as_ref().len() as u64,
            sha256: whole.or(expected).unwrap_or_default(),
            block_size: BLOCK_SIZE,
            blocks,
        };
        match existing {
            // The same bytes, stored already.
            Some((old, true)) if old == manifest => {
                self.claim(&old, now_ms).await?;
                return Ok(old);
            }
            // The same bytes: an upload to resume.
            Some((old, false)) if old == manifest => {}
            // An earlier attempt with other bytes (a region rewritten after
            // a failed commit, another object uploaded for an import):
            // nothing counts on it, since committed bytes never change.
            Some(_) => {
                let release = payload_catalog::Write::ReleaseManifest { id, now_ms };
                self.repo.write_batch(&[release]).await?;
            }
            None => {}
        }
        let states = self.claim(&manifest, now_ms).await?;
        let missing: Vec<BlockState> = states.into_iter().filter(|s| !s.stored).collect();
        let mut first = std::collections::HashMap::with_capacity(manifest.blocks.len());
        for (i, hash) in manifest.blocks.iter().enumerate() {
            first.entry(*hash).or_insert(i);
        }
        let mut landed = futures_util::stream::iter(missing)
            .map(|state| {
                let start = first[&state.hash] * BLOCK_SIZE as usize;
                let body = Bytes::from_owner(Slice(mapped.clone(), start..start + state.size_bytes as usize));
                let key = block_key(&state.hash);
                async move {
                    self.retry(|| self.bucket.put(&key, body.clone(), Some(state.hash)))
                        .await
                        .map_err(|e| store_error("uploading the payload's blocks", e))?;
                    crate::failpoint!("after-block-upload");
                    Ok::<_, AgentError>(state.hash)
                }
            })
            .buffer_unordered(self.concurrency)
            .ready_chunks(MARK_BATCH);
        // Marked as they land (a few at a time: each mark is a catalog
        // transaction), so a resumed upload skips what made it.
        while let Some(chunk) = landed.next().await {
            let (stored, failed): (Vec<_>, Vec<_>) = chunk.into_iter().partition(Result::is_ok);
            let stored: Vec<BlockHash> = stored.into_iter().flatten().collect();
            self.repo.mark_blocks_stored(&stored).await?;
            if let Some(Err(err)) = failed.into_iter().next() {
                return Err(err);
            }
        }
        if let Some(check) = check {
            if !check
                .await
                .map_err(|e| task_failed("checking the payload's SHA-256", e))?
            {
                let release = payload_catalog::Write::ReleaseManifest { id, now_ms };
                self.repo.write_batch(&[release]).await?;
                return Err(AgentError::Integrity(format!(
                    "payload {id} no longer matches its SHA-256 on this node; it was not uploaded"
                )));
            }
        }
        self.put_manifest(&manifest).await?;
        crate::failpoint!("after-manifest-put");
        self.repo.complete_manifest(id).await?;
        crate::failpoint!("after-upload");
        Ok(manifest)
    }

    /// Claims the manifest, waiting out a collection that is deleting one
    /// of its blocks (uploading it before that delete lands would lose it).
    async fn claim(&self, manifest: &Manifest, now_ms: u64) -> Result<Vec<BlockState>, AgentError> {
        let deadline = tokio::time::Instant::now() + DELETING_WAIT;
        loop {
            let states = self.repo.claim_manifest(manifest, now_ms).await?;
            if !states.iter().any(|s| s.deleting) {
                return Ok(states);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::Unavailable(format!(
                    "a garbage collection has held blocks of payload {} for {}s; retry the spill later",
                    manifest.payload,
                    DELETING_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn put_manifest(&self, manifest: &Manifest) -> Result<(), AgentError> {
        let doc = serde_json::json!({
            "payload_id": manifest.payload.to_string(),
            "size_bytes": manifest.size_bytes,
            "sha256": hex::encode(manifest.sha256),
            "block_size": manifest.block_size,
            "blocks": manifest.blocks.iter().map(hex::encode).collect::<Vec<_>>(),
        });
        let body = Bytes::from(doc.to_string());
        let key = manifest_key(manifest.payload);
        self.retry(|| self.bucket.put(&key, body.clone(), None))
            .await
            .map_err(|e| store_error("writing the manifest", e))
    }

    /// Fetches the blocks `indices` of `manifest` into `file` at their
    /// offsets, each checked against its hash (a short or corrupt read is
    /// fetched again).
    pub async fn download(&self, manifest: &Manifest, file: Arc<File>, indices: Vec<usize>) -> Result<(), AgentError> {
        futures_util::stream::iter(indices)
            .map(|i| {
                let (hash, range) = (manifest.blocks[i], manifest.range(i));
                let file = file.clone();
                async move {
                    let key = block_key(&hash);
                    // The permit is held while the block is in memory, not
                    // through the backoff of a failed attempt.
                    let (_buffer, bytes) = self
                        .retry(|| async {
                            let buffer = self.buffers.acquire().await;
                            let bytes = self.bucket.get(&key, None).await?;
                            Ok((buffer, check_block(&key, &hash, bytes, range.end - range.start).await?))
                        })
                        .await
                        .map_err(|e| store_error("downloading the payload's blocks", e))?;
                    write_at(file, bytes, range.start).await
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// The size of the object a client uploaded for payload `id`, if any.
    pub async fn uploaded_size(&self, id: PayloadId) -> Result<Option<u64>, AgentError> {
        let key = upload_key(id);
        self.retry(|| self.bucket.head(&key))
            .await
            .map_err(|e| store_error("looking up the uploaded object", e))
    }

    /// Copies the uploaded object of payload `id` (`size` bytes) into
    /// `file` with ranged GETs of one block each.
    pub async fn fetch_upload(&self, id: PayloadId, size: u64, file: Arc<File>) -> Result<(), AgentError> {
        let key = upload_key(id);
        let ranges: Vec<_> = (0..size.div_ceil(BLOCK_SIZE))
            .map(|i| i * BLOCK_SIZE..((i + 1) * BLOCK_SIZE).min(size))
            .collect();
        futures_util::stream::iter(ranges)
            .map(|range| {
                let (key, file) = (&key, file.clone());
                async move {
                    let (_buffer, bytes) = self
                        .retry(|| async {
                            let buffer = self.buffers.acquire().await;
                            let bytes = self.bucket.get(key, Some(range.clone())).await?;
                            match bytes.len() as u64 == range.end - range.start {
                                true => Ok((buffer, bytes)),
                                false => Err(StoreError::Transient(format!("{key}: a short read"))),
                            }
                        })
                        .await
                        .map_err(|e| store_error("downloading the uploaded object", e))?;
                    write_at(file, bytes, range.start).await
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Deletes the uploaded object once its bytes are in blocks.
    pub async fn delete_upload(&self, id: PayloadId) -> Result<(), AgentError> {
        let key = upload_key(id);
        self.retry(|| self.bucket.delete(&key))
            .await
            .map_err(|e| store_error("deleting the uploaded object", e))
    }
}

/// A fetched block must have its length and hash; anything else (a short
/// read, a corrupt body) is worth fetching again.
async fn check_block(key: &str, hash: &BlockHash, bytes: Bytes, len: u64) -> Result<Bytes, StoreError> {
    let want = *hash;
    let checked = tokio::task::spawn_blocking(move || {
        let ok = bytes.len() as u64 == len && <[u8; 32]>::from(Sha256::digest(&bytes)) == want;
        (ok, bytes)
    })
    .await
    .map_err(|e| StoreError::Transient(e.to_string()))?;
    match checked {
        (true, bytes) => Ok(bytes),
        (false, bytes) => Err(StoreError::Transient(format!(
            "{key}: got {} bytes that do not hash to the block's name",
            bytes.len()
        ))),
    }
}

async fn write_at(file: Arc<File>, bytes: Bytes, offset: u64) -> Result<(), AgentError> {
    tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
        .await
        .map_err(|e| task_failed("writing a downloaded block", e))?
        .map_err(|e| io_error("writing a downloaded block", e))
}
