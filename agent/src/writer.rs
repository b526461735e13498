//! Group commit: every catalog write goes through one task that takes all
//! writes waiting at that moment and applies them in one transaction. Callers
//! that need durability await the outcome; others (allocation rows, digests)
//! fire and forget, and ordering is preserved either way.

use std::sync::Arc;

use payload_catalog::{CatalogError, Repository, Write};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<(), CatalogError>>;

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 4096;

#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<(Option<Write>, Option<Reply>)>,
}

impl Writer {
    /// Starts the writer task; it ends when every `Writer` clone is dropped.
    pub fn spawn(repo: Arc<dyn Repository>) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(repo, rx));
        (Writer { tx }, task)
    }

    /// Queues a write and waits until it is committed.
    pub async fn write(&self, write: Write) -> Result<(), CatalogError> {
        self.send_and_wait(Some(write)).await
    }

    /// Waits until every write queued before this call is committed.
    pub async fn flush(&self) -> Result<(), CatalogError> {
        self.send_and_wait(None).await
    }

    async fn send_and_wait(&self, write: Option<Write>) -> Result<(), CatalogError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send((write, Some(reply)))
            .map_err(|_| CatalogError::Storage("the catalog writer has stopped".into()))?;
        done.await
            .map_err(|_| CatalogError::Storage("the catalog writer has stopped".into()))?
    }

    /// Queues a write without waiting; a later awaited write commits after it.
    pub fn enqueue(&self, write: Write) {
        let _ = self.tx.send((Some(write), None));
    }
}

async fn run(repo: Arc<dyn Repository>, mut rx: mpsc::UnboundedReceiver<(Option<Write>, Option<Reply>)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (items, replies): (Vec<Option<Write>>, Vec<Option<Reply>>) = batch.drain(..).unzip();
        let is_write: Vec<bool> = items.iter().map(Option::is_some).collect();
        let writes: Vec<Write> = items.into_iter().flatten().collect();
        match repo.write_batch(&writes).await {
            Ok(()) => {
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(Ok(()));
                }
            }
            // One bad write must not fail its neighbours: retry one by one.
            Err(_) => {
                let mut writes = writes.iter();
                for (reply, is_write) in replies.into_iter().zip(is_write) {
                    let result = match is_write.then(|| writes.next()).flatten() {
                        Some(write) => repo.write_batch(std::slice::from_ref(write)).await,
                        None => Ok(()),
                    };
                    if let Err(err) = &result {
                        tracing::error!(%err, "catalog write failed");
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }
}
