//! Catalog writes, durable on append. Every write goes first to a small
//! write-ahead log (one `write()`; the page cache survives SIGKILL), then to
//! one task that takes all writes waiting at that moment and applies them to
//! the catalog in one transaction (group commit). Nothing on the request path
//! waits for the catalog; readers of the catalog call [`Writer::flush`]
//! first. At start-up the log is replayed into the catalog, which is
//! harmless for writes that had already landed (inserts are upserts).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write as _};
use std::path::Path;
use std::sync::{Arc, Mutex};

use payload_catalog::{CatalogError, Repository, Write};
use tokio::sync::{mpsc, oneshot};

use crate::node::lock;

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 4096;
/// How long the writer lets a burst gather when nobody is waiting on it:
/// fewer, larger transactions leave the CPU to the request path.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);
/// Rewrite the log with only pending writes once it is this large.
const REWRITE_AT: u64 = 16 << 20;

enum Item {
    Write(u64, Write),
    Flush(oneshot::Sender<Result<(), CatalogError>>),
}

struct Log {
    file: File,
    path: std::path::PathBuf,
    len: u64,
    next_seq: u64,
    /// Appended but not yet in the catalog, oldest first, as encoded.
    pending: VecDeque<(u64, Vec<u8>)>,
}

#[derive(Clone)]
pub struct Writer {
    log: Arc<Mutex<Log>>,
    tx: mpsc::UnboundedSender<Item>,
}

fn storage(what: &str, e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Storage(format!("{what}: {e}"))
}

fn frame(write: &Write) -> Result<Vec<u8>, CatalogError> {
    let body = serde_json::to_vec(write).map_err(|e| storage("encoding a catalog write", e))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes the log; a torn final record ends it.
fn read_log(path: &Path) -> io::Result<Vec<Write>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let mut writes = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let Some(body) = rest.get(4..4 + len) else { break };
        let Ok(write) = serde_json::from_slice(body) else { break };
        writes.push(write);
        rest = &rest[4 + len..];
    }
    Ok(writes)
}

/// Applies writes one by one, so that one bad write cannot fail the rest.
async fn apply_each(repo: &dyn Repository, writes: &[Write]) -> Result<(), CatalogError> {
    let mut first_err = None;
    for write in writes {
        if let Err(err) = repo.write_batch(std::slice::from_ref(write)).await {
            tracing::error!(?write, %err, "catalog write failed");
            first_err.get_or_insert(err);
        }
    }
    first_err.map_or(Ok(()), Err)
}

impl Writer {
    /// Replays the log at `path` into `repo`, then starts the writer task;
    /// it ends when every `Writer` clone is dropped.
    pub async fn open(repo: Arc<dyn Repository>, path: &Path) -> Result<Writer, CatalogError> {
        let replay = read_log(path).map_err(|e| storage("reading the catalog log", e))?;
        if !replay.is_empty() {
            tracing::info!(writes = replay.len(), "replaying the catalog log");
            if repo.write_batch(&replay).await.is_err() {
                // An update of a row deleted later in the log fails alone; the rest apply.
                let _ = apply_each(repo.as_ref(), &replay).await;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| storage("opening the catalog log", e))?;
        file.set_len(0).map_err(|e| storage("truncating the catalog log", e))?;
        let log = Log {
            file,
            path: path.to_path_buf(),
            len: 0,
            next_seq: 0,
            pending: VecDeque::new(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(log));
        tokio::spawn(run(repo, rx, log.clone()));
        Ok(Writer { log, tx })
    }

    /// Makes `write` durable (logged) and queues it for the catalog.
    pub fn write(&self, write: Write) -> Result<(), CatalogError> {
        let framed = frame(&write)?;
        let mut log = lock(&self.log);
        log.file
            .write_all(&framed)
            .map_err(|e| storage("appending to the catalog log", e))?;
        let seq = log.next_seq;
        log.next_seq += 1;
        log.len += framed.len() as u64;
        log.pending.push_back((seq, framed));
        // Sent under the lock: the catalog sees writes in log order.
        self.tx
            .send(Item::Write(seq, write))
            .map_err(|_| storage("catalog writer", "stopped"))
    }

    /// Waits until every write made before this call is in the catalog.
    pub async fn flush(&self) -> Result<(), CatalogError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Item::Flush(reply))
            .map_err(|_| storage("catalog writer", "stopped"))?;
        done.await.map_err(|_| storage("catalog writer", "stopped"))?
    }
}

impl Log {
    /// Forgets writes up to `seq`, now in the catalog, and keeps the file small.
    fn applied(&mut self, seq: u64) -> io::Result<()> {
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            self.pending.pop_front();
        }
        if self.pending.is_empty() {
            self.file.set_len(0)?;
            self.len = 0;
        } else if self.len > REWRITE_AT {
            let tmp = self.path.with_extension("rewrite");
            let mut file = File::create(&tmp)?;
            let mut len = 0;
            for (_, framed) in &self.pending {
                file.write_all(framed)?;
                len += framed.len() as u64;
            }
            std::fs::rename(&tmp, &self.path)?;
            self.file = OpenOptions::new().append(true).open(&self.path)?;
            self.len = len;
        }
        Ok(())
    }
}

/// Keeps the last write per payload row (an update after an insert stays an
/// insert), so a payload allocated, committed and hashed within one batch
/// costs one row write. Other steps (the agent logs none today) stay as they are.
fn coalesce(writes: Vec<Write>) -> Vec<Write> {
    use payload_catalog::PayloadId;
    use std::collections::HashMap;
    let id = |w: &Write| -> Option<PayloadId> {
        match w {
            Write::Insert(r) | Write::Update(r) => Some(r.id),
            Write::Delete(id) => Some(*id),
            Write::Lineage { .. } | Write::Metadata { .. } | Write::CommitOffset { .. } => None,
        }
    };
    let mut slot: HashMap<PayloadId, usize> = HashMap::with_capacity(writes.len());
    let mut out: Vec<Option<Write>> = Vec::with_capacity(writes.len());
    for write in writes {
        let Some(key) = id(&write) else {
            out.push(Some(write));
            continue;
        };
        let write = match (slot.get(&key).and_then(|&i| out[i].take()), write) {
            (Some(Write::Insert(_)), Write::Update(rec)) => Write::Insert(rec),
            (_, write) => write,
        };
        slot.insert(key, out.len());
        out.push(Some(write));
    }
    out.into_iter().flatten().collect()
}

async fn run(repo: Arc<dyn Repository>, mut rx: mpsc::UnboundedReceiver<Item>, log: Arc<Mutex<Log>>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Gather a burst, but stop as soon as somebody waits on a flush.
        let deadline = tokio::time::Instant::now() + GATHER;
        while batch.len() < MAX_BATCH && !batch.iter().any(|item| matches!(item, Item::Flush(_))) {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                item = rx.recv() => match item {
                    Some(item) => batch.push(item),
                    None => break,
                },
            }
        }
        let mut writes = Vec::new();
        let mut flushes = Vec::new();
        let mut last = None;
        for item in batch.drain(..) {
            match item {
                Item::Write(seq, write) => {
                    writes.push(write);
                    last = Some(seq);
                }
                Item::Flush(reply) => flushes.push(reply),
            }
        }
        let writes = coalesce(writes);
        let mut result = Ok(());
        if !writes.is_empty() && repo.write_batch(&writes).await.is_err() {
            result = apply_each(repo.as_ref(), &writes).await;
        }
        if let Some(seq) = last {
            // Failed writes stay logged only until the next start-up replays them.
            if let Err(e) = lock(&log).applied(seq) {
                tracing::warn!(%e, "could not trim the catalog log");
            }
        }
        for reply in flushes {
            let _ = reply.send(result.as_ref().map(|_| ()).map_err(|e| storage("catalog write", e)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payload_catalog::{PayloadId, PayloadRecord, PayloadState, SqliteRepository, Tier};

    fn record(id: PayloadId, state: PayloadState) -> PayloadRecord {
        PayloadRecord {
            state,
            ..PayloadRecord::allocated(id, Tier::Ram, 1, 1)
        }
    }

    #[test]
    fn coalescing_keeps_the_last_write_per_payload_and_inserts_stay_inserts() {
        let (a, b) = (PayloadId::random(), PayloadId::random());
        let writes = vec![
            Write::Insert(record(a, PayloadState::Allocated)),
            Write::Insert(record(b, PayloadState::Allocated)),
            Write::Update(record(a, PayloadState::Active)),
            Write::Delete(b),
        ];
        let out = coalesce(writes);
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0], Write::Insert(r) if r.id == a && r.state == PayloadState::Active));
        assert!(matches!(&out[1], Write::Delete(id) if *id == b));
    }

    #[tokio::test]
    async fn a_logged_write_that_never_reached_the_catalog_is_replayed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::open(&dir.path().join("c.db")).await.unwrap());
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

        let writer = Writer::open(repo.clone(), &dir.path().join("catalog.log"))
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
}
