//! Streams: offsets, reads, retention, consumer offsets, bad input,
//! concurrent appenders, and wake-ups for subscribers.

use std::collections::BTreeMap;
use std::time::Duration;

use payload_catalog::*;

use super::{insert, parity, record, Backend};

fn key(name: &str) -> StreamKey {
    StreamKey::new("ns", name).unwrap()
}

fn item(payload_id: PayloadId, n: u64) -> AppendItem {
    AppendItem {
        payload_id,
        event_time_ms: 1_000 + n,
        duration_ns: n,
        tags: BTreeMap::from([("n".to_string(), n.to_string())]),
    }
}

fn read_from(start: u64) -> ReadQuery {
    ReadQuery {
        start,
        end: None,
        max: 0,
        not_before_ms: 0,
    }
}

async fn appends_get_contiguous_offsets_in_request_order(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    let s = key("events");
    repo.create_stream(&s, Retention::default(), None, 50).await.unwrap();
    assert_eq!(
        repo.append(&s, &[item(rec.id, 0), item(rec.id, 1)], 100).await.unwrap(),
        (0, 1)
    );
    assert_eq!(repo.append(&s, &[item(rec.id, 2)], 200).await.unwrap(), (2, 2));
    assert_eq!(repo.append(&s, &[], 200).await.unwrap(), (0, 0), "nothing appended");
    let all = repo.read_stream(&s, read_from(0)).await.unwrap();
    assert_eq!(all.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(
        all[1],
        StreamEntry {
            offset: 1,
            payload_id: rec.id,
            event_time_ms: 1_001,
            append_time_ms: 100,
            duration_ns: 1,
            tags: item(rec.id, 1).tags,
        }
    );
    let range = ReadQuery {
        start: 1,
        end: Some(1),
        ..read_from(1)
    };
    assert_eq!(repo.read_stream(&s, range).await.unwrap(), vec![all[1].clone()]);
    let capped = ReadQuery { max: 2, ..read_from(0) };
    assert_eq!(repo.read_stream(&s, capped).await.unwrap().len(), 2);
    let recent = ReadQuery {
        not_before_ms: 150,
        ..read_from(0)
    };
    assert_eq!(repo.read_stream(&s, recent).await.unwrap(), vec![all[2].clone()]);
    assert!(
        repo.read_stream(&s, read_from(3)).await.unwrap().is_empty(),
        "the head is empty"
    );
    let head = repo.stream_head(&s).await.unwrap();
    assert_eq!(head.next_offset, 3);
    assert_eq!(repo.read_entries(head.id, 1, 1).await.unwrap(), vec![all[1].clone()]);
    assert_eq!(repo.read_entries(head.id, 0, 100).await.unwrap(), all);
}

async fn bad_stream_requests_get_precise_errors(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    assert!(matches!(
        StreamKey::new("ns", ""),
        Err(CatalogError::InvalidArgument(_))
    ));
    let s = key("s");
    let ghost = key("ghost");
    assert!(matches!(
        repo.append(&ghost, &[item(rec.id, 0)], 1).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        repo.read_stream(&ghost, read_from(0)).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        repo.get_committed(&ghost, "g").await,
        Err(CatalogError::NotFound(_))
    ));
    repo.create_stream(&s, Retention::default(), None, 1).await.unwrap();
    assert!(matches!(
        repo.create_stream(&s, Retention::default(), None, 1).await,
        Err(CatalogError::AlreadyExists(_))
    ));
    let unknown = [item(rec.id, 0), item(PayloadId::random(), 1)];
    assert!(matches!(
        repo.append(&s, &unknown, 1).await,
        Err(CatalogError::NotFound(_))
    ));
    assert_eq!(
        repo.stream_head(&s).await.unwrap().next_offset,
        0,
        "a refused append writes nothing"
    );
    repo.append(&s, &[item(rec.id, 0)], 1).await.unwrap();
    assert!(matches!(
        repo.read_stream(&s, read_from(2)).await,
        Err(CatalogError::OutOfRange(_))
    ));
    let backwards = ReadQuery {
        end: Some(0),
        ..read_from(1)
    };
    assert!(matches!(
        repo.read_stream(&s, backwards).await,
        Err(CatalogError::InvalidArgument(_))
    ));
    assert!(matches!(
        repo.commit_offset(&s, "g", 5, 1).await,
        Err(CatalogError::OutOfRange(_))
    ));
    assert!(matches!(
        repo.commit_offset(&s, "", 0, 1).await,
        Err(CatalogError::InvalidArgument(_))
    ));
}

async fn retention_trims_by_count_and_by_age(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    let by_count = key("count");
    let three = Retention {
        max_entries: 3,
        max_age_ms: 0,
    };
    repo.create_stream(&by_count, three, None, 1).await.unwrap();
    for n in 0..5 {
        repo.append(&by_count, &[item(rec.id, n)], 10).await.unwrap();
    }
    let kept = repo.read_stream(&by_count, read_from(0)).await.unwrap();
    assert_eq!(kept.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![2, 3, 4]);

    let by_age = key("age");
    let second = Retention {
        max_entries: 0,
        max_age_ms: 1_000,
    };
    repo.create_stream(&by_age, second, None, 1).await.unwrap();
    repo.append(&by_age, &[item(rec.id, 0)], 10_000).await.unwrap();
    repo.append(&by_age, &[item(rec.id, 1)], 10_500).await.unwrap();
    repo.append(&by_age, &[item(rec.id, 2)], 11_200).await.unwrap();
    let kept = repo.read_stream(&by_age, read_from(0)).await.unwrap();
    assert_eq!(kept.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![1, 2]);
}

async fn consumer_offsets_tell_nothing_committed_from_zero(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    let s = key("s");
    repo.create_stream(&s, Retention::default(), None, 1).await.unwrap();
    repo.append(&s, &[item(rec.id, 0), item(rec.id, 1)], 1).await.unwrap();
    assert_eq!(repo.get_committed(&s, "g").await.unwrap(), None);
    repo.commit_offset(&s, "g", 0, 1).await.unwrap();
    assert_eq!(repo.get_committed(&s, "g").await.unwrap(), Some(0));
    repo.commit_offset(&s, "g", 2, 1).await.unwrap();
    assert_eq!(repo.get_committed(&s, "g").await.unwrap(), Some(2));
    assert_eq!(repo.get_committed(&s, "other").await.unwrap(), None);

    // Deleting cascades to entries and offsets; deleting again is fine.
    repo.delete_stream(&s, None).await.unwrap();
    repo.delete_stream(&s, None).await.unwrap();
    repo.create_stream(&s, Retention::default(), None, 1).await.unwrap();
    assert_eq!(repo.get_committed(&s, "g").await.unwrap(), None);
    assert!(repo.read_stream(&s, read_from(0)).await.unwrap().is_empty());
}

async fn concurrent_appenders_never_share_an_offset(b: Backend) {
    let rec = record(1, Tier::Ram, &[]);
    insert(&*b.repo, std::slice::from_ref(&rec)).await;
    let s = key("busy");
    b.repo.create_stream(&s, Retention::default(), None, 1).await.unwrap();
    let other = b.open("standalone").await;
    let writers = [b.repo.clone(), other].map(|repo| {
        let s = s.clone();
        tokio::spawn(async move {
            let mut offsets = Vec::new();
            for n in 0..50 {
                let (first, last) = repo.append(&s, &[item(rec.id, n), item(rec.id, n)], 1).await.unwrap();
                offsets.extend(first..=last);
            }
            offsets
        })
    });
    let mut offsets = Vec::new();
    for writer in writers {
        offsets.extend(writer.await.unwrap());
    }
    offsets.sort();
    assert_eq!(offsets, (0..200).collect::<Vec<_>>(), "unique and contiguous");
    let stored = b.repo.read_stream(&s, read_from(0)).await.unwrap();
    assert_eq!(stored.len(), 200);
}

async fn watchers_wake_on_append_and_on_delete(b: Backend) {
    let repo = &*b.repo;
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    let s = key("s");
    repo.create_stream(&s, Retention::default(), None, 1).await.unwrap();
    let head = repo.stream_head(&s).await.unwrap();
    let mut rx = repo.watch_stream(head);
    assert_eq!(*rx.borrow_and_update(), 0);
    repo.append(&s, &[item(rec.id, 0)], 1).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("woken by the append")
        .unwrap();
    assert_eq!(*rx.borrow_and_update(), 1);
    repo.delete_stream(&s, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("woken by the delete")
        .unwrap();
    assert!(matches!(repo.stream_head(&s).await, Err(CatalogError::NotFound(_))));
}

async fn streams_keep_their_owner_and_delete_only_as_theirs(b: Backend) {
    let repo = &*b.repo;
    let s = key("owned");
    assert!(matches!(repo.stream_owner(&s).await, Err(CatalogError::NotFound(_))));
    repo.create_stream(&s, Retention::default(), Some("unix:1000:1000"), 1)
        .await
        .unwrap();
    let owned = repo.stream_owner(&s).await.unwrap();
    assert_eq!(owned.owner.as_deref(), Some("unix:1000:1000"));
    // A delete checked against another owner (the stream was made again
    // meanwhile) leaves it.
    repo.delete_stream(&s, Some("unix:1001:1001")).await.unwrap();
    repo.delete_stream(&s, None).await.unwrap();
    repo.stream_head(&s).await.unwrap();
    repo.delete_stream(&s, Some("unix:1000:1000")).await.unwrap();
    assert!(matches!(repo.stream_head(&s).await, Err(CatalogError::NotFound(_))));
    let open = key("open");
    repo.create_stream(&open, Retention::default(), None, 1).await.unwrap();
    assert_eq!(repo.stream_owner(&open).await.unwrap().owner, None);
    // An append checked against a stream that was deleted and made again
    // since goes nowhere.
    let rec = record(1, Tier::Ram, &[]);
    insert(repo, std::slice::from_ref(&rec)).await;
    repo.delete_stream(&s, Some("unix:1000:1000")).await.ok();
    repo.create_stream(&s, Retention::default(), Some("unix:1001:1001"), 1)
        .await
        .unwrap();
    assert!(matches!(
        repo.append_to(&s, Some(owned.id), &[item(rec.id, 0)], 1).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(repo.read_stream(&s, read_from(0)).await.unwrap().is_empty());
    let now = repo.stream_owner(&s).await.unwrap();
    assert_ne!(now.id, owned.id);
    assert_eq!(
        repo.append_to(&s, Some(now.id), &[item(rec.id, 0)], 1).await.unwrap(),
        (0, 0)
    );
    repo.delete_stream(&open, None).await.unwrap();
    assert!(matches!(repo.stream_head(&open).await, Err(CatalogError::NotFound(_))));
}

parity!(
    streams_keep_their_owner_and_delete_only_as_theirs,
    appends_get_contiguous_offsets_in_request_order,
    bad_stream_requests_get_precise_errors,
    retention_trims_by_count_and_by_age,
    consumer_offsets_tell_nothing_committed_from_zero,
    concurrent_appenders_never_share_an_offset,
    watchers_wake_on_append_and_on_delete,
);

/// Agents sharing a PostgreSQL catalog hear each other's appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_appends_through_one_agent_wake_watchers_on_another() {
    let Some(b) = Backend::postgres().await else {
        return;
    };
    let other = b.open("node-b").await;
    let rec = record(1, Tier::Ram, &[]);
    insert(&*b.repo, std::slice::from_ref(&rec)).await;
    let s = key("shared");
    b.repo.create_stream(&s, Retention::default(), None, 1).await.unwrap();
    let mut rx = other.watch_stream(other.stream_head(&s).await.unwrap());
    rx.borrow_and_update();
    b.repo.append(&s, &[item(rec.id, 0), item(rec.id, 1)], 1).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("NOTIFY reached the other agent")
        .unwrap();
    assert_eq!(*rx.borrow_and_update(), 2);
    assert_eq!(other.read_stream(&s, read_from(0)).await.unwrap().len(), 2);
}
