//! The SQLite repository: lineage, metadata and listing rules on a real
//! database file.

use payload_catalog::*;

fn record(created_at_ms: u64, tier: Tier, labels: &[(&str, &str)]) -> PayloadRecord {
    PayloadRecord {
        state: PayloadState::Active,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..PayloadRecord::allocated(PayloadId::random(), tier, 10, created_at_ms)
    }
}

async fn repo_with(records: &[PayloadRecord]) -> (tempfile::TempDir, SqliteRepository) {
    let dir = tempfile::tempdir().unwrap();
    let repo = SqliteRepository::open(&dir.path().join("catalog.db")).await.unwrap();
    let writes: Vec<Write> = records.iter().cloned().map(Write::Insert).collect();
    repo.write_batch(&writes).await.unwrap();
    (dir, repo)
}

fn edge(child: PayloadId, parent: PayloadId) -> LineageEdge {
    LineageEdge {
        child,
        parent,
        operation: "derive".into(),
        role: "input".into(),
        parameters: vec![1],
    }
}

#[tokio::test]
async fn lineage_walks_up_and_down_with_depth_and_refuses_cycles_and_unknown_ends() {
    let recs: Vec<_> = (0..4).map(|i| record(i, Tier::Ram, &[])).collect();
    let (a, b, c, d) = (recs[0].id, recs[1].id, recs[2].id, recs[3].id);
    let (_dir, repo) = repo_with(&recs).await;
    // a -> b -> c, and a -> d
    repo.add_lineage(b, &[edge(b, a)]).await.unwrap();
    repo.add_lineage(c, &[edge(c, b)]).await.unwrap();
    repo.add_lineage(d, &[edge(d, a)]).await.unwrap();

    let up = repo.get_lineage(c, true, 0).await.unwrap();
    assert_eq!(up.iter().map(|e| e.parent).collect::<Vec<_>>(), vec![b, a]);
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
    let mut want = vec![b, c, d];
    want.sort();
    assert_eq!(down, want, "downstream edges name their children");

    let err = repo.add_lineage(a, &[edge(a, c)]).await.unwrap_err();
    assert!(
        matches!(err, CatalogError::InvalidArgument(ref m) if m.contains("cycle")),
        "{err:?}"
    );
    let err = repo.add_lineage(a, &[edge(a, a)]).await.unwrap_err();
    assert!(matches!(err, CatalogError::InvalidArgument(_)), "{err:?}");
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

#[tokio::test]
async fn metadata_merge_combines_json_objects_and_replace_overwrites() {
    let rec = record(1, Tier::Ram, &[]);
    let (_dir, repo) = repo_with(std::slice::from_ref(&rec)).await;
    let md = |data: &str, schema: &str| Metadata {
        data: data.as_bytes().to_vec(),
        schema: schema.into(),
        updated_at_ms: 5,
    };
    repo.update_metadata(rec.id, MetadataMode::Replace, md(r#"{"a":1,"b":2}"#, "v1"))
        .await
        .unwrap();
    let merged = repo
        .update_metadata(rec.id, MetadataMode::Merge, md(r#"{"b":null,"c":3}"#, ""))
        .await
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&merged.data).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"a": 1, "c": 3}),
        "RFC 7386: null removes, new keys add"
    );
    assert_eq!(merged.schema, "v1", "an empty schema keeps the stored one");
    let kept = repo
        .update_metadata(rec.id, MetadataMode::Merge, md("", "v2"))
        .await
        .unwrap();
    assert_eq!(kept.data, merged.data, "empty data keeps the stored data");
    let replaced = repo
        .update_metadata(rec.id, MetadataMode::Replace, md("opaque", ""))
        .await
        .unwrap();
    assert_eq!(
        (replaced.data.as_slice(), replaced.schema.as_str()),
        (&b"opaque"[..], "")
    );
    let event = MetadataEvent {
        data: b"e".to_vec(),
        source: "test".into(),
        version: "1".into(),
        ts_ms: 9,
    };
    repo.append_metadata_event(rec.id, event.clone()).await.unwrap();
    assert!(matches!(
        repo.append_metadata_event(PayloadId::random(), event).await,
        Err(CatalogError::NotFound(_))
    ));
}

#[tokio::test]
async fn listing_filters_and_pages_stay_stable_while_rows_are_inserted() {
    let mut recs = Vec::new();
    for i in 0..30u64 {
        let tier = if i % 3 == 0 { Tier::Disk } else { Tier::Ram };
        recs.push(record(
            1_000 + i / 2,
            tier,
            &[("team", if i % 2 == 0 { "x" } else { "y" })],
        ));
    }
    let (_dir, repo) = repo_with(&recs).await;
    let mut query = ListQuery {
        page_size: 7,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = repo.list_payloads(&query).await.unwrap();
        assert_eq!(page.total, 30, "the total is the first page's count");
        seen.extend(page.items.iter().map(|r| (r.created_at_ms, r.id)));
        // Newer rows arriving mid-listing must not shift later pages.
        repo.write_batch(&[Write::Insert(record(5_000, Tier::Ram, &[]))])
            .await
            .unwrap();
        match page.next {
            Some(token) => query.after = Some(token),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, ties by id");
    assert_eq!(seen.len(), 30);

    let disk = ListQuery {
        tier: Some(Tier::Disk),
        page_size: 100,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&disk).await.unwrap().total, 10);
    let team = ListQuery {
        labels: vec![("team".into(), "x".into())],
        tier: Some(Tier::Ram),
        page_size: 100,
        ..Default::default()
    };
    let page = repo.list_payloads(&team).await.unwrap();
    assert!(page
        .items
        .iter()
        .all(|r| r.labels["team"] == "x" && r.tier == Tier::Ram));
    assert_eq!(page.total, 10);
    let window = ListQuery {
        created_after_ms: Some(1_003),
        created_before_ms: Some(1_006),
        page_size: 100,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&window).await.unwrap().total, 4);
}

#[tokio::test]
async fn deleting_a_payload_removes_its_lineage_and_metadata() {
    let recs: Vec<_> = (0..2).map(|i| record(i, Tier::Ram, &[("k", "v")])).collect();
    let (_dir, repo) = repo_with(&recs).await;
    repo.add_lineage(recs[1].id, &[edge(recs[1].id, recs[0].id)])
        .await
        .unwrap();
    repo.write_batch(&[Write::Delete(recs[0].id)]).await.unwrap();
    assert!(repo.get_payload(recs[0].id).await.unwrap().is_none());
    assert!(repo.get_lineage(recs[1].id, true, 0).await.unwrap().is_empty());
    let labelled = ListQuery {
        labels: vec![("k".into(), "v".into())],
        page_size: 10,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&labelled).await.unwrap().total, 1);
}
