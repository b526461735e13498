//! Leases: expiry, renew, revocation on force delete, stability under spill
//! pressure, restoration after restart. Time moves by advancing the node's
//! clock, never by sleeping.

mod common;

use common::*;
use payload_agent::error::AgentError;
use payload_agent::node::{AllocateRequest, MoveOutcome, NodeConfig};
use payload_catalog::{PayloadId, Tier};

fn cfg() -> NodeConfig {
    NodeConfig {
        lease_default_ms: 1_000,
        lease_max_ms: 5_000,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_live_lease_blocks_spill_and_an_expired_one_lets_it_move() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
    let id = put_on(&node, Tier::Ram, &pattern(8192, 1)).await;
    let grant = node.acquire(id, None, true, 0).await.unwrap();
    assert!(
        grant.expires_ms - node.now_ms() <= 1_000,
        "the default duration applies"
    );
    let err = node.relocate(id, Tier::Disk, false, false).await.unwrap_err();
    assert!(matches!(err, AgentError::Conflict(_)), "{err:?}");
    node.clock().advance(1_001);
    let moved = node.relocate(id, Tier::Disk, false, false).await.unwrap();
    assert!(matches!(moved, MoveOutcome::Moved(ref r) if r.tier == Tier::Disk));
}

#[tokio::test]
async fn lease_duration_is_capped_at_the_maximum() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
    let id = put_on(&node, Tier::Ram, b"capped").await;
    let now = node.now_ms();
    let grant = node.acquire(id, None, true, 3_600_000).await.unwrap();
    assert!(grant.expires_ms <= now + 5_000 + 50, "capped at lease_max_ms");
}

#[tokio::test]
async fn renew_extends_a_lease_past_its_first_expiry() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
    let id = put_on(&node, Tier::Ram, b"renew me").await;
    let grant = node.acquire(id, None, true, 0).await.unwrap();
    node.clock().advance(800);
    node.renew(grant.lease, 2_000).unwrap();
    node.clock().advance(800);
    assert!(
        node.relocate(id, Tier::Disk, false, false).await.is_err(),
        "still leased after the first expiry"
    );
    node.clock().advance(1_300);
    let err = node.renew(grant.lease, 0).unwrap_err();
    assert!(
        matches!(err, AgentError::NotFound(_)),
        "expired leases cannot be renewed: {err:?}"
    );
}

#[tokio::test]
async fn force_delete_revokes_leases_and_renew_says_so() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
    let id = put_on(&node, Tier::Ram, b"doomed").await;
    let grant = node.acquire(id, None, true, 0).await.unwrap();
    let err = node.delete(id, false).await.unwrap_err();
    assert!(matches!(err, AgentError::Conflict(_)), "{err:?}");
    node.delete(id, true).await.unwrap();
    let err = node.renew(grant.lease, 0).unwrap_err();
    assert!(
        matches!(err, AgentError::InvalidState(ref m) if m.contains("revoked")),
        "{err:?}"
    );
    assert!(matches!(node.get(id), Err(AgentError::NotFound(_))));
    assert!(!node.store(Tier::Ram).unwrap().path(id).exists(), "bytes are gone");
    assert!(!node.release(grant.lease), "release after revocation is a no-op");
}

#[tokio::test]
async fn leased_payloads_stay_put_under_spill_pressure() {
    let dirs = Dirs::new();
    let cap = Capacity {
        ram: 8 * MIB,
        disk: 64 * MIB,
    };
    let (node, _) = open_node(&dirs, cfg(), &cap).await;
    let leased = put_on(&node, Tier::Ram, &pattern(MIB as usize, 9)).await;
    let grant = node.acquire(leased, None, true, 5_000).await.unwrap();
    // Fill RAM well past the high watermark: the spiller must skip the leased one.
    for i in 0..12 {
        put_on(&node, Tier::Ram, &pattern(MIB as usize, i)).await;
    }
    node.spill_to_low_watermark(Tier::Ram).await;
    let (rec, leases) = node.get(leased).unwrap();
    assert_eq!(rec.tier, Tier::Ram, "a leased copy is never moved");
    assert_eq!(leases, 1);
    let path = node.store(Tier::Ram).unwrap().path(leased);
    assert_eq!(std::fs::read(path).unwrap(), pattern(MIB as usize, 9));
    assert!(node.store(Tier::Ram).unwrap().used() <= 8 * MIB);
    assert!(!node.ids_on(Tier::Disk).is_empty(), "others were spilled");
    node.release(grant.lease);
}

#[tokio::test]
async fn live_leases_survive_a_restart_and_expired_ones_do_not() {
    let dirs = Dirs::new();
    let (long_lease, short_lease, id);
    {
        let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
        id = put_on(&node, Tier::Ram, b"survivor").await;
        long_lease = node.acquire(id, None, true, 5_000).await.unwrap().lease;
        short_lease = node.acquire(id, None, true, 100).await.unwrap().lease;
        node.flush().await.unwrap();
    }
    let restarted = cfg();
    restarted.clock.advance(1_000);
    let (node, report) = open_node(&dirs, restarted, &Capacity::default()).await;
    assert_eq!(report.leases_restored, 1, "{report:?}");
    assert_eq!(node.get(id).unwrap().1, 1);
    assert!(node.renew(long_lease, 0).is_ok());
    assert!(node.renew(short_lease, 0).is_err());
    assert!(matches!(
        node.relocate(id, Tier::Disk, false, false).await,
        Err(AgentError::Conflict(_))
    ));
}

#[tokio::test]
async fn batch_acquire_answers_each_item_in_order() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
    let a = put_on(&node, Tier::Ram, b"a").await;
    let uncommitted = node.allocate(AllocateRequest::new(1, Tier::Ram)).await.unwrap().id;
    let b = put_on(&node, Tier::Disk, b"b").await;
    let results = node.acquire_many(&[
        (a, None, 0),
        (uncommitted, None, 0),
        (b, Some(Tier::Ram), 0),
        (b, None, 0),
    ]);
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(AgentError::InvalidState(_))));
    assert!(
        matches!(results[2], Err(AgentError::InvalidState(_))),
        "batch never promotes"
    );
    assert_eq!(results[3].as_ref().unwrap().rec.id, b);
    let leases: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|g| g.lease))
        .collect();
    assert_eq!(node.lease_count(), 2);
    assert_eq!(node.release_many(&leases), 2);
    assert_eq!(node.lease_count(), 0);
}

#[tokio::test]
async fn blocking_lease_promotes_and_best_effort_fails_fast() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
    let id = put_on(&node, Tier::Disk, &pattern(4096, 5)).await;
    let err = node.acquire(id, Some(Tier::Ram), false, 0).await.unwrap_err();
    assert!(matches!(err, AgentError::InvalidState(_)), "{err:?}");
    let grant = node.acquire(id, Some(Tier::Ram), true, 0).await.unwrap();
    assert_eq!(grant.rec.tier, Tier::Ram);
    let path = node.store(Tier::Ram).unwrap().path(id);
    assert_eq!(std::fs::read(path).unwrap(), pattern(4096, 5));
}

#[tokio::test]
async fn a_timed_pin_blocks_spill_until_it_lapses() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, cfg(), &Capacity::default()).await;
    let id = put_on(&node, Tier::Ram, b"pinned").await;
    node.pin(id, 1_000).await.unwrap();
    let err = node.relocate(id, Tier::Disk, false, false).await.unwrap_err();
    assert!(
        matches!(err, AgentError::InvalidState(ref m) if m.contains("pinned")),
        "{err:?}"
    );
    node.clock().advance(1_001);
    assert!(matches!(
        node.relocate(id, Tier::Disk, false, false).await,
        Ok(MoveOutcome::Moved(_))
    ));
    node.unpin(PayloadId::random()).await.unwrap();
}

#[tokio::test]
async fn a_payload_at_its_lease_cap_refuses_more_until_one_is_released() {
    let dirs = Dirs::new();
    let mut config = cfg();
    config.limits.leases_per_payload = 3;
    let (node, _) = open_node(&dirs, config, &Capacity::default()).await;
    let id = put_on(&node, Tier::Ram, b"popular").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(node.acquire(id, None, true, 0).await.unwrap().lease);
    }
    let err = node.acquire(id, None, true, 0).await.unwrap_err();
    assert!(
        matches!(err, AgentError::ResourceExhausted(ref m) if m.contains("--max-leases-per-payload")),
        "{err:?}"
    );
    node.release(held.pop().unwrap());
    node.acquire(id, None, true, 0).await.unwrap();
}
