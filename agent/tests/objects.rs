//! The object tier against a real S3-compatible server (moto, on
//! 127.0.0.1): payloads of every edge size round-trip through it with their
//! bytes checked, shared blocks are stored once and collected only when no
//! manifest names them, commits can wait for the object store, client
//! uploads are imported, a promote copies past a reader's lease, and the
//! disk's watermark spills what it may to the object tier.

mod common;

use std::sync::Arc;

use common::s3::{server, S3};
use common::*;
use payload_agent::node::{AllocateRequest, MoveOutcome, Node, NodeConfig};
use payload_agent::object::bucket::S3Bucket;
use payload_agent::object::{BlockCache, ObjectTier};
use payload_catalog::{PayloadId, PayloadState, Priority, SqliteRepository, Tier};

struct Setup {
    s3: &'static S3,
    bucket: String,
    /// Kept for the node's lifetime (its directories).
    _dirs: Dirs,
    node: Arc<Node>,
}

const PREFIX: &str = "pm";

async fn setup(cap: Capacity, cfg: NodeConfig) -> Option<Setup> {
    setup_with_cache(cap, cfg, 512 * MIB).await
}

async fn setup_with_cache(cap: Capacity, cfg: NodeConfig, cache_capacity: u64) -> Option<Setup> {
    let s3 = server()?;
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let repo = Arc::new(
        SqliteRepository::open(&dirs.state.path().join("catalog.db"))
            .await
            .unwrap(),
    );
    let store = S3Bucket::connect(&format!("s3://{bucket}/{PREFIX}")).await.unwrap();
    store.check().await.unwrap();
    let cache = BlockCache::open(&dirs.state.path().join("object-cache"), cache_capacity).unwrap();
    let object = ObjectTier::new(Box::new(store), repo.clone(), 8, cache);
    let (node, _) = open_node_with(&dirs, cfg, &cap, repo, Some(object)).await;
    Some(Setup {
        s3,
        bucket,
        _dirs: dirs,
        node,
    })
}

impl Setup {
    async fn keys(&self, under: &str) -> Vec<String> {
        self.s3.keys(&self.bucket, &format!("{PREFIX}/{under}")).await
    }

    /// Reads a payload through a lease that accepts any tier.
    async fn read(&self, id: PayloadId) -> (Tier, Vec<u8>) {
        let grant = self.node.acquire(id, None, true, 0).await.unwrap();
        let path = match grant.rec.tier {
            Tier::Object => self.node.object().unwrap().cache.path(id),
            tier => self.node.store(tier).unwrap().path(id),
        };
        let bytes = std::fs::read(path).unwrap();
        self.node.release(grant.lease);
        (grant.rec.tier, bytes)
    }
}

fn no_gc_grace() -> NodeConfig {
    NodeConfig {
        object_gc_grace_ms: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_every_edge_size_round_trip_through_the_object_tier() {
    let cap = Capacity {
        ram: 256 * MIB,
        disk: 256 * MIB,
    };
    let Some(s) = setup(cap, NodeConfig::default()).await else {
        return;
    };
    for (i, size) in [1, 4 * MIB - 1, 4 * MIB, 4 * MIB + 1, 100 * MIB]
        .into_iter()
        .enumerate()
    {
        let bytes = noise(size as usize, i as u64);
        let id = put_on(&s.node, Tier::Ram, &bytes).await;
        let moved = s.node.relocate(id, Tier::Object, false, false).await.unwrap();
        let rec = moved.record().unwrap().clone();
        assert_eq!(
            (rec.tier, rec.state),
            (Tier::Object, PayloadState::Durable),
            "size {size}"
        );
        assert!(
            !s.node.store(Tier::Ram).unwrap().path(id).exists(),
            "the RAM copy is freed"
        );
        assert_eq!(
            s.read(id).await,
            (Tier::Object, bytes.clone()),
            "size {size} read from the cache"
        );
        // Promoting fetches the blocks into a disk region; the object copy stays.
        let MoveOutcome::Moved(rec) = s.node.relocate(id, Tier::Disk, false, false).await.unwrap() else {
            panic!("promote did not move")
        };
        assert!(rec.has_copy(Tier::Object));
        assert_eq!(s.read(id).await, (Tier::Disk, bytes), "size {size} promoted to disk");
    }
    assert_eq!(s.node.store(Tier::Ram).unwrap().used(), 0, "RAM holds nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_blocks_are_uploaded_once_and_collected_only_when_no_manifest_names_them() {
    let Some(s) = setup(Capacity::default(), no_gc_grace()).await else {
        return;
    };
    let shared = noise(8 * MIB as usize, 1);
    let with_tail = |seed| [shared.clone(), noise(MIB as usize, seed)].concat();
    let (a, b) = (with_tail(2), with_tail(3));
    let a_id = put_on(&s.node, Tier::Ram, &a).await;
    let b_id = put_on(&s.node, Tier::Ram, &b).await;
    let traffic = || s.node.object().unwrap().traffic.figures();
    s.node.relocate(a_id, Tier::Object, false, false).await.unwrap();
    assert_eq!(s.keys("blocks/").await.len(), 3);
    let after_a = traffic();
    assert_eq!(after_a.puts, 4, "a's three blocks and its manifest");
    s.node.relocate(b_id, Tier::Object, false, false).await.unwrap();
    assert_eq!(
        s.keys("blocks/").await.len(),
        4,
        "the two shared blocks are stored once; only b's tail is new"
    );
    let after_b = traffic();
    assert_eq!(
        after_b.puts - after_a.puts,
        2,
        "b's tail block and its manifest, nothing else"
    );
    let manifest_bytes = after_b.put_bytes - after_a.put_bytes - MIB;
    assert!(manifest_bytes < 64 << 10, "b sent its tail and a manifest only");
    assert_eq!(s.keys("manifests/").await.len(), 2);

    s.node.delete(a_id, false).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let report = s.node.collect_garbage(0).await.unwrap();
    assert_eq!(report.blocks, 1, "only a's own tail goes");
    assert_eq!(s.keys("blocks/").await.len(), 3);
    assert_eq!(s.read(b_id).await, (Tier::Object, b.clone()), "b still reads whole");

    s.node.delete(b_id, false).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(s.node.collect_garbage(0).await.unwrap().blocks, 3);
    eventually("manifest objects are deleted", || async {
        s.keys("manifests/").await.is_empty()
    })
    .await;
    assert!(s.keys("blocks/").await.is_empty(), "nothing is left in the bucket");
    assert_eq!(s.node.repo().block_stats().await.unwrap().blocks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_durable_commit_returns_with_every_block_and_the_manifest_stored() {
    let Some(s) = setup(Capacity::default(), NodeConfig::default()).await else {
        return;
    };
    let bytes = noise(5 * MIB as usize, 7);
    let rec = s
        .node
        .allocate(AllocateRequest::new(bytes.len() as u64, Tier::Ram))
        .await
        .unwrap();
    std::fs::write(s.node.store(Tier::Ram).unwrap().path(rec.id), &bytes).unwrap();
    let rec = s.node.commit(rec.id, None, false, true).await.unwrap();
    assert_eq!(
        rec.state,
        PayloadState::Durable,
        "a RAM payload with an object copy is durable"
    );
    assert!(rec.has_copy(Tier::Object));
    assert_eq!(s.keys("blocks/").await.len(), 2);
    assert_eq!(s.keys("manifests/").await.len(), 1);
    // The spill that follows uploads nothing.
    s.node.relocate(rec.id, Tier::Object, false, false).await.unwrap();
    assert_eq!(s.keys("blocks/").await.len(), 2);
    assert_eq!(s.read(rec.id).await, (Tier::Object, bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_adopts_a_client_upload_and_an_object_already_under_the_prefix() {
    let Some(s) = setup(Capacity::default(), NodeConfig::default()).await else {
        return;
    };
    let client = s.s3.client().await;
    let put = |key: String, body: Vec<u8>| {
        let (client, bucket) = (client.clone(), s.bucket.clone());
        async move {
            client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(body.into())
                .send()
                .await
                .unwrap();
        }
    };
    let bytes = pattern(5 * MIB as usize + 7, 9);
    let rec = s
        .node
        .allocate(AllocateRequest::new(bytes.len() as u64, Tier::Object))
        .await
        .unwrap();
    let url = s.node.object().unwrap().upload_url(rec.id);
    let key = url.strip_prefix(&format!("s3://{}/", s.bucket)).unwrap().to_string();
    let err = s.node.import(rec.id, 0).await.unwrap_err();
    assert!(err.to_string().contains("put the object at"), "{err}");
    put(key.clone(), bytes[..10].to_vec()).await;
    let err = s.node.import(rec.id, 0).await.unwrap_err();
    assert!(err.to_string().contains("10 bytes"), "a short upload is refused: {err}");
    put(key, bytes.clone()).await;
    let imported = s.node.import(rec.id, 0).await.unwrap();
    assert_eq!((imported.tier, imported.state), (Tier::Object, PayloadState::Durable));
    assert_eq!(s.read(rec.id).await, (Tier::Object, bytes));
    assert!(s.keys("uploads/").await.is_empty(), "the adopted upload is removed");
    let again = s.node.import(rec.id, 0).await.unwrap();
    assert_eq!(
        again.sha256, imported.sha256,
        "a retried import answers as the first did"
    );

    // An object put under the prefix by hand, never allocated: 0 bytes.
    let stray = PayloadId::random();
    put(format!("{PREFIX}/uploads/{stray}"), Vec::new()).await;
    let adopted = s.node.import(stray, 0).await.unwrap();
    assert_eq!(adopted.size_bytes, 0);
    assert_eq!(s.read(stray).await, (Tier::Object, Vec::new()));
    // Dropped from the cache, an empty payload still leases a real file.
    s.node.object().unwrap().cache.remove(stray);
    assert_eq!(s.read(stray).await, (Tier::Object, Vec::new()));
    assert!(s.node.object().unwrap().cache.is_complete(stray));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_the_disk_copy_keeps_reading_while_another_promotes_it_to_ram() {
    let Some(s) = setup(Capacity::default(), NodeConfig::default()).await else {
        return;
    };
    let bytes = pattern(3 * MIB as usize, 4);
    let id = put_on(&s.node, Tier::Disk, &bytes).await;
    let reader = s.node.acquire(id, None, true, 60_000).await.unwrap();
    let disk_path = s.node.store(Tier::Disk).unwrap().path(id);
    let MoveOutcome::Moved(rec) = s.node.relocate(id, Tier::Ram, false, false).await.unwrap() else {
        panic!("the promote did not happen")
    };
    assert_eq!(rec.tier, Tier::Ram);
    assert!(rec.has_copy(Tier::Disk), "the leased disk copy stays");
    assert_eq!(std::fs::read(&disk_path).unwrap(), bytes, "the reader's copy is intact");
    assert_eq!(s.read(id).await, (Tier::Ram, bytes));
    s.node.release(reader.lease);
    s.node.sweep().await;
    assert!(!disk_path.exists(), "the disk copy goes once nobody reads it");
    assert!(!s.node.get(id).unwrap().0.has_copy(Tier::Disk));
    assert_eq!(s.node.store(Tier::Disk).unwrap().used(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_watermark_spills_unleased_unpinned_payloads_lowest_priority_first() {
    let cap = Capacity {
        ram: 16 * MIB,
        disk: 8 * MIB,
    };
    let cfg = NodeConfig {
        disk_high_watermark: 0.5,
        disk_low_watermark: 0.25,
        ..Default::default()
    };
    let Some(s) = setup(cap, cfg).await else { return };
    let put = |priority: Priority, seed: u8| {
        let node = s.node.clone();
        async move {
            let req = AllocateRequest {
                priority,
                ..AllocateRequest::new(MIB, Tier::Disk)
            };
            let rec = node.allocate(req).await.unwrap();
            std::fs::write(
                node.store(Tier::Disk).unwrap().path(rec.id),
                pattern(MIB as usize, seed),
            )
            .unwrap();
            node.commit(rec.id, None, false, false).await.unwrap();
            rec.id
        }
    };
    let high = put(Priority::High, 1).await;
    let low = put(Priority::Low, 2).await;
    let normal = put(Priority::Normal, 3).await;
    let leased = put(Priority::Low, 4).await;
    let pinned = put(Priority::Low, 5).await;
    let never = put(Priority::Never, 6).await;
    let _lease = s.node.acquire(leased, None, true, 60_000).await.unwrap();
    s.node.pin(pinned, 0).await.unwrap();
    let moved = s.node.spill_to_low_watermark(Tier::Disk).await;
    let tier = |id| s.node.get(id).unwrap().0.tier;
    // 6 MiB on an 8 MiB disk, down to 2 MiB: four must go, but only three may.
    assert_eq!(moved, 3);
    for id in [low, normal, high] {
        assert_eq!(tier(id), Tier::Object);
    }
    for id in [leased, pinned, never] {
        assert_eq!(tier(id), Tier::Disk, "leased, pinned and never-evict payloads stay");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ram_spills_to_disk_and_disk_to_the_object_store_least_recently_leased_first() {
    let cap = Capacity {
        ram: 8 * MIB,
        disk: 6 * MIB,
    };
    let cfg = NodeConfig {
        ram_high_watermark: 0.5,
        ram_low_watermark: 0.25,
        disk_high_watermark: 0.5,
        disk_low_watermark: 0.25,
        ..Default::default()
    };
    let Some(s) = setup(cap, cfg).await else { return };
    let clock = s.node.clock().clone();
    let mut ids = Vec::new();
    for seed in 0..6 {
        ids.push(put_on(&s.node, Tier::Ram, &pattern(MIB as usize, seed)).await);
    }
    // Leased in the order 5, 3, 1, 0, 2, 4 (a millisecond apart): that is
    // the order they are spilled in; 4 is still being read.
    let mut reader = None;
    for i in [5, 3, 1, 0, 2, 4] {
        clock.advance(1);
        let grant = s.node.acquire(ids[i], None, true, 60_000).await.unwrap();
        if i == 4 {
            reader = Some(grant);
        } else {
            s.node.release(grant.lease);
        }
    }
    let tier = |i: usize| s.node.get(ids[i]).unwrap().0.tier;
    // 6 MiB over RAM's 4 MiB high watermark, down to 2 MiB: four go to disk.
    assert_eq!(s.node.spill_to_low_watermark(Tier::Ram).await, 4);
    let on = |t: Tier| (0..6).filter(|i| tier(*i) == t).collect::<Vec<_>>();
    assert_eq!(on(Tier::Ram), vec![2, 4], "the two most recently leased stay in RAM");
    assert_eq!(on(Tier::Disk), vec![0, 1, 3, 5]);
    // 4 MiB over disk's 3 MiB high watermark, down to 1.5 MiB: three go on.
    assert_eq!(s.node.spill_to_low_watermark(Tier::Disk).await, 3);
    assert_eq!(on(Tier::Object), vec![1, 3, 5], "least recently leased first");
    assert_eq!(on(Tier::Disk), vec![0]);
    // A lease taken during the cascade kept its payload where it was read.
    assert_eq!(tier(4), Tier::Ram);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            s.read(*id).await.1,
            pattern(MIB as usize, i as u8),
            "payload {i} reads whole"
        );
    }
    s.node.release(reader.unwrap().lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_makes_room_in_the_block_cache_for_its_staged_copy() {
    let Some(s) = setup_with_cache(Capacity::default(), NodeConfig::default(), 10 * MIB).await else {
        return;
    };
    let cache = &s.node.object().unwrap().cache;
    let a = pattern(8 * MIB as usize, 1);
    let a_id = put_on(&s.node, Tier::Ram, &a).await;
    s.node.relocate(a_id, Tier::Object, false, false).await.unwrap();
    assert_eq!(s.read(a_id).await.1, a);
    assert_eq!(cache.usage(), (8 * MIB, 10 * MIB), "a's read filled the cache");
    let b = pattern(6 * MIB as usize, 2);
    let b_id = payload_catalog::PayloadId::random();
    s.s3.client()
        .await
        .put_object()
        .bucket(&s.bucket)
        .key(format!("{PREFIX}/uploads/{b_id}"))
        .body(b.clone().into())
        .send()
        .await
        .unwrap();
    s.node.import(b_id, 0).await.unwrap();
    let (used, capacity) = cache.usage();
    assert!(used <= capacity, "the staged copy made room: {used} of {capacity}");
    assert!(
        cache.is_complete(b_id) && !cache.is_complete(a_id),
        "a's blocks were evicted for b's"
    );
    assert_eq!(s.read(b_id).await, (Tier::Object, b));
    assert_eq!(s.read(a_id).await, (Tier::Object, a), "a reads whole again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_no_longer_matches_its_digest_is_never_made_authoritative() {
    use std::os::unix::fs::PermissionsExt;
    let Some(s) = setup(Capacity::default(), NodeConfig::default()).await else {
        return;
    };
    let bytes = noise(5 * MIB as usize, 11);
    let rec = s
        .node
        .allocate(AllocateRequest::new(bytes.len() as u64, Tier::Disk))
        .await
        .unwrap();
    let path = s.node.store(Tier::Disk).unwrap().path(rec.id);
    std::fs::write(&path, &bytes).unwrap();
    let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &bytes)).into();
    s.node.commit(rec.id, Some(digest), false, false).await.unwrap();
    // Bit rot on the disk copy.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut rotten = bytes.clone();
    rotten[MIB as usize] ^= 1;
    std::fs::write(&path, &rotten).unwrap();
    let err = s.node.relocate(rec.id, Tier::Object, false, false).await.unwrap_err();
    assert!(matches!(err, payload_agent::error::AgentError::Integrity(_)), "{err}");
    assert_eq!(
        s.node.get(rec.id).unwrap().0.tier,
        Tier::Disk,
        "the payload stays where it was"
    );
    assert!(
        s.keys("manifests/").await.is_empty(),
        "no manifest names the rotten blocks"
    );
    assert!(
        s.node.repo().node_manifests().await.unwrap().is_empty(),
        "the claim was released"
    );
}
