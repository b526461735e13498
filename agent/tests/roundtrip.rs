//! Puts and gets through the real socket with real mmap of shm and disk files.

mod common;

use common::*;
use payload_agent::node::NodeConfig;
use payload_client::{PutOptions, Tier};
use payload_proto::core::payload_descriptor::Location;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn ram_payload_round_trips_through_shm_with_its_digest() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let bytes = pattern(3 * MIB as usize + 17, 7);
    let opts = PutOptions {
        verify: true,
        ..Default::default()
    };
    let desc = served.client.put_with(&bytes, &opts).await.unwrap();
    assert_eq!(desc.tier, Tier::Ram as i32);
    assert_eq!(desc.sha256, Sha256::digest(&bytes).to_vec());
    let Some(Location::Ram(ram)) = &desc.location else {
        panic!("RAM location expected, got {desc:?}")
    };
    assert!(ram.shm_name.starts_with('/'));
    let shm_path = format!("/dev/shm{}", ram.shm_name);
    assert_eq!(
        std::fs::read(&shm_path).unwrap(),
        bytes,
        "the shm object holds the bytes"
    );

    let id = payload_client::descriptor_id(&desc).unwrap();
    let lease = served.client.get(id).await.unwrap();
    assert_eq!(Sha256::digest(lease.bytes()), Sha256::digest(&bytes));
    drop(lease);
    served.stop().await;
}

#[tokio::test]
async fn disk_payload_has_an_absolute_path_and_is_sealed() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let bytes = pattern(100_000, 3);
    let opts = PutOptions {
        tier: Tier::Disk,
        sync: true,
        ..Default::default()
    };
    let desc = served.client.put_with(&bytes, &opts).await.unwrap();
    let Some(Location::Disk(disk)) = &desc.location else {
        panic!("disk location expected")
    };
    assert!(disk.path.starts_with('/'), "absolute path, got {}", disk.path);
    assert_eq!(std::fs::read(&disk.path).unwrap(), bytes);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&disk.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o400, "committed regions are read-only");
    let open_for_write = std::fs::OpenOptions::new().write(true).open(&disk.path);
    if !is_root() {
        assert!(open_for_write.is_err());
    }
    let id = payload_client::descriptor_id(&desc).unwrap();
    assert_eq!(served.client.get(id).await.unwrap().bytes(), &bytes[..]);
    served.stop().await;
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn many_small_payloads_round_trip_and_list_pages_cover_them_all() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let mut ids = Vec::new();
    for i in 0..25u8 {
        ids.push(served.client.put(&pattern(4096, i)).await.unwrap());
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            served.client.get(*id).await.unwrap().bytes(),
            &pattern(4096, i as u8)[..]
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = served
            .client
            .list(payload_proto::runtime::ListPayloadsRequest {
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.total_count, 25);
        seen.extend(
            page.payloads
                .iter()
                .map(|p| uuid::Uuid::from_slice(&p.id.as_ref().unwrap().value).unwrap()),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    served.stop().await;
}

#[tokio::test]
async fn lineage_over_grpc_returns_16_byte_ids_and_names_children() {
    use payload_proto::catalog as pbc;
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let parent = served.client.put(b"parent").await.unwrap();
    let child = served.client.put(b"child").await.unwrap();
    let pid = |id: uuid::Uuid| {
        Some(payload_proto::core::PayloadId {
            value: id.as_bytes().to_vec(),
        })
    };
    let (_, mut catalog, _) = served.client.raw();
    let edge = pbc::LineageEdge {
        parent: pid(parent),
        operation: "tokenize".into(),
        ..Default::default()
    };
    catalog
        .add_lineage(pbc::AddLineageRequest {
            child: pid(child),
            parents: vec![edge],
        })
        .await
        .unwrap();
    let down = catalog
        .get_lineage(pbc::GetLineageRequest {
            id: pid(parent),
            upstream: false,
            max_depth: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(down.edges.len(), 1);
    assert_eq!(
        down.edges[0].parent.as_ref().unwrap().value,
        parent.as_bytes().to_vec(),
        "16 raw bytes, not text"
    );
    assert_eq!(down.edges[0].child.as_ref().unwrap().value, child.as_bytes().to_vec());
    assert_eq!(down.edges[0].operation, "tokenize");
    served.stop().await;
}

#[tokio::test]
async fn prefetch_promotes_in_the_background() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let opts = PutOptions {
        tier: Tier::Disk,
        ..Default::default()
    };
    let desc = served.client.put_with(&pattern(65_536, 4), &opts).await.unwrap();
    let id = payload_client::descriptor_id(&desc).unwrap();
    let (_, mut catalog, _) = served.client.raw();
    let request = payload_proto::runtime::PrefetchRequest {
        id: Some(payload_proto::core::PayloadId {
            value: id.as_bytes().to_vec(),
        }),
        target_tier: Tier::Ram as i32,
    };
    catalog.prefetch(request).await.unwrap();
    // Readiness poll, bounded by count: the hint completes in the background.
    let mut tier = 0;
    for _ in 0..500 {
        tier = served.client.stat(id).await.unwrap().payload.unwrap().tier;
        if tier == Tier::Ram as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(tier, Tier::Ram as i32);
    assert_eq!(served.client.get(id).await.unwrap().bytes(), &pattern(65_536, 4)[..]);
    served.stop().await;
}
