//! The object tier racing itself, in process against a real S3-compatible
//! server (moto): deletes during uploads, leases across restarts, objects
//! larger than the block cache.

mod common;

use std::sync::Arc;

use common::s3::{server, S3};
use common::*;
use payload_agent::error::AgentError;
use payload_agent::node::{AllocateRequest, Node, NodeConfig, Recovery};
use payload_agent::object::bucket::S3Bucket;
use payload_agent::object::{BlockCache, ObjectTier};
use payload_catalog::{PayloadId, Repository, SqliteRepository, Tier};

const PREFIX: &str = "rv";

/// An object tier on `bucket` over `repo`.
async fn tier(
    bucket: &str,
    repo: Arc<dyn Repository>,
    cache_dir: &std::path::Path,
    concurrency: usize,
    cache_capacity: u64,
) -> ObjectTier {
    let store = S3Bucket::connect(&format!("s3://{bucket}/{PREFIX}")).await.unwrap();
    store.check().await.unwrap();
    let cache = BlockCache::open(cache_dir, cache_capacity).unwrap();
    ObjectTier::new(Box::new(store), repo, concurrency, cache)
}

/// Node `name` on `dirs`, its catalog the SQLite file `db` (which other
/// nodes may share); opening it again on the same directories is a restart.
async fn node_named(
    dirs: &Dirs,
    db: &std::path::Path,
    name: &str,
    bucket: &str,
    cfg: NodeConfig,
    concurrency: usize,
    cache_capacity: u64,
) -> (Arc<Node>, Recovery) {
    let repo: Arc<dyn Repository> = Arc::new(
        SqliteRepository::open_url(&format!("sqlite://{}", db.display()), name)
            .await
            .unwrap(),
    );
    let cache_dir = dirs.state.path().join("object-cache");
    let object = tier(bucket, repo.clone(), &cache_dir, concurrency, cache_capacity).await;
    let cfg = NodeConfig {
        node_name: name.into(),
        ..cfg
    };
    open_node_with(dirs, cfg, &Capacity::default(), repo, Some(object)).await
}

/// The standalone node on `dirs` with an object tier on `bucket`.
async fn open(dirs: &Dirs, bucket: &str, concurrency: usize, cache_capacity: u64) -> (Arc<Node>, Recovery) {
    let db = dirs.state.path().join("catalog.db");
    node_named(
        dirs,
        &db,
        "standalone",
        bucket,
        NodeConfig::default(),
        concurrency,
        cache_capacity,
    )
    .await
}

async fn keys(s3: &S3, bucket: &str, under: &str) -> Vec<String> {
    s3.keys(bucket, &format!("{PREFIX}/{under}")).await
}

async fn put_upload(s3: &S3, bucket: &str, id: PayloadId, body: Vec<u8>) {
    s3.client()
        .await
        .put_object()
        .bucket(bucket)
        .key(format!("{PREFIX}/uploads/{id}"))
        .body(body.into())
        .send()
        .await
        .unwrap();
}

/// Waits until no manifest object is left in the bucket.
async fn no_manifest_objects(s3: &S3, bucket: &str) {
    eventually("the manifest object of the deleted payload is deleted", || async {
        keys(s3, bucket, "manifests/").await.is_empty()
    })
    .await;
}

/// Deletes payload `id` once `upload` (a task uploading it) has claimed its
/// manifest: the upload loses, the manifest is released, and its object
/// does not stay in the bucket.
async fn delete_during_upload<T: std::fmt::Debug>(
    s3: &S3,
    bucket: &str,
    node: Arc<Node>,
    id: PayloadId,
    upload: tokio::task::JoinHandle<Result<T, AgentError>>,
) {
    wait_claimed(&node, id).await;
    node.delete(id, true).await.unwrap();
    let lost = upload.await.unwrap();
    assert!(lost.is_err(), "the upload lost to the delete: {lost:?}");
    node.flush().await.unwrap();
    assert!(node.repo().get_manifest(id).await.unwrap().is_none(), "released");
    no_manifest_objects(s3, bucket).await;
}

/// And none comes back when the node starts again.
async fn after_restart(s3: &S3, bucket: &str, dirs: &Dirs) {
    let (_node, _) = open(dirs, bucket, 1, 512 * MIB).await;
    no_manifest_objects(s3, bucket).await;
}

/// Waits until an upload of `id` has claimed its manifest in the catalog.
async fn wait_claimed(node: &Node, id: PayloadId) {
    eventually("the upload claims its manifest", || async {
        node.repo().get_manifest(id).await.unwrap().is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_on_the_object_copy_keeps_its_cache_file_across_a_restart() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let bytes = pattern(6 * MIB as usize, 4);
    let (id, lease, path);
    {
        let (node, _) = open(&dirs, &bucket, 8, 512 * MIB).await;
        id = put_on(&node, Tier::Disk, &bytes).await;
        node.relocate(id, Tier::Object, false, false).await.unwrap();
        let grant = node.acquire(id, None, true, 60_000).await.unwrap();
        assert_eq!(grant.rec.tier, Tier::Object);
        lease = grant.lease;
        path = node.object().unwrap().cache.path(id);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the lease reads the cache file");
        // A promote copies past the reader's lease; the object copy (and
        // the cache file the lease was granted on) stays.
        node.relocate(id, Tier::Disk, false, false).await.unwrap();
        assert!(path.exists(), "the leased cache file stays while the agent runs");
        node.flush().await.unwrap();
    }
    let (node, report) = open(&dirs, &bucket, 8, 512 * MIB).await;
    assert_eq!(report.leases_restored, 1, "{report:?}");
    assert!(node.renew(lease, 0).is_ok(), "the lease is live after the restart");
    assert!(
        std::fs::read(&path).is_ok_and(|b| b == bytes),
        "a live lease's file must survive the restart (cache_dropped = {})",
        report.cache_dropped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_deleted_during_its_object_durable_commit_leaves_no_manifest_object() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let bytes = noise(48 * MIB as usize, 7);
    {
        // One block in flight: the upload takes long enough to delete during.
        let (node, _) = open(&dirs, &bucket, 1, 512 * MIB).await;
        let rec = node
            .allocate(AllocateRequest::new(bytes.len() as u64, Tier::Disk))
            .await
            .unwrap();
        std::fs::write(node.store(Tier::Disk).unwrap().path(rec.id), &bytes).unwrap();
        let commit = tokio::spawn({
            let node = node.clone();
            async move { node.commit(rec.id, None, false, true).await }
        });
        delete_during_upload(s3, &bucket, node, rec.id, commit).await;
    }
    after_restart(s3, &bucket, &dirs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_deleted_during_its_import_leaves_no_manifest_object() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let bytes = noise(48 * MIB as usize, 8);
    {
        let (node, _) = open(&dirs, &bucket, 1, 512 * MIB).await;
        let rec = node
            .allocate(AllocateRequest::new(bytes.len() as u64, Tier::Object))
            .await
            .unwrap();
        put_upload(s3, &bucket, rec.id, bytes.clone()).await;
        let import = tokio::spawn({
            let node = node.clone();
            async move { node.import(rec.id, 0).await }
        });
        delete_during_upload(s3, &bucket, node, rec.id, import).await;
    }
    after_restart(s3, &bucket, &dirs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_deleted_during_its_spill_to_the_object_tier_leaves_no_manifest_object() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let bytes = noise(48 * MIB as usize, 9);
    {
        let (node, _) = open(&dirs, &bucket, 1, 512 * MIB).await;
        let id = put_on(&node, Tier::Disk, &bytes).await;
        let spill = node.relocate(id, Tier::Object, false, false);
        let spill = tokio::spawn(spill);
        delete_during_upload(s3, &bucket, node, id, spill).await;
    }
    after_restart(s3, &bucket, &dirs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_larger_than_the_block_cache_can_still_be_imported_and_promoted() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let (node, _) = open(&dirs, &bucket, 8, 8 * MIB).await;
    let bytes = pattern(12 * MIB as usize, 3);
    let id = PayloadId::random();
    put_upload(s3, &bucket, id, bytes.clone()).await;
    // Nothing is leased: the cache is simply smaller than the object.
    let imported = node.import(id, 0).await;
    assert!(imported.is_ok(), "import refused: {}", imported.unwrap_err());
    node.relocate(id, Tier::Disk, false, false).await.unwrap();
    let path = node.store(Tier::Disk).unwrap().path(id);
    assert_eq!(std::fs::read(path).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_never_counts_on_another_nodes_manifest() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs_a, dirs_b) = (Dirs::new(), Dirs::new());
    let db = dirs_b.state.path().join("catalog.db");
    let bytes = pattern(6 * MIB as usize, 5);
    let id = PayloadId::random();
    // Node A uploaded X (its import's Insert is not in the catalog yet).
    let repo_a: Arc<dyn Repository> = Arc::new(
        SqliteRepository::open_url(&format!("sqlite://{}", db.display()), "node-a")
            .await
            .unwrap(),
    );
    let a = tier(
        &bucket,
        repo_a.clone(),
        &dirs_a.state.path().join("object-cache"),
        4,
        64 * MIB,
    )
    .await;
    let file = dirs_a.state.path().join("x");
    std::fs::write(&file, &bytes).unwrap();
    a.upload(id, &file, None, 1).await.unwrap();

    let (b, _) = node_named(&dirs_b, &db, "node-b", &bucket, NodeConfig::default(), 4, 64 * MIB).await;
    put_upload(s3, &bucket, id, bytes).await;
    let err = b.import(id, 0).await.unwrap_err();
    assert!(matches!(err, AgentError::Conflict(_)), "{err}");
    assert!(b.get(id).is_err(), "node B holds no payload resting on A's manifest");
    assert_eq!(
        repo_a.node_manifests().await.unwrap(),
        vec![(id, true)],
        "A's manifest stays A's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_past_the_maximum_payload_size_is_refused_before_any_work() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let db = dirs.state.path().join("catalog.db");
    let cfg = NodeConfig {
        max_payload_bytes: 4 * MIB,
        ..NodeConfig::default()
    };
    let (node, _) = node_named(&dirs, &db, "standalone", &bucket, cfg, 4, 8 * MIB).await;
    let id = PayloadId::random();
    put_upload(s3, &bucket, id, pattern(12 * MIB as usize, 9)).await;
    let err = node.import(id, 0).await.unwrap_err();
    assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("--max-payload-size"), "{err}");
    assert!(keys(s3, &bucket, "blocks/").await.is_empty(), "nothing was uploaded");
    assert_eq!(node.object().unwrap().traffic.figures().gets, 0, "nor fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_imports_of_one_id_at_once_agree_on_its_bytes() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let (node, _) = open(&dirs, &bucket, 4, 512 * MIB).await;
    let bytes = noise(64 * MIB as usize, 3);
    let want: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &bytes,
    ))
    .into();
    let id = PayloadId::random();
    put_upload(s3, &bucket, id, bytes).await;
    let first = tokio::spawn({
        let node = node.clone();
        async move { node.import(id, 0).await }
    });
    // A client retrying while the first import still runs.
    eventually("the first import claims its manifest", || async {
        node.repo().get_manifest(id).await.unwrap().is_some()
    })
    .await;
    // Refused while the first runs (or, had it just finished, its answer).
    match node.import(id, 0).await {
        Err(AgentError::Conflict(_)) => {}
        Ok(rec) => assert_eq!(rec.sha256, Some(want)),
        Err(err) => panic!("{err}"),
    }
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.sha256, Some(want));
    assert_eq!(
        node.import(id, 0).await.unwrap().sha256,
        Some(want),
        "a later retry answers as the first"
    );
}
