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
    /// The first `size` bytes of `memfd`, the sealed region of `id`, from
    /// its mapping (made on first use); `None` when it is too large or no
    /// mapping can be kept (then read it with `pread`).
    pub fn copy(&self, id: PayloadId, memfd: &File, size: usize) -> Option<Vec<u8>> {
        if size > MAX_BYTES {
            return None;
        }
        let known = lock(&self.maps).get(&id).cloned();
        let map = match known {
            Some(map) => map,
            None => {
                if lock(&self.maps).len() >= MAX_MAPS {
                    return None;
                }
                // Private and read-only: always allowed on a write-sealed
                // memfd, and it shares the region's pages (never written).
                // SAFETY: the memfd is sealed, so its bytes never change
                // and it cannot shrink under the mapping.
                let map = Arc::new(unsafe { MmapOptions::new().len(size).map_copy_read_only(memfd) }.ok()?);
                lock(&self.maps).entry(id).or_insert(map).clone()
            }
        };
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
        assert_eq!(maps.copy(id, &file, 4096).unwrap(), vec![7u8; 4096]);
        assert_eq!(maps.copy(id, &file, 100).unwrap(), vec![7u8; 100], "the kept mapping");
        assert!(maps.copy(id, &file, MAX_BYTES + 1).is_none(), "too large to map");
        maps.forget(id);
        assert!(lock(&maps.maps).is_empty());
    }
}
