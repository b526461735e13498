//! File-backed tiers: RAM is one POSIX shared-memory object per payload (a
//! file on the tmpfs behind `/dev/shm`), DISK is one file per payload under a
//! root directory. Every name carries the node id, so agents that share a
//! root never mistake each other's files for their own. Capacity is real:
//! it is reserved before a region is created and the region's space is
//! allocated (`fallocate`) at once, so a full filesystem answers the
//! allocation instead of killing a writer with SIGBUS. Regions are 0600
//! while written and 0400 once sealed.
//!
//! RAM regions written through the native socket are memfds instead (see
//! [`crate::memfd`]): they have no name, are held here by payload, reached
//! through [`FileStore::open`], and sealed by the kernel at commit.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use payload_catalog::{PayloadId, Tier};

use crate::error::AgentError;
use sha2::{Digest, Sha256};

/// The directory every shared-memory name is relative to.
pub const SHM_DIR: &str = "/dev/shm";

/// One file-backed tier.
#[derive(Debug)]
pub struct FileStore {
    tier: Tier,
    root: PathBuf,
    /// File names are `<prefix><uuid><suffix>`; the prefix names the node.
    prefix: String,
    /// Names before node ids (`<legacy_prefix><uuid><suffix>`): adopted at
    /// start-up only when this node's catalog has a row for the uuid.
    legacy_prefix: String,
    suffix: &'static str,
    capacity: u64,
    used: AtomicU64,
    /// Memfd regions (RAM only), by payload.
    memfds: Mutex<HashMap<PayloadId, Arc<File>>>,
    /// Holds a copy of every memfd, so they outlive an agent crash.
    keeper: Option<crate::keeper::Keeper>,
    /// Mappings of small sealed memfds, for inline answers.
    small: crate::smallmaps::SmallMaps,
    /// The most memfd regions at once: each holds a descriptor.
    max_memfds: usize,
    /// Memfds made ahead of small puts, their pages allocated (RAM): one
    /// list per slot size in [`POOL_SLOTS`].
    pool: Mutex<[Vec<File>; POOL_SLOTS.len()]>,
    refilling: std::sync::atomic::AtomicBool,
    /// The mode of a named region once sealed (`--read-access`).
    sealed_mode: u32,
}

/// The slot sizes of the memfd pool. A put takes the smallest slot that
/// holds it and shrinks it to size, so at most a slot's worth of pages is
/// allocated and freed again (one 64 KiB size cost a 4 KiB put 16 pages
/// allocated and 15 freed).
pub const POOL_SLOTS: [u64; 3] = [4 << 10, 16 << 10, 64 << 10];
/// How many memfds of each slot size the pool keeps ready.
const POOL_DEPTH: usize = 64;

/// What a scan of a tier's root found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Regions with this node's names (whose owner is checked before one
    /// is used or removed: see [`FileStore::owns`]).
    pub ours: Vec<PayloadId>,
    /// Regions in the pre-node-id naming: maybe ours, maybe another agent's.
    pub legacy: Vec<PayloadId>,
    /// Payload regions of other nodes (by their uuid), left alone.
    pub foreign: Vec<PayloadId>,
}

impl FileStore {
    /// The RAM tier: `<root>/<prefix>-<node_id>-<uuid>`; `root` must be
    /// `/dev/shm` or a directory below it so that `shm_name` resolves for
    /// every client.
    pub fn ram(root: &Path, shm_prefix: &str, node_id: &str, capacity: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            root.starts_with(SHM_DIR),
            "the RAM root {} must be {SHM_DIR} or a directory below it: clients open {SHM_DIR}/<shm_name>",
            root.display()
        );
        anyhow::ensure!(
            !shm_prefix.is_empty() && !shm_prefix.contains(['/', '\0']),
            "--shm-prefix {shm_prefix:?} must be non-empty and hold no '/': shared-memory names are one path component"
        );
        let legacy = format!("{shm_prefix}-");
        Self::new(Tier::Ram, root, format!("{legacy}{node_id}-"), legacy, "", capacity)
    }

    /// The DISK tier: `<root>/<node_id>-<uuid>.bin`.
    pub fn disk(root: &Path, node_id: &str, capacity: u64) -> anyhow::Result<Self> {
        Self::new(Tier::Disk, root, format!("{node_id}-"), String::new(), ".bin", capacity)
    }

    fn new(
        tier: Tier,
        root: &Path,
        prefix: String,
        legacy_prefix: String,
        suffix: &'static str,
        capacity: u64,
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(root).map_err(|e| anyhow::anyhow!("creating {} failed: {e}", root.display()))?;
        let root = root.canonicalize()?;
        Ok(Self {
            tier,
            root,
            prefix,
            legacy_prefix,
            suffix,
            capacity,
            used: AtomicU64::new(0),
            memfds: Mutex::new(HashMap::new()),
            keeper: None,
            small: Default::default(),
            max_memfds: memfd_budget(crate::memfd::raise_fd_limit()),
            pool: Mutex::new(Default::default()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            sealed_mode: 0o400,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Refuses a capacity the filesystem can never hold, and warns when
    /// what is left of it is more than the free space now (others use the
    /// filesystem too; allocation past the free space answers
    /// RESOURCE_EXHAUSTED, since regions get real space).
    pub fn check_capacity(&self) -> anyhow::Result<()> {
        let (free, total) = free_space(&self.root)?;
        let tier = self.tier.name().to_ascii_lowercase();
        anyhow::ensure!(
            self.capacity <= total,
            "the {tier} tier's capacity ({} bytes) is larger than the filesystem at {} ({total} bytes): lower \
             --{tier}-capacity or give the tier a larger filesystem",
            self.capacity,
            self.root.display(),
        );
        let wanted = self.capacity.saturating_sub(self.used());
        if wanted > free {
            tracing::warn!(
                tier,
                root = %self.root.display(),
                free,
                wanted,
                "the tier's free capacity is more than the filesystem has free; allocations past it will be refused"
            );
        }
        Ok(())
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn path(&self, id: PayloadId) -> PathBuf {
        self.root.join(format!("{}{}{}", self.prefix, id, self.suffix))
    }

    /// The RAM location name: the path relative to `/dev/shm`, with a leading slash.
    pub fn shm_name(&self, id: PayloadId) -> String {
        let path = self.path(id);
        let relative = path.strip_prefix(SHM_DIR).unwrap_or(&path);
        format!("/{}", relative.display())
    }

    /// Reserves `bytes` of capacity, or says how much is free.
    pub fn reserve(&self, bytes: u64) -> Result<(), AgentError> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.capacity)
            })
            .map(|_| ())
            .map_err(|used| {
                AgentError::ResourceExhausted(format!(
                    "{} tier is full: {bytes} bytes requested, {} of {} free; delete or spill payloads, or raise its capacity",
                    self.tier.name(),
                    self.capacity.saturating_sub(used),
                    self.capacity
                ))
            })
    }

    /// Counts bytes already there (start-up), even past capacity.
    pub fn add_used(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    pub fn unreserve(&self, bytes: u64) {
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            Some(used.saturating_sub(bytes))
        });
    }

    /// Creates the region, owner read-write only, with `size` bytes of the
    /// filesystem's space allocated to it; on failure nothing is left.
    pub fn create(&self, id: PayloadId, size: u64) -> io::Result<()> {
        create_region(&self.path(id), size)
    }

    /// [`FileStore::create`], a large region off the async workers: giving
    /// it real space (zeroed pages on tmpfs) takes a while.
    pub async fn create_async(&self, id: PayloadId, size: u64) -> Result<(), AgentError> {
        const INLINE: u64 = 1 << 20;
        let created = if size <= INLINE {
            self.create(id, size)
        } else {
            let path = self.path(id);
            tokio::task::spawn_blocking(move || create_region(&path, size))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        };
        created.map_err(|e| io_error("creating the payload region", e))
    }

    fn memfds(&self) -> MutexGuard<'_, HashMap<PayloadId, Arc<File>>> {
        self.memfds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who may open sealed named regions: 0400, 0440 or 0444.
    pub fn set_sealed_mode(&mut self, mode: u32) {
        self.sealed_mode = mode;
    }

    pub fn sealed_mode(&self) -> u32 {
        self.sealed_mode
    }

    /// Hands every memfd region to `keeper` from now on, and takes back
    /// the ones it kept (start-up: recovery drops those no row names).
    pub fn keep_memfds(&mut self, keeper: crate::keeper::Keeper, kept: Vec<(PayloadId, File)>) {
        self.memfds().extend(kept.into_iter().map(|(id, f)| (id, Arc::new(f))));
        self.keeper = Some(keeper);
    }

    /// Hands a new keeper every memfd region when the old one is gone. The
    /// regions' lock is held only to copy the list (leases and puts go on);
    /// a region freed meanwhile is dropped from the new keeper afterwards.
    pub fn rekeep(&self) -> io::Result<()> {
        let Some(keeper) = &self.keeper else { return Ok(()) };
        if !keeper.reconnect()? {
            return Ok(());
        }
        let held: Vec<(PayloadId, Arc<File>)> = self.memfds().iter().map(|(id, f)| (*id, f.clone())).collect();
        for (id, file) in &held {
            keeper.keep(*id, file)?;
        }
        let gone: Vec<PayloadId> = {
            let memfds = self.memfds();
            held.iter()
                .map(|(id, _)| *id)
                .filter(|id| !memfds.contains_key(id))
                .collect()
        };
        gone.into_iter().for_each(|id| keeper.forget(id));
        Ok(())
    }

    /// Whether the keeper died (a watcher noticed): [`FileStore::rekeep`] then.
    pub fn keeper_lost(&self) -> bool {
        self.keeper.as_ref().is_some_and(|k| k.lost())
    }

    /// The payloads with memfd regions.
    pub fn memfd_ids(&self) -> Vec<PayloadId> {
        self.memfds().keys().copied().collect()
    }

    /// Whether another memfd region fits in the descriptor budget.
    pub fn check_memfd_room(&self) -> Result<(), AgentError> {
        let held = self.memfds().len();
        if held < self.max_memfds {
            return Ok(());
        }
        Err(AgentError::ResourceExhausted(format!(
            "this node holds {held} sealed RAM payloads, one descriptor each: the most its descriptor limit allows \
             (raise the agent's `ulimit -n` / LimitNOFILE, spill or delete payloads, or put over gRPC for a named \
             /dev/shm region)"
        )))
    }

    /// Creates a memfd region of `size` bytes with its pages allocated.
    pub fn create_memfd(&self, id: PayloadId, size: u64) -> io::Result<Arc<File>> {
        self.adopt_memfd(id, self.new_memfd(size)?)
    }

    /// A memfd of `size` bytes with its pages allocated: from the pool when
    /// it is small, so the request path rarely creates or faults one.
    pub fn new_memfd(&self, size: u64) -> io::Result<File> {
        if let Some(slot) = POOL_SLOTS.iter().position(|&slot| size <= slot) {
            let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner())[slot].pop();
            if let Some(file) = pooled {
                // Shrinking frees the pages past `size`.
                file.set_len(size)?;
                return Ok(file);
            }
        }
        crate::memfd::create("payload", size)
    }

    /// Whether some slot size of the pool runs low and nobody is filling
    /// it yet; a true answer must be followed by [`FileStore::refill_pool`].
    /// A size never taken never runs low, so it costs nothing after start-up.
    pub fn pool_wants_refill(&self) -> bool {
        let low = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|files| files.len() < POOL_DEPTH / 2);
        low && !self.refilling.swap(true, Ordering::AcqRel)
    }

    /// Fills the pool (blocking: it allocates pages).
    pub fn refill_pool(&self) {
        for (slot, &size) in POOL_SLOTS.iter().enumerate() {
            loop {
                let have = self.pool.lock().unwrap_or_else(|p| p.into_inner())[slot].len();
                if have >= POOL_DEPTH {
                    break;
                }
                match crate::memfd::create("payload", size) {
                    Ok(file) => self.pool.lock().unwrap_or_else(|p| p.into_inner())[slot].push(file),
                    Err(e) => {
                        tracing::debug!(%e, "could not fill the memfd pool");
                        break;
                    }
                }
            }
        }
        self.refilling.store(false, Ordering::Release);
    }

    /// Takes a memfd written elsewhere (a client's) as the region of `id`.
    pub fn adopt_memfd(&self, id: PayloadId, file: File) -> io::Result<Arc<File>> {
        if let Some(keeper) = &self.keeper {
            // A request never waits for a new keeper to start: the sweeper
            // replaces it within half a second and hands it this memfd too.
            if keeper.keep(id, &file).is_err() {
                keeper.mark_lost();
            }
        }
        let file = Arc::new(file);
        self.memfds().insert(id, file.clone());
        Ok(file)
    }

    /// The region's memfd, if it is one.
    pub fn memfd(&self, id: PayloadId) -> Option<Arc<File>> {
        self.memfds().get(&id).cloned()
    }

    /// The bytes of the small sealed memfd of `id`, from a mapping kept for
    /// inline answers (see [`crate::smallmaps`]); `None`: read it instead.
    pub fn copy_small(&self, id: PayloadId, memfd: &Arc<File>, size: usize) -> Option<Vec<u8>> {
        if let Some(bytes) = self.small.cached(id, size) {
            return Some(bytes);
        }
        // Mapped only while the region is still the payload's, under the
        // lock `remove` takes: a mapping never outlives its payload.
        let memfds = self.memfds();
        if !memfds.get(&id).is_some_and(|held| Arc::ptr_eq(held, memfd)) {
            return None;
        }
        self.small.map(id, memfd, size)
    }

    /// How many memfd regions are sealed (committed), and their bytes.
    pub fn memfd_usage(&self) -> (u64, u64) {
        // Copied out first: no descriptor calls under the lock.
        let memfds: Vec<Arc<File>> = self.memfds().values().cloned().collect();
        let sealed = memfds.iter().filter(|f| crate::memfd::is_sealed(f));
        sealed
            .filter_map(|f| f.metadata().ok())
            .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
    }

    /// The region opened for reading, and a path that names it for as long
    /// as the file is open (a memfd's is `/proc/self/fd/N`).
    pub fn open(&self, id: PayloadId) -> io::Result<Source> {
        match self.memfd(id) {
            Some(memfd) => {
                // Opened again rather than duplicated: a read offset of its own.
                let file = File::open(format!("/proc/self/fd/{}", memfd.as_raw_fd()))?;
                let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
                Ok(Source { file, path })
            }
            None => {
                let path = self.path(id);
                Ok(Source {
                    file: File::open(&path)?,
                    path,
                })
            }
        }
    }

    /// Makes the region immutable: a memfd gets every seal (refused while a
    /// writable mapping exists); a named file loses write permission.
    pub fn seal(&self, id: PayloadId) -> io::Result<()> {
        match self.memfd(id) {
            Some(memfd) => crate::memfd::seal(&memfd),
            None => fs::set_permissions(self.path(id), Permissions::from_mode(self.sealed_mode)),
        }
    }

    /// Undoes [`FileStore::seal`] for a commit that did not happen (a
    /// memfd's seals are for good: its writer aborts instead).
    pub fn unseal(&self, id: PayloadId) -> io::Result<()> {
        if self.memfd(id).is_some() {
            return Ok(());
        }
        fs::set_permissions(self.path(id), Permissions::from_mode(0o600))
    }

    /// Removes the region; a region already gone is not an error.
    pub fn remove(&self, id: PayloadId) -> io::Result<()> {
        let removed = {
            let mut memfds = self.memfds();
            let removed = memfds.remove(&id).is_some();
            // Under the same lock as `copy_small`'s check.
            self.small.forget(id);
            removed
        };
        if removed {
            if let Some(keeper) = &self.keeper {
                keeper.forget(id);
            }
            return Ok(());
        }
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether the region exists and this user owns it: a file of this
    /// node's name made by someone else is never taken for ours.
    pub fn owns(&self, id: PayloadId) -> bool {
        self.memfd(id).is_some() || fs::metadata(self.path(id)).is_ok_and(|m| m.uid() == euid())
    }

    /// The size of the region, if it exists and this user owns it (a file
    /// of that name made by someone else is never taken for ours).
    pub fn region_len(&self, id: PayloadId) -> Option<u64> {
        if let Some(memfd) = self.memfd(id) {
            return memfd.metadata().ok().map(|m| m.len());
        }
        fs::metadata(self.path(id))
            .ok()
            .filter(|m| m.uid() == euid())
            .map(|m| m.len())
    }

    /// Makes the region and its name survive power loss.
    pub fn sync(&self, id: PayloadId) -> io::Result<()> {
        if self.memfd(id).is_some() {
            // Memory: there is nothing to sync it to.
            return Ok(());
        }
        let path = self.path(id);
        File::open(&path)?.sync_all()?;
        crate::durable::fsync_parent(&path)
    }

    fn legacy_path(&self, id: PayloadId) -> PathBuf {
        self.root.join(format!("{}{}{}", self.legacy_prefix, id, self.suffix))
    }

    /// Renames a region in the pre-node-id naming to this node's name. Only
    /// for ids this node's catalog holds and whose region is missing: that
    /// row proves the file is ours.
    pub fn adopt_legacy(&self, id: PayloadId) -> bool {
        let legacy = self.legacy_path(id);
        fs::metadata(&legacy).is_ok_and(|m| m.uid() == euid()) && fs::rename(legacy, self.path(id)).is_ok()
    }

    /// Sorts the files under the root into this node's regions, regions in
    /// the old naming, and other nodes' regions; anything else is ignored.
    pub fn scan(&self) -> io::Result<Scan> {
        let mut scan = Scan::default();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(body) = name.strip_suffix(self.suffix) else {
                continue;
            };
            if let Some(id) = body.strip_prefix(&self.prefix).and_then(|u| PayloadId::parse(u).ok()) {
                scan.ours.push(id);
            } else if let Some(rest) = body.strip_prefix(&self.legacy_prefix) {
                if let Ok(id) = PayloadId::parse(rest) {
                    scan.legacy.push(id);
                } else if let Some(id) = rest
                    .len()
                    .checked_sub(36)
                    .and_then(|at| rest.get(at..))
                    .and_then(|u| PayloadId::parse(u).ok())
                {
                    scan.foreign.push(id);
                }
            }
        }
        Ok(scan)
    }
}

/// How many memfd regions a descriptor limit leaves room for.
fn memfd_budget(fd_limit: u64) -> usize {
    let budget = fd_limit.saturating_sub(crate::memfd::FD_HEADROOM).max(fd_limit / 2);
    usize::try_from(budget).unwrap_or(usize::MAX)
}

/// A region open for reading; `path` names it while `file` is open.
pub struct Source {
    pub file: File,
    pub path: PathBuf,
}

/// Creates a region file, owner read-write only, with `size` bytes of the
/// filesystem's space allocated to it; on failure nothing is left.
pub fn create_region(path: &Path, size: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    allocate(&file, size).inspect_err(|_| {
        let _ = fs::remove_file(path);
    })
}

/// Gives `file` `size` bytes of real space. Filesystems without
/// `fallocate` get a sparse file, as before.
fn allocate(file: &File, size: u64) -> io::Result<()> {
    if size == 0 {
        // fallocate refuses an empty range; there is nothing to reserve.
        return Ok(());
    }
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate on a descriptor we own; mode 0 extends the file.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => file.set_len(size),
        _ => Err(err),
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Free and total bytes of the filesystem holding `path`.
pub(crate) fn free_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

/// Copies a region to a new file and seals it; `sync` makes the copy durable
/// before returning. A failed copy leaves nothing behind.
pub fn copy_file(from: &Path, to: &Path, sync: bool, mode: u32) -> io::Result<()> {
    let mut source = File::open(from)?;
    let mut dest = OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
    let copied = source
        .metadata()
        .and_then(|m| allocate(&dest, m.len()))
        .and_then(|_| io::copy(&mut source, &mut dest))
        .and_then(|_| if sync { dest.sync_all() } else { Ok(()) })
        .and_then(|_| fs::set_permissions(to, Permissions::from_mode(mode)))
        .and_then(|_| if sync { crate::durable::fsync_parent(to) } else { Ok(()) });
    if let Err(e) = copied {
        let _ = fs::remove_file(to);
        return Err(e);
    }
    Ok(())
}

/// SHA-256 of a file's bytes.
pub fn digest_file(path: &Path) -> io::Result<[u8; 32]> {
    digest(File::open(path)?)
}

/// SHA-256 of an open file's bytes from where it stands.
pub fn digest(mut file: File) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().into())
}

/// Maps an I/O failure on the node to the agent's vocabulary: a full
/// filesystem is out of capacity, anything else a node failure.
pub fn io_error(what: &str, err: io::Error) -> AgentError {
    match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => AgentError::ResourceExhausted(format!(
            "{what}: the filesystem is full; delete payloads or free space there"
        )),
        _ => AgentError::Io {
            what: what.to_string(),
            detail: err.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(bytes: &[u8]) -> File {
        let file = crate::memfd::create("test", bytes.len() as u64).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, bytes, 0).unwrap();
        crate::memfd::seal(&file).unwrap();
        file
    }

    #[test]
    fn small_mappings_are_of_held_regions_and_go_with_their_payload() {
        let root = tempfile::tempdir_in("/dev/shm").unwrap();
        let store = FileStore::ram(root.path(), "pm-test", "node", 1 << 20).unwrap();
        let id = PayloadId::random();
        let memfd = store.adopt_memfd(id, sealed(&[5; 4096])).unwrap();
        assert_eq!(store.copy_small(id, &memfd, 4096).unwrap(), vec![5; 4096]);
        assert_eq!(store.small.cached(id, 4096).unwrap(), vec![5; 4096], "kept");
        store.remove(id).unwrap();
        assert!(store.small.cached(id, 4096).is_none(), "unmapped with its payload");
        // A region that is no longer the payload's (removed while a get
        // was under way) is read, never mapped.
        assert!(store.copy_small(id, &memfd, 4096).is_none());
        assert!(store.small.cached(id, 4096).is_none());
    }
}
