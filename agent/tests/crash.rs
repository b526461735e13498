//! Crash safety with real processes: the agent binary is killed with SIGKILL
//! during writes, commits and spills, then started again on the same state.
//! Every committed payload must come back with identical bytes, live leases
//! must still hold, half-written allocations must be gone, and no shm object
//! or file may be left without a catalog row.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::*;
use common::*;
use payload_client::{ClientError, PutOptions, Tier};
use payload_proto::core::PayloadState as pb_state;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_and_commits_loses_nothing_committed() {
    let dirs = Dirs::new();
    let (agent, client) = Agent::start(&dirs).await;
    let mut committed = Vec::new();
    for i in 0..20u8 {
        let tier = if i % 2 == 0 { Tier::Ram } else { Tier::Disk };
        let bytes = pattern(50_000 + i as usize * 1000, i);
        committed.push(put(&client, &bytes, tier).await.unwrap());
    }
    let leased = committed[0].0;
    let _lease = client
        .get_with(
            leased,
            payload_client::LeaseOptions {
                duration_ms: 60_000,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .detach();
    let mut half_written = Vec::new();
    for _ in 0..3 {
        let mut region = client.allocate_with(8192, &PutOptions::default()).await.unwrap();
        region.as_mut_slice()[..4096].fill(0xAB);
        half_written.push(region.id());
    }

    // A writer racing the kill: whatever it saw committed must survive.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = tokio::spawn({
        let (client, acked) = (client.clone(), acked.clone());
        async move {
            for i in 0u32.. {
                let bytes = pattern(20_000, i as u8);
                let tier = if i % 3 == 0 { Tier::Disk } else { Tier::Ram };
                match put(&client, &bytes, tier).await {
                    Ok(done) => acked.lock().unwrap().push(done),
                    Err(_) => return,
                }
            }
        }
    });
    while acked.lock().unwrap().len() < 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.kill9();
    let _ = writer.await;
    drop(client);

    let (agent, client) = Agent::start(&dirs).await;
    let acked = acked.lock().unwrap().clone();
    assert_served(&client, &committed).await;
    assert_served(&client, &acked).await;
    for id in half_written {
        assert!(
            matches!(client.stat(id).await, Err(ClientError::NotFound(_))),
            "half-written {id} must be dropped"
        );
    }
    let err = client.delete(leased, false).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Aborted(_)),
        "the journaled lease still holds: {err:?}"
    );
    let count = assert_no_orphans(&dirs, &client).await;
    assert!(count >= committed.len() + acked.len());
    agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_spills_leaves_exactly_one_valid_copy() {
    let dirs = Dirs::new();
    let (mut agent, mut client) = Agent::start(&dirs).await;
    let bytes = pattern(24 * MIB as usize, 77);
    let digest = Sha256::digest(&bytes);
    let id = client.put(&bytes).await.unwrap();
    // Kill at several points of successive spills and promotions.
    for round in 0..6u64 {
        let target = if round % 2 == 0 { Tier::Disk } else { Tier::Ram };
        let mover = tokio::spawn({
            let client = client.clone();
            async move {
                match target {
                    Tier::Disk => client.spill(id, Some(Tier::Disk), false).await.map(drop),
                    _ => client.promote(id, Tier::Ram).await.map(drop),
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(round * 7)).await;
        agent.kill9();
        match mover.await.unwrap() {
            // Finished before the kill, or cut off by it.
            Ok(()) | Err(ClientError::Unavailable(_)) | Err(ClientError::Other(_)) => {}
            Err(err) => panic!("round {round}: the move failed for another reason: {err}"),
        }
        drop(client);
        (agent, client) = Agent::start(&dirs).await;
        let lease = client.get(id).await.expect("the payload survives every crash");
        assert_eq!(Sha256::digest(lease.bytes()), digest, "round {round}");
        drop(lease);
        // Never left SPILLING: the payload still moves both ways.
        let state = client.stat(id).await.unwrap().payload.unwrap().state;
        assert!(
            [pb_state::Active as i32, pb_state::Durable as i32].contains(&state),
            "round {round}: state {state}"
        );
        assert_eq!(
            assert_no_orphans(&dirs, &client).await,
            1,
            "exactly one copy after round {round}"
        );
    }
    agent.kill9();
}

/// Two agents on one PostgreSQL catalog; one is killed mid-write and
/// restarted: it keeps every payload it acknowledged, and its recovery
/// touches none of the other node's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_on_a_shared_postgres_catalog_spares_the_other_node() {
    let Some(url) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let (dirs_a, dirs_b) = (Dirs::new(), Dirs::new());
    let flags = |node: &'static str| ["--catalog", url.as_str(), "--node-name", node];
    let (agent_a, a) = Agent::start_with(&dirs_a, &flags("a")).await;
    let (agent_b, b) = Agent::start_with(&dirs_b, &flags("b")).await;
    let mut on_b = Vec::new();
    for i in 0..10u8 {
        on_b.push(put(&b, &pattern(10_000, i), Tier::Ram).await.unwrap());
    }
    let mut half_written = Vec::new();
    for _ in 0..2 {
        half_written.push(a.allocate_with(4096, &PutOptions::default()).await.unwrap().id());
    }
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = tokio::spawn({
        let (client, acked) = (a.clone(), acked.clone());
        async move {
            for i in 0u32.. {
                let tier = if i % 2 == 0 { Tier::Ram } else { Tier::Disk };
                match put(&client, &pattern(20_000, i as u8), tier).await {
                    Ok(done) => acked.lock().unwrap().push(done),
                    Err(_) => return,
                }
            }
        }
    });
    while acked.lock().unwrap().len() < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent_a.kill9();
    let _ = writer.await;
    drop(a);

    let (agent_a, a) = Agent::start_with(&dirs_a, &flags("a")).await;
    let acked = acked.lock().unwrap().clone();
    assert_served(&a, &acked).await;
    for id in half_written {
        assert!(
            matches!(a.stat(id).await, Err(ClientError::NotFound(_))),
            "half-written {id} dropped"
        );
    }
    assert_no_orphans(&dirs_a, &a).await;
    assert_eq!(
        assert_no_orphans(&dirs_b, &b).await,
        on_b.len(),
        "node b's rows are all still there"
    );
    for (id, digest) in &on_b {
        assert_eq!(Sha256::digest(b.get(*id).await.unwrap().bytes()).to_vec(), *digest);
        // A knows whose it is, and does not serve it (no object-store copy).
        let stat = a.stat(*id).await.unwrap();
        assert_eq!(stat.payload.unwrap().node, "b");
        assert!(stat.payload_descriptor.unwrap().location.is_none());
        assert!(
            matches!(a.get(*id).await.map(drop), Err(ClientError::FailedPrecondition(m)) if m.contains("node b")),
            "a does not serve b's payloads"
        );
    }
    agent_a.kill9();
    agent_b.kill9();
}
