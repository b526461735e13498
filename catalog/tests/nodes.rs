//! The cluster catalog's node table on PostgreSQL: what the operator keeps
//! of each node so a down one is still listed after it restarts.

use payload_catalog::*;

fn node(name: &str, last_seen_ms: u64) -> NodeRow {
    NodeRow {
        name: name.into(),
        pool: "gpu".into(),
        version: "0.1.0".into(),
        last_seen_ms,
    }
}

#[tokio::test]
async fn nodes_are_recorded_replaced_and_forgotten_only_without_payloads() {
    let Some(url) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    let catalog = PgRepository::connect(&url, "payload-operator").await.unwrap();
    assert_eq!(catalog.known_nodes().await.unwrap(), vec![]);
    catalog.record_node(&node("b", 1_000)).await.unwrap();
    catalog.record_node(&node("a", 2_000)).await.unwrap();
    let moved = NodeRow {
        pool: "cpu".into(),
        ..node("a", 9_000)
    };
    catalog.record_node(&moved).await.unwrap();
    assert_eq!(
        catalog.known_nodes().await.unwrap(),
        vec![moved.clone(), node("b", 1_000)]
    );

    // "b" holds a payload row: kept however long ago it was seen; "a",
    // without one, is forgotten once it was seen before the cutoff.
    let on_b = PayloadRecord {
        state: PayloadState::Active,
        ..PayloadRecord::allocated(PayloadId::random(), Tier::Ram, 10, 5)
    };
    catalog.for_node("b").write_batch(&[Write::Insert(on_b)]).await.unwrap();
    assert_eq!(catalog.forget_nodes(9_000).await.unwrap(), 0);
    assert_eq!(catalog.forget_nodes(9_001).await.unwrap(), 1);
    assert_eq!(catalog.known_nodes().await.unwrap(), vec![node("b", 1_000)]);
    // A write that lands after a later one changes nothing.
    catalog.record_node(&node("b", 500)).await.unwrap();
    assert_eq!(catalog.known_nodes().await.unwrap(), vec![node("b", 1_000)]);
}
