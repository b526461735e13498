//! Every input bound over the real socket: each request past a bound is
//! answered INVALID_ARGUMENT (or the status its kind calls for) with a
//! message naming the limit, before any work is done, and the agent keeps
//! answering good requests throughout.

mod common;

use std::collections::HashMap;

use common::*;
use payload_agent::node::NodeConfig;
use payload_proto::catalog as pbc;
use payload_proto::core::{self as pb, Tier as PbTier};
use payload_proto::runtime;
use tonic::Code;

fn id(uuid: uuid::Uuid) -> Option<pb::PayloadId> {
    Some(pb::PayloadId {
        value: uuid.as_bytes().to_vec(),
    })
}

fn stream(name: &str) -> Option<runtime::StreamId> {
    Some(runtime::StreamId {
        name: name.into(),
        namespace: String::new(),
    })
}

fn labels(n: usize, key: usize, value: usize) -> HashMap<String, String> {
    (0..n).map(|i| (format!("{i:0>key$}"), "v".repeat(value))).collect()
}

/// One case: what it is, the code it must get, a word its message must hold.
type Case = (&'static str, Code, &'static str, Result<(), tonic::Status>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bound_is_answered_precisely_and_the_agent_stays_responsive() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let client = &served.client;
    let kept = client.put(&pattern(4096, 1)).await.unwrap();
    let (mut data, mut catalog, _) = client.raw();
    let mut streams = client.streams();
    streams
        .create_stream(runtime::CreateStreamRequest {
            stream: stream("s"),
            ..Default::default()
        })
        .await
        .unwrap();
    let alloc = |labels: HashMap<String, String>| runtime::AllocatePayloadRequest {
        size_bytes: 16,
        preferred_tier: PbTier::Ram as i32,
        labels,
        ..Default::default()
    };
    let lease_item = runtime::AcquireReadLeaseRequest {
        id: id(kept),
        ..Default::default()
    };
    let edge = |operation: &str| pbc::LineageEdge {
        parent: id(kept),
        operation: operation.into(),
        ..Default::default()
    };
    let md = |data: usize, schema: &str| pbc::PayloadMetadata {
        id: id(kept),
        data: vec![b'x'; data],
        schema: schema.into(),
        version: 0,
    };

    let mut cases: Vec<Case> = Vec::new();
    macro_rules! case {
        ($what:expr, $code:expr, $word:expr, $call:expr) => {
            cases.push(($what, $code, $word, $call.await.map(drop)));
            // Responsive throughout: a good call right after each bad one.
            client.stats().await.expect("the agent still answers");
        };
    }
    case!(
        "150,000 batch leases",
        Code::InvalidArgument,
        "--max-batch-items",
        data.batch_acquire_read_lease(runtime::BatchAcquireReadLeaseRequest {
            requests: vec![lease_item.clone(); 150_000],
        })
    );
    case!(
        "10,001 batch releases",
        Code::InvalidArgument,
        "--max-batch-items",
        data.batch_release_lease(runtime::BatchReleaseLeaseRequest {
            lease_ids: vec![pb::LeaseId { value: vec![0; 16] }; 10_001],
        })
    );
    case!(
        "10,001 spills",
        Code::InvalidArgument,
        "--max-batch-items",
        catalog.spill(runtime::SpillRequest {
            ids: vec![id(kept).unwrap(); 10_001],
            ..Default::default()
        })
    );
    case!(
        "65 labels",
        Code::InvalidArgument,
        "--max-labels",
        catalog.allocate_payload(alloc(labels(65, 2, 1)))
    );
    case!(
        "a 257-byte label key",
        Code::InvalidArgument,
        "--max-label-key-bytes",
        catalog.allocate_payload(alloc(labels(1, 257, 1)))
    );
    case!(
        "a 2049-byte label value",
        Code::InvalidArgument,
        "--max-label-value-bytes",
        catalog.allocate_payload(alloc(labels(1, 2, 2049)))
    );
    case!(
        "a NUL in a label",
        Code::InvalidArgument,
        "NUL",
        catalog.allocate_payload(alloc([("k".to_string(), "a\0b".to_string())].into()))
    );
    case!(
        "a TTL of a century",
        Code::InvalidArgument,
        "--max-duration-ms",
        catalog.allocate_payload(runtime::AllocatePayloadRequest {
            ttl_ms: 100 * 365 * 86_400_000,
            ..alloc(HashMap::new())
        })
    );
    case!(
        "a write deadline past the agent's",
        Code::InvalidArgument,
        "--write-deadline-ms",
        catalog.allocate_payload(runtime::AllocatePayloadRequest {
            write_deadline_ms: u64::MAX,
            ..alloc(HashMap::new())
        })
    );
    case!(
        "priority 99",
        Code::InvalidArgument,
        "not a known value",
        catalog.allocate_payload(runtime::AllocatePayloadRequest {
            eviction_policy: Some(pb::EvictionPolicy {
                priority: 99,
                ..Default::default()
            }),
            ..alloc(HashMap::new())
        })
    );
    case!(
        "a pin of a century",
        Code::InvalidArgument,
        "--max-duration-ms",
        catalog.pin(runtime::PinRequest {
            id: id(kept),
            duration_ms: 100 * 365 * 86_400_000,
        })
    );
    case!(
        "metadata mode 99",
        Code::InvalidArgument,
        "not a known value",
        catalog.update_payload_metadata(pbc::UpdatePayloadMetadataRequest {
            id: id(kept),
            mode: 99,
            metadata: Some(md(1, "")),
            ..Default::default()
        })
    );
    case!(
        "metadata of 1 MiB and a byte",
        Code::InvalidArgument,
        "--max-metadata-bytes",
        catalog.update_payload_metadata(pbc::UpdatePayloadMetadataRequest {
            id: id(kept),
            metadata: Some(md((1 << 20) + 1, "")),
            ..Default::default()
        })
    );
    case!(
        "a NUL in a schema",
        Code::InvalidArgument,
        "NUL",
        catalog.update_payload_metadata(pbc::UpdatePayloadMetadataRequest {
            id: id(kept),
            metadata: Some(md(1, "a\0")),
            ..Default::default()
        })
    );
    case!(
        "an event of 1 MiB and a byte",
        Code::InvalidArgument,
        "--max-metadata-bytes",
        catalog.append_payload_metadata_event(pbc::AppendPayloadMetadataEventRequest {
            id: id(kept),
            metadata: Some(md((1 << 20) + 1, "")),
            ..Default::default()
        })
    );
    case!(
        "a NUL in an event source",
        Code::InvalidArgument,
        "NUL",
        catalog.append_payload_metadata_event(pbc::AppendPayloadMetadataEventRequest {
            id: id(kept),
            source: "s\0".into(),
            ..Default::default()
        })
    );
    case!(
        "1,001 lineage parents",
        Code::InvalidArgument,
        "--max-lineage-parents",
        catalog.add_lineage(pbc::AddLineageRequest {
            child: id(kept),
            parents: vec![edge("op"); 1_001],
        })
    );
    case!(
        "a NUL in a lineage operation",
        Code::InvalidArgument,
        "NUL",
        catalog.add_lineage(pbc::AddLineageRequest {
            child: id(kept),
            parents: vec![edge("o\0p")],
        })
    );
    case!(
        "a self edge, as the reference's examples send",
        Code::Ok,
        "",
        catalog.add_lineage(pbc::AddLineageRequest {
            child: id(kept),
            parents: vec![edge("self")],
        })
    );
    case!(
        "lineage depth 1,001",
        Code::InvalidArgument,
        "--max-lineage-depth",
        catalog.get_lineage(pbc::GetLineageRequest {
            id: id(kept),
            upstream: true,
            max_depth: 1_001,
        })
    );
    case!(
        "a selector of 17 terms",
        Code::InvalidArgument,
        "--max-selector-terms",
        catalog.list_payloads(runtime::ListPayloadsRequest {
            label_selector: "a=b,".repeat(17),
            ..Default::default()
        })
    );
    case!(
        "a NUL in a selector",
        Code::InvalidArgument,
        "NUL",
        catalog.list_payloads(runtime::ListPayloadsRequest {
            label_selector: "a=\0".into(),
            ..Default::default()
        })
    );
    case!(
        "promote policy 99",
        Code::InvalidArgument,
        "not a known value",
        catalog.promote(runtime::PromoteRequest {
            id: id(kept),
            target_tier: PbTier::Ram as i32,
            policy: 99,
        })
    );
    case!(
        "spill policy 99",
        Code::InvalidArgument,
        "not a known value",
        catalog.spill(runtime::SpillRequest {
            ids: vec![id(kept).unwrap()],
            policy: 99,
            ..Default::default()
        })
    );
    case!(
        "promotion policy 99 on a lease",
        Code::InvalidArgument,
        "not a known value",
        data.acquire_read_lease(runtime::AcquireReadLeaseRequest {
            promotion_policy: 99,
            ..lease_item.clone()
        })
    );
    case!(
        "lease mode 99 (as the reference answers)",
        Code::FailedPrecondition,
        "LEASE_MODE_READ",
        data.acquire_read_lease(runtime::AcquireReadLeaseRequest {
            mode: 99,
            ..lease_item.clone()
        })
    );
    case!(
        "a 257-byte stream name",
        Code::InvalidArgument,
        "--max-name-bytes",
        streams.create_stream(runtime::CreateStreamRequest {
            stream: stream(&"n".repeat(257)),
            ..Default::default()
        })
    );
    case!(
        "a NUL in a stream name",
        Code::InvalidArgument,
        "NUL",
        streams.create_stream(runtime::CreateStreamRequest {
            stream: stream("a\0"),
            ..Default::default()
        })
    );
    case!(
        "a NUL in a consumer group",
        Code::InvalidArgument,
        "NUL",
        streams.commit(runtime::CommitRequest {
            stream: stream("s"),
            consumer_group: "g\0".into(),
            offset: 0,
        })
    );
    case!(
        "10,001 stream items",
        Code::InvalidArgument,
        "--max-batch-items",
        streams.append(runtime::AppendRequest {
            stream: stream("s"),
            items: vec![
                runtime::AppendItem {
                    payload_id: id(kept),
                    ..Default::default()
                };
                10_001
            ],
        })
    );
    case!(
        "65 tags on an entry",
        Code::InvalidArgument,
        "--max-labels",
        streams.append(runtime::AppendRequest {
            stream: stream("s"),
            items: vec![runtime::AppendItem {
                payload_id: id(kept),
                tags: labels(65, 2, 1),
                ..Default::default()
            }],
        })
    );
    let huge = labels(1, 2, 5 << 20);
    let oversize = catalog.allocate_payload(alloc(huge)).await.map(drop);
    client.stats().await.expect("the agent still answers");

    for (what, want, word, got) in cases {
        let code = got.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        assert_eq!(code, want, "{what}: {got:?}");
        if let Err(status) = got {
            assert!(status.message().contains(word), "{what}: {:?}", status.message());
        }
    }
    // Refused before it is decoded (tonic's code for it).
    let status = oversize.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "a message over --max-message-size: {status:?}"
    );
    assert!(client.get(kept).await.is_ok(), "stored data is untouched");
    served.stop().await;
}

#[tokio::test]
async fn metadata_events_come_in_pages() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let kept = served.client.put(b"with history").await.unwrap();
    let (_, mut catalog, _) = served.client.raw();
    for i in 0..250 {
        catalog
            .append_payload_metadata_event(pbc::AppendPayloadMetadataEventRequest {
                id: id(kept),
                version: i.to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = catalog
            .list_payload_metadata_events(pbc::ListPayloadMetadataEventsRequest {
                id: id(kept),
                page_size: 100,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 100);
        seen.extend(page.events.into_iter().map(|e| e.version));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (0..250).map(|i: i32| i.to_string()).collect::<Vec<_>>());
    let bad = catalog
        .list_payload_metadata_events(pbc::ListPayloadMetadataEventsRequest {
            id: id(kept),
            page_token: "not a token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    served.stop().await;
}

#[tokio::test]
async fn subscriptions_are_capped_per_stream_and_a_closed_one_frees_its_slot() {
    let dirs = Dirs::new();
    let mut cfg = NodeConfig::default();
    cfg.limits.subscribers_per_stream = 2;
    let served = Served::start(&dirs, cfg, &Capacity::default()).await;
    let mut streams = served.client.streams();
    streams
        .create_stream(runtime::CreateStreamRequest {
            stream: stream("capped"),
            ..Default::default()
        })
        .await
        .unwrap();
    let subscribe = || runtime::SubscribeRequest {
        stream: stream("capped"),
        ..Default::default()
    };
    let first = streams.subscribe(subscribe()).await.unwrap();
    let second = streams.subscribe(subscribe()).await.unwrap();
    let third = streams.subscribe(subscribe()).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    assert!(third.message().contains("--max-subscribers-per-stream"));
    drop(first);
    // The follower notices its subscriber is gone and gives the slot back
    // (bounded: a slot never given back fails the test, not hangs it).
    let mut again = None;
    for _ in 0..500 {
        match streams.subscribe(subscribe()).await {
            Ok(sub) => {
                again = Some(sub);
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    let again = again.expect("a closed subscription frees its slot");
    // Open subscriptions would hold the graceful stop.
    drop((again, second, streams));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_stuck_on_the_catalog_ends_at_the_request_deadline() {
    let dirs = Dirs::new();
    let mut cfg = NodeConfig::default();
    cfg.limits.request_timeout_ms = 300;
    let served = Served::start(&dirs, cfg, &Capacity::default()).await;
    let mut locker = lock_sqlite(&dirs.state.path().join("catalog.db")).await;
    // Acknowledged (it is in the node's log) while the catalog is locked...
    served.client.put(b"waits in the log").await.unwrap();
    // ...so a listing, which reads the catalog after the log drains, waits.
    let (_, mut catalog, _) = served.client.raw();
    let err = catalog
        .list_payloads(runtime::ListPayloadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("--request-timeout-ms"), "{err:?}");
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    // The writer's next retry lands the write; then the node stops cleanly.
    eventually("the writer catches up once the catalog is unlocked", || async {
        served.node.flush().await.is_ok()
    })
    .await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_whose_callers_give_up_still_account_for_every_reserved_byte() {
    let dirs = Dirs::new();
    let cap = Capacity {
        ram: 512 * MIB,
        disk: 64 * MIB,
    };
    let served = Served::start(&dirs, NodeConfig::default(), &cap).await;
    let (_, mut catalog, _) = served.client.raw();
    for _ in 0..12 {
        let mut request = tonic::Request::new(runtime::AllocatePayloadRequest {
            size_bytes: 32 * MIB,
            preferred_tier: PbTier::Ram as i32,
            ..Default::default()
        });
        // Gone before the region is made, most of the time.
        request.set_timeout(std::time::Duration::from_millis(1));
        let _ = catalog.allocate_payload(request).await;
    }
    // Each allocation either did not happen or is a payload (reclaimed at
    // its write deadline): nothing is reserved for a region nobody owns.
    eventually("reserved capacity and regions match the payloads", || async {
        let stats = served.client.stats().await.unwrap();
        let ram = stats.tiers.iter().find(|t| t.tier == PbTier::Ram as u32).unwrap();
        let files = Dirs::files_in(dirs.ram.path()).len() as u64;
        ram.reserved_bytes == ram.bytes && files == ram.payloads
    })
    .await;
    served.stop().await;
}
