//! Catalog writes, durable on append. Every write goes first to a small
//! write-ahead log (one `write()`; the page cache survives SIGKILL), then to
//! one task that takes all writes waiting at that moment and applies them to
//! the catalog in one transaction (group commit). The log is the truth until
//! the catalog has a write: a write leaves the log only once it is applied,
//! a failing catalog is retried with backoff for as long as it takes, and a
//! write the catalog refuses for good is set aside in `catalog.rejected`,
//! never dropped. Past a backlog limit new payloads are refused
//! ([`Writer::admit`]) so nothing is acknowledged that cannot be kept.
//! `sync` commits wait for an fsync of the log, shared by every write
//! appended by then (group fsync).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payload_catalog::{CatalogError, Repository, Write};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::durable;
use crate::error::AgentError;
use crate::node::lock;

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 4096;
/// How long the writer lets a burst gather when nobody is waiting on it:
/// fewer, larger transactions leave the CPU to the request path.
const GATHER: Duration = Duration::from_millis(20);
/// Rewrite the log with only pending writes once it is this large (small
/// in unit tests, so that they reach it).
const REWRITE_AT: u64 = if cfg!(test) { 4 << 10 } else { 16 << 20 };
/// A catalog transaction that takes longer than this is abandoned and its
/// batch split; a single write gets twice as long at each retry, up to
/// the last.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
const STATEMENT_TIMEOUT_MAX: Duration = Duration::from_secs(80);
/// A batch that fails this many times running is split, in case its size
/// is the trouble (a server-side statement or lock timeout, say).
const SPLIT_AFTER: u32 = 3;
/// Retry delays grow from the first to the last, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a reader of the catalog waits for pending writes to land.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

enum Item {
    Write(u64, Write),
    Flush(oneshot::Sender<()>),
}

struct Log {
    file: File,
    path: PathBuf,
    /// Bytes of whole records in the file; a failed append is cut back to it.
    len: u64,
    next_seq: u64,
    /// Appended but not yet in the catalog, oldest first, as encoded.
    pending: VecDeque<(u64, Vec<u8>)>,
}

/// Whether the catalog is taking writes, for the messages of refused calls.
#[derive(Default)]
struct Health {
    failing_since: Option<Instant>,
}

struct Shared {
    log: Mutex<Log>,
    health: Mutex<Health>,
    max_backlog: usize,
    rejected_path: PathBuf,
    /// Every write with a sequence number below this is fsynced in the log
    /// (or applied to the catalog, which is durable itself).
    synced: watch::Sender<u64>,
    syncing: Mutex<bool>,
    /// A log fsync that failed: the kernel may have dropped the pages, so
    /// no later fsync can vouch for them. Sticky until the agent restarts.
    sync_failed: Mutex<Option<String>>,
    /// Cuts the writer's gathering short: somebody waits on a flush.
    flush_wanted: tokio::sync::Notify,
}

#[derive(Clone)]
pub struct Writer {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Item>,
}

fn stopped() -> AgentError {
    AgentError::Unavailable("the node's catalog writer has stopped; restart the agent".into())
}

fn frame(write: &Write) -> Result<Vec<u8>, AgentError> {
    let body =
        serde_json::to_vec(write).map_err(|e| AgentError::InvalidArgument(format!("encoding a catalog write: {e}")))?;
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

/// One transaction, abandoned after `limit` (`None`).
async fn attempt(repo: &dyn Repository, writes: &[Write], limit: Duration) -> Option<Result<(), CatalogError>> {
    tokio::time::timeout(limit, repo.write_batch(writes)).await.ok()
}

/// An outage, or an operator of an earlier release that cannot take the
/// write yet: both are waited out (until it is upgraded), never set aside.
fn transient(err: &CatalogError) -> bool {
    matches!(err, CatalogError::Storage(_)) || payload_catalog::remote::is_unknown_call(err)
}

/// How long to keep trying while the catalog is unavailable.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// The background writer: until it works.
    Forever,
    /// Start-up replay: report the outage instead, so the agent refuses to start.
    Once,
}

/// Applies `writes`: as one batch, then, if the catalog refuses the batch
/// for good, one by one, setting aside each write it refuses. A batch too
/// slow for one transaction is split in halves; a catalog that is
/// unavailable is retried (or reported, with `Patience::Once`).
async fn apply(
    repo: &dyn Repository,
    writes: &[Write],
    shared: &Shared,
    patience: Patience,
) -> Result<(), CatalogError> {
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
    let mut limit = STATEMENT_TIMEOUT;
    let mut failures = 0;
    loop {
        let result = attempt(repo, writes, limit).await.unwrap_or_else(|| {
            Err(CatalogError::Storage(format!(
                "the catalog did not finish a write within {limit:?}"
            )))
        });
        match result {
            Ok(()) => return shared.healthy(),
            Err(err) if transient(&err) => {
                shared.failing(&err);
                failures += 1;
                if writes.len() > 1 && (failures >= SPLIT_AFTER || err.to_string().contains("did not finish")) {
                    let (first, rest) = writes.split_at(writes.len() / 2);
                    Box::pin(apply(repo, first, shared, patience)).await?;
                    return Box::pin(apply(repo, rest, shared, patience)).await;
                }
                if patience == Patience::Once {
                    return Err(err);
                }
                limit = (limit * 2).min(STATEMENT_TIMEOUT_MAX);
                backoff.wait().await;
            }
            Err(err) if writes.len() == 1 => match shared.reject(&writes[0], &err) {
                // Set aside: the log moves on, so the catalog is taking writes.
                Ok(()) => return shared.healthy(),
                Err(full) if patience == Patience::Once => return Err(full),
                // The state dir is full or read-only: keep the write until it is not.
                Err(full) => {
                    shared.failing(&full);
                    backoff.wait().await;
                }
            },
            Err(_) => break,
        }
    }
    for write in writes {
        Box::pin(apply(repo, std::slice::from_ref(write), shared, patience)).await?;
    }
    Ok(())
}

impl Shared {
    /// One fsync of the log, covering every write appended before it.
    async fn sync_now(self: Arc<Self>) {
        let prepared = {
            let log = lock(&self.log);
            log.file.try_clone().map(|file| (file, log.next_seq))
        };
        let synced = match prepared {
            Ok((file, upto)) => tokio::task::spawn_blocking(move || file.sync_data().map(|()| upto))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(e) => Err(e),
        };
        match synced {
            Ok(upto) => {
                self.synced.send_if_modified(|synced| {
                    let advanced = upto > *synced;
                    *synced = (*synced).max(upto);
                    advanced
                });
            }
            Err(e) => self.poison(format!("fsync of the catalog log: {e}")),
        }
        *lock(&self.syncing) = false;
        // Wake every waiter, after the flag is down: one whose write is not
        // covered yet starts the next fsync.
        self.synced.send_modify(|_| {});
    }

    /// Makes every later synced commit fail: an fsync on this node failed,
    /// so no later fsync can vouch for what it covered. Commits that do not
    /// ask for power-loss safety go on.
    fn poison(&self, why: String) {
        tracing::error!(%why, "durability can no longer be promised; synced commits are refused until a restart");
        *lock(&self.sync_failed) = Some(why);
    }

    fn check_synced(&self) -> Result<(), AgentError> {
        match &*lock(&self.sync_failed) {
            None => Ok(()),
            Some(e) => Err(AgentError::Unavailable(format!(
                "an fsync on this node failed ({e}), so durability cannot be promised; check the disk and restart \
                 the agent"
            ))),
        }
    }

    fn healthy(&self) -> Result<(), CatalogError> {
        let mut health = lock(&self.health);
        if let Some(since) = health.failing_since.take() {
            tracing::info!(after = ?since.elapsed(), "the catalog takes writes again");
        }
        Ok(())
    }

    fn failing(&self, err: &CatalogError) {
        let mut health = lock(&self.health);
        if health.failing_since.is_none() {
            tracing::error!(%err, "catalog write failed; the write stays in catalog.log and is retried");
            health.failing_since = Some(Instant::now());
        } else {
            tracing::debug!(%err, "catalog write failed again");
        }
    }

    /// Sets aside a write the catalog refuses for good: kept, with the
    /// reason, for an operator to look at; never silently dropped.
    fn reject(&self, write: &Write, err: &CatalogError) -> Result<(), CatalogError> {
        let line = serde_json::json!({ "error": err.to_string(), "write": write });
        let mut text = line.to_string();
        text.push('\n');
        durable::open_append(&self.rejected_path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| CatalogError::Storage(format!("setting aside a refused catalog write: {e}")))?;
        // Said once it is true: the file holds the write.
        tracing::error!(?write, %err, path = %self.rejected_path.display(), "the catalog refused a write; it is set aside");
        Ok(())
    }

    /// Why the catalog is not taking writes, for clients: how long and how
    /// many writes wait (the catalog's own words go to the log only).
    fn outage(&self, pending: usize) -> Option<String> {
        let health = lock(&self.health);
        let since = health.failing_since?;
        Some(format!(
            "the node's catalog has not taken writes for {}s (the agent's log says why); {pending} writes wait in \
             catalog.log",
            since.elapsed().as_secs()
        ))
    }
}

impl Writer {
    /// Replays the log at `path` into `repo`, then starts the writer task;
    /// it ends when every `Writer` clone is dropped. A replay the catalog
    /// cannot take now fails, and leaves the log as it was.
    pub async fn open(repo: Arc<dyn Repository>, path: &Path, max_backlog: usize) -> anyhow::Result<Writer> {
        let replay = read_log(path).map_err(|e| anyhow::anyhow!("reading the catalog log {}: {e}", path.display()))?;
        let file = durable::open_append(path)
            .map_err(|e| anyhow::anyhow!("opening the catalog log {}: {e}", path.display()))?;
        let shared = Arc::new(Shared {
            log: Mutex::new(Log {
                file,
                path: path.to_path_buf(),
                len: 0,
                next_seq: 0,
                pending: VecDeque::new(),
            }),
            health: Mutex::default(),
            max_backlog,
            rejected_path: path.with_extension("rejected"),
            synced: watch::channel(0).0,
            syncing: Mutex::new(false),
            sync_failed: Mutex::new(None),
            flush_wanted: tokio::sync::Notify::new(),
        });
        if !replay.is_empty() {
            tracing::info!(writes = replay.len(), "replaying the catalog log");
            let mut replayed = Ok(());
            for chunk in replay.chunks(MAX_BATCH) {
                replayed = apply(repo.as_ref(), &coalesce(chunk.to_vec()), &shared, Patience::Once).await;
                if replayed.is_err() {
                    break;
                }
            }
            if let Err(err) = replayed {
                anyhow::bail!(
                    "the catalog cannot take the {} writes waiting in {} ({err}); they are kept there. Make the \
                     catalog writable (is another process holding the SQLite database? is PostgreSQL up? is its \
                     disk full?) and start the agent again",
                    replay.len(),
                    path.display()
                );
            }
        }
        lock(&shared.log)
            .file
            .set_len(0)
            .map_err(|e| anyhow::anyhow!("emptying the replayed catalog log {}: {e}", path.display()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(repo, rx, shared.clone()));
        Ok(Writer { shared, tx })
    }

    /// Refuses new work while the catalog has fallen too far behind: the
    /// log would grow without bound, and a client would be told "stored"
    /// for a write the node may not be able to keep.
    pub fn admit(&self) -> Result<(), AgentError> {
        let pending = lock(&self.shared.log).pending.len();
        if pending < self.shared.max_backlog {
            return Ok(());
        }
        let why = self
            .shared
            .outage(pending)
            .unwrap_or_else(|| format!("{pending} writes wait for the catalog"));
        Err(AgentError::Unavailable(format!(
            "{why}; new payloads are refused until the catalog catches up (limit {}): check the catalog, then retry",
            self.shared.max_backlog
        )))
    }

    /// Makes `write` durable against SIGKILL (logged) and queues it for the
    /// catalog. Returns its sequence number, for [`Writer::sync`].
    pub fn write(&self, write: Write) -> Result<u64, AgentError> {
        let framed = frame(&write)?;
        let mut log = lock(&self.shared.log);
        if let Err(e) = log.file.write_all(&framed) {
            // A partial record would hide every record after it: cut it off.
            let len = log.len;
            if let Err(cut) = log.file.set_len(len) {
                tracing::error!(%cut, "could not cut a failed append off the catalog log");
            }
            return Err(crate::store::io_error("appending to the catalog log", e));
        }
        let seq = log.next_seq;
        log.next_seq += 1;
        log.len += framed.len() as u64;
        log.pending.push_back((seq, framed));
        // Sent under the lock: the catalog sees writes in log order.
        self.tx.send(Item::Write(seq, write)).map_err(|_| stopped())?;
        Ok(seq)
    }

    /// Waits until write `seq` survives power loss. Concurrent callers share
    /// one fsync: whoever finds none running starts one (as a task of its
    /// own, so a caller that goes away cannot leave it half done) covering
    /// every write appended so far; everyone waits for the one that covers
    /// them.
    pub async fn sync(&self, seq: u64) -> Result<(), AgentError> {
        let mut synced = self.shared.synced.subscribe();
        loop {
            if *synced.borrow_and_update() > seq {
                return Ok(());
            }
            self.shared.check_synced()?;
            if !std::mem::replace(&mut *lock(&self.shared.syncing), true) {
                tokio::spawn(self.shared.clone().sync_now());
            }
            if synced.changed().await.is_err() {
                return Err(stopped());
            }
        }
    }

    /// Waits until every write made before this call is in the catalog, or
    /// says why it is not.
    pub async fn flush(&self) -> Result<(), AgentError> {
        // While the catalog is failing, readers are answered at once rather
        // than queued behind a writer that is retrying.
        let pending = lock(&self.shared.log).pending.len();
        if let Some(why) = self.shared.outage(pending) {
            return Err(AgentError::Unavailable(format!(
                "{why}; retry once the catalog is back"
            )));
        }
        let (reply, done) = oneshot::channel();
        self.tx.send(Item::Flush(reply)).map_err(|_| stopped())?;
        self.shared.flush_wanted.notify_one();
        match tokio::time::timeout(FLUSH_WAIT, done).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(stopped()),
            Err(_) => {
                let pending = lock(&self.shared.log).pending.len();
                let why = self
                    .shared
                    .outage(pending)
                    .unwrap_or_else(|| format!("{pending} writes wait for the catalog"));
                Err(AgentError::Unavailable(format!(
                    "{why}; retry once the catalog is back"
                )))
            }
        }
    }

    /// Records a failed fsync of payload data: see `Shared::poison`.
    pub fn poison(&self, why: String) {
        self.shared.poison(why);
    }

    /// Writes waiting for the catalog (for tests and stats).
    pub fn backlog(&self) -> usize {
        lock(&self.shared.log).pending.len()
    }
}

impl Log {
    /// Forgets writes up to `seq`, now in the catalog, and keeps the file small.
    fn applied(&mut self, seq: u64) -> io::Result<()> {
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            self.pending.pop_front();
        }
        if self.pending.is_empty() {
            // A log left long only replays writes the catalog already has.
            match self.file.set_len(0) {
                Ok(()) => self.len = 0,
                Err(e) => tracing::warn!(%e, "could not empty the catalog log"),
            }
        } else if self.len > REWRITE_AT {
            let mut bytes = Vec::new();
            for (_, framed) in &self.pending {
                bytes.extend_from_slice(framed);
            }
            match durable::replace_file(&self.path, &bytes) {
                // Before the rename: the old log is whole, try again at the next trim.
                Err(e) => tracing::warn!(%e, "could not rewrite the catalog log; it stays as it is"),
                Ok(replaced) => {
                    self.file = replaced.file;
                    self.len = bytes.len() as u64;
                    // The new log may not survive power loss under its name.
                    replaced.dir_synced?;
                }
            }
        }
        Ok(())
    }
}

/// Keeps the last write per payload row (an update after an insert stays an
/// insert; nothing after a delete revives the row), so a payload allocated,
/// committed and hashed within one batch costs one row write. Other steps
/// (the agent logs none today) stay as they are.
fn coalesce(writes: Vec<Write>) -> Vec<Write> {
    use payload_catalog::PayloadId;
    use std::collections::HashMap;
    let id = |w: &Write| -> Option<PayloadId> {
        match w {
            Write::Insert(r) | Write::Update(r) => Some(r.id),
            Write::Delete(id) => Some(*id),
            Write::Lineage { .. }
            | Write::Metadata { .. }
            | Write::ReleaseManifest { .. }
            | Write::CommitOffset { .. } => None,
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
            (Some(Write::Delete(id)), Write::Update(_)) => Write::Delete(id),
            (_, write) => write,
        };
        slot.insert(key, out.len());
        out.push(Some(write));
    }
    out.into_iter().flatten().collect()
}

async fn run(repo: Arc<dyn Repository>, mut rx: mpsc::UnboundedReceiver<Item>, shared: Arc<Shared>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Gather a burst, but stop as soon as somebody waits on a flush.
        // Writes are not received one by one meanwhile: nothing waits on
        // the channel, so a write wakes nobody (on two cores a wake-up per
        // write costs the request path more than the write itself).
        if batch.len() < MAX_BATCH && !batch.iter().any(|item| matches!(item, Item::Flush(_))) {
            tokio::select! {
                _ = tokio::time::sleep(GATHER) => {}
                _ = shared.flush_wanted.notified() => {}
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
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
        if let Some(seq) = last {
            let writes = coalesce(writes);
            crate::failpoint!("writer-before-apply");
            // Returns only once every write is applied or set aside.
            if let Err(err) = apply(repo.as_ref(), &writes, &shared, Patience::Forever).await {
                // Not reached (Forever retries); if it were, stopping keeps the log for the next start.
                tracing::error!(%err, "the catalog writer stops; its writes stay in catalog.log");
                return;
            }
            crate::failpoint!("writer-applied");
            let trimmed = lock(&shared.log).applied(seq);
            if let Err(e) = trimmed {
                // A log rewrite that may not survive power loss: synced
                // commits can no longer be promised.
                shared.poison(format!("rewriting the catalog log: {e}"));
            }
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests;
