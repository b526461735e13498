//! Capacity: RAM fills, spill makes room on disk; with both full, Allocate
//! says RESOURCE_EXHAUSTED and never overcommits.

mod common;

use common::*;
use payload_agent::error::AgentError;
use payload_agent::node::{AllocateRequest, NodeConfig};
use payload_catalog::Tier;

#[tokio::test]
async fn full_ram_spills_to_disk_then_both_full_is_resource_exhausted() {
    let dirs = Dirs::new();
    let cap = Capacity {
        ram: 4 * MIB,
        disk: 6 * MIB,
    };
    let (node, _) = open_node(&dirs, NodeConfig::default(), &cap).await;
    let mut ids = Vec::new();
    for i in 0..10u8 {
        let rec = match node.allocate(AllocateRequest::new(MIB, Tier::Ram)).await {
            Ok(rec) => rec,
            Err(err) => {
                assert!(
                    matches!(err, AgentError::ResourceExhausted(ref m) if m.contains("full")),
                    "{err:?}"
                );
                assert_eq!(i, 10, "allocation {i} failed too early: {err}");
                break;
            }
        };
        std::fs::write(node.store(Tier::Ram).unwrap().path(rec.id), pattern(MIB as usize, i)).unwrap();
        node.commit(rec.id, None, false, false).await.unwrap();
        ids.push((rec.id, i));
    }
    assert_eq!(ids.len(), 10, "4 MiB RAM + 6 MiB disk hold ten 1 MiB payloads");
    assert_eq!(node.ids_on(Tier::Disk).len(), 6, "the coldest six went to disk");
    let err = node.allocate(AllocateRequest::new(MIB, Tier::Ram)).await.unwrap_err();
    assert!(matches!(err, AgentError::ResourceExhausted(_)), "{err:?}");
    let err = node.allocate(AllocateRequest::new(MIB, Tier::Disk)).await.unwrap_err();
    assert!(matches!(err, AgentError::ResourceExhausted(_)), "{err:?}");
    assert!(node.store(Tier::Ram).unwrap().used() <= 4 * MIB);
    assert!(node.store(Tier::Disk).unwrap().used() <= 6 * MIB);
    for (id, seed) in ids {
        let (rec, _) = node.get(id).unwrap();
        let bytes = std::fs::read(node.store(rec.tier).unwrap().path(id)).unwrap();
        assert_eq!(
            bytes,
            pattern(MIB as usize, seed),
            "payload {id} intact on {:?}",
            rec.tier
        );
    }
}

#[tokio::test]
async fn watermark_spill_stops_at_the_low_watermark_and_skips_pinned() {
    let dirs = Dirs::new();
    let cap = Capacity {
        ram: 10 * MIB,
        disk: 64 * MIB,
    };
    let cfg = NodeConfig {
        ram_high_watermark: 0.8,
        ram_low_watermark: 0.5,
        ..Default::default()
    };
    let (node, _) = open_node(&dirs, cfg, &cap).await;
    let mut ids = Vec::new();
    for _ in 0..9u8 {
        let rec = node.allocate(AllocateRequest::new(MIB, Tier::Ram)).await.unwrap();
        node.commit(rec.id, None, false, false).await.unwrap();
        ids.push(rec.id);
    }
    node.pin(ids[0], 0).await.unwrap();
    let moved = node.spill_to_low_watermark(Tier::Ram).await;
    assert_eq!(moved, 4, "9 MiB down to 5 MiB");
    assert_eq!(node.store(Tier::Ram).unwrap().used(), 5 * MIB);
    assert_eq!(node.get(ids[0]).unwrap().0.tier, Tier::Ram, "pinned payloads stay");
}
