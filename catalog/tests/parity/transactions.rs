//! Multi-step writes: a batch of payload, metadata, lineage and offset
//! changes is visible whole or not at all.

use payload_catalog::*;

use super::{edge, insert, parity, record, Backend};

async fn a_batch_is_applied_whole_or_not_at_all(b: Backend) {
    let repo = &*b.repo;
    let parent = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&parent)).await;
    let s = StreamKey::new("", "s").unwrap();
    repo.create_stream(&s, Retention::default(), None, 1).await.unwrap();
    repo.append(
        &s,
        &[AppendItem {
            payload_id: parent.id,
            event_time_ms: 0,
            duration_ns: 0,
            tags: Default::default(),
        }],
        1,
    )
    .await
    .unwrap();

    let child = record(2, Tier::Ram, &[("k", "v")]);
    let steps = |lineage_parent: PayloadId| {
        vec![
            Write::Insert(child.clone()),
            Write::Metadata {
                id: child.id,
                mode: MetadataMode::Replace,
                update: Metadata {
                    data: b"{}".to_vec(),
                    ..Metadata::default()
                },
                expected_version: Some(0),
            },
            Write::CommitOffset {
                stream: s.clone(),
                group: "g".into(),
                offset: 1,
                now_ms: 1,
            },
            Write::Lineage {
                child: child.id,
                edges: vec![edge(child.id, lineage_parent)],
            },
        ]
    };

    // The last step fails (an unknown parent): nothing of the batch stays.
    let err = repo.write_batch(&steps(PayloadId::random())).await.unwrap_err();
    assert!(matches!(err, CatalogError::NotFound(_)), "{err:?}");
    assert_eq!(repo.get_payload(child.id).await.unwrap(), None);
    assert_eq!(repo.get_committed(&s, "g").await.unwrap(), None);
    let labelled = ListQuery {
        labels: vec![("k".into(), "v".into())],
        page_size: 10,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&labelled).await.unwrap().total, 0);

    repo.write_batch(&steps(parent.id)).await.unwrap();
    assert_eq!(repo.get_payload(child.id).await.unwrap(), Some(child.clone()));
    assert_eq!(repo.get_metadata(child.id).await.unwrap().unwrap().version, 1);
    assert_eq!(repo.get_committed(&s, "g").await.unwrap(), Some(1));
    assert_eq!(repo.get_lineage(child.id, true, 0).await.unwrap().len(), 1);

    // A conflicting metadata step undoes the steps before it too.
    let retry = [
        Write::CommitOffset {
            stream: s.clone(),
            group: "g".into(),
            offset: 0,
            now_ms: 2,
        },
        steps(parent.id).swap_remove(1),
    ];
    assert!(matches!(repo.write_batch(&retry).await, Err(CatalogError::Conflict(_))));
    assert_eq!(repo.get_committed(&s, "g").await.unwrap(), Some(1));
}

async fn a_catalog_from_a_newer_binary_is_refused_with_a_clear_error(b: Backend) {
    // Stamp a schema version this binary has never heard of.
    b.stamp_schema_version(9_999).await;
    let err = match b.try_open("standalone").await {
        Ok(_) => panic!("a newer schema must be refused"),
        Err(err) => err,
    };
    let text = err.to_string();
    assert!(text.contains("9999") && text.contains("newer"), "{text}");
}

parity!(
    a_batch_is_applied_whole_or_not_at_all,
    a_catalog_from_a_newer_binary_is_refused_with_a_clear_error,
);
