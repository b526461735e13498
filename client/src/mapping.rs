//! Mapping descriptors into this process: a writable mapping for a fresh
//! allocation, read-only mappings for leased reads, cached and reused because
//! a payload's bytes never change after commit.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use memmap2::{Mmap, MmapMut, MmapOptions};
use payload_proto::core::{payload_descriptor::Location, PayloadDescriptor};

use crate::error::{ClientError, Result};

/// Where shared-memory names live.
const SHM_DIR: &str = "/dev/shm";

/// The file behind a descriptor's location and the payload's length.
pub fn location_path(desc: &PayloadDescriptor) -> Result<(PathBuf, u64)> {
    match &desc.location {
        Some(Location::Ram(ram)) => Ok((
            PathBuf::from(format!("{SHM_DIR}/{}", ram.shm_name.trim_start_matches('/'))),
            ram.length_bytes,
        )),
        Some(Location::Disk(disk)) => Ok((PathBuf::from(&disk.path), disk.length_bytes)),
        Some(Location::Gpu(_)) => Err(ClientError::Protocol(
            "GPU locations are not mappable from the CPU; ask for a lease with min tier RAM or DISK".into(),
        )),
        None => Err(ClientError::Protocol("the descriptor has no location".into())),
    }
}

pub fn map_writable(desc: &PayloadDescriptor) -> Result<MmapMut> {
    let (path, len) = location_path(desc)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| ClientError::io(format!("opening {} for writing", path.display()), e))?;
    // SAFETY: the agent created this region for this writer alone; nobody
    // reads or resizes it until we commit.
    unsafe { MmapOptions::new().len(len as usize).map_mut(&file) }
        .map_err(|e| ClientError::io(format!("mapping {}", path.display()), e))
}

fn map_readonly(path: &PathBuf, len: u64) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
    // SAFETY: committed regions are sealed read-only and never change.
    unsafe { MmapOptions::new().len(len as usize).populate().map(&file) }
        .map_err(|e| ClientError::io(format!("mapping {}", path.display()), e))
}

/// A bounded cache of read-only mappings keyed by file path. Paths embed the
/// payload id and payload bytes are immutable, so a cached mapping of a path
/// always shows the right bytes.
pub struct MappingCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
}

struct CacheInner {
    maps: HashMap<PathBuf, Arc<Mmap>>,
    order: VecDeque<PathBuf>,
}

impl MappingCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(CacheInner {
                maps: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity,
        }
    }

    pub fn get(&self, desc: &PayloadDescriptor) -> Result<Arc<Mmap>> {
        let (path, len) = location_path(desc)?;
        if let Some(map) = self.lock().maps.get(&path) {
            if map.len() as u64 == len {
                return Ok(map.clone());
            }
        }
        let map = Arc::new(map_readonly(&path, len)?);
        let mut inner = self.lock();
        if inner.maps.insert(path.clone(), map.clone()).is_none() {
            inner.order.push_back(path);
        }
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.maps.remove(&old);
            }
        }
        Ok(map)
    }

    /// Forgets every mapping of a payload (after delete), so its memory can go.
    pub fn forget(&self, id_text: &str) {
        let mut inner = self.lock();
        inner.maps.retain(|path, _| !path.to_string_lossy().contains(id_text));
        inner.order.retain(|path| !path.to_string_lossy().contains(id_text));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
