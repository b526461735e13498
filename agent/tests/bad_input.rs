//! Bad input over the real socket: each gets the right status and a message
//! that says what to do, and nothing already committed changes.

mod common;

use common::*;
use payload_agent::error::AgentError;
use payload_agent::node::{AllocateRequest, NodeConfig};
use payload_catalog::Tier;
use payload_proto::core::{self as pb, Tier as PbTier};
use payload_proto::runtime;
use sha2::{Digest, Sha256};
use tonic::Code;

fn id(bytes: &[u8]) -> Option<pb::PayloadId> {
    Some(pb::PayloadId { value: bytes.to_vec() })
}

#[tokio::test]
async fn each_bad_request_gets_a_precise_status_and_stored_bytes_stay_intact() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let keep = pattern(10_000, 42);
    let kept = served.client.put(&keep).await.unwrap();
    let (mut data, mut catalog, _) = served.client.raw();
    let unknown = uuid::Uuid::new_v4();
    let alloc = |size, tier: i32| runtime::AllocatePayloadRequest {
        size_bytes: size,
        preferred_tier: tier,
        ..Default::default()
    };

    let pending = served.client.allocate_with(16, &Default::default()).await.unwrap();
    let pending_id = id(pending.id().as_bytes());
    drop(pending);

    let cases: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![
        (
            "short id",
            Code::InvalidArgument,
            data.resolve_snapshot(runtime::ResolveSnapshotRequest { id: id(b"abc") })
                .await
                .map(drop),
        ),
        (
            "missing id",
            Code::InvalidArgument,
            data.resolve_snapshot(runtime::ResolveSnapshotRequest { id: None })
                .await
                .map(drop),
        ),
        (
            "unknown id",
            Code::NotFound,
            data.resolve_snapshot(runtime::ResolveSnapshotRequest {
                id: id(unknown.as_bytes()),
            })
            .await
            .map(drop),
        ),
        (
            "zero size",
            Code::InvalidArgument,
            catalog.allocate_payload(alloc(0, PbTier::Ram as i32)).await.map(drop),
        ),
        (
            "huge size",
            Code::InvalidArgument,
            catalog
                .allocate_payload(alloc(1 << 50, PbTier::Ram as i32))
                .await
                .map(drop),
        ),
        (
            "unspecified tier",
            Code::InvalidArgument,
            catalog.allocate_payload(alloc(10, 0)).await.map(drop),
        ),
        (
            "unknown tier",
            Code::InvalidArgument,
            catalog.allocate_payload(alloc(10, 42)).await.map(drop),
        ),
        (
            "unconfigured tier",
            Code::FailedPrecondition,
            catalog.allocate_payload(alloc(10, PbTier::Gpu as i32)).await.map(drop),
        ),
        (
            "void tier",
            Code::InvalidArgument,
            catalog.allocate_payload(alloc(10, PbTier::Void as i32)).await.map(drop),
        ),
        (
            "lease on uncommitted",
            Code::FailedPrecondition,
            data.acquire_read_lease(runtime::AcquireReadLeaseRequest {
                id: pending_id.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "commit twice",
            Code::FailedPrecondition,
            catalog
                .commit_payload(runtime::CommitPayloadRequest {
                    id: id(kept.as_bytes()),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "bad digest length",
            Code::InvalidArgument,
            catalog
                .commit_payload(runtime::CommitPayloadRequest {
                    id: pending_id.clone(),
                    expected_sha256: vec![1, 2, 3],
                    sync: false,
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "wrong digest",
            Code::InvalidArgument,
            catalog
                .commit_payload(runtime::CommitPayloadRequest {
                    id: pending_id.clone(),
                    expected_sha256: vec![0; 32],
                    sync: false,
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "lease mode",
            Code::FailedPrecondition,
            data.acquire_read_lease(runtime::AcquireReadLeaseRequest {
                id: id(kept.as_bytes()),
                mode: 7,
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "short lease id",
            Code::InvalidArgument,
            data.release_lease(runtime::ReleaseLeaseRequest {
                lease_id: Some(pb::LeaseId { value: vec![1] }),
            })
            .await
            .map(drop),
        ),
        (
            "unknown lease release is idempotent",
            Code::Ok,
            data.release_lease(runtime::ReleaseLeaseRequest {
                lease_id: Some(pb::LeaseId {
                    value: unknown.as_bytes().to_vec(),
                }),
            })
            .await
            .map(drop),
        ),
        (
            "renew unknown lease",
            Code::NotFound,
            data.renew_lease(runtime::RenewLeaseRequest {
                lease_id: Some(pb::LeaseId {
                    value: unknown.as_bytes().to_vec(),
                }),
                extend_ms: 0,
            })
            .await
            .map(drop),
        ),
        (
            "promote to slower tier",
            Code::FailedPrecondition,
            catalog
                .promote(runtime::PromoteRequest {
                    id: id(kept.as_bytes()),
                    target_tier: PbTier::Disk as i32,
                    policy: 0,
                })
                .await
                .map(drop),
        ),
        (
            "promote uncommitted",
            Code::FailedPrecondition,
            catalog
                .promote(runtime::PromoteRequest {
                    id: pending_id.clone(),
                    target_tier: PbTier::Disk as i32,
                    policy: 0,
                })
                .await
                .map(drop),
        ),
        (
            "garbage page token",
            Code::InvalidArgument,
            catalog
                .list_payloads(runtime::ListPayloadsRequest {
                    page_token: "7".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "bad label selector",
            Code::InvalidArgument,
            catalog
                .list_payloads(runtime::ListPayloadsRequest {
                    label_selector: "novalue".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
    ];
    for (what, want, got) in cases {
        let code = got.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        assert_eq!(code, want, "{what}: {got:?}");
        if let Err(status) = got {
            assert!(
                status.message().len() > 15,
                "{what}: message should explain: {:?}",
                status.message()
            );
        }
    }

    let spill = catalog
        .spill(runtime::SpillRequest {
            ids: vec![
                pb::PayloadId { value: vec![9] },
                pb::PayloadId {
                    value: kept.as_bytes().to_vec(),
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !spill.results[0].ok && spill.results[0].error_message.contains("16"),
        "per-item failure: {:?}",
        spill.results[0]
    );
    assert!(
        spill.results[1].ok,
        "the valid item still spills: {:?}",
        spill.results[1]
    );

    let lease = served.client.get(kept).await.unwrap();
    assert_eq!(
        Sha256::digest(lease.bytes()),
        Sha256::digest(&keep),
        "the committed payload is untouched"
    );
    served.stop().await;
}

#[tokio::test]
async fn a_write_past_the_region_is_refused_at_commit() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let rec = node.allocate(AllocateRequest::new(100, Tier::Ram)).await.unwrap();
    std::fs::write(node.store(Tier::Ram).unwrap().path(rec.id), vec![1u8; 150]).unwrap();
    let err = node.commit(rec.id, None, false, false).await.unwrap_err();
    assert!(
        matches!(err, AgentError::InvalidArgument(ref m) if m.contains("past the region")),
        "{err:?}"
    );
    node.abort(rec.id).await.unwrap();
    assert!(!node.store(Tier::Ram).unwrap().path(rec.id).exists());
}

#[tokio::test]
async fn a_writer_that_disappears_is_aborted_at_its_deadline() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let mut req = AllocateRequest::new(4096, Tier::Disk);
    req.write_deadline_ms = 1_000;
    let rec = node.allocate(req).await.unwrap();
    node.sweep().await;
    assert!(node.get(rec.id).is_ok(), "still within its deadline");
    node.clock().advance(1_001);
    node.sweep().await;
    assert!(matches!(node.get(rec.id), Err(AgentError::NotFound(_))));
    assert!(!node.store(Tier::Disk).unwrap().path(rec.id).exists());
    assert_eq!(node.store(Tier::Disk).unwrap().used(), 0, "capacity returned");
}

#[tokio::test]
async fn ttl_expiry_removes_unleased_payloads_only() {
    let dirs = Dirs::new();
    let (node, _) = open_node(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let mut req = AllocateRequest::new(10, Tier::Ram);
    req.ttl_ms = 500;
    let a = node.allocate(req.clone()).await.unwrap().id;
    let b = node.allocate(req).await.unwrap().id;
    for id in [a, b] {
        node.commit(id, None, false, false).await.unwrap();
    }
    let lease = node.acquire(b, None, true, 60_000).await.unwrap();
    node.clock().advance(600);
    node.sweep().await;
    assert!(node.get(a).is_err(), "expired and unleased: removed");
    assert!(node.get(b).is_ok(), "expired but leased: kept until the lease ends");
    node.release(lease.lease);
    node.sweep().await;
    assert!(node.get(b).is_err());
}
