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
    assert_eq!(s3.keys(&bucket, "crash/blocks/").await.len(), 6);
    assert_eq!(s3.keys(&bucket, "crash/manifests/").await.len(), 1);
    assert_served(&client, &[acked]).await;
    assert_no_orphans(&dirs, &client).await;
    agent.kill9();
}
