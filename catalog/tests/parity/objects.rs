//! The object tier's rows: copies on payload rows, manifests, block
//! reference counts and the two-step collection.

use payload_catalog::*;

use super::{insert, parity, record, Backend};

fn manifest(blocks: &[u8]) -> Manifest {
    let block = |b: u8| [b; 32];
    Manifest {
        payload: PayloadId::random(),
        size_bytes: blocks.len() as u64 * BLOCK_SIZE - 1,
        sha256: [9; 32],
        block_size: BLOCK_SIZE,
        blocks: blocks.iter().map(|b| block(*b)).collect(),
    }
}

async fn copies_round_trip_on_payload_rows(b: Backend) {
    let repo = &*b.repo;
    let mut rec = record(1, Tier::Ram, &[]);
    rec.copies = vec![CopyRecord {
        tier: Tier::Object,
        verified: true,
    }];
    insert(repo, std::slice::from_ref(&rec)).await;
    let got = repo.get_payload(rec.id).await.unwrap().unwrap();
    assert_eq!(got.copies, rec.copies);
    assert!(got.in_object_store());
    rec.copies.clear();
    repo.write_batch(&[Write::Update(rec.clone())]).await.unwrap();
    assert!(repo.get_payload(rec.id).await.unwrap().unwrap().copies.is_empty());
}

async fn shared_blocks_are_counted_once_per_manifest_and_collected_at_zero(b: Backend) {
    let repo = &*b.repo;
    // Block 1 appears twice in the first manifest: one reference.
    let first = manifest(&[1, 2, 1]);
    let second = manifest(&[2, 3]);
    let states = repo.claim_manifest(&first, 10).await.unwrap();
    assert_eq!(states.iter().map(|s| s.hash[0]).collect::<Vec<_>>(), vec![1, 2]);
    assert!(states.iter().all(|s| !s.stored && !s.deleting));
    repo.mark_blocks_stored(&[[1; 32], [2; 32]]).await.unwrap();
    // Claiming the same manifest again (a resumed upload) takes nothing more.
    assert!(repo.claim_manifest(&first, 11).await.unwrap().iter().all(|s| s.stored));
    let states = repo.claim_manifest(&second, 12).await.unwrap();
    assert_eq!(
        states.iter().map(|s| (s.hash[0], s.stored)).collect::<Vec<_>>(),
        vec![(2, true), (3, false)],
        "a block another manifest stored is not uploaded again"
    );
    let pending = |all: Vec<(PayloadId, bool)>| {
        let mut ids: Vec<_> = all
            .into_iter()
            .filter(|(_, complete)| !complete)
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        ids
    };
    let mut both = vec![first.payload, second.payload];
    both.sort();
    assert_eq!(pending(repo.node_manifests().await.unwrap()), both);
    repo.complete_manifest(first.payload).await.unwrap();
    assert_eq!(pending(repo.node_manifests().await.unwrap()), vec![second.payload]);
    let (got, complete) = repo.get_manifest(first.payload).await.unwrap().unwrap();
    assert_eq!((got, complete), (first.clone(), true));
    assert!(matches!(
        repo.claim_manifest(
            &Manifest {
                blocks: vec![[7; 32]],
                ..first.clone()
            },
            13
        )
        .await,
        Err(CatalogError::Conflict(_))
    ));

    // Dropping the first manifest frees block 1 only; a replay is harmless.
    let release = Write::ReleaseManifest {
        id: first.payload,
        now_ms: 100,
    };
    repo.write_batch(std::slice::from_ref(&release)).await.unwrap();
    repo.write_batch(&[release]).await.unwrap();
    let stats = repo.block_stats().await.unwrap();
    assert_eq!((stats.blocks, stats.unreferenced), (3, 1));
    assert!(
        repo.gc_begin(99, 10).await.unwrap().is_empty(),
        "inside the grace period"
    );
    let doomed = repo.gc_begin(100, 10).await.unwrap();
    assert_eq!(doomed, vec![[1; 32]]);
    repo.gc_finish(&doomed).await.unwrap();
    let stats = repo.block_stats().await.unwrap();
    assert_eq!((stats.blocks, stats.unreferenced), (2, 0));
}

async fn a_block_claimed_during_a_collection_is_uploaded_again(b: Backend) {
    let repo = &*b.repo;
    let first = manifest(&[5]);
    repo.claim_manifest(&first, 1).await.unwrap();
    repo.mark_blocks_stored(&[[5; 32]]).await.unwrap();
    repo.write_batch(&[Write::ReleaseManifest {
        id: first.payload,
        now_ms: 2,
    }])
    .await
    .unwrap();
    let doomed = repo.gc_begin(2, 10).await.unwrap();
    assert_eq!(doomed, vec![[5; 32]]);
    // Another payload with the same bytes claims the block mid-collection.
    let second = manifest(&[5]);
    let states = repo.claim_manifest(&second, 3).await.unwrap();
    assert!(states[0].deleting, "the uploader learns the block is being deleted");
    repo.mark_blocks_stored(&[[5; 32]]).await.unwrap();
    assert!(
        repo.claim_manifest(&second, 3).await.unwrap()[0].deleting,
        "marking a block stored mid-collection does not count"
    );
    repo.gc_finish(&doomed).await.unwrap();
    let states = repo.claim_manifest(&second, 4).await.unwrap();
    assert_eq!((states[0].stored, states[0].deleting), (false, false));
    assert_eq!(repo.block_stats().await.unwrap().blocks, 1, "the claimed row stays");
}

async fn a_node_releases_only_its_own_manifests(b: Backend) {
    let (ours, theirs) = (&*b.repo, b.open("other").await);
    let m = manifest(&[8]);
    theirs.claim_manifest(&m, 1).await.unwrap();
    ours.write_batch(&[Write::ReleaseManifest {
        id: m.payload,
        now_ms: 2,
    }])
    .await
    .unwrap();
    assert!(
        ours.get_manifest(m.payload).await.unwrap().is_some(),
        "another node's manifest stays"
    );
    assert!(ours.node_manifests().await.unwrap().is_empty());
    assert_eq!(theirs.node_manifests().await.unwrap(), vec![(m.payload, false)]);
    assert_eq!(ours.block_stats().await.unwrap().unreferenced, 0);
    // Nor is it this node's to share: its references are the other's.
    assert!(matches!(
        ours.claim_manifest(&m, 3).await,
        Err(CatalogError::Conflict(_))
    ));
}

async fn one_collection_at_a_time_across_nodes(b: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let other = b.open("other").await;
    let held = b.repo.gc_lock().await.unwrap();
    let taken = Arc::new(AtomicBool::new(false));
    let waiter = tokio::spawn({
        let taken = taken.clone();
        async move {
            let lock = other.gc_lock().await.unwrap();
            taken.store(true, Ordering::SeqCst);
            drop(lock);
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!taken.load(Ordering::SeqCst), "a second collector waits for the first");
    drop(held);
    waiter.await.unwrap();
    assert!(taken.load(Ordering::SeqCst));
    // And the lock can be taken again once both are done.
    drop(b.repo.gc_lock().await.unwrap());
}

parity!(
    a_node_releases_only_its_own_manifests,
    one_collection_at_a_time_across_nodes,
    copies_round_trip_on_payload_rows,
    shared_blocks_are_counted_once_per_manifest_and_collected_at_zero,
    a_block_claimed_during_a_collection_is_uploaded_again,
);
