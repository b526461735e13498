//! File-backed tiers: RAM is one POSIX shared-memory object per payload (a
//! file on the tmpfs behind `/dev/shm`), DISK is one file per payload under a
//! root directory. Capacity is reserved before a region is created, so the
//! tier never overcommits; regions are 0600 while written and 0400 once
//! sealed.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use payload_catalog::{CatalogError, PayloadId, Tier};
use sha2::{Digest, Sha256};

/// The directory every shared-memory name is relative to.
pub const SHM_DIR: &str = "/dev/shm";

/// One file-backed tier.
#[derive(Debug)]
pub struct FileStore {
    tier: Tier,
    root: PathBuf,
    /// File names are `<prefix><uuid><suffix>`.
    prefix: String,
    suffix: &'static str,
    capacity: u64,
    used: AtomicU64,
}

impl FileStore {
    /// The RAM tier: `<root>/<prefix>-<uuid>`; `root` must be `/dev/shm` or
    /// a directory below it so that `shm_name` resolves for every client.
    pub fn ram(root: &Path, shm_prefix: &str, capacity: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            root.starts_with(SHM_DIR),
            "the RAM root {} must be {SHM_DIR} or a directory below it: clients open {SHM_DIR}/<shm_name>",
            root.display()
        );
        Self::new(Tier::Ram, root, format!("{shm_prefix}-"), "", capacity)
    }

    /// The DISK tier: `<root>/<uuid>.bin`.
    pub fn disk(root: &Path, capacity: u64) -> anyhow::Result<Self> {
        Self::new(Tier::Disk, root, String::new(), ".bin", capacity)
    }

    fn new(tier: Tier, root: &Path, prefix: String, suffix: &'static str, capacity: u64) -> anyhow::Result<Self> {
        fs::create_dir_all(root).map_err(|e| anyhow::anyhow!("creating {} failed: {e}", root.display()))?;
        let root = root.canonicalize()?;
        Ok(Self {
            tier,
            root,
            prefix,
            suffix,
            capacity,
            used: AtomicU64::new(0),
        })
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
    pub fn reserve(&self, bytes: u64) -> Result<(), CatalogError> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.capacity)
            })
            .map(|_| ())
            .map_err(|used| {
                CatalogError::ResourceExhausted(format!(
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

    /// Creates the empty region, owner read-write only, sized to `size`.
    pub fn create(&self, id: PayloadId, size: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path(id))?;
        file.set_len(size)
    }

    /// Drops write permission: after commit nobody opens the region for writing.
    pub fn seal(&self, id: PayloadId) -> io::Result<()> {
        fs::set_permissions(self.path(id), Permissions::from_mode(0o400))
    }

    /// Removes the region; a region already gone is not an error.
    pub fn remove(&self, id: PayloadId) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The size of the region on disk, if it exists.
    pub fn region_len(&self, id: PayloadId) -> Option<u64> {
        fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    pub fn sync(&self, id: PayloadId) -> io::Result<()> {
        File::open(self.path(id))?.sync_all()
    }

    /// Every payload id that has a region here (files that look like ours).
    pub fn scan(&self) -> io::Result<Vec<PayloadId>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(&self.prefix) else {
                continue;
            };
            let Some(uuid) = rest.strip_suffix(self.suffix) else {
                continue;
            };
            if let Ok(id) = PayloadId::parse(uuid) {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}

/// Copies a region to a new file and seals it; `sync` makes the copy durable
/// before returning. A failed copy leaves nothing behind.
pub fn copy_file(from: &Path, to: &Path, sync: bool) -> io::Result<()> {
    let mut source = File::open(from)?;
    let mut dest = OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
    let copied = io::copy(&mut source, &mut dest).and_then(|_| if sync { dest.sync_all() } else { Ok(()) });
    if let Err(e) = copied {
        let _ = fs::remove_file(to);
        return Err(e);
    }
    fs::set_permissions(to, Permissions::from_mode(0o400))
}

/// SHA-256 of a file's bytes.
pub fn digest_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().into())
}

/// Maps an I/O failure on a region to the catalog's vocabulary.
pub fn io_error(what: &str, err: io::Error) -> CatalogError {
    if err.raw_os_error() == Some(libc::ENOSPC) {
        CatalogError::ResourceExhausted(format!("{what}: the filesystem is full"))
    } else {
        CatalogError::Storage(format!("{what}: {err}"))
    }
}
