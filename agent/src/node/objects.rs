//! The node's side of the object tier: reading object-tier payloads
//! through the block cache, adopting client uploads (ImportPayload),
//! dropping local copies nobody reads any more, collecting unreferenced
//! blocks, and cleaning up uploads a crash cut short.

use std::sync::Arc;
use std::time::Duration;

use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::{PayloadId, PayloadRecord, PayloadState, Priority, Tier, Write};

use super::{lock, Entry, Node};
use crate::error::AgentError;
use crate::object::GcReport;
use crate::store::io_error;

impl Node {
    /// Adopts the object a client uploaded for payload `id` (allocated on
    /// TIER_OBJECT, or not known here at all): its bytes are cut into
    /// blocks, hashed and stored like any spilled payload, and the upload
    /// is removed. `size` 0 keeps the recorded size.
    pub async fn import(self: &Arc<Self>, id: PayloadId, size: u64) -> Result<PayloadRecord, AgentError> {
        self.import_as(id, size, None).await
    }

    /// [`Node::import`] on behalf of `owner`, who owns the payload when it
    /// was not allocated here first.
    pub async fn import_as(
        self: &Arc<Self>,
        id: PayloadId,
        size: u64,
        owner: Option<String>,
    ) -> Result<PayloadRecord, AgentError> {
        let node = self.clone();
        tokio::spawn(async move { node.import_now(id, size, owner).await })
            .await
            .map_err(|e| crate::error::task_failed("importing", e))?
    }

    async fn import_now(
        self: &Arc<Self>,
        id: PayloadId,
        size: u64,
        owner: Option<String>,
    ) -> Result<PayloadRecord, AgentError> {
        let object = self.object()?.clone();
        self.writer.admit()?;
        if size > self.cfg.max_payload_bytes {
            return Err(too_large(id, size, self.cfg.max_payload_bytes));
        }
        // One import of an id at a time, known here or not.
        let Some(_importing) = object.begin_import(id) else {
            return Err(AgentError::Conflict(format!(
                "an import of payload {id} is under way; wait for it"
            )));
        };
        // A delete or release of an earlier payload of this id still in the
        // log must land first: it could drop the manifest this import
        // reuses, or make the id look like another node's.
        self.flush().await?;
        let known = self.entry(id).ok();
        match &known {
            Some(entry) => {
                let mut e = lock(entry);
                // A retry after a lost reply: the import happened.
                if e.rec.tier == Tier::Object
                    && e.rec.state == PayloadState::Durable
                    && (size == 0 || size == e.rec.size_bytes)
                {
                    return Ok(e.rec.clone());
                }
                if e.rec.tier != Tier::Object || e.rec.state != PayloadState::Allocated {
                    return Err(AgentError::InvalidState(format!(
                        "payload {id} is {} on the {} tier; ImportPayload adopts ALLOCATED payloads of the object tier",
                        e.rec.state.name(),
                        e.rec.tier.name()
                    )));
                }
                if e.moving {
                    return Err(AgentError::Conflict(format!(
                        "payload {id} is busy (an import or a move is under way); wait for it"
                    )));
                }
                // Held for the import: the write-deadline sweep leaves it be.
                e.moving = true;
            }
            None if self.repo.get_payload(id).await?.is_some() => {
                return Err(AgentError::AlreadyExists(format!(
                    "payload {id} belongs to another node of this catalog; import it there"
                )));
            }
            None => {}
        }
        let imported = self.import_work(id, size, known.as_ref(), owner).await;
        if let Some(entry) = &known {
            lock(entry).moving = false;
        }
        imported
    }

    async fn import_work(
        &self,
        id: PayloadId,
        size: u64,
        known: Option<&super::EntryRef>,
        owner: Option<String>,
    ) -> Result<PayloadRecord, AgentError> {
        let object = self.object()?.clone();
        let uploaded = object.uploaded_size(id).await?.ok_or_else(|| {
            AgentError::InvalidState(format!(
                "nothing was uploaded for payload {id}: put the object at {} first",
                object.upload_url(id)
            ))
        })?;
        let recorded = known.as_ref().map(|e| lock(e).rec.size_bytes);
        let want = match (size, recorded) {
            (0, Some(recorded)) => recorded,
            (0, None) => uploaded,
            (size, _) => size,
        };
        if uploaded > self.cfg.max_payload_bytes {
            return Err(too_large(id, uploaded, self.cfg.max_payload_bytes));
        }
        if uploaded != want {
            return Err(AgentError::InvalidArgument(format!(
                "the object uploaded for payload {id} is {uploaded} bytes, but {want} were expected; upload it again \
                 or pass its real size_bytes"
            )));
        }
        // Staged in the block cache when it fits: the staged file is then
        // the cached copy.
        let staged = object.cache.stage(id, uploaded, &|other| self.is_leased(other))?;
        let file = staged
            .file
            .try_clone()
            .map_err(|e| io_error("staging the uploaded object", e))?;
        let adopted = async {
            object.fetch_upload(id, uploaded, Arc::new(file)).await?;
            let manifest = object.upload(id, &staged.path, None, self.now_ms()).await?;
            if staged.cached {
                object.cache.adopt(&manifest)?;
            }
            Ok::<_, AgentError>(manifest)
        }
        .await;
        if !staged.cached {
            object.cache.unstage(id, &staged);
        }
        let manifest = match adopted {
            Ok(manifest) => manifest,
            Err(err) => {
                object.cache.unstage(id, &staged);
                if known.is_some_and(|e| lock(e).gone) {
                    // The delete's release may have landed before the claim.
                    self.release_raced_upload(id);
                }
                return Err(err);
            }
        };
        let now = self.now_ms();
        let rec = match known {
            Some(entry) => {
                let mut e = lock(entry);
                if e.gone {
                    // Not under the entry's lock: making room in the cache
                    // takes the cache's lock, then entries' (is_leased).
                    drop(e);
                    object.cache.remove(id);
                    // The delete's release may have landed before this
                    // import claimed the manifest.
                    self.release_raced_upload(id);
                    return Err(AgentError::NotFound(format!(
                        "payload {id} was deleted during the import"
                    )));
                }
                let mut rec = e.rec.clone();
                rec.state = transition(rec.state, Event::Commit { durable: true })?;
                rec.size_bytes = uploaded;
                rec.sha256 = Some(manifest.sha256);
                rec.version += 1;
                self.writer.write(Write::Update(rec.clone()))?;
                e.rec = rec.clone();
                rec
            }
            None => {
                let rec = PayloadRecord {
                    state: PayloadState::Durable,
                    sha256: Some(manifest.sha256),
                    priority: Priority::Normal,
                    owner,
                    ..PayloadRecord::allocated(id, Tier::Object, uploaded, now)
                };
                self.writer.write(Write::Insert(rec.clone()))?;
                self.payloads
                    .shard(&id)
                    .insert(id, Arc::new(std::sync::Mutex::new(Entry::new(rec.clone(), now))));
                rec
            }
        };
        if let Err(err) = object.delete_upload(id).await {
            tracing::warn!(%id, %err, "could not delete the adopted upload; delete it by hand");
        }
        Ok(rec)
    }

    /// Logs the release of an ended payload's manifest (a missing one is
    /// fine).
    pub(crate) fn log_release(&self, id: PayloadId) {
        let release = Write::ReleaseManifest {
            id,
            now_ms: self.now_ms(),
        };
        if let Err(err) = self.writer.write(release) {
            tracing::warn!(%id, %err, "could not log a manifest release; its blocks stay referenced until restart");
        }
    }

    /// [`Node::log_release`] for a payload that ended while an upload was
    /// under way, and the manifest object that upload may have written
    /// after the payload's copies were freed.
    pub(crate) fn release_raced_upload(&self, id: PayloadId) {
        self.log_release(id);
        if let Some(object) = self.object.clone() {
            tokio::spawn(async move {
                if let Err(err) = object.delete_manifest_object(id).await {
                    tracing::warn!(%id, %err, "could not delete a manifest object; its blocks are collected anyway");
                }
            });
        }
    }

    /// Frees local copies kept under a promoted payload once nobody holds a
    /// lease (sweeper). Caller holds the entry's lock.
    pub(crate) fn drop_idle_copies(&self, e: &mut Entry, now: u64) {
        let local = |tier: Tier| !tier.off_node();
        if e.moving || e.gone || !e.rec.copies.iter().any(|c| local(c.tier)) || e.live_leases(now) > 0 {
            return;
        }
        let mut rec = e.rec.clone();
        let (dropped, kept): (Vec<_>, Vec<_>) = rec.copies.iter().partition(|c| local(c.tier));
        rec.copies = kept;
        if let Err(err) = self.writer.write(Write::Update(super::lifecycle::logged(&rec))) {
            tracing::debug!(id = %rec.id, %err, "could not drop idle copies yet");
            return;
        }
        e.rec = rec;
        for copy in dropped {
            self.free_copy(copy.tier, e.rec.id, e.rec.size_bytes);
        }
    }

    /// Deletes blocks no manifest has named for `grace_ms` (0 = the
    /// configured grace).
    pub async fn collect_garbage(&self, grace_ms: u64) -> Result<GcReport, AgentError> {
        let grace = if grace_ms == 0 {
            self.cfg.object_gc_grace_ms
        } else {
            grace_ms
        };
        // Releases still in the log must reach the catalog first.
        self.flush().await?;
        self.object()?.collect_garbage(self.now_ms(), grace).await
    }

    /// Collects garbage every `--object-gc-interval-ms`.
    pub async fn run_collector(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(self.cfg.object_gc_interval_ms.max(1000));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {
                    match self.collect_garbage(0).await {
                        Ok(report) if report.blocks > 0 => tracing::info!(blocks = report.blocks, "collected unreferenced blocks"),
                        Ok(_) => {}
                        Err(err) => tracing::warn!(%err, "garbage collection failed; it runs again later"),
                    }
                }
                _ = super::stopped(&mut stop) => return,
            }
        }
    }

    /// Start-up: this node's manifests that no payload counts on (uploads a
    /// crash cut short, or finished just before a crash kept their switch,
    /// commit or import from being logged) are released. Their stored
    /// blocks stay until collected, so a retried upload sends only what is
    /// missing.
    pub(crate) async fn release_unused_manifests(&self) -> anyhow::Result<usize> {
        // The rows start-up dropped must be gone from the catalog first.
        self.flush().await?;
        let mut unused = Vec::new();
        for (id, _complete) in self.repo.node_manifests().await? {
            let relied_on = match self.entry(id) {
                Ok(e) => lock(&e).rec.in_object_store(),
                // A row start-up left unloaded (its tier is not configured
                // now) may still count on it.
                Err(_) => self.repo.get_payload(id).await?.is_some_and(|r| r.in_object_store()),
            };
            if !relied_on {
                unused.push(id);
            }
        }
        // Applied now, not through the log: a spill that reuses the
        // manifest once serving starts must not be overtaken by it.
        let now = self.now_ms();
        let releases: Vec<Write> = unused
            .iter()
            .map(|&id| Write::ReleaseManifest { id, now_ms: now })
            .collect();
        self.repo.write_batch(&releases).await?;
        // Before serving, so a spill of the same payload cannot put a new
        // manifest object that one of these deletes then removes.
        let object = self.object()?;
        use futures_util::StreamExt;
        futures_util::stream::iter(&unused)
            .for_each_concurrent(16, |&id| async move {
                if let Err(err) = object.delete_manifest_object(id).await {
                    tracing::warn!(%id, %err, "could not delete a released manifest object; delete it by hand");
                }
            })
            .await;
        let released = unused.len();
        Ok(released)
    }
}

fn too_large(id: PayloadId, size: u64, max: u64) -> AgentError {
    AgentError::InvalidArgument(format!(
        "payload {id} would be {size} bytes, past the maximum payload size of {max} bytes (--max-payload-size); \
         split it"
    ))
}
