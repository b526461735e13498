//! Lineage (validated ends, depth, both directions, no cycles) and metadata
//! (REPLACE, MERGE, versions, expected-version races, history).

use payload_catalog::*;

use super::{edge, insert, parity, record, Backend};

async fn lineage_walks_up_and_down_with_depth_and_refuses_cycles_and_unknown_ends(b: Backend) {
    let repo = &*b.repo;
    let recs: Vec<_> = (0..4).map(|i| record(i, Tier::Ram, &[])).collect();
    let (a, bb, c, d) = (recs[0].id, recs[1].id, recs[2].id, recs[3].id);
    insert(repo, &recs).await;
    // a -> bb -> c, and a -> d
    repo.add_lineage(bb, &[edge(bb, a)]).await.unwrap();
    repo.add_lineage(c, &[edge(c, bb)]).await.unwrap();
    repo.add_lineage(d, &[edge(d, a)]).await.unwrap();
    // Adding an edge twice is harmless.
    repo.add_lineage(d, &[edge(d, a)]).await.unwrap();

    let up = repo.get_lineage(c, true, 0).await.unwrap();
    assert_eq!(up.iter().map(|e| e.parent).collect::<Vec<_>>(), vec![bb, a]);
    assert_eq!(up[0], edge(c, bb), "edges come back whole");
    assert_eq!(
        repo.get_lineage(c, true, 1).await.unwrap().len(),
        1,
        "depth 1 stops at the parent"
    );
    let mut down: Vec<_> = repo
        .get_lineage(a, false, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.child)
        .collect();
    down.sort();
    let mut want = vec![bb, c, d];
    want.sort();
    assert_eq!(down, want, "downstream edges name their children");

    let err = repo.add_lineage(a, &[edge(a, c)]).await.unwrap_err();
    assert!(
        matches!(err, CatalogError::InvalidArgument(ref m) if m.contains("cycle")),
        "{err:?}"
    );
    // A self edge (the reference's client examples send one) is kept but
    // never followed.
    repo.add_lineage(a, &[edge(a, a)]).await.unwrap();
    assert!(repo.get_lineage(a, true, 0).await.unwrap().is_empty());
    assert_eq!(repo.get_lineage(bb, true, 0).await.unwrap(), vec![edge(bb, a)]);
    let ghost = PayloadId::random();
    assert!(matches!(
        repo.add_lineage(a, &[edge(a, ghost)]).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        repo.add_lineage(ghost, &[edge(ghost, a)]).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        repo.get_lineage(ghost, true, 0).await,
        Err(CatalogError::NotFound(_))
    ));
}

fn md(data: &str, schema: &str) -> Metadata {
    Metadata {
        data: data.as_bytes().to_vec(),
        schema: schema.into(),
        updated_at_ms: 5,
        version: 0,
    }
}

async fn metadata_merge_combines_json_objects_and_replace_overwrites(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    assert_eq!(repo.get_metadata(rec.id).await.unwrap(), None);
    let first = repo
        .update_metadata(rec.id, MetadataMode::Replace, md(r#"{"a":1,"b":2}"#, "v1"), None)
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    let merged = repo
        .update_metadata(rec.id, MetadataMode::Merge, md(r#"{"b":null,"c":3}"#, ""), None)
        .await
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&merged.data).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"a": 1, "c": 3}),
        "RFC 7386: null removes, new keys add"
    );
    assert_eq!(merged.schema, "v1", "an empty schema keeps the stored one");
    assert_eq!(merged.version, 2);
    let kept = repo
        .update_metadata(rec.id, MetadataMode::Merge, md("", "v2"), None)
        .await
        .unwrap();
    assert_eq!(kept.data, merged.data, "empty data keeps the stored data");
    let replaced = repo
        .update_metadata(rec.id, MetadataMode::Replace, md("opaque", ""), None)
        .await
        .unwrap();
    assert_eq!(
        (replaced.data.as_slice(), replaced.schema.as_str()),
        (&b"opaque"[..], "")
    );
    assert_eq!(repo.get_metadata(rec.id).await.unwrap(), Some(replaced));
    assert!(matches!(
        repo.update_metadata(PayloadId::random(), MetadataMode::Replace, md("x", ""), None)
            .await,
        Err(CatalogError::NotFound(_))
    ));
}

async fn a_stale_expected_version_is_refused_and_changes_nothing(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    let err = repo
        .update_metadata(rec.id, MetadataMode::Replace, md("x", ""), Some(3))
        .await
        .unwrap_err();
    assert!(matches!(err, CatalogError::Conflict(_)), "{err:?}");
    let v1 = repo
        .update_metadata(rec.id, MetadataMode::Replace, md("x", ""), Some(0))
        .await
        .unwrap();
    assert!(matches!(
        repo.update_metadata(rec.id, MetadataMode::Replace, md("y", ""), Some(0))
            .await,
        Err(CatalogError::Conflict(_))
    ));
    assert_eq!(repo.get_metadata(rec.id).await.unwrap(), Some(v1));
}

async fn two_updates_with_the_same_expected_version_one_wins(b: Backend) {
    let rec = record(1, Tier::Ram, &[]);
    insert(&*b.repo, std::slice::from_ref(&rec)).await;
    let other = b.open("standalone").await;
    for round in 0..10u64 {
        let (left, right) = tokio::join!(
            b.repo
                .update_metadata(rec.id, MetadataMode::Replace, md("left", ""), Some(round)),
            other.update_metadata(rec.id, MetadataMode::Replace, md("right", ""), Some(round)),
        );
        let won: Vec<_> = [&left, &right].into_iter().filter(|r| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {left:?} / {right:?}");
        for result in [left, right] {
            if let Err(err) = result {
                assert!(matches!(err, CatalogError::Conflict(_)), "{err:?}");
            }
        }
        let stored = b.repo.get_metadata(rec.id).await.unwrap().unwrap();
        assert_eq!(stored.version, round + 1);
    }
}

async fn concurrent_merges_without_a_version_both_apply(b: Backend) {
    let rec = record(1, Tier::Ram, &[]);
    insert(&*b.repo, std::slice::from_ref(&rec)).await;
    let other = b.open("standalone").await;
    for round in 0..10 {
        let (left, right) = tokio::join!(
            b.repo.update_metadata(
                rec.id,
                MetadataMode::Merge,
                md(&format!(r#"{{"left{round}":1}}"#), ""),
                None
            ),
            other.update_metadata(
                rec.id,
                MetadataMode::Merge,
                md(&format!(r#"{{"right{round}":1}}"#), ""),
                None
            ),
        );
        left.unwrap();
        right.unwrap();
    }
    let stored = b.repo.get_metadata(rec.id).await.unwrap().unwrap();
    let value: serde_json::Value = serde_json::from_slice(&stored.data).unwrap();
    assert_eq!(value.as_object().unwrap().len(), 20, "no merge lost: {value}");
    assert_eq!(stored.version, 20);
}

async fn concurrent_opposite_edges_never_close_a_cycle(b: Backend) {
    let other = b.open("standalone").await;
    for _ in 0..10 {
        let recs: Vec<_> = (0..2).map(|i| record(i, Tier::Ram, &[])).collect();
        insert(&*b.repo, &recs).await;
        let (x, y) = (recs[0].id, recs[1].id);
        let (x_from_y, y_from_x) = ([edge(x, y)], [edge(y, x)]);
        let (one, two) = tokio::join!(b.repo.add_lineage(x, &x_from_y), other.add_lineage(y, &y_from_x));
        assert!(one.is_ok() != two.is_ok(), "exactly one edge lands: {one:?} / {two:?}");
    }
}

async fn metadata_events_read_back_in_order(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    let events: Vec<_> = (0..3)
        .map(|i| MetadataEvent {
            data: format!("e{i}").into_bytes(),
            source: "test".into(),
            version: i.to_string(),
            ts_ms: 10 - i,
        })
        .collect();
    for event in &events {
        repo.append_metadata_event(rec.id, event.clone()).await.unwrap();
    }
    let all = repo.metadata_history(rec.id, 0, 100).await.unwrap();
    assert_eq!((all.events, all.next), (events.clone(), None));
    // Two pages of two and one.
    let first = repo.metadata_history(rec.id, 0, 2).await.unwrap();
    assert_eq!(first.events, events[..2]);
    let rest = repo
        .metadata_history(rec.id, first.next.expect("more"), 2)
        .await
        .unwrap();
    assert_eq!((rest.events, rest.next), (events[2..].to_vec(), None));
    assert!(matches!(
        repo.append_metadata_event(PayloadId::random(), events[0].clone()).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        repo.metadata_history(PayloadId::random(), 0, 10).await,
        Err(CatalogError::NotFound(_))
    ));
}

parity!(
    lineage_walks_up_and_down_with_depth_and_refuses_cycles_and_unknown_ends,
    metadata_merge_combines_json_objects_and_replace_overwrites,
    a_stale_expected_version_is_refused_and_changes_nothing,
    two_updates_with_the_same_expected_version_one_wins,
    concurrent_merges_without_a_version_both_apply,
    concurrent_opposite_edges_never_close_a_cycle,
    metadata_events_read_back_in_order,
);
