//! The object tier under faults: an S3 server that times out, answers 503,
//! resets connections and cuts reads short (every third call), and an agent
//! process aborted in the middle of an upload. Nothing acknowledged is lost
//! and every transfer that reports success moved the right bytes.

#![cfg(feature = "failpoints")]

mod common;

use std::time::Duration;

use common::process::*;
use common::s3::server;
use common::*;
use payload_client::Tier;
use payload_proto::core as pb;
use payload_proto::runtime;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_read_and_promote_succeed_through_timeouts_503s_resets_and_short_reads() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let store = format!("s3://{bucket}/faults");
    let (agent, client) = Agent::start_env(&dirs, &["--object-store", &store], &[("PM_OBJECT_FAULTS", "3")])
        .await
        .unwrap_or_else(|log| panic!("agent did not start: {log}"));
    let bytes = noise(9 * MIB as usize + 3, 5);
    let acked = put(&client, &bytes, Tier::Ram).await.unwrap();
    let id = acked.0;
    let desc = client.spill(id, Some(Tier::Object), false).await.unwrap();
    assert_eq!(desc.tier, Tier::Object as i32);
    assert_served(&client, std::slice::from_ref(&acked)).await;
    client.promote(id, Tier::Ram).await.unwrap();
    assert_served(&client, &[acked]).await;
    let log = dirs.read_log();
    for kind in ["timeout", "503", "reset"] {
        assert!(
            log.contains(&format!("injected a fault: {kind}")),
            "no {kind} was injected"
        );
    }
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_aborted_mid_upload_keeps_the_payload_and_the_retried_spill_sends_only_what_is_missing() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let store = format!("s3://{bucket}/crash");
    // One block at a time, so the abort after the third leaves three.
    let flags = ["--object-store", store.as_str(), "--object-concurrency", "1"];
    let (agent, client) = Agent::start_env(&dirs, &flags, &[("PM_FAILPOINT", "after-block-upload:3")])
        .await
        .unwrap_or_else(|log| panic!("agent did not start: {log}"));
    let bytes = noise(24 * MIB as usize, 8);
    let acked = put(&client, &bytes, Tier::Ram).await.unwrap();
    let id = acked.0;
    assert!(client.spill(id, Some(Tier::Object), false).await.is_err());
    drop(client);
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some_and(|s| !s.success()));
    let landed = s3.keys(&bucket, "crash/blocks/").await.len();
    assert_eq!(landed, 3, "the upload was cut short after three of six blocks");
    assert!(s3.keys(&bucket, "crash/manifests/").await.is_empty());

    let (agent, client) = Agent::start_with(&dirs, &flags).await;
    assert_served(&client, std::slice::from_ref(&acked)).await;
    let stat = client.stat(id).await.unwrap();
    assert_eq!(
        stat.payload.unwrap().tier,
        Tier::Ram as i32,
        "the payload never left RAM"
    );
    // The client releases the check's lease in the background.
    eventually("the read lease is released", || async {
        client.stats().await.unwrap().active_leases == 0
    })
    .await;
    let desc = client.spill(id, Some(Tier::Object), false).await.unwrap();
    assert_eq!(desc.tier, Tier::Object as i32);
    let stats = client.stats().await.unwrap();
    // The abort came after the third block landed but before it was
    // recorded: that one is sent again, the two recorded ones are not.
    assert_eq!(
        stats.object_puts, 5,
        "the retry sent the four unrecorded blocks and the manifest, nothing more"
    );
    assert!(
        (16 * MIB..16 * MIB + (64 << 10)).contains(&stats.object_put_bytes),
        "four blocks and a manifest: {} bytes",
        stats.object_put_bytes
    );
    assert_eq!(s3.keys(&bucket, "crash/blocks/").await.len(), 6);
    assert_eq!(s3.keys(&bucket, "crash/manifests/").await.len(), 1);
    assert_served(&client, &[acked]).await;
    assert_no_orphans(&dirs, &client).await;
    agent.kill9();
}

/// An agent on the object store `s3://<bucket>/<prefix>`, aborting at
/// `point` when one is given.
async fn object_agent(dirs: &Dirs, url: &str, point: Option<&str>) -> (Agent, payload_client::Client) {
    let flags = ["--object-store", url, "--object-gc-grace-ms", "1"];
    let env: Vec<(&str, &str)> = point.map(|p| ("PM_FAILPOINT", p)).into_iter().collect();
    Agent::start_env(dirs, &flags, &env)
        .await
        .unwrap_or_else(|log| panic!("agent did not start: {log}"))
}

async fn aborted(agent: Agent, dirs: &Dirs, point: &str) {
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some_and(|s| !s.success()));
    assert!(
        dirs.read_log().contains(&format!("failpoint {point}")),
        "never reached {point}"
    );
}

async fn no_leases(client: &payload_client::Client) {
    eventually("read leases are released", || async {
        client.stats().await.unwrap().active_leases == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_aborted_after_the_manifest_put_keeps_the_payload_and_spills_again_without_uploading() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs, url) = (Dirs::new(), format!("s3://{bucket}/m"));
    let (agent, client) = object_agent(&dirs, &url, Some("after-manifest-put")).await;
    let acked = put(&client, &noise(9 * MIB as usize, 1), Tier::Ram).await.unwrap();
    assert!(client.spill(acked.0, Some(Tier::Object), false).await.is_err());
    drop(client);
    aborted(agent, &dirs, "after-manifest-put").await;

    let (agent, client) = object_agent(&dirs, &url, None).await;
    assert_served(&client, std::slice::from_ref(&acked)).await;
    assert_eq!(
        client.stat(acked.0).await.unwrap().payload.unwrap().tier,
        Tier::Ram as i32
    );
    no_leases(&client).await;
    client.spill(acked.0, Some(Tier::Object), false).await.unwrap();
    assert_eq!(
        client.stats().await.unwrap().object_puts,
        1,
        "every block was stored already: only the manifest is put again"
    );
    assert_eq!(s3.keys(&bucket, "m/blocks/").await.len(), 3);
    assert_served(&client, &[acked]).await;
    assert_no_orphans(&dirs, &client).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_aborted_mid_collection_loses_no_block_a_manifest_names_and_finishes_it_later() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs, url) = (Dirs::new(), format!("s3://{bucket}/gc"));
    let (agent, client) = object_agent(&dirs, &url, Some("gc-after-delete")).await;
    // Two payloads sharing their first 8 MiB (two blocks).
    let shared = noise(8 * MIB as usize, 2);
    let kept = put(&client, &[shared.clone(), noise(MIB as usize, 3)].concat(), Tier::Ram)
        .await
        .unwrap();
    let gone = put(&client, &[shared, noise(MIB as usize, 4)].concat(), Tier::Ram)
        .await
        .unwrap();
    for id in [kept.0, gone.0] {
        client.spill(id, Some(Tier::Object), false).await.unwrap();
    }
    assert_eq!(s3.keys(&bucket, "gc/blocks/").await.len(), 4);
    client.delete(gone.0, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        client.collect_garbage(0).await.is_err(),
        "the agent aborts mid-collection"
    );
    drop(client);
    aborted(agent, &dirs, "gc-after-delete").await;

    let (agent, client) = object_agent(&dirs, &url, None).await;
    assert_eq!(
        s3.keys(&bucket, "gc/blocks/").await.len(),
        3,
        "only the deleted payload's own block went"
    );
    assert_served(&client, &[kept]).await;
    client.collect_garbage(0).await.unwrap();
    assert_eq!(
        client.stats().await.unwrap().object_unreferenced_blocks,
        0,
        "the collection finished"
    );
    assert_eq!(s3.keys(&bucket, "gc/blocks/").await.len(), 3);
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_aborted_mid_promote_keeps_the_object_copy_and_leaves_no_region() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs, url) = (Dirs::new(), format!("s3://{bucket}/p"));
    let (agent, client) = object_agent(&dirs, &url, Some("after-download")).await;
    let acked = put(&client, &noise(6 * MIB as usize, 5), Tier::Ram).await.unwrap();
    client.spill(acked.0, Some(Tier::Object), false).await.unwrap();
    assert!(client.promote(acked.0, Tier::Disk).await.is_err());
    drop(client);
    aborted(agent, &dirs, "after-download").await;

    let (agent, client) = object_agent(&dirs, &url, None).await;
    assert_eq!(
        client.stat(acked.0).await.unwrap().payload.unwrap().tier,
        Tier::Object as i32
    );
    assert_no_orphans(&dirs, &client).await;
    assert_served(&client, std::slice::from_ref(&acked)).await;
    client.promote(acked.0, Tier::Disk).await.unwrap();
    assert_served(&client, &[acked]).await;
    assert_no_orphans(&dirs, &client).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ram_payload_with_an_object_copy_survives_losing_its_ram_copy() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs, url) = (Dirs::new(), format!("s3://{bucket}/reboot"));
    let (agent, client) = object_agent(&dirs, &url, None).await;
    let opts = payload_client::PutOptions {
        object_durable: true,
        ..Default::default()
    };
    let acked = put_opts(&client, &noise(5 * MIB as usize, 6), &opts).await.unwrap();
    agent.kill9();
    // What a reboot does to /dev/shm, and to the keeper of sealed payloads.
    kill_keeper(&dirs);
    for name in Dirs::files_in(dirs.ram.path()) {
        std::fs::remove_file(dirs.ram.path().join(name)).unwrap();
    }
    let (agent, client) = object_agent(&dirs, &url, None).await;
    let stat = client.stat(acked.0).await.unwrap().payload.unwrap();
    assert_eq!(stat.tier, Tier::Object as i32, "read from its object copy now");
    assert_served(&client, &[acked]).await;
    assert_no_orphans(&dirs, &client).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_aborted_between_an_object_durable_upload_and_its_commit_leaks_no_manifest() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs, url) = (Dirs::new(), format!("s3://{bucket}/d"));
    let (agent, client) = object_agent(&dirs, &url, Some("after-upload")).await;
    let kept = put(&client, &noise(5 * MIB as usize, 3), Tier::Disk).await.unwrap();
    let opts = payload_client::PutOptions {
        object_durable: true,
        ..Default::default()
    };
    assert!(put_opts(&client, &noise(9 * MIB as usize, 2), &opts).await.is_err());
    drop(client);
    aborted(agent, &dirs, "after-upload").await;
    assert_eq!(s3.keys(&bucket, "d/manifests/").await.len(), 1, "the upload finished");

    let (agent, client) = object_agent(&dirs, &url, None).await;
    let stats = client.stats().await.unwrap();
    assert_eq!(
        (stats.object_blocks, stats.object_unreferenced_blocks),
        (3, 3),
        "the commit that was never acknowledged holds no block"
    );
    assert!(s3.keys(&bucket, "d/manifests/").await.is_empty());
    eventually("the released blocks are collected", || async {
        client.collect_garbage(1).await.unwrap();
        s3.keys(&bucket, "d/blocks/").await.is_empty()
    })
    .await;
    assert_served(&client, &[kept]).await;
    assert_no_orphans(&dirs, &client).await;
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_aborted_mid_import_keeps_the_upload_and_the_retried_import_sends_only_the_manifest() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs, url) = (Dirs::new(), format!("s3://{bucket}/i"));
    let bytes = noise(9 * MIB as usize, 4);
    let id = uuid::Uuid::new_v4();
    s3.client()
        .await
        .put_object()
        .bucket(&bucket)
        .key(format!("i/uploads/{id}"))
        .body(bytes.clone().into())
        .send()
        .await
        .unwrap();
    let (agent, client) = object_agent(&dirs, &url, Some("after-upload")).await;
    assert!(client.import(id, 0).await.is_err());
    drop(client);
    aborted(agent, &dirs, "after-upload").await;
    assert_eq!(s3.keys(&bucket, "i/uploads/").await.len(), 1, "the upload is kept");

    let (agent, client) = object_agent(&dirs, &url, None).await;
    assert!(
        s3.keys(&bucket, "i/manifests/").await.is_empty(),
        "the unused manifest was released"
    );
    let desc = client.import(id, 0).await.unwrap();
    assert_eq!(desc.tier, Tier::Object as i32);
    assert_eq!(
        client.stats().await.unwrap().object_puts,
        1,
        "the blocks were stored already: only the manifest is put"
    );
    assert!(
        s3.keys(&bucket, "i/uploads/").await.is_empty(),
        "the adopted upload is removed"
    );
    let lease = client.get(id).await.unwrap();
    assert_eq!(lease.bytes(), &bytes[..]);
    drop(lease);
    agent.kill9();
}

/// An import cut short after its upload completed leaves a complete
/// manifest for the still-ALLOCATED payload (start-up keeps it: the row is
/// on the object tier). The client uploads again — other bytes of the same
/// size, as it may before the payload is committed — and imports: the
/// payload must be the bytes imported, on every tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimport_after_a_crash_is_the_bytes_uploaded_the_second_time() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let (dirs, url) = (Dirs::new(), format!("s3://{bucket}/ri"));
    let (agent, client) = object_agent(&dirs, &url, Some("after-upload")).await;
    let size = 6 * MIB as usize;
    let (first, second) = (noise(size, 1), noise(size, 2));
    let (_, mut catalog, _) = client.raw();
    let desc = catalog
        .allocate_payload(runtime::AllocatePayloadRequest {
            size_bytes: size as u64,
            preferred_tier: pb::Tier::Object as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .payload_descriptor
        .unwrap();
    let id = payload_client::descriptor_id(&desc).unwrap();
    let bucket_name = bucket.as_str();
    let upload = |body: Vec<u8>| async move {
        s3.client()
            .await
            .put_object()
            .bucket(bucket_name)
            .key(format!("ri/uploads/{id}"))
            .body(body.into())
            .send()
            .await
            .unwrap();
    };
    upload(first.clone()).await;
    assert!(client.import(id, 0).await.is_err(), "the agent aborted");
    drop((client, catalog));
    aborted(agent, &dirs, "after-upload").await;

    let (agent, client) = object_agent(&dirs, &url, None).await;
    let stat = client.stat(id).await.unwrap().payload.unwrap();
    assert_eq!(stat.tier, Tier::Object as i32, "still allocated on the object tier");
    upload(second.clone()).await;
    let imported = client.import(id, 0).await.unwrap();
    let lease_bytes = client.get(id).await.unwrap().bytes().to_vec();
    let want = Sha256::digest(&second).to_vec();
    assert_eq!(
        Sha256::digest(&lease_bytes).to_vec(),
        want,
        "the lease reads the second upload"
    );
    client.promote(id, Tier::Ram).await.unwrap();
    let promoted = client.get(id).await.unwrap().bytes().to_vec();
    assert_eq!(Sha256::digest(&promoted).to_vec(), want, "the promoted copy too");
    assert_eq!(imported.sha256, want, "and the recorded digest");
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_on_another_object_store_than_its_catalog_knows() {
    let Some(s3) = server() else { return };
    let bucket = s3.bucket().await;
    let dirs = Dirs::new();
    let (agent, _client) = object_agent(&dirs, &format!("s3://{bucket}/one"), None).await;
    agent.kill9();
    let other = format!("s3://{bucket}/two");
    let refused = Agent::refused(&dirs, &["--object-store", &other]);
    assert!(
        refused.contains(&format!("start with --object-store s3://{bucket}/one")),
        "{refused}"
    );
    let missing = Agent::refused(&Dirs::new(), &["--object-store", "s3://no-such-bucket-pm/x"]);
    assert!(
        missing.contains("does not exist"),
        "a missing bucket is named: {missing}"
    );
}
