use super::*;
use payload_catalog::{PayloadId, PayloadRecord, PayloadState, SqliteRepository, Tier};
use sqlx::Connection as _;

fn record(id: PayloadId, state: PayloadState) -> PayloadRecord {
    PayloadRecord {
        state,
        ..PayloadRecord::allocated(id, Tier::Ram, 1, 1)
    }
}

async fn sqlite(dir: &Path) -> Arc<dyn Repository> {
    Arc::new(SqliteRepository::open(&dir.join("c.db")).await.unwrap())
}

#[test]
fn coalescing_keeps_the_last_write_per_payload_and_never_revives_a_delete() {
    let (a, b, c) = (PayloadId::random(), PayloadId::random(), PayloadId::random());
    let writes = vec![
        Write::Insert(record(a, PayloadState::Allocated)),
        Write::Insert(record(b, PayloadState::Allocated)),
        Write::Update(record(a, PayloadState::Active)),
        Write::Delete(b),
        Write::Delete(c),
        Write::Update(record(c, PayloadState::Active)),
    ];
    let out = coalesce(writes);
    assert_eq!(out.len(), 3);
    assert!(matches!(&out[0], Write::Insert(r) if r.id == a && r.state == PayloadState::Active));
    assert!(matches!(&out[1], Write::Delete(id) if *id == b));
    assert!(matches!(&out[2], Write::Delete(id) if *id == c), "{:?}", out[2]);
}

#[tokio::test]
async fn a_logged_write_that_never_reached_the_catalog_is_replayed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let repo = sqlite(dir.path()).await;
    let (kept, dropped) = (PayloadId::random(), PayloadId::random());
    let mut log = Vec::new();
    for write in [
        Write::Insert(record(kept, PayloadState::Allocated)),
        Write::Insert(record(dropped, PayloadState::Allocated)),
        Write::Update(record(kept, PayloadState::Active)),
        Write::Delete(dropped),
        // Already applied before the crash: replaying it again is harmless.
        Write::Update(record(kept, PayloadState::Active)),
    ] {
        log.extend(frame(&write).unwrap());
    }
    log.extend_from_slice(&[200, 0, 0, 0, b'{']); // a torn last record
    std::fs::write(dir.path().join("catalog.log"), log).unwrap();

    let writer = Writer::open(repo.clone(), &dir.path().join("catalog.log"), 100)
        .await
        .unwrap();
    assert_eq!(
        repo.get_payload(kept).await.unwrap().unwrap().state,
        PayloadState::Active
    );
    assert!(repo.get_payload(dropped).await.unwrap().is_none());
    assert_eq!(
        std::fs::metadata(dir.path().join("catalog.log")).unwrap().len(),
        0,
        "replayed, then emptied"
    );

    writer.write(Write::Delete(kept)).unwrap();
    writer.flush().await.unwrap();
    assert!(repo.get_payload(kept).await.unwrap().is_none());
}

#[tokio::test]
async fn a_write_the_catalog_refuses_is_set_aside_and_the_rest_land() {
    let dir = tempfile::tempdir().unwrap();
    let repo = sqlite(dir.path()).await;
    let writer = Writer::open(repo.clone(), &dir.path().join("catalog.log"), 100)
        .await
        .unwrap();
    let (a, ghost, b) = (PayloadId::random(), PayloadId::random(), PayloadId::random());
    writer.write(Write::Insert(record(a, PayloadState::Active))).unwrap();
    // An update of a row that does not exist: refused for good.
    writer
        .write(Write::Update(record(ghost, PayloadState::Active)))
        .unwrap();
    writer.write(Write::Insert(record(b, PayloadState::Active))).unwrap();
    writer.flush().await.unwrap();
    assert!(repo.get_payload(a).await.unwrap().is_some());
    assert!(repo.get_payload(b).await.unwrap().is_some());
    let rejected = std::fs::read_to_string(dir.path().join("catalog.rejected")).unwrap();
    assert_eq!(rejected.lines().count(), 1, "{rejected}");
    assert!(rejected.contains(&ghost.to_string()), "{rejected}");
    assert_eq!(writer.backlog(), 0);
    assert_eq!(std::fs::metadata(dir.path().join("catalog.log")).unwrap().len(), 0);
}

/// Holds SQLite's write lock from another connection, as another process
/// would (`BEGIN IMMEDIATE` and nothing else).
async fn hold_write_lock(db: &Path) -> sqlx::SqliteConnection {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
    conn
}

#[tokio::test]
async fn a_locked_catalog_keeps_writes_in_the_log_until_it_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let repo = sqlite(dir.path()).await;
    let log_path = dir.path().join("catalog.log");
    let writer = Writer::open(repo.clone(), &log_path, 3).await.unwrap();
    let mut locker = hold_write_lock(&dir.path().join("c.db")).await;

    let ids: Vec<_> = (0..2).map(|_| PayloadId::random()).collect();
    for id in &ids {
        writer.write(Write::Insert(record(*id, PayloadState::Active))).unwrap();
    }
    // Refused for good once the catalog is back: set aside last.
    let ghost = PayloadId::random();
    writer
        .write(Write::Update(record(ghost, PayloadState::Active)))
        .unwrap();
    while lock(&writer.shared.health).failing_since.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        writer.backlog(),
        3,
        "nothing leaves the log while the catalog is locked"
    );
    assert!(std::fs::metadata(&log_path).unwrap().len() > 0);
    let refused = writer.admit().unwrap_err();
    assert!(
        matches!(&refused, AgentError::Unavailable(m) if m.contains("catalog.log")),
        "{refused:?}"
    );

    // A restart now (a second writer on the same log) refuses to start and keeps the log.
    let before = std::fs::read(&log_path).unwrap();
    let err = Writer::open(repo.clone(), &log_path, 3).await.err().expect("refused");
    assert!(err.to_string().contains("they are kept there"), "{err}");
    assert_eq!(std::fs::read(&log_path).unwrap(), before);

    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    // Readers are refused at once while the catalog fails; the writer's
    // next retry lands everything.
    wait_for_catch_up(&writer).await;
    for id in &ids {
        assert!(repo.get_payload(*id).await.unwrap().is_some(), "{id} landed");
    }
    assert_eq!(writer.backlog(), 0);
    // The last thing the writer did was set a write aside: it is healthy.
    writer.flush().await.unwrap();
    let rejected = std::fs::read_to_string(dir.path().join("catalog.rejected")).unwrap();
    assert!(rejected.contains(&ghost.to_string()), "{rejected}");
    writer.admit().unwrap();
}

#[tokio::test]
async fn concurrent_synced_writes_all_wait_for_an_fsync_that_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let repo = sqlite(dir.path()).await;
    let writer = Writer::open(repo, &dir.path().join("catalog.log"), 100).await.unwrap();
    let waits: Vec<_> = (0..8)
        .map(|_| {
            let writer = writer.clone();
            tokio::spawn(async move {
                let seq = writer
                    .write(Write::Insert(record(PayloadId::random(), PayloadState::Active)))
                    .unwrap();
                writer.sync(seq).await.map(|()| seq)
            })
        })
        .collect();
    for wait in waits {
        let seq = wait.await.unwrap().unwrap();
        assert!(
            *writer.shared.synced.borrow() > seq,
            "write {seq} returned before its fsync"
        );
    }
}

/// Waits (bounded) until the writer has applied everything.
async fn wait_for_catch_up(writer: &Writer) {
    for _ in 0..1_000 {
        if writer.flush().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the writer never caught up");
}

#[test]
fn a_rewrite_keeps_exactly_the_pending_writes_and_later_appends_land_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.log");
    let mut log = Log {
        file: durable::open_append(&path).unwrap(),
        path: path.clone(),
        len: 0,
        next_seq: 0,
        pending: VecDeque::new(),
    };
    let ids: Vec<PayloadId> = (0..100).map(|_| PayloadId::random()).collect();
    for (seq, id) in ids.iter().enumerate() {
        let framed = frame(&Write::Delete(*id)).unwrap();
        log.file.write_all(&framed).unwrap();
        log.len += framed.len() as u64;
        log.pending.push_back((seq as u64, framed));
    }
    assert!(log.len > REWRITE_AT, "the test must reach the rewrite");
    log.applied(49).unwrap();
    let kept = |path: &Path| -> Vec<PayloadId> {
        read_log(path)
            .unwrap()
            .into_iter()
            .map(|w| match w {
                Write::Delete(id) => id,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(kept(&path), ids[50..], "only what the catalog does not have yet");
    let extra = PayloadId::random();
    log.file.write_all(&frame(&Write::Delete(extra)).unwrap()).unwrap();
    assert_eq!(kept(&path).last(), Some(&extra), "appends go to the new file");
}

#[tokio::test]
async fn a_synced_commit_that_is_cancelled_does_not_wedge_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let repo = sqlite(dir.path()).await;
    let writer = Writer::open(repo, &dir.path().join("catalog.log"), 100).await.unwrap();
    let write = || Write::Insert(record(PayloadId::random(), PayloadState::Active));
    let first = writer.write(write()).unwrap();
    // Cut off at once, as a client that goes away would.
    let _ = tokio::time::timeout(Duration::ZERO, writer.sync(first)).await;
    let second = writer.write(write()).unwrap();
    let synced = tokio::time::timeout(Duration::from_secs(30), writer.sync(second)).await;
    assert!(
        matches!(synced, Ok(Ok(()))),
        "the second synced write hung or failed: {synced:?}"
    );
}

#[tokio::test]
async fn the_writer_is_healthy_again_once_it_has_set_a_refused_write_aside() {
    let dir = tempfile::tempdir().unwrap();
    let repo = sqlite(dir.path()).await;
    let writer = Writer::open(repo, &dir.path().join("catalog.log"), 10).await.unwrap();
    let mut locker = hold_write_lock(&dir.path().join("c.db")).await;
    // Only a write the catalog will refuse is pending: first it fails as an
    // outage (locked), then for good (no such row).
    writer
        .write(Write::Update(record(PayloadId::random(), PayloadState::Active)))
        .unwrap();
    while lock(&writer.shared.health).failing_since.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    for _ in 0..1_000 {
        if writer.backlog() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(writer.backlog(), 0, "the refused write was set aside");
    writer.flush().await.expect("readers are served again");
}
