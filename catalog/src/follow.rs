//! What every server of streams does the same way, agent or operator:
//! feeding a subscriber as appends commit, and checking a range read.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::error::{CatalogError, Result};
use crate::repo::Repository;
use crate::stream::{ReadQuery, StreamEntry, StreamHead, StreamKey, MAX_READ};

/// Feeds one subscriber: reads from `next` in batches the size of its
/// window (one query each), sends each entry (waiting for room, so a slow
/// subscriber holds back only this task), and sleeps on the stream's watch
/// once caught up. Ends when the subscriber goes away or the stream is
/// deleted (a `NotFound` is its last message).
pub async fn follow(
    repo: Arc<dyn Repository>,
    key: StreamKey,
    head: StreamHead,
    mut next: u64,
    batch: u64,
    tx: mpsc::Sender<Result<StreamEntry>>,
) {
    let mut woken: watch::Receiver<u64> = repo.watch_stream(head);
    loop {
        // Marked seen before reading: an append committed after this point
        // wakes the wait below even if the read already returned it.
        woken.borrow_and_update();
        let entries = match repo.read_entries(head.id, next, batch).await {
            Ok(entries) => entries,
            Err(err) => {
                let _ = tx.send(Err(err)).await;
                return;
            }
        };
        let caught_up = (entries.len() as u64) < batch;
        if entries.is_empty() {
            // Woken with nothing to read: the stream may be gone (a delete
            // wakes its subscribers), or gone and made again under its name.
            match repo.stream_head(&key).await {
                Ok(now) if now.id == head.id => {}
                Ok(_) | Err(CatalogError::NotFound(_)) => {
                    let gone = CatalogError::NotFound(format!("stream {key} was deleted"));
                    let _ = tx.send(Err(gone)).await;
                    return;
                }
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        }
        for entry in entries {
            next = entry.offset + 1;
            if tx.send(Ok(entry)).await.is_err() {
                return;
            }
        }
        if caught_up {
            tokio::select! {
                changed = woken.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    }
}

/// Where a subscription starts, checked against the stream's head.
pub fn subscription_start(key: &StreamKey, head: StreamHead, start: u64) -> Result<u64> {
    if start > head.next_offset {
        return Err(CatalogError::OutOfRange(format!(
            "offset {start} is past the head of stream {key} (next offset {}); subscribe from_latest to wait for \
             new entries",
            head.next_offset
        )));
    }
    Ok(start)
}

/// The entries `start..=end` of a stream, refused when the range is
/// inverted, too long for one read, or reaches past the last entry.
pub async fn read_range(repo: &dyn Repository, key: &StreamKey, start: u64, end: u64) -> Result<Vec<StreamEntry>> {
    if end < start {
        return Err(CatalogError::InvalidArgument(format!(
            "end_offset {end} is before start_offset {start}"
        )));
    }
    if end - start >= MAX_READ {
        return Err(CatalogError::InvalidArgument(format!(
            "a range holds at most {MAX_READ} entries; split {start}..={end}"
        )));
    }
    let head = repo.stream_head(key).await?;
    if end >= head.next_offset {
        return Err(CatalogError::OutOfRange(format!(
            "end_offset {end} is past the last entry of stream {key} (next offset {})",
            head.next_offset
        )));
    }
    let query = ReadQuery {
        start,
        end: Some(end),
        max: MAX_READ,
        not_before_ms: 0,
    };
    repo.read_stream(key, query).await
}
