//! Another node's payload leased here (a visitor), against a real
//! S3-compatible server (moto, on 127.0.0.1) and one SQLite catalog shared
//! by two in-process nodes: served from its object copy through this
//! node's block cache, forgotten once idle, refused soon after its node
//! deletes it, and refused naming the store when this node's object store
//! is not its node's.

mod common;

use std::sync::Arc;

use common::s3::server;
use common::*;
use payload_agent::error::AgentError;
use payload_agent::node::{Node, NodeConfig};
use payload_agent::object::bucket::S3Bucket;
use payload_agent::object::{BlockCache, ObjectTier};
use payload_catalog::{PayloadId, SqliteRepository, Tier};

const PREFIX: &str = "pm";

/// A node named `name` on the SQLite catalog `db` and the object store
/// `s3://bucket/pm`.
async fn node(dirs: &Dirs, db: &std::path::Path, bucket: &str, name: &str) -> Arc<Node> {
    let url = format!("sqlite://{}", db.display());
    let repo = Arc::new(SqliteRepository::open_url(&url, name).await.unwrap());
    let store = S3Bucket::connect(&format!("s3://{bucket}/{PREFIX}")).await.unwrap();
    store.check().await.unwrap();
    let cache = BlockCache::open(&dirs.state.path().join("object-cache"), 64 * MIB).unwrap();
    let object = ObjectTier::new(Box::new(store), repo.clone(), 8, cache);
    let cfg = NodeConfig {
        node_name: name.into(),
        ..Default::default()
    };
    open_node_with(dirs, cfg, &Capacity::default(), repo, Some(object))
        .await
        .0
}

struct Pair {
    bucket: String,
    a_dirs: Dirs,
    a: Arc<Node>,
    /// The payload node-a spilled to the object store, and its bytes.
    id: PayloadId,
    bytes: Vec<u8>,
}

/// Node-a with one payload on the object tier, its rows in the catalog.
async fn node_a_with_a_spilled_payload() -> Option<Pair> {
    let s3 = server()?;
    let bucket = s3.bucket().await;
    let a_dirs = Dirs::new();
    let a = node(&a_dirs, &a_dirs.state.path().join("catalog.db"), &bucket, "node-a").await;
    let bytes = pattern(3 * MIB as usize + 11, 4);
    let id = put_on(&a, Tier::Ram, &bytes).await;
    a.relocate(id, Tier::Object, false, false).await.unwrap();
    a.flush().await.unwrap();
    Some(Pair {
        bucket,
        a_dirs,
        a,
        id,
        bytes,
    })
}

impl Pair {
    async fn node_b(&self, dirs: &Dirs, bucket: &str) -> Arc<Node> {
        node(dirs, &self.a_dirs.state.path().join("catalog.db"), bucket, "node-b").await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_payload_is_leased_from_its_object_copy_and_forgotten_once_idle() {
    let Some(p) = node_a_with_a_spilled_payload().await else {
        return;
    };
    let (id, bytes) = (p.id, &p.bytes);
    let b_dirs = Dirs::new();
    let b = p.node_b(&b_dirs, &p.bucket).await;
    let cache = &b.object().unwrap().cache;

    let grant = b.acquire(id, None, true, 100_000).await.unwrap();
    assert_eq!(grant.rec.tier, Tier::Object);
    assert_eq!(
        &std::fs::read(cache.path(id)).unwrap(),
        bytes,
        "node-b reads node-a's bytes"
    );
    let object_usage = |node: &Node| {
        let usage = node.usage();
        let t = *usage.tiers.iter().find(|t| t.tier == Tier::Object as u32).unwrap();
        (t.payloads, t.cache_bytes)
    };
    assert_eq!(object_usage(&b), (0, bytes.len() as u64), "cached, not node-b's own");
    // Leased, it stays however long nobody else asks.
    b.clock().advance(90_000);
    b.sweep().await;
    assert!(cache.is_complete(id), "a live lease keeps the visitor");
    assert!(b.renew(grant.lease, 0).is_ok());
    assert!(b.release(grant.lease));
    b.sweep().await;
    assert!(cache.is_complete(id), "idle only a moment");
    // Nothing here moves or deletes node-a's payload.
    let refused = b.delete(id, false).await.unwrap_err();
    assert!(matches!(refused, AgentError::NotFound(_)), "{refused:?}");
    assert!(b.relocate(id, Tier::Ram, false, false).await.is_err());

    b.clock().advance(61_000);
    b.sweep().await;
    assert!(!cache.is_complete(id), "forgotten with its cached blocks once idle");
    assert_eq!(object_usage(&b), (0, 0));
    // The next lease looks it up and fetches it again.
    let again = b.acquire(id, None, true, 0).await.unwrap();
    assert_eq!(&std::fs::read(cache.path(id)).unwrap(), bytes);
    b.release(again.lease);
    // Node-a's own copy is untouched by all of it.
    let own = p.a.acquire(id, None, true, 0).await.unwrap();
    assert_eq!(own.rec.tier, Tier::Object);
    assert_eq!(&std::fs::read(p.a.object().unwrap().cache.path(id)).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_its_node_deleted_is_refused_here_soon_after_and_its_live_lease_keeps_reading() {
    let Some(p) = node_a_with_a_spilled_payload().await else {
        return;
    };
    let id = p.id;
    let b_dirs = Dirs::new();
    let b = p.node_b(&b_dirs, &p.bucket).await;
    let cache = &b.object().unwrap().cache;
    let held = b.acquire(id, None, true, 600_000).await.unwrap();

    p.a.delete(id, true).await.unwrap();
    p.a.flush().await.unwrap();
    // Within the recheck interval the visitor's row is trusted.
    let trusted = b.acquire(id, None, true, 0).await.unwrap();
    b.release(trusted.lease);
    b.clock().advance(6_000);
    let batch = b.acquire_many(&[(id, None, 0)]).remove(0).unwrap_err();
    assert!(
        matches!(&batch, AgentError::InvalidState(m) if m.contains("use AcquireReadLease")),
        "a batch lease never asks the catalog, so it refuses a visitor not confirmed lately: {batch:?}"
    );
    let refused = b.acquire(id, None, true, 0).await.unwrap_err();
    assert!(
        matches!(&refused, AgentError::NotFound(m) if m.contains("deleted on the node that held it")),
        "{refused:?}"
    );
    assert_eq!(
        std::fs::read(cache.path(id)).unwrap(),
        p.bytes,
        "the lease taken before the delete still reads its cached bytes"
    );
    b.sweep().await;
    assert!(cache.is_complete(id), "kept while a lease lives");
    assert!(b.release(held.lease));
    b.sweep().await;
    assert!(
        !cache.is_complete(id),
        "given up on, it goes as soon as its last lease ends"
    );
    assert!(!cache.path(id).exists());
    let refused = b.acquire(id, None, true, 0).await.unwrap_err();
    assert!(matches!(refused, AgentError::NotFound(_)), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_another_object_store_is_refused_naming_its_store() {
    let Some(p) = node_a_with_a_spilled_payload().await else {
        return;
    };
    let other = server().unwrap().bucket().await;
    let b_dirs = Dirs::new();
    let b = p.node_b(&b_dirs, &other).await;
    let refused = b.acquire(p.id, None, true, 0).await.unwrap_err();
    let AgentError::InvalidState(message) = &refused else {
        panic!("{refused:?}");
    };
    assert!(message.contains(&format!("s3://{other}/{PREFIX}")), "{message}");
    assert!(message.contains("--object-store of node node-a"), "{message}");
    assert_eq!(b.object().unwrap().cache.usage().0, 0, "no bytes left counted");
}
