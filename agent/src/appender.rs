//! Group append: appends to one stream that arrive while the previous one is
//! in the catalog share the next transaction, so concurrent appenders pay
//! for one commit (one fsync on PostgreSQL) between them. Offsets stay
//! contiguous per call and in arrival order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use payload_catalog::{AppendItem, CatalogError, Repository, StreamKey};
use tokio::sync::{mpsc, oneshot};

/// Items gathered into one transaction at most.
const MAX_BATCH_ITEMS: usize = 10_000;

type Reply = oneshot::Sender<Result<(u64, u64), CatalogError>>;

struct Pending {
    /// The stream's row id, when the caller checked it (see
    /// [`Repository::append_to`]).
    stream: Option<i64>,
    items: Vec<AppendItem>,
    now_ms: u64,
    reply: Reply,
}

type Queues = Arc<Mutex<HashMap<StreamKey, mpsc::UnboundedSender<Pending>>>>;

/// One queue (and one task draining it) per stream being appended to; a
/// queue found empty is removed, so idle streams cost nothing.
pub struct Appender {
    repo: Arc<dyn Repository>,
    queues: Queues,
}

impl Appender {
    pub fn new(repo: Arc<dyn Repository>) -> Self {
        Self {
            repo,
            queues: Arc::default(),
        }
    }

    /// As [`Repository::append_to`], batched with concurrent appends to `key`.
    pub async fn append(
        &self,
        key: StreamKey,
        stream: Option<i64>,
        items: Vec<AppendItem>,
        now_ms: u64,
    ) -> Result<(u64, u64), CatalogError> {
        let (reply, done) = oneshot::channel();
        let pending = Pending {
            stream,
            items,
            now_ms,
            reply,
        };
        {
            // Sent under the lock the drain task takes to retire an empty
            // queue: a send never lands in a queue nobody drains.
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = queues.entry(key.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(drain(self.repo.clone(), self.queues.clone(), key, rx));
                tx
            });
            if queue.send(pending).is_err() {
                return Err(CatalogError::Storage("the stream appender stopped".into()));
            }
        }
        done.await
            .map_err(|_| CatalogError::Storage("the stream appender stopped".into()))?
    }
}

async fn drain(repo: Arc<dyn Repository>, queues: Queues, key: StreamKey, mut rx: mpsc::UnboundedReceiver<Pending>) {
    loop {
        let first = {
            let mut map = queues.lock().unwrap_or_else(|e| e.into_inner());
            match rx.try_recv() {
                Ok(first) => first,
                Err(_) => {
                    map.remove(&key);
                    return;
                }
            }
        };
        let mut batch = vec![first];
        let mut count = batch[0].items.len();
        while count < MAX_BATCH_ITEMS {
            match rx.try_recv() {
                Ok(next) => {
                    count += next.items.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        append_batch(repo.as_ref(), &key, batch).await;
        // Let callers queue up while this one was in the catalog.
        tokio::task::yield_now().await;
    }
}

async fn append_batch(repo: &dyn Repository, key: &StreamKey, batch: Vec<Pending>) {
    let stream = batch[0].stream;
    // One transaction only for calls checked against the same stream.
    if batch.len() == 1 || batch.iter().any(|p| p.stream != stream) {
        for pending in batch {
            let appended = repo
                .append_to(key, pending.stream, &pending.items, pending.now_ms)
                .await;
            let _ = pending.reply.send(appended);
        }
        return;
    }
    let items: Vec<AppendItem> = batch.iter().flat_map(|p| p.items.iter().cloned()).collect();
    let now_ms = batch.iter().map(|p| p.now_ms).max().unwrap_or_default();
    match repo.append_to(key, stream, &items, now_ms).await {
        Ok((first, _)) => {
            let mut next = first;
            for pending in batch {
                let n = pending.items.len() as u64;
                let range = if n == 0 { (0, 0) } else { (next, next + n - 1) };
                next += n;
                let _ = pending.reply.send(Ok(range));
            }
        }
        // One bad call must not fail the others: each goes alone, and gets
        // its own answer.
        Err(_) => {
            for pending in batch {
                let appended = repo
                    .append_to(key, pending.stream, &pending.items, pending.now_ms)
                    .await;
                let _ = pending.reply.send(appended);
            }
        }
    }
}
