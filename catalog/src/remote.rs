//! A catalog reached through another process: in a cluster the operator
//! holds the database and agents call it. Every repository operation is a
//! [`Call`], sent as JSON; the serving side runs it with [`dispatch`] on the
//! repository of the caller's node and answers the operation's own result
//! (or its [`CatalogError`]) as JSON. The transport is a [`Link`]: gRPC
//! between agent and operator, or in-process in the tests, where the whole
//! parity suite runs through this module.
//!
//! Both ends are the same build (the agent and operator images of one
//! release): the encoding is not a public contract.

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::model::{LineageEdge, Metadata, MetadataMode, PayloadId, PayloadRecord};
use crate::objects::{BlockHash, BlockState, BlockStats, Manifest};
use crate::policy::Policy;
use crate::repo::{EventPage, GcLock, ListQuery, MetadataEvent, Page, Repository, Write};
use crate::stream::{AppendItem, ReadQuery, Retention, StreamEntry, StreamHead, StreamKey, StreamOwner};

/// Rows per page when an agent loads its node's rows: 200 of the largest
/// rows the agent accepts (64 labels of 2 KiB values) stay well inside a
/// 64 MiB message; typical rows make pages of a few hundred KiB.
const LOAD_PAGE: u32 = 200;

/// One repository operation, by the [`Repository`] method of its name.
#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    WriteBatch(Vec<Write>),
    GetPayload(PayloadId),
    LocatePayload(PayloadId),
    ListPayloads(ListQuery),
    AddLineage(PayloadId, Vec<LineageEdge>),
    GetLineage(PayloadId, bool, u32),
    UpdateMetadata(PayloadId, MetadataMode, Metadata, Option<u64>),
    GetMetadata(PayloadId),
    AppendMetadataEvent(PayloadId, MetadataEvent),
    MetadataHistory(PayloadId, u64, u32),
    CreateStream(StreamKey, Retention, Option<String>, u64),
    StreamOwner(StreamKey),
    DeleteStream(StreamKey, Option<String>),
    AppendTo(StreamKey, Option<i64>, Vec<AppendItem>, u64),
    ReadStream(StreamKey, ReadQuery),
    ReadEntries(i64, u64, u64),
    StreamHead(StreamKey),
    CommitOffset(StreamKey, String, u64, u64),
    GetCommitted(StreamKey, String),
    ClaimManifest(Manifest, u64),
    MarkBlocksStored(Vec<BlockHash>),
    CompleteManifest(PayloadId),
    GetManifest(PayloadId),
    NodeManifests,
    GcBegin(u64, u32),
    GcFinish(Vec<BlockHash>),
    BlockStats,
    Policies,
}

impl Call {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a call always serializes")
    }

    /// The call's name (its [`Repository`] method's), for metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Call::WriteBatch(..) => "WriteBatch",
            Call::GetPayload(..) => "GetPayload",
            Call::LocatePayload(..) => "LocatePayload",
            Call::ListPayloads(..) => "ListPayloads",
            Call::AddLineage(..) => "AddLineage",
            Call::GetLineage(..) => "GetLineage",
            Call::UpdateMetadata(..) => "UpdateMetadata",
            Call::GetMetadata(..) => "GetMetadata",
            Call::AppendMetadataEvent(..) => "AppendMetadataEvent",
            Call::MetadataHistory(..) => "MetadataHistory",
            Call::CreateStream(..) => "CreateStream",
            Call::StreamOwner(..) => "StreamOwner",
            Call::DeleteStream(..) => "DeleteStream",
            Call::AppendTo(..) => "AppendTo",
            Call::ReadStream(..) => "ReadStream",
            Call::ReadEntries(..) => "ReadEntries",
            Call::StreamHead(..) => "StreamHead",
            Call::CommitOffset(..) => "CommitOffset",
            Call::GetCommitted(..) => "GetCommitted",
            Call::ClaimManifest(..) => "ClaimManifest",
            Call::MarkBlocksStored(..) => "MarkBlocksStored",
            Call::CompleteManifest(..) => "CompleteManifest",
            Call::GetManifest(..) => "GetManifest",
            Call::NodeManifests => "NodeManifests",
            Call::GcBegin(..) => "GcBegin",
            Call::GcFinish(..) => "GcFinish",
            Call::BlockStats => "BlockStats",
            Call::Policies => "Policies",
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Call> {
        serde_json::from_slice(bytes).map_err(|e| CatalogError::InvalidArgument(format!("{UNKNOWN_CALL}: {e}")))
    }
}

/// How an operator refuses a call it does not know (one of a later
/// release); the words are fixed, since older operators send them too.
const UNKNOWN_CALL: &str = "not a catalog call of this release";

/// Whether `err` is an operator's refusal of a call it does not know.
pub fn is_unknown_call(err: &CatalogError) -> bool {
    matches!(err, CatalogError::InvalidArgument(m) if m.starts_with(UNKNOWN_CALL))
}

fn json<T: Serialize>(value: T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| CatalogError::Storage(format!("encoding a catalog answer: {e}")))
}

/// The encoded answer of a call refused before it ran.
pub fn refusal(err: CatalogError) -> Vec<u8> {
    let answer: std::result::Result<serde_json::Value, CatalogError> = Err(err);
    serde_json::to_vec(&answer).expect("an answer always serializes")
}

/// Runs `call` on `repo` and encodes its answer for the caller.
pub async fn dispatch(repo: &dyn Repository, call: Call) -> Vec<u8> {
    let answer = run(repo, call).await;
    serde_json::to_vec(&answer).expect("an answer always serializes")
}

async fn run(repo: &dyn Repository, call: Call) -> Result<serde_json::Value> {
    match call {
        Call::WriteBatch(writes) => json(repo.write_batch(&writes).await?),
        Call::GetPayload(id) => json(repo.get_payload(id).await?),
        Call::LocatePayload(id) => json(repo.locate_payload(id).await?),
        Call::ListPayloads(query) => json(repo.list_payloads(&query).await?),
        Call::AddLineage(child, edges) => json(repo.add_lineage(child, &edges).await?),
        Call::GetLineage(id, upstream, depth) => json(repo.get_lineage(id, upstream, depth).await?),
        Call::UpdateMetadata(id, mode, update, expected) => {
            json(repo.update_metadata(id, mode, update, expected).await?)
        }
        Call::GetMetadata(id) => json(repo.get_metadata(id).await?),
        Call::AppendMetadataEvent(id, event) => json(repo.append_metadata_event(id, event).await?),
        Call::MetadataHistory(id, after, limit) => json(repo.metadata_history(id, after, limit).await?),
        Call::CreateStream(key, retention, owner, now) => {
            json(repo.create_stream(&key, retention, owner.as_deref(), now).await?)
        }
        Call::StreamOwner(key) => json(repo.stream_owner(&key).await?),
        Call::DeleteStream(key, owner) => json(repo.delete_stream(&key, owner.as_deref()).await?),
        Call::AppendTo(key, stream, items, now) => json(repo.append_to(&key, stream, &items, now).await?),
        Call::ReadStream(key, query) => json(repo.read_stream(&key, query).await?),
        Call::ReadEntries(stream, start, max) => json(repo.read_entries(stream, start, max).await?),
        Call::StreamHead(key) => json(repo.stream_head(&key).await?),
        Call::CommitOffset(key, group, offset, now) => json(repo.commit_offset(&key, &group, offset, now).await?),
        Call::GetCommitted(key, group) => json(repo.get_committed(&key, &group).await?),
        Call::ClaimManifest(manifest, now) => json(repo.claim_manifest(&manifest, now).await?),
        Call::MarkBlocksStored(hashes) => json(repo.mark_blocks_stored(&hashes).await?),
        Call::CompleteManifest(id) => json(repo.complete_manifest(id).await?),
        Call::GetManifest(id) => json(repo.get_manifest(id).await?),
        Call::NodeManifests => json(repo.node_manifests().await?),
        Call::GcBegin(cutoff, limit) => json(repo.gc_begin(cutoff, limit).await?),
        Call::GcFinish(hashes) => json(repo.gc_finish(&hashes).await?),
        Call::BlockStats => json(repo.block_stats().await?),
        Call::Policies => json(repo.policies().await?),
    }
}

/// How a [`RemoteRepository`] reaches the serving side. A failure of the
/// link itself (the server down, a connection lost) is
/// [`CatalogError::Storage`]: the agent keeps the write and retries.
#[async_trait]
pub trait Link: Send + Sync + 'static {
    /// Sends an encoded [`Call`] and returns the encoded answer.
    async fn call(&self, call: Vec<u8>) -> Result<Vec<u8>>;
    /// As [`Repository::gc_lock`], held on the serving side until dropped.
    async fn gc_lock(&self) -> Result<GcLock>;
    /// As [`Repository::watch_stream`].
    fn watch_stream(&self, head: StreamHead) -> tokio::sync::watch::Receiver<u64>;
}

/// A shared link: the agent's heartbeats use the same connection.
#[async_trait]
impl<L: Link> Link for std::sync::Arc<L> {
    async fn call(&self, call: Vec<u8>) -> Result<Vec<u8>> {
        self.as_ref().call(call).await
    }
    async fn gc_lock(&self) -> Result<GcLock> {
        self.as_ref().gc_lock().await
    }
    fn watch_stream(&self, head: StreamHead) -> tokio::sync::watch::Receiver<u64> {
        self.as_ref().watch_stream(head)
    }
}

/// A [`Repository`] whose every operation runs on the other end of a
/// [`Link`], as node `node` (the serving side decides which node's rows a
/// caller may write; this name is what it is expected to say).
pub struct RemoteRepository<L> {
    node: String,
    link: L,
}

impl<L: Link> RemoteRepository<L> {
    pub fn new(node: &str, link: L) -> Self {
        Self {
            node: node.to_string(),
            link,
        }
    }

    async fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T> {
        let answer = self.link.call(call.encode()).await?;
        let answer: std::result::Result<serde_json::Value, CatalogError> = serde_json::from_slice(&answer)
            .map_err(|e| CatalogError::Storage(format!("the catalog answered in another encoding: {e}")))?;
        serde_json::from_value(answer?)
            .map_err(|e| CatalogError::Storage(format!("the catalog answered another type: {e}")))
    }
}

#[async_trait]
impl<L: Link> Repository for RemoteRepository<L> {
    fn node(&self) -> &str {
        &self.node
    }
    async fn write_batch(&self, writes: &[Write]) -> Result<()> {
        self.call(Call::WriteBatch(writes.to_vec())).await
    }
    async fn get_payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>> {
        self.call(Call::GetPayload(id)).await
    }
    async fn locate_payload(&self, id: PayloadId) -> Result<Option<(PayloadRecord, String)>> {
        self.call(Call::LocatePayload(id)).await
    }
    // In pages: a node's rows may be far more than one message holds.
    async fn load_payloads(&self) -> Result<Vec<PayloadRecord>> {
        let mut query = ListQuery {
            page_size: LOAD_PAGE,
            ..Default::default()
        };
        let mut all = Vec::new();
        loop {
            let page: Page = self.call(Call::ListPayloads(query.clone())).await?;
            all.extend(page.items);
            match page.next {
                Some(next) => query.after = Some(next),
                None => return Ok(all),
            }
        }
    }
    async fn list_payloads(&self, query: &ListQuery) -> Result<Page> {
        self.call(Call::ListPayloads(query.clone())).await
    }
    async fn add_lineage(&self, child: PayloadId, edges: &[LineageEdge]) -> Result<()> {
        self.call(Call::AddLineage(child, edges.to_vec())).await
    }
    async fn get_lineage(&self, id: PayloadId, upstream: bool, max_depth: u32) -> Result<Vec<LineageEdge>> {
        self.call(Call::GetLineage(id, upstream, max_depth)).await
    }
    async fn update_metadata(
        &self,
        id: PayloadId,
        mode: MetadataMode,
        update: Metadata,
        expected_version: Option<u64>,
    ) -> Result<Metadata> {
        self.call(Call::UpdateMetadata(id, mode, update, expected_version))
            .await
    }
    async fn get_metadata(&self, id: PayloadId) -> Result<Option<Metadata>> {
        self.call(Call::GetMetadata(id)).await
    }
    async fn append_metadata_event(&self, id: PayloadId, event: MetadataEvent) -> Result<()> {
        self.call(Call::AppendMetadataEvent(id, event)).await
    }
    async fn metadata_history(&self, id: PayloadId, after: u64, limit: u32) -> Result<EventPage> {
        self.call(Call::MetadataHistory(id, after, limit)).await
    }
    async fn create_stream(
        &self,
        key: &StreamKey,
        retention: Retention,
        owner: Option<&str>,
        now_ms: u64,
    ) -> Result<()> {
        let call = Call::CreateStream(key.clone(), retention, owner.map(str::to_string), now_ms);
        self.call(call).await
    }
    async fn stream_owner(&self, key: &StreamKey) -> Result<StreamOwner> {
        self.call(Call::StreamOwner(key.clone())).await
    }
    async fn delete_stream(&self, key: &StreamKey, owner: Option<&str>) -> Result<()> {
        self.call(Call::DeleteStream(key.clone(), owner.map(str::to_string)))
            .await
    }
    async fn append_to(
        &self,
        key: &StreamKey,
        stream: Option<i64>,
        items: &[AppendItem],
        now_ms: u64,
    ) -> Result<(u64, u64)> {
        self.call(Call::AppendTo(key.clone(), stream, items.to_vec(), now_ms))
            .await
    }
    async fn read_stream(&self, key: &StreamKey, query: ReadQuery) -> Result<Vec<StreamEntry>> {
        self.call(Call::ReadStream(key.clone(), query)).await
    }
    async fn read_entries(&self, stream_id: i64, start: u64, max: u64) -> Result<Vec<StreamEntry>> {
        self.call(Call::ReadEntries(stream_id, start, max)).await
    }
    async fn stream_head(&self, key: &StreamKey) -> Result<StreamHead> {
        self.call(Call::StreamHead(key.clone())).await
    }
    async fn commit_offset(&self, key: &StreamKey, group: &str, offset: u64, now_ms: u64) -> Result<()> {
        self.call(Call::CommitOffset(key.clone(), group.to_string(), offset, now_ms))
            .await
    }
    async fn get_committed(&self, key: &StreamKey, group: &str) -> Result<Option<u64>> {
        self.call(Call::GetCommitted(key.clone(), group.to_string())).await
    }
    async fn claim_manifest(&self, manifest: &Manifest, now_ms: u64) -> Result<Vec<BlockState>> {
        self.call(Call::ClaimManifest(manifest.clone(), now_ms)).await
    }
    async fn mark_blocks_stored(&self, hashes: &[BlockHash]) -> Result<()> {
        self.call(Call::MarkBlocksStored(hashes.to_vec())).await
    }
    async fn complete_manifest(&self, id: PayloadId) -> Result<()> {
        self.call(Call::CompleteManifest(id)).await
    }
    async fn get_manifest(&self, id: PayloadId) -> Result<Option<(Manifest, bool)>> {
        self.call(Call::GetManifest(id)).await
    }
    async fn node_manifests(&self) -> Result<Vec<(PayloadId, bool)>> {
        self.call(Call::NodeManifests).await
    }
    async fn gc_lock(&self) -> Result<GcLock> {
        self.link.gc_lock().await
    }
    async fn gc_begin(&self, cutoff_ms: u64, limit: u32) -> Result<Vec<BlockHash>> {
        self.call(Call::GcBegin(cutoff_ms, limit)).await
    }
    async fn gc_finish(&self, hashes: &[BlockHash]) -> Result<()> {
        self.call(Call::GcFinish(hashes.to_vec())).await
    }
    async fn block_stats(&self) -> Result<BlockStats> {
        self.call(Call::BlockStats).await
    }
    async fn policies(&self) -> Result<Vec<Policy>> {
        self.call(Call::Policies).await
    }
    fn watch_stream(&self, head: StreamHead) -> tokio::sync::watch::Receiver<u64> {
        self.link.watch_stream(head)
    }
}

/// A [`Link`] to a repository in this process, through the same encoding
/// as the network: the tests run the parity suite over it.
pub struct Loopback(pub std::sync::Arc<dyn Repository>);

#[async_trait]
impl Link for Loopback {
    async fn call(&self, call: Vec<u8>) -> Result<Vec<u8>> {
        Ok(dispatch(self.0.as_ref(), Call::decode(&call)?).await)
    }
    async fn gc_lock(&self) -> Result<GcLock> {
        self.0.gc_lock().await
    }
    fn watch_stream(&self, head: StreamHead) -> tokio::sync::watch::Receiver<u64> {
        self.0.watch_stream(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_of_a_later_release_is_told_apart_from_other_refusals() {
        let unknown = Call::decode(br#"{"LocateEverything":[]}"#).unwrap_err();
        assert!(is_unknown_call(&unknown), "{unknown}");
        assert!(!is_unknown_call(&CatalogError::InvalidArgument(
            "bad page token".into()
        )));
        assert!(!is_unknown_call(&CatalogError::Storage(UNKNOWN_CALL.into())));
    }
}
