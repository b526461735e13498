//! The repository trait: the one interface every catalog backend implements.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::model::{LineageEdge, Metadata, MetadataMode, PayloadId, PayloadRecord, PayloadState, Tier};
use crate::objects::{BlockHash, BlockState, BlockStats, Manifest};
use crate::policy::Policy;
use crate::stream::{AppendItem, ReadQuery, Retention, StreamEntry, StreamHead, StreamKey, StreamOwner};

/// One step of a multi-step update; [`Repository::write_batch`] applies a
/// batch of them atomically. Payload writes are idempotent (inserts are
/// upserts), so the agent's log of them can be replayed after a crash.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Write {
    Insert(PayloadRecord),
    Update(PayloadRecord),
    Delete(PayloadId),
    /// As [`Repository::add_lineage`].
    Lineage {
        child: PayloadId,
        edges: Vec<LineageEdge>,
    },
    /// As [`Repository::update_metadata`].
    Metadata {
        id: PayloadId,
        mode: MetadataMode,
        update: Metadata,
        expected_version: Option<u64>,
    },
    /// Drops a payload's manifest and its block references (a missing
    /// manifest is fine: replays change nothing).
    ReleaseManifest {
        id: PayloadId,
        now_ms: u64,
    },
    /// As [`Repository::commit_offset`].
    CommitOffset {
        stream: StreamKey,
        group: String,
        offset: u64,
        now_ms: u64,
    },
}

/// One page of [`Repository::metadata_history`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<MetadataEvent>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<u64>,
}

/// Filters and paging for [`Repository::list_payloads`]. Results are newest
/// first; the page token is a keyset position, stable under inserts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListQuery {
    pub tier: Option<Tier>,
    pub state: Option<PayloadState>,
    pub labels: Vec<(String, String)>,
    pub created_after_ms: Option<u64>,
    pub created_before_ms: Option<u64>,
    pub page_size: u32,
    pub after: Option<PageToken>,
    /// Whose rows: this node's (the default), another node's, or every
    /// node's (the cluster view).
    #[serde(default)]
    pub scope: Scope,
}

/// Which nodes' rows a listing covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    #[default]
    Own,
    Node(String),
    Cluster,
}

/// A keyset position: the last row of the previous page, and the total the
/// first page counted (a listing reports one total throughout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageToken {
    pub created_at_ms: u64,
    pub id: PayloadId,
    pub total: u64,
}

impl PageToken {
    pub fn encode(&self) -> String {
        format!(
            "k1.{}.{}.{}",
            self.created_at_ms,
            hex::encode(self.id.as_bytes()),
            self.total
        )
    }

    pub fn decode(token: &str) -> Result<PageToken> {
        let bad = || {
            CatalogError::InvalidArgument(format!(
                "page_token {token:?} is not a token this server issued; pass next_page_token back unchanged, or omit it for the first page"
            ))
        };
        let mut parts = token.split('.');
        if parts.next() != Some("k1") {
            return Err(bad());
        }
        let created_at_ms = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let id = parts.next().and_then(|p| hex::decode(p).ok()).ok_or_else(bad)?;
        let id = PayloadId::from_slice(&id).map_err(|_| bad())?;
        let total = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(PageToken {
            created_at_ms,
            id,
            total,
        })
    }
}

/// Held for the whole of a garbage collection; see [`Repository::gc_lock`].
pub struct GcLock {
    _held: Box<dyn Send>,
    /// Set when a lock held through another process (the operator's) is
    /// gone before it was dropped: the collection must stop.
    lost: Option<tokio::sync::watch::Receiver<bool>>,
}

impl GcLock {
    pub fn new(held: impl Send + 'static) -> Self {
        Self {
            _held: Box::new(held),
            lost: None,
        }
    }

    /// A lock that can be taken away while held: `lost` turns true then.
    pub fn losable(held: impl Send + 'static, lost: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            _held: Box::new(held),
            lost: Some(lost),
        }
    }

    /// What turns true if the lock is lost (`None`: it cannot be, while
    /// held): check it before each step that relies on the lock.
    pub fn lost(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.lost.clone()
    }
}

/// Parses a label selector `k=v,k2=v2` (empty = match everything).
pub fn parse_label_selector(selector: &str) -> Result<Vec<(String, String)>> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| match term.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(CatalogError::InvalidArgument(format!(
                "label selector term {term:?} must be key=value (terms separated by commas)"
            ))),
        })
        .collect()
}

/// One page of a listing.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Page {
    pub items: Vec<PayloadRecord>,
    /// The node each item's row belongs to, in order.
    #[serde(default)]
    pub nodes: Vec<String>,
    pub next: Option<PageToken>,
    /// Rows matching the filters when the listing began (first page).
    pub total: u64,
}

/// An audit event appended to a payload's metadata history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetadataEvent {
    pub data: Vec<u8>,
    pub source: String,
    pub version: String,
    pub ts_ms: u64,
}

/// The catalog's storage interface; SQLite and PostgreSQL implement it and
/// the parity suite holds both to the same behaviour. Payload rows belong to
/// the node the repository was opened for; lineage, metadata and streams are
/// shared by every node of the catalog.
#[async_trait]
pub trait Repository: Send + Sync + 'static {
    /// The node whose payload rows this repository writes and loads.
    fn node(&self) -> &str;
    /// Applies every write in one transaction: all of them or none. An
    /// update of a missing row fails with `NotFound`.
    async fn write_batch(&self, writes: &[Write]) -> Result<()>;
    async fn get_payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>>;
    /// A payload's row and the node it belongs to, whichever node that is
    /// (a lease on one node of another's payload starts here).
    async fn locate_payload(&self, id: PayloadId) -> Result<Option<(PayloadRecord, String)>>;
    /// Every payload row of this node, for an agent rebuilding its view.
    async fn load_payloads(&self) -> Result<Vec<PayloadRecord>>;
    /// A page of this node's payload rows.
    async fn list_payloads(&self, query: &ListQuery) -> Result<Page>;

    /// Adds edges `parent -> child`; both ends must exist and no cycle may form.
    async fn add_lineage(&self, child: PayloadId, edges: &[LineageEdge]) -> Result<()>;
    /// Edges reachable from `id` upstream (parents) or downstream (children),
    /// breadth first, up to `max_depth` hops (0 = unlimited).
    async fn get_lineage(&self, id: PayloadId, upstream: bool, max_depth: u32) -> Result<Vec<LineageEdge>>;

    /// Stores metadata and returns what is stored now. With
    /// `expected_version`, fails with `Conflict` unless the stored version is
    /// that one (0 = none stored yet): the loser of a race learns of it.
    async fn update_metadata(
        &self,
        id: PayloadId,
        mode: MetadataMode,
        update: Metadata,
        expected_version: Option<u64>,
    ) -> Result<Metadata>;
    async fn get_metadata(&self, id: PayloadId) -> Result<Option<Metadata>>;
    async fn append_metadata_event(&self, id: PayloadId, event: MetadataEvent) -> Result<()>;
    /// Up to `limit` of a payload's metadata events after position `after`
    /// (0 = from the first), oldest first, with the position to continue
    /// from when more follow.
    async fn metadata_history(&self, id: PayloadId, after: u64, limit: u32) -> Result<EventPage>;

    /// Creates a stream owned by `owner` (as a payload's owner is written;
    /// `None`: open to every caller).
    async fn create_stream(
        &self,
        key: &StreamKey,
        retention: Retention,
        owner: Option<&str>,
        now_ms: u64,
    ) -> Result<()>;
    /// The stream's owner and row id; `NotFound` when there is no such stream.
    async fn stream_owner(&self, key: &StreamKey) -> Result<StreamOwner>;
    /// Removes a stream with its entries and offsets, only while `owner`
    /// (what [`Repository::stream_owner`] said) still owns it: one deleted
    /// and made again by someone else meanwhile stays. A missing one is fine.
    async fn delete_stream(&self, key: &StreamKey, owner: Option<&str>) -> Result<()>;
    /// Appends in order and returns the first and last offsets given. Every
    /// payload must exist. No items: `(0, 0)` and nothing written.
    async fn append(&self, key: &StreamKey, items: &[AppendItem], now_ms: u64) -> Result<(u64, u64)> {
        self.append_to(key, None, items, now_ms).await
    }
    /// [`Repository::append`], and with `stream` (a row id from
    /// [`Repository::stream_owner`]) only while the name still holds that
    /// stream: one deleted and made again since is `NotFound`.
    async fn append_to(
        &self,
        key: &StreamKey,
        stream: Option<i64>,
        items: &[AppendItem],
        now_ms: u64,
    ) -> Result<(u64, u64)>;
    async fn read_stream(&self, key: &StreamKey, query: ReadQuery) -> Result<Vec<StreamEntry>>;
    /// Up to `max` entries from offset `start` of the stream with row id
    /// `stream_id`, in one query and without checking that the stream still
    /// exists (a deleted one has no entries): the subscriber's path.
    async fn read_entries(&self, stream_id: i64, start: u64, max: u64) -> Result<Vec<StreamEntry>>;
    async fn stream_head(&self, key: &StreamKey) -> Result<StreamHead>;
    /// Records a consumer group's offset; it may not pass the stream's head.
    async fn commit_offset(&self, key: &StreamKey, group: &str, offset: u64, now_ms: u64) -> Result<()>;
    /// `None` when the group never committed.
    async fn get_committed(&self, key: &StreamKey, group: &str) -> Result<Option<u64>>;
    /// Records a pending manifest for this node and takes a reference on
    /// each of its distinct blocks, in one transaction; says which blocks
    /// the store holds already. Claiming an identical manifest again takes
    /// nothing more; a different one for the same payload is a `Conflict`.
    async fn claim_manifest(&self, manifest: &Manifest, now_ms: u64) -> Result<Vec<BlockState>>;
    /// Notes that these blocks' objects are in the store.
    async fn mark_blocks_stored(&self, hashes: &[BlockHash]) -> Result<()>;
    /// Marks a manifest complete: its blocks and manifest object are stored.
    async fn complete_manifest(&self, id: PayloadId) -> Result<()>;
    /// A payload's manifest and whether it is complete.
    async fn get_manifest(&self, id: PayloadId) -> Result<Option<(Manifest, bool)>>;
    /// This node's manifests, each with whether it is complete (a pending
    /// one is an upload that has not finished, or was cut short).
    async fn node_manifests(&self) -> Result<Vec<(PayloadId, bool)>>;
    /// Waits until no other collection runs on this catalog, then holds it
    /// off until the lock is dropped: a collection spans two transactions
    /// and the store's deletes between them, and a second collector could
    /// delete a block a third party re-uploaded after the first finished.
    async fn gc_lock(&self) -> Result<GcLock>;
    /// Marks up to `limit` blocks unreferenced since `cutoff_ms` or before
    /// as being deleted and returns them (with any a collection left
    /// marked); delete their objects, then call [`Repository::gc_finish`].
    async fn gc_begin(&self, cutoff_ms: u64, limit: u32) -> Result<Vec<BlockHash>>;
    /// Drops the rows of collected blocks; a block claimed meanwhile stays,
    /// to be uploaded again.
    async fn gc_finish(&self, hashes: &[BlockHash]) -> Result<()>;
    async fn block_stats(&self) -> Result<BlockStats>;

    /// Every accepted policy, for agents to apply (the operator writes
    /// them: see `put_policy` on the SQL backends).
    async fn policies(&self) -> Result<Vec<Policy>>;

    /// Wakes with a stream's next offset whenever entries are appended to it
    /// through any repository sharing this catalog.
    fn watch_stream(&self, head: StreamHead) -> tokio::sync::watch::Receiver<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let token = PageToken {
            created_at_ms: 42,
            id: PayloadId::random(),
            total: 7,
        };
        assert_eq!(PageToken::decode(&token.encode()).unwrap(), token);
        for garbage in [
            "",
            "7",
            "k1.x.y.z",
            "k1.1.00.1",
            "k2.1.0011.1",
            &format!("{}.9", token.encode()),
        ] {
            assert!(
                matches!(PageToken::decode(garbage), Err(CatalogError::InvalidArgument(_))),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn label_selectors_parse_terms_and_refuse_bare_keys() {
        assert_eq!(parse_label_selector("").unwrap(), vec![]);
        assert_eq!(
            parse_label_selector("a=1, b = 2").unwrap(),
            vec![("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]
        );
        assert!(parse_label_selector("a").is_err());
        assert!(parse_label_selector("=1").is_err());
    }
}
