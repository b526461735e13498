//! The object tier's catalog rows: which copies a payload has, the manifest
//! that cuts a payload into content-addressed blocks, and the blocks'
//! reference counts. A block is shared by every manifest that names it and
//! stored once; its count changes in the same transaction as the manifest
//! that takes or drops it.

use serde::{Deserialize, Serialize};

use crate::model::{PayloadId, Tier};

/// SHA-256 of a block's bytes: the block's name in the object store.
pub type BlockHash = [u8; 32];

/// The size blocks are cut at (the last block of a payload may be shorter).
pub const BLOCK_SIZE: u64 = 4 << 20;

/// A copy of a payload besides the authoritative one (the record's `tier`):
/// a cache that may be dropped, or the object copy kept under a promoted one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    pub tier: Tier,
    /// Whether the copy's bytes were checked against the payload's SHA-256.
    pub verified: bool,
}

/// How a payload is cut into blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub payload: PayloadId,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
    pub block_size: u64,
    /// In payload order; a block may appear more than once.
    pub blocks: Vec<BlockHash>,
}

impl Manifest {
    /// The byte range block `index` covers.
    pub fn range(&self, index: usize) -> std::ops::Range<u64> {
        let start = index as u64 * self.block_size;
        start..(start + self.block_size).min(self.size_bytes)
    }

    /// Each block once, in order of first appearance, with its length.
    pub fn distinct(&self) -> Vec<(BlockHash, u64)> {
        let mut seen = std::collections::HashSet::new();
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, hash)| seen.insert(**hash))
            .map(|(i, hash)| {
                let range = self.range(i);
                (*hash, range.end - range.start)
            })
            .collect()
    }

    /// The block list as stored: lowercase hex joined by commas.
    pub fn blocks_text(&self) -> String {
        self.blocks.iter().map(hex::encode).collect::<Vec<_>>().join(",")
    }

    pub fn parse_blocks(text: &str) -> Option<Vec<BlockHash>> {
        if text.is_empty() {
            return Some(Vec::new());
        }
        text.split(',')
            .map(|h| hex::decode(h).ok().and_then(|b| b.try_into().ok()))
            .collect()
    }
}

/// What the catalog knows of one block a manifest claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub hash: BlockHash,
    pub size_bytes: u64,
    /// The block is known to be in the object store: no upload needed.
    pub stored: bool,
    /// A collection is deleting the block's object right now: upload it
    /// only once that is over.
    pub deleting: bool,
}

/// Totals over the block table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks no manifest names (waiting for collection).
    pub unreferenced: u64,
}
