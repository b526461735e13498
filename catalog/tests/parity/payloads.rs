//! Payload rows: upserts, keyset listing with filters, node ownership and
//! cascading deletes.

use payload_catalog::*;

use super::{edge, insert, parity, record, Backend};

async fn rows_round_trip_and_updates_of_missing_rows_fail(b: Backend) {
    let mut rec = record(7, Tier::Disk, &[("a", "1")]);
    rec.sha256 = Some([9; 32]);
    rec.min_residency_tier = Some(Tier::Ram);
    rec.require_durable = true;
    rec.pinned_until_ms = u64::MAX;
    rec.owner = Some("unix:1000:100".into());
    insert(&*b.repo, std::slice::from_ref(&rec)).await;
    assert_eq!(b.repo.get_payload(rec.id).await.unwrap(), Some(rec.clone()));
    // Inserting again is an upsert: the log of writes can be replayed.
    rec.state = PayloadState::Durable;
    rec.labels.clear();
    insert(&*b.repo, std::slice::from_ref(&rec)).await;
    assert_eq!(b.repo.get_payload(rec.id).await.unwrap(), Some(rec.clone()));
    let ghost = record(1, Tier::Ram, &[]);
    assert!(matches!(
        b.repo.write_batch(&[Write::Update(ghost)]).await,
        Err(CatalogError::NotFound(_))
    ));
    assert_eq!(b.repo.load_payloads().await.unwrap(), vec![rec]);
}

async fn listing_filters_and_pages_stay_stable_while_rows_are_inserted(b: Backend) {
    let repo = &*b.repo;
    let mut recs = Vec::new();
    for i in 0..30u64 {
        let tier = if i % 3 == 0 { Tier::Disk } else { Tier::Ram };
        let odd = if (i / 2) % 2 == 1 { "1" } else { "0" };
        recs.push(record(
            1_000 + i / 2,
            tier,
            &[("team", if i % 2 == 0 { "x" } else { "y" }), ("odd", odd)],
        ));
    }
    insert(repo, &recs).await;
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
        insert(repo, &[record(5_000, Tier::Ram, &[])]).await;
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
    // A label-driven listing pages by keyset too, in the same order.
    let mut by_team = ListQuery {
        labels: vec![("team".into(), "y".into())],
        page_size: 4,
        ..Default::default()
    };
    let mut paged = Vec::new();
    loop {
        let page = repo.list_payloads(&by_team).await.unwrap();
        assert_eq!(page.total, 15);
        paged.extend(page.items.iter().map(|r| (r.created_at_ms, r.id)));
        match page.next {
            Some(token) => by_team.after = Some(token),
            None => break,
        }
    }
    let mut want: Vec<_> = recs
        .iter()
        .filter(|r| r.labels["team"] == "y")
        .map(|r| (r.created_at_ms, r.id))
        .collect();
    want.sort_by(|a, b| b.cmp(a));
    assert_eq!(paged, want);
    let two_labels = ListQuery {
        labels: vec![("team".into(), "y".into()), ("odd".into(), "1".into())],
        created_after_ms: Some(1_002),
        page_size: 100,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&two_labels).await.unwrap().total, 6);
    let window = ListQuery {
        created_after_ms: Some(1_003),
        created_before_ms: Some(1_006),
        page_size: 100,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&window).await.unwrap().total, 4);
    let active = ListQuery {
        state: Some(PayloadState::Durable),
        page_size: 100,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&active).await.unwrap().total, 0);
}

async fn each_node_loads_and_lists_only_its_own_rows(b: Backend) {
    let other = b.open("node-b").await;
    let mine = record(1, Tier::Ram, &[]);
    let theirs = record(2, Tier::Ram, &[]);
    insert(&*b.repo, std::slice::from_ref(&mine)).await;
    insert(&*other, std::slice::from_ref(&theirs)).await;
    assert_eq!(b.repo.load_payloads().await.unwrap(), vec![mine.clone()]);
    assert_eq!(other.load_payloads().await.unwrap(), vec![theirs.clone()]);
    let all = ListQuery {
        page_size: 10,
        ..Default::default()
    };
    let listed = other.list_payloads(&all).await.unwrap();
    assert_eq!((listed.total, listed.items[0].id), (1, theirs.id));
    // Lineage is catalog-wide: it may cross nodes.
    other.add_lineage(theirs.id, &[edge(theirs.id, mine.id)]).await.unwrap();
    assert_eq!(b.repo.get_lineage(mine.id, false, 0).await.unwrap().len(), 1);
}

async fn deleting_a_payload_removes_its_lineage_metadata_and_labels(b: Backend) {
    let repo = &*b.repo;
    let recs: Vec<_> = (0..2).map(|i| record(i, Tier::Ram, &[("k", "v")])).collect();
    insert(repo, &recs).await;
    repo.add_lineage(recs[1].id, &[edge(recs[1].id, recs[0].id)])
        .await
        .unwrap();
    repo.update_metadata(recs[0].id, MetadataMode::Replace, Metadata::default(), None)
        .await
        .unwrap();
    repo.write_batch(&[Write::Delete(recs[0].id)]).await.unwrap();
    assert!(repo.get_payload(recs[0].id).await.unwrap().is_none());
    assert!(repo.get_lineage(recs[1].id, true, 0).await.unwrap().is_empty());
    assert!(matches!(
        repo.get_metadata(recs[0].id).await,
        Err(CatalogError::NotFound(_))
    ));
    let labelled = ListQuery {
        labels: vec![("k".into(), "v".into())],
        page_size: 10,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&labelled).await.unwrap().total, 1);
}

/// The agent accepts labels up to 256-byte keys and 2 KiB values (its
/// defaults); every such label must fit the catalog's label index
/// (PostgreSQL's B-tree rows stop at about 2.7 KiB).
async fn the_largest_labels_the_agent_accepts_fit_the_label_index(b: Backend) {
    let repo = &*b.repo;
    // Incompressible text, so no index compression helps.
    let noise = |n: usize| -> String {
        let mut out = String::new();
        while out.len() < n {
            out.push_str(&uuid::Uuid::new_v4().simple().to_string());
        }
        out.truncate(n);
        out
    };
    let (key, value) = (noise(256), noise(2048));
    let rec = record(1, Tier::Ram, &[(key.as_str(), value.as_str())]);
    repo.write_batch(&[Write::Insert(rec.clone())]).await.unwrap();
    let found = ListQuery {
        labels: vec![(key, value)],
        page_size: 10,
        ..Default::default()
    };
    assert_eq!(repo.list_payloads(&found).await.unwrap().items.len(), 1);
}

async fn a_node_cannot_take_over_change_or_delete_another_nodes_rows(b: Backend) {
    let a = b.repo.clone();
    let other = b.open("node-b").await;
    let mine = record(100, Tier::Ram, &[("k", "v")]);
    insert(a.as_ref(), std::slice::from_ref(&mine)).await;
    let mut changed = mine.clone();
    changed.size_bytes = 1;
    for write in [Write::Insert(changed.clone()), Write::Update(changed)] {
        let refused = other.write_batch(&[write]).await;
        assert!(
            matches!(&refused, Err(CatalogError::Conflict(m)) if m.contains("belongs to another node")),
            "{refused:?}"
        );
    }
    // Any node finds the row and whose it is.
    let located = Some((mine.clone(), "standalone".to_string()));
    assert_eq!(other.locate_payload(mine.id).await.unwrap(), located);
    assert_eq!(a.locate_payload(mine.id).await.unwrap(), located);
    assert_eq!(
        other.locate_payload(PayloadId(uuid::Uuid::new_v4())).await.unwrap(),
        None
    );
    other.write_batch(&[Write::Delete(mine.id)]).await.unwrap();
    assert_eq!(a.get_payload(mine.id).await.unwrap(), Some(mine.clone()), "untouched");
    assert_eq!(a.load_payloads().await.unwrap(), vec![mine.clone()]);
    assert!(other.load_payloads().await.unwrap().is_empty());
    // Its owner still changes and deletes it.
    a.write_batch(&[Write::Delete(mine.id)]).await.unwrap();
    assert_eq!(a.get_payload(mine.id).await.unwrap(), None);
}

async fn listings_cover_this_node_another_or_the_whole_catalog(b: Backend) {
    let a = b.repo.clone();
    let other = b.open("node-b").await;
    let mine = record(100, Tier::Ram, &[("model", "m")]);
    let theirs = record(200, Tier::Disk, &[("model", "m")]);
    insert(a.as_ref(), std::slice::from_ref(&mine)).await;
    insert(other.as_ref(), std::slice::from_ref(&theirs)).await;
    let list = |scope: Scope, labels: bool| {
        let a = a.clone();
        async move {
            let query = ListQuery {
                scope,
                page_size: 1,
                labels: if labels {
                    vec![("model".into(), "m".into())]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            let mut seen = Vec::new();
            let mut query = query;
            loop {
                let page = a.list_payloads(&query).await.unwrap();
                assert_eq!(page.items.len(), page.nodes.len());
                seen.extend(page.items.iter().map(|r| r.id).zip(page.nodes.clone()));
                match page.next {
                    Some(next) => query.after = Some(next),
                    None => return (seen, page.total),
                }
            }
        }
    };
    for labels in [false, true] {
        let (own, total) = list(Scope::Own, labels).await;
        assert_eq!((own, total), (vec![(mine.id, "standalone".to_string())], 1));
        let (theirs_only, _) = list(Scope::Node("node-b".into()), labels).await;
        assert_eq!(theirs_only, vec![(theirs.id, "node-b".to_string())]);
        // Newest first, each with its node, over pages of one.
        let (all, total) = list(Scope::Cluster, labels).await;
        assert_eq!(total, 2);
        assert_eq!(
            all,
            vec![(theirs.id, "node-b".to_string()), (mine.id, "standalone".to_string())]
        );
    }
}

parity!(
    listings_cover_this_node_another_or_the_whole_catalog,
    a_node_cannot_take_over_change_or_delete_another_nodes_rows,
    the_largest_labels_the_agent_accepts_fit_the_label_index,
    rows_round_trip_and_updates_of_missing_rows_fail,
    listing_filters_and_pages_stay_stable_while_rows_are_inserted,
    each_node_loads_and_lists_only_its_own_rows,
    deleting_a_payload_removes_its_lineage_metadata_and_labels,
);
