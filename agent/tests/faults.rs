//! Fault points: the agent process aborts at a named step (feature
//! `failpoints`, `PM_FAILPOINT=name`), is started again on the same state,
//! and must serve every payload it acknowledged with its bytes, forget every
//! delete it acknowledged, and leave no file without a row. (Capacity is
//! recounted at start-up; leaks within a running agent are checked by
//! `moves.rs` and the full-filesystem tests.)

#![cfg(feature = "failpoints")]

mod common;

use std::time::Duration;

use common::process::*;
use common::*;
use payload_client::{ClientError, LeaseOptions, Tier};
use uuid::Uuid;

/// What the workload was told happened.
#[derive(Default)]
struct Acked {
    payloads: Vec<(Uuid, Vec<u8>)>,
    deleted: Vec<Uuid>,
}

/// Puts, commits, spills, promotes, leases and deletes, stopping at the
/// first failure (the agent aborted).
async fn workload(client: &payload_client::Client, acked: &mut Acked) -> Result<(), ClientError> {
    for i in 0..6u8 {
        let tier = if i % 2 == 0 { Tier::Ram } else { Tier::Disk };
        acked.payloads.push(put(client, &pattern(64 << 10, i), tier).await?);
    }
    // Let the writer apply a batch, so points after the apply are reached.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.spill(acked.payloads[0].0, Some(Tier::Disk), false).await?;
    client.promote(acked.payloads[1].0, Tier::Ram).await?;
    let lease = client.get_with(acked.payloads[2].0, LeaseOptions::default()).await?;
    client.release(lease).await?;
    // Until the answer, the delete may or may not have happened.
    let (doomed, _) = acked.payloads.pop().unwrap();
    client.delete(doomed, false).await?;
    acked.deleted.push(doomed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    put(client, b"one more batch for the writer", Tier::Ram).await?;
    Ok(())
}

/// Takes a minute-long lease and keeps it past the client's life: a timed
/// one, journaled before it is granted (a session lease would end with
/// the connection, and an inline one is journaled only within 5 ms).
async fn hold_lease(client: &payload_client::Client, id: Uuid) -> Uuid {
    let opts = LeaseOptions {
        duration_ms: 60_000,
        timed: true,
        ..Default::default()
    };
    client.get_with(id, opts).await.unwrap().detach()
}

/// Runs the workload on an agent set to abort at `point`, restarts it,
/// and checks that nothing acknowledged is lost and nothing leaks.
async fn abort_at(point: &str) {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start_env(&dirs, &[], &[("PM_FAILPOINT", point)])
        .await
        .unwrap_or_else(|log| panic!("agent did not start: {log}"));
    let mut acked = Acked::default();
    let finished = workload(&client, &mut acked).await;
    drop(client);
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(
        finished.is_err() && status.is_some_and(|s| !s.success()),
        "the agent never reached fault point {point} (workload: {finished:?}, exit: {status:?})"
    );
    assert!(
        dirs.read_log().contains(&format!("failpoint {point}")),
        "{}",
        dirs.read_log()
    );

    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &acked.payloads).await;
    for id in &acked.deleted {
        assert!(
            matches!(client.stat(*id).await, Err(ClientError::NotFound(_))),
            "{point}: deleted {id} came back"
        );
    }
    let count = assert_no_orphans(&dirs, &client).await;
    assert!(count >= acked.payloads.len());
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_region_create() {
    abort_at("after-region-create").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_log_append() {
    abort_at("after-log-append").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_before_the_catalog_apply() {
    abort_at("writer-before-apply").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_the_catalog_apply() {
    abort_at("writer-applied").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_the_commit_is_logged() {
    abort_at("after-commit-log").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_copy() {
    abort_at("after-copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_switch() {
    abort_at("after-switch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_before_free() {
    abort_at("before-free").await;
}

/// The lease journal is rewritten at start-up: an abort between writing
/// the new file and renaming it keeps every lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_mid_journal_rewrite() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let kept = put(&client, &pattern(4096, 1), Tier::Ram).await.unwrap();
    let lease = hold_lease(&client, kept.0).await;
    agent.kill9();
    drop(client);
    let status = Agent::refused_env(&dirs, &[("PM_FAILPOINT", "mid-rewrite")]);
    assert!(status.contains("failpoint mid-rewrite"), "{status}");
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, std::slice::from_ref(&kept)).await;
    let err = client.delete(kept.0, false).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Aborted(_)),
        "lease {lease} still holds: {err:?}"
    );
    agent.kill9();
}

/// The journal is compacted by the sweeper once it holds 100,000 records
/// more than are live: an abort mid-compaction keeps every live lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_mid_compaction() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start_env(&dirs, &[], &[("PM_FAILPOINT", "mid-compaction")])
        .await
        .unwrap_or_else(|log| panic!("agent did not start: {log}"));
    let kept = put(&client, &pattern(4096, 1), Tier::Ram).await.unwrap();
    let held = hold_lease(&client, kept.0).await;
    let churn = put(&client, &pattern(4096, 2), Tier::Ram).await.unwrap();
    let (mut data, _, _) = client.raw();
    let item = payload_proto::runtime::AcquireReadLeaseRequest {
        id: Some(payload_proto::core::PayloadId {
            value: churn.0.as_bytes().to_vec(),
        }),
        ..Default::default()
    };
    // 60,000 grants and as many releases: a sweep compacts once there are
    // 100,000 records, maybe while this loop still runs (then a call fails
    // and the loop stops: the agent is gone).
    for _ in 0..6 {
        let batch = payload_proto::runtime::BatchAcquireReadLeaseRequest {
            requests: vec![item.clone(); 10_000],
        };
        let Ok(granted) = data.batch_acquire_read_lease(batch).await else {
            break;
        };
        let lease_ids = granted
            .into_inner()
            .results
            .into_iter()
            .filter_map(|r| r.lease.and_then(|l| l.lease_id))
            .collect();
        let release = payload_proto::runtime::BatchReleaseLeaseRequest { lease_ids };
        if data.batch_release_lease(release).await.is_err() {
            break;
        }
    }
    drop((data, client));
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the sweeper never compacted: {status:?}"
    );
    assert!(
        dirs.read_log().contains("failpoint mid-compaction"),
        "{}",
        dirs.read_log()
    );
    let (agent, client) = Agent::start(&dirs).await;
    assert_served(&client, &[kept.clone(), churn]).await;
    let err = client.delete(kept.0, false).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Aborted(_)),
        "lease {held} still holds: {err:?}"
    );
    agent.kill9();
}
