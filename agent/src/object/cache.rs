//! The block cache: object-tier payloads read on this node, one sparse file
//! per payload (`<id>.cache`, so a lease hands out one path holding the
//! whole payload) with the blocks present recorded in `<id>.idx`. Blocks
//! are fetched only when missing and evicted coldest block first, by
//! punching holes, from payloads nobody holds a lease on. The index is
//! written (durably) only after the blocks it lists are synced, so after a
//! crash it never claims a block that is not there.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use payload_catalog::{Manifest, PayloadId};

use super::ObjectTier;
use crate::error::{task_failed, AgentError};
use crate::node::lock;
use crate::store::io_error;

/// Where an import staged an uploaded object; see [`BlockCache::stage`].
pub struct Staged {
    pub path: PathBuf,
    pub file: File,
    /// In the cache (to be adopted), or beside it (too large to cache).
    pub cached: bool,
}

pub struct BlockCache {
    dir: PathBuf,
    capacity: u64,
    inner: Mutex<Inner>,
    /// One fill at a time per payload; eviction skips payloads being filled.
    filling: Mutex<HashMap<PayloadId, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<PayloadId, Cached>,
    /// Bytes of blocks present.
    used: u64,
    /// A logical clock for recency.
    tick: u64,
    /// The last generation given to an entry.
    generation: u64,
}

impl Inner {
    /// A new entry: a generation of its own, so that a fill that outlives
    /// a remove never marks blocks present in the entry made after it.
    fn fresh(&mut self, size: u64, block_size: u64) -> Cached {
        self.generation += 1;
        Cached::new(size, block_size, self.generation)
    }
}

struct Cached {
    size: u64,
    block_size: u64,
    /// Per block: when it was last read (0 = not present).
    used_at: Vec<u64>,
    /// Bytes counted in `used` for blocks being fetched or staged now.
    pending: u64,
    generation: u64,
    /// When it was last used as a whole (a hit, a fill): an empty
    /// payload has no blocks to tell.
    touched: u64,
}

impl Cached {
    fn new(size: u64, block_size: u64, generation: u64) -> Self {
        Self {
            size,
            block_size,
            used_at: vec![0; size.div_ceil(block_size) as usize],
            pending: 0,
            generation,
            touched: 0,
        }
    }

    /// Whether it was used after tick `since`, or is being filled now.
    fn used_since(&self, since: u64) -> bool {
        self.pending > 0 || self.touched > since || self.used_at.iter().any(|t| *t > since)
    }

    /// Bytes this entry holds in the cache's count.
    fn counted(&self) -> u64 {
        self.present().map(|i| self.len_of(i)).sum::<u64>() + self.pending
    }

    fn len_of(&self, i: usize) -> u64 {
        let start = i as u64 * self.block_size;
        (start + self.block_size).min(self.size) - start
    }

    fn present(&self) -> impl Iterator<Item = usize> + '_ {
        self.used_at.iter().enumerate().filter(|(_, t)| **t > 0).map(|(i, _)| i)
    }

    fn index_text(&self) -> String {
        let bits: String = self.used_at.iter().map(|t| if *t > 0 { '1' } else { '0' }).collect();
        format!("{} {} {bits}\n", self.size, self.block_size)
    }
}

impl BlockCache {
    /// Opens the cache under `dir`, keeping what a valid index vouches for
    /// and removing the rest. A capacity the filesystem can never hold is
    /// refused.
    pub fn open(dir: &Path, capacity: u64) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating the object cache {}: {e}", dir.display()))?;
        fs::set_permissions(dir, Permissions::from_mode(0o700))?;
        let dir = dir.canonicalize()?;
        let (free, total) = crate::store::free_space(&dir)?;
        anyhow::ensure!(
            capacity <= total,
            "the object cache's capacity ({capacity} bytes) is larger than the filesystem at {} ({total} bytes): \
             lower --object-cache-capacity or move --object-cache-dir",
            dir.display()
        );
        let mut inner = Inner::default();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name
                .strip_suffix(".staging")
                .is_some_and(|u| PayloadId::parse(u).is_ok())
            {
                // An import a crash cut short; it starts again from its upload.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".cache").and_then(|u| PayloadId::parse(u).ok()) else {
                continue;
            };
            let index = fs::read_to_string(path.with_extension("idx")).ok();
            match index.as_deref().and_then(parse_index) {
                Some(mut cached) if fs::metadata(&path).is_ok_and(|m| m.len() == cached.size) => {
                    inner.generation += 1;
                    cached.generation = inner.generation;
                    inner.used += cached.counted();
                    inner.entries.insert(id, cached);
                }
                _ => {
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(path.with_extension("idx"));
                }
            }
        }
        if capacity.saturating_sub(inner.used) > free {
            tracing::warn!(
                dir = %dir.display(),
                free,
                capacity,
                "the object cache may grow past the free space of its filesystem; fills past it will fail"
            );
        }
        Ok(Self {
            dir,
            capacity,
            inner: Mutex::new(inner),
            filling: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, id: PayloadId) -> PathBuf {
        self.dir.join(format!("{id}.cache"))
    }

    /// (bytes of blocks present, capacity).
    pub fn usage(&self) -> (u64, u64) {
        (lock(&self.inner).used, self.capacity)
    }

    /// The cache file of payload `id` when every block is present (and
    /// marks it used); `None` when a fill is needed.
    pub fn hit(&self, id: PayloadId) -> Option<PathBuf> {
        let mut inner = lock(&self.inner);
        inner.tick += 1;
        let tick = inner.tick;
        let c = inner.entries.get_mut(&id)?;
        if c.used_at.contains(&0) {
            return None;
        }
        c.used_at.iter_mut().for_each(|t| *t = tick);
        c.touched = tick;
        Some(self.path(id))
    }

    fn is_cached(&self, id: PayloadId) -> bool {
        lock(&self.inner).entries.contains_key(&id)
    }

    /// Whether every block of payload `id` is present.
    pub fn is_complete(&self, id: PayloadId) -> bool {
        lock(&self.inner)
            .entries
            .get(&id)
            .is_some_and(|c| c.used_at.iter().all(|t| *t > 0))
    }

    /// Makes the cache file of `manifest`'s payload whole, fetching only
    /// missing blocks, and returns its path. `leased` tells which payloads'
    /// files must not lose blocks to make room.
    pub async fn fill(
        &self,
        tier: &ObjectTier,
        manifest: &Manifest,
        leased: &(dyn Fn(PayloadId) -> bool + Sync),
    ) -> Result<PathBuf, AgentError> {
        let id = manifest.payload;
        let gate = lock(&self.filling).entry(id).or_default().clone();
        let _filling = gate.lock().await;
        let path = self.path(id);
        let Some(missing) = self.missing_or_touch(manifest) else {
            return Ok(path);
        };
        if missing.is_empty() {
            // An empty payload has no blocks, but its file must exist.
            open_for_fill(&path, 0).map_err(|e| io_error("creating the cache file", e))?;
            self.adopt(manifest)?;
            return Ok(path);
        }
        let need: u64 = missing
            .iter()
            .map(|i| manifest.range(*i).end - manifest.range(*i).start)
            .sum();
        let generation = self.make_room(need, id, manifest.size_bytes, manifest.block_size, leased)?;
        let fetched = match open_for_fill(&path, manifest.size_bytes) {
            Ok(file) => {
                let file = Arc::new(file);
                let fetched = tier.download(manifest, file.clone(), missing.clone()).await;
                fetched.map(|()| file)
            }
            Err(e) => Err(io_error("opening the cache file", e)),
        };
        let synced = match fetched {
            Ok(file) => sync(file).await,
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            // Space was counted for blocks that did not land.
            let mut inner = lock(&self.inner);
            if let Some(c) = inner.entries.get_mut(&id).filter(|c| c.generation == generation) {
                c.pending = c.pending.saturating_sub(need);
                inner.used -= need;
            }
            return Err(e);
        }
        let text = {
            let mut inner = lock(&self.inner);
            inner.tick += 1;
            let tick = inner.tick;
            // A delete (or a visitor forgotten) may have dropped the entry
            // meanwhile, and a fill since may have made another: the
            // blocks fetched here may be in a file no longer this entry's.
            let Some(cached) = inner.entries.get_mut(&id).filter(|c| c.generation == generation) else {
                let gone = !inner.entries.contains_key(&id);
                if gone {
                    // This fill may have made the file again.
                    let _ = fs::remove_file(&path);
                }
                drop(inner);
                // The gate a remove left for this fill goes with it.
                let mut filling = lock(&self.filling);
                if gone && filling.get(&id).is_some_and(|g| Arc::ptr_eq(g, &gate)) && !self.is_cached(id) {
                    filling.remove(&id);
                }
                return Err(AgentError::NotFound(format!(
                    "payload {id} was removed from this node's block cache while it was fetched; retry"
                )));
            };
            for i in &missing {
                cached.used_at[*i] = tick;
            }
            cached.touched = tick;
            cached.pending = cached.pending.saturating_sub(need);
            cached.index_text()
        };
        let index = path.with_extension("idx");
        tokio::task::spawn_blocking(move || {
            crate::durable::write_durably(&index, text.as_bytes())?;
            fs::set_permissions(&path, Permissions::from_mode(0o400))?;
            Ok::<_, std::io::Error>(path)
        })
        .await
        .map_err(|e| task_failed("recording the cache index", e))?
        .map_err(|e| io_error("recording the cache index", e))
    }

    /// Creates a private file of `size` bytes where an import stages payload
    /// `id`. One that fits is made room for in the cache, so that
    /// [`BlockCache::adopt`] can make it the cached copy ([`BlockCache::remove`]
    /// gives the room back); a larger one goes beside the cache, for
    /// [`BlockCache::unstage`] to remove once the blocks are stored.
    pub fn stage(
        &self,
        id: PayloadId,
        size: u64,
        leased: &(dyn Fn(PayloadId) -> bool + Sync),
    ) -> Result<Staged, AgentError> {
        self.remove(id);
        let cached = size <= self.capacity;
        let path = if cached {
            self.make_room(size, id, size, payload_catalog::BLOCK_SIZE, leased)?;
            self.path(id)
        } else {
            self.dir.join(format!("{id}.staging"))
        };
        let _ = fs::remove_file(&path);
        // Real space (a full filesystem answers RESOURCE_EXHAUSTED now, not
        // halfway through the fetch).
        let created = crate::store::create_region(&path, size)
            .and_then(|()| OpenOptions::new().read(true).write(true).open(&path));
        match created {
            Ok(file) => Ok(Staged { path, file, cached }),
            Err(e) => {
                self.remove(id);
                let _ = fs::remove_file(&path);
                Err(io_error("staging the uploaded object", e))
            }
        }
    }

    /// Drops a staged file: its room in the cache, or the file beside it.
    pub fn unstage(&self, id: PayloadId, staged: &Staged) {
        if staged.cached {
            self.remove(id);
        } else {
            let _ = fs::remove_file(&staged.path);
        }
    }

    /// Adopts a file already holding the whole payload (staged by
    /// [`BlockCache::stage`], or an empty payload's).
    pub fn adopt(&self, manifest: &Manifest) -> Result<(), AgentError> {
        let path = self.path(manifest.payload);
        let text = {
            let mut inner = lock(&self.inner);
            inner.tick += 1;
            let tick = inner.tick;
            if !inner.entries.contains_key(&manifest.payload) {
                let fresh = inner.fresh(manifest.size_bytes, manifest.block_size);
                inner.entries.insert(manifest.payload, fresh);
            }
            let cached = inner.entries.get_mut(&manifest.payload).expect("inserted above");
            if cached.size != manifest.size_bytes || cached.block_size != manifest.block_size {
                return Err(AgentError::InvalidState(format!(
                    "the staged copy of payload {} is not the size its manifest says",
                    manifest.payload
                )));
            }
            // The staged bytes were counted as pending; now they are present.
            cached.used_at.iter_mut().for_each(|t| *t = tick);
            cached.touched = tick;
            cached.pending = cached.pending.saturating_sub(manifest.size_bytes);
            cached.index_text()
        };
        File::open(&path)
            .and_then(|f| f.sync_all())
            .and_then(|_| crate::durable::write_durably(&path.with_extension("idx"), text.as_bytes()))
            .and_then(|_| fs::set_permissions(&path, Permissions::from_mode(0o400)))
            .map_err(|e| io_error("adopting the staged payload into the cache", e))
    }

    /// Payloads whose fill runs now (its gate is held).
    pub fn filling(&self) -> std::collections::HashSet<PayloadId> {
        lock(&self.filling)
            .iter()
            .filter(|(_, gate)| gate.try_lock().is_err())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Drops a payload's cached blocks (it was deleted, or promoted).
    pub fn remove(&self, id: PayloadId) {
        let mut filling = lock(&self.filling);
        // A held gate stays: a fill that starts now waits for the one
        // running (which finds its entry gone) instead of racing it.
        if filling.get(&id).is_some_and(|gate| gate.try_lock().is_ok()) {
            filling.remove(&id);
        }
        self.forget(&mut lock(&self.inner), id);
    }

    /// The cache's logical clock now: see [`BlockCache::remove_unused_since`].
    pub fn tick(&self) -> u64 {
        lock(&self.inner).tick
    }

    /// [`BlockCache::remove`], unless payload `id` was used after `tick`
    /// or is being filled: a visitor forgotten by the sweeper may have been
    /// found again, and its file handed out, since the sweeper decided.
    pub fn remove_unused_since(&self, id: PayloadId, tick: u64) -> bool {
        let mut filling = lock(&self.filling);
        if filling.get(&id).is_some_and(|gate| gate.try_lock().is_err()) {
            return false;
        }
        let mut inner = lock(&self.inner);
        if inner.entries.get(&id).is_some_and(|c| c.used_since(tick)) {
            return false;
        }
        filling.remove(&id);
        self.forget(&mut inner, id);
        true
    }

    /// Drops an entry and its files together, under the entries' lock, so
    /// that no fill or hit sees the entry without its file or the other
    /// way round.
    fn forget(&self, inner: &mut Inner, id: PayloadId) {
        if let Some(old) = inner.entries.remove(&id) {
            inner.used -= old.counted();
        }
        let path = self.path(id);
        let _ = fs::remove_file(path.with_extension("idx"));
        let _ = fs::remove_file(path);
    }

    /// Drops every cached payload `keep` says no (start-up: payloads deleted
    /// or moved off the object tier while the agent was down).
    pub fn retain(&self, keep: impl Fn(PayloadId) -> bool) -> usize {
        let gone: Vec<PayloadId> = lock(&self.inner)
            .entries
            .keys()
            .copied()
            .filter(|id| !keep(*id))
            .collect();
        for id in &gone {
            self.remove(*id);
        }
        gone.len()
    }

    /// The blocks of `manifest`'s payload not present, or `None` when it
    /// is whole, then marked used under the same lock (so that no sweep
    /// drops it in between).
    fn missing_or_touch(&self, manifest: &Manifest) -> Option<Vec<usize>> {
        let mut inner = lock(&self.inner);
        inner.tick += 1;
        let tick = inner.tick;
        let Some(c) = inner.entries.get_mut(&manifest.payload) else {
            return Some((0..manifest.blocks.len()).collect());
        };
        let missing: Vec<usize> = (0..c.used_at.len()).filter(|i| c.used_at[*i] == 0).collect();
        if !missing.is_empty() {
            return Some(missing);
        }
        c.used_at.iter_mut().for_each(|t| *t = tick);
        c.touched = tick;
        None
    }

    /// Counts `need` bytes for payload `id` (of `size` bytes in blocks of
    /// `block_size`), punching the coldest blocks of unleased payloads out
    /// first when the cache would pass capacity; returns the generation of
    /// the entry counted into.
    fn make_room(
        &self,
        need: u64,
        id: PayloadId,
        size: u64,
        block_size: u64,
        leased: &(dyn Fn(PayloadId) -> bool + Sync),
    ) -> Result<u64, AgentError> {
        let busy: Vec<PayloadId> = lock(&self.filling)
            .iter()
            .filter(|(other, gate)| **other != id && gate.try_lock().is_err())
            .map(|(other, _)| *other)
            .collect();
        if need > self.capacity {
            return Err(AgentError::ResourceExhausted(format!(
                "payload {id} needs {need} bytes of the object cache, more than its whole capacity of {} bytes \
                 (--object-cache-capacity): lease it with min_tier DISK or RAM, which promotes it, or raise the capacity",
                self.capacity
            )));
        }
        let mut inner = lock(&self.inner);
        let mut victims: Vec<(u64, PayloadId, usize)> = Vec::new();
        if inner.used + need > self.capacity {
            for (other, c) in &inner.entries {
                if *other == id || busy.contains(other) || leased(*other) {
                    continue;
                }
                victims.extend(c.present().map(|i| (c.used_at[i], *other, i)));
            }
            victims.sort();
        }
        let mut punched: HashMap<PayloadId, Vec<usize>> = HashMap::new();
        for (_, other, i) in victims {
            if inner.used + need <= self.capacity {
                break;
            }
            let c = inner.entries.get_mut(&other).expect("victims come from entries");
            c.used_at[i] = 0;
            let len = c.len_of(i);
            inner.used -= len;
            punched.entry(other).or_default().push(i);
        }
        if inner.used + need > self.capacity {
            for (other, blocks) in &punched {
                let c = inner.entries.get_mut(other).expect("punched come from entries");
                blocks.iter().for_each(|i| c.used_at[*i] = 1);
                inner.used += blocks.iter().map(|i| c.len_of(*i)).sum::<u64>();
            }
            return Err(AgentError::ResourceExhausted(format!(
                "the object cache ({} bytes, --object-cache-capacity) cannot hold {need} more bytes: the rest is \
                 leased; release leases or raise the capacity",
                self.capacity
            )));
        }
        for (other, blocks) in punched {
            let c = &inner.entries[&other];
            // The index first: a crash between the two leaves a block that
            // is there but not listed, never the other way round.
            let path = self.path(other);
            let written = crate::durable::write_durably(&path.with_extension("idx"), c.index_text().as_bytes());
            let holes = blocks
                .iter()
                .map(|i| (*i as u64 * c.block_size, c.len_of(*i)))
                .collect::<Vec<_>>();
            if written.is_err() || punch(&path, &holes).is_err() {
                tracing::warn!(id = %other, "could not evict cached blocks; dropping the cached payload");
                let _ = fs::remove_file(path.with_extension("idx"));
                let _ = fs::remove_file(&path);
                let c = inner.entries.remove(&other).expect("present");
                inner.used -= c.present().map(|i| c.len_of(i)).sum::<u64>();
            }
        }
        inner.used += need;
        if !inner.entries.contains_key(&id) {
            let fresh = inner.fresh(size, block_size);
            inner.entries.insert(id, fresh);
        }
        let c = inner.entries.get_mut(&id).expect("inserted above");
        c.pending += need;
        Ok(c.generation)
    }
}

fn parse_index(text: &str) -> Option<Cached> {
    let mut parts = text.split_whitespace();
    let size = parts.next()?.parse().ok()?;
    let block_size: u64 = parts.next()?.parse().ok().filter(|b| *b > 0)?;
    let bits = parts.next().unwrap_or("");
    let blocks = u64::div_ceil(size, block_size) as usize;
    if bits.len() != blocks || !bits.chars().all(|c| c == '0' || c == '1') {
        return None;
    }
    Some(Cached {
        used_at: bits.chars().map(|c| u64::from(c == '1')).collect(),
        ..Cached::new(size, block_size, 0)
    })
}

fn open_for_fill(path: &Path, size: u64) -> std::io::Result<File> {
    if path.exists() {
        fs::set_permissions(path, Permissions::from_mode(0o600))?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.set_len(size)?;
    Ok(file)
}

async fn sync(file: Arc<File>) -> Result<(), AgentError> {
    tokio::task::spawn_blocking(move || file.sync_data())
        .await
        .map_err(|e| task_failed("syncing the cache file", e))?
        .map_err(|e| io_error("syncing the cache file", e))
}

/// Gives back the space of `(offset, len)` ranges of a file, keeping its size.
fn punch(path: &Path, holes: &[(u64, u64)]) -> std::io::Result<()> {
    let file = OpenOptions::new().write(true).open(path).or_else(|_| {
        fs::set_permissions(path, Permissions::from_mode(0o600))?;
        OpenOptions::new().write(true).open(path)
    })?;
    for (offset, len) in holes {
        // SAFETY: fallocate on a descriptor we own.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                *offset as libc::off_t,
                *len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
