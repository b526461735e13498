//! Read-only mappings of small sealed memfds, kept for answers that carry
//! the bytes inline: copying 4 KiB out of a mapping costs a fraction of a
//! `pread` of a region that is not in the CPU's caches (the page-cache
//! lookup and the access-time update are most of a small read).

use std::fs::File;
use std::sync::{Arc, Mutex};

use memmap2::{Mmap, MmapOptions};
use payload_catalog::PayloadId;

use crate::node::{lock, IdMap};

/// Regions up to this size are mapped (the largest inline answer).
pub const MAX_BYTES: usize = 64 << 10;
/// Mappings kept at most: far below the kernel's default map count limit
/// (65,530 a process), which the rest of the agent needs too. Past it,
/// reads fall back to `pread`.
const MAX_MAPS: usize = 16_384;

#[derive(Debug, Default)]
pub struct SmallMaps {
    maps: Mutex<IdMap<PayloadId, Arc<Mmap>>>,
}

impl SmallMaps {
    /// The first `size` bytes of the region of `id`, if it is mapped.
    pub fn cached(&self, id: PayloadId, size: usize) -> Option<Vec<u8>> {
        let map = lock(&self.maps).get(&id).cloned()?;
        map.get(..size).map(<[u8]>::to_vec)
    }

    /// Maps `memfd`, the sealed region of `id`, and copies its first `size`
    /// bytes; `None` when it is too large or no more mappings are kept (then
    /// read it with `pread`). The caller makes sure the region is still the
    /// payload's, under a lock its removal takes too, so no mapping outlives it.
    pub fn map(&self, id: PayloadId, memfd: &File, size: usize) -> Option<Vec<u8>> {
        if size > MAX_BYTES {
            return None;
        }
        let mut maps = lock(&self.maps);
        if maps.len() >= MAX_MAPS && !maps.contains_key(&id) {
            return None;
        }
        // Private and read-only: always allowed on a write-sealed memfd,
        // and it shares the region's pages (never written).
        // SAFETY: the memfd is sealed, so its bytes never change and it
        // cannot shrink under the mapping.
        let made = Arc::new(unsafe { MmapOptions::new().len(size).populate().map_copy_read_only(memfd) }.ok()?);
        let map = maps.entry(id).or_insert(made).clone();
        drop(maps);
        map.get(..size).map(<[u8]>::to_vec)
    }

    /// Unmaps the region of `id` (deleted, or moved off RAM).
    pub fn forget(&self, id: PayloadId) {
        lock(&self.maps).remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_come_from_the_sealed_region_and_end_with_it() {
        let file = crate::memfd::create("small", 4096).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096], 0).unwrap();
        crate::memfd::seal(&file).unwrap();
        let maps = SmallMaps::default();
        let id = PayloadId::random();
        assert!(maps.cached(id, 4096).is_none());
        assert_eq!(maps.map(id, &file, 4096).unwrap(), vec![7u8; 4096]);
        assert_eq!(maps.cached(id, 100).unwrap(), vec![7u8; 100], "the kept mapping");
        assert!(maps.map(id, &file, MAX_BYTES + 1).is_none(), "too large to map");
        maps.forget(id);
        assert!(maps.cached(id, 4096).is_none());
    }
}
