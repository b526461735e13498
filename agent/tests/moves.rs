//! Moves racing deletes, on tiers too small for every move: whatever the
//! interleaving, once the dust settles each tier reserves exactly the bytes
//! of the payloads on it, every payload has exactly one region, and none is
//! left moving (SPILLING).

mod common;

use common::*;
use payload_agent::node::NodeConfig;
use payload_catalog::{PayloadState, Tier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_racing_deletes_on_small_tiers_leak_nothing_and_end_settled() {
    let dirs = Dirs::new();
    // Room for 12 payloads in RAM but only 6 on disk: many spills fail for capacity.
    let cap = Capacity {
        ram: 12 * MIB,
        disk: 6 * MIB,
    };
    let cfg = NodeConfig {
        ram_high_watermark: 1.0,
        ram_low_watermark: 1.0,
        ..Default::default()
    };
    let (node, _) = open_node(&dirs, cfg, &cap).await;
    let mut ids = Vec::new();
    for i in 0..12u8 {
        ids.push(put_on(&node, Tier::Ram, &pattern(MIB as usize, i)).await);
    }
    let mut tasks = Vec::new();
    for round in 0..4 {
        for (i, id) in ids.iter().copied().enumerate() {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                match (i + round) % 4 {
                    0 | 1 => drop(node.relocate(id, Tier::Disk, false, false).await),
                    2 => drop(node.relocate(id, Tier::Ram, false, false).await),
                    _ if round == 3 && i % 3 == 0 => drop(node.delete(id, true).await),
                    _ => drop(node.relocate(id, Tier::Disk, false, true).await),
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    node.flush().await.unwrap();

    for tier in [Tier::Ram, Tier::Disk] {
        let store = node.store(tier).unwrap();
        let on_tier = node.ids_on(tier);
        let bytes: u64 = on_tier.iter().map(|id| node.get(*id).unwrap().0.size_bytes).sum();
        assert_eq!(store.used(), bytes, "{} reserves exactly what it holds", tier.name());
        let files = Dirs::files_in(store.root());
        let mut want: Vec<String> = on_tier
            .iter()
            .map(|id| store.path(*id).file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        want.sort();
        assert_eq!(files, want, "{}: one region per payload, nothing else", tier.name());
    }
    for id in ids {
        if let Ok((rec, _)) = node.get(id) {
            assert_ne!(rec.state, PayloadState::Spilling, "{id} was left moving");
        }
    }
}
