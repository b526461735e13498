//! Metadata over gRPC: versions, the expected-version check (ABORTED on a
//! lost race) and the event history.

mod common;

use common::{Capacity, Dirs, Served};
use payload_agent::node::NodeConfig;
use payload_proto::catalog as pbc;
use payload_proto::core as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_carry_versions_and_a_stale_one_is_aborted() {
    let dirs = Dirs::new();
    let served = Served::start(&dirs, NodeConfig::default(), &Capacity::default()).await;
    let id = served.client.put(b"weights").await.unwrap();
    let id = Some(pb::PayloadId {
        value: id.as_bytes().to_vec(),
    });
    let (_, mut catalog, _) = served.client.raw();
    let update = |data: &str, expected_version| pbc::UpdatePayloadMetadataRequest {
        id: id.clone(),
        mode: pb::MetadataUpdateMode::Merge as i32,
        metadata: Some(pbc::PayloadMetadata {
            data: data.as_bytes().to_vec(),
            ..Default::default()
        }),
        expected_version,
        ..Default::default()
    };
    let get = pbc::GetPayloadMetadataRequest { id: id.clone() };
    assert_eq!(
        catalog
            .get_payload_metadata(get.clone())
            .await
            .unwrap()
            .into_inner()
            .version,
        0
    );

    let first = catalog
        .update_payload_metadata(update(r#"{"a":1}"#, Some(0)))
        .await
        .unwrap();
    assert_eq!(first.into_inner().metadata.unwrap().version, 1);
    let merged = catalog
        .update_payload_metadata(update(r#"{"b":2}"#, None))
        .await
        .unwrap();
    let merged = merged.into_inner().metadata.unwrap();
    assert_eq!(merged.version, 2);
    let value: serde_json::Value = serde_json::from_slice(&merged.data).unwrap();
    assert_eq!(value, serde_json::json!({"a": 1, "b": 2}));

    let stale = catalog
        .update_payload_metadata(update(r#"{"c":3}"#, Some(1)))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert!(stale.message().contains("version 2"), "{stale:?}");
    let stored = catalog.get_payload_metadata(get).await.unwrap().into_inner();
    assert_eq!(
        (stored.version, stored.data),
        (2, merged.data),
        "a refused update changes nothing"
    );

    for (n, source) in ["ingest", "eval"].into_iter().enumerate() {
        let event = pbc::AppendPayloadMetadataEventRequest {
            id: id.clone(),
            metadata: Some(pbc::PayloadMetadata {
                data: vec![n as u8],
                ..Default::default()
            }),
            source: source.into(),
            version: n.to_string(),
        };
        catalog.append_payload_metadata_event(event).await.unwrap();
    }
    let history = catalog
        .list_payload_metadata_events(pbc::ListPayloadMetadataEventsRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let sources: Vec<_> = history.iter().map(|e| e.source.as_str()).collect();
    assert_eq!(sources, ["ingest", "eval"]);
    assert!(history.iter().all(|e| e.id == id && e.ts.is_some()));

    let ghost = Some(pb::PayloadId { value: vec![1; 16] });
    let unknown = catalog
        .list_payload_metadata_events(pbc::ListPayloadMetadataEventsRequest {
            id: ghost,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    served.stop().await;
}
