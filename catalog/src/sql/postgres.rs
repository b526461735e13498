//! PostgreSQL backend: the catalog several agents share. Offsets, metadata
//! versions and lineage checks rely on row locks taken inside each
//! transaction; appends are announced with NOTIFY so subscribers attached to
//! any agent wake up.

use std::collections::{HashSet, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Pool, QueryBuilder, Row, Transaction};

use super::{corrupt, merge_data, migrate_error, to_i64, to_u64, StreamHub};
use crate::error::{CatalogError, Result};
use crate::model::*;
use crate::policy::Policy;
use crate::repo::*;
use crate::stream::*;

/// The PostgreSQL schema, embedded; applied in order at connect.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// The NOTIFY channel appends are announced on: payload `<stream id> <next offset>`.
const APPEND_CHANNEL: &str = "payload_manager_stream_append";

type Db = sqlx::Postgres;
type Conn = sqlx::PgConnection;
type DbRow = sqlx::postgres::PgRow;
type Repo = PgRepository;

/// A catalog in a PostgreSQL database, shared by any number of agents.
#[derive(Clone)]
pub struct PgRepository {
    pool: Pool<Db>,
    node: Arc<str>,
    hub: Arc<StreamHub>,
}

impl PgRepository {
    /// Connects to `url` (`postgres://user@host:port/db`) as node `node`,
    /// applies pending migrations, and starts listening for appends.
    pub async fn connect(url: &str, node: &str) -> Result<Self> {
        let shown = crate::redact_url(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| CatalogError::InvalidArgument(format!("bad PostgreSQL URL {shown:?}: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| CatalogError::Storage(format!("cannot connect to PostgreSQL catalog {shown:?}: {e}")))?;
        // Migrations take an advisory lock, so agents starting together
        // apply each one once.
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| migrate_error("PostgreSQL", &MIGRATOR, e))?;
        let hub = Arc::new(StreamHub::default());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(APPEND_CHANNEL).await?;
        tokio::spawn(relay_appends(listener, Arc::downgrade(&hub)));
        Ok(Self {
            pool,
            node: node.into(),
            hub,
        })
    }
}

impl PgRepository {
    /// The same catalog, connections and append listener, as node `node`:
    /// the operator serves every node's calls from one pool.
    pub fn for_node(&self, node: &str) -> PgRepository {
        PgRepository {
            pool: self.pool.clone(),
            node: node.into(),
            hub: self.hub.clone(),
        }
    }
}

/// Feeds appends announced by every agent into this repository's hub, until
/// the repository is gone.
async fn relay_appends(mut listener: PgListener, hub: Weak<StreamHub>) {
    loop {
        // try_recv, not recv: recv reconnects silently and what was sent
        // meanwhile is lost; here a lost connection is seen (Ok(None)) and
        // every subscriber re-reads.
        let received = listener.try_recv().await;
        let Some(hub) = hub.upgrade() else {
            return;
        };
        match received {
            Ok(Some(note)) => {
                let mut parts = note.payload().split(' ').map(str::parse::<i64>);
                if let (Some(Ok(id)), Some(Ok(next))) = (parts.next(), parts.next()) {
                    hub.notify(id, to_u64(next));
                }
            }
            Ok(None) => {
                tracing::warn!("stream notification listener lost its connection; reconnecting");
                hub.notify_all();
            }
            Err(err) => {
                tracing::warn!(%err, "stream notification listener failed; retrying");
                hub.notify_all();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Row locks order concurrent writers; no table-wide lock is needed.
async fn begin_write(pool: &Pool<Db>) -> Result<Transaction<'static, Db>> {
    Ok(pool.begin().await?)
}

/// Lineage writes from every agent take turns, so two concurrent additions
/// cannot each pass the cycle check and together close a cycle.
async fn lock_lineage(conn: &mut Conn) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LINEAGE_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Holds the catalog's collection lock: a session advisory lock on a
/// connection of its own, released when the lock drops it (the server ends
/// the session, and its locks, when the connection closes).
async fn gc_lock(repo: &Repo) -> Result<GcLock> {
    use sqlx::Acquire as _;
    let mut conn = repo.pool.acquire().await?.detach();
    // A collector whose host dies must not hold the lock until the
    // kernel's default keepalive (hours) notices: the server probes the
    // idle connection after 30 s and drops it after three missed probes.
    for setting in [
        "SET tcp_keepalives_idle = 30",
        "SET tcp_keepalives_interval = 10",
        "SET tcp_keepalives_count = 3",
    ] {
        // Best effort: a server or pooler that refuses them still collects.
        if let Err(err) = sqlx::query(setting).execute(conn.acquire().await?).await {
            tracing::warn!(%err, setting, "the collection lock's connection has no keepalive");
        }
    }
    // Tried, not waited for: a caller that gives up (drops this future)
    // leaves no session queued on the server for the lock.
    loop {
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(GC_LOCK_KEY)
            .fetch_one(conn.acquire().await?)
            .await?;
        if taken {
            return Ok(GcLock::new(conn));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The advisory lock key of collections ("pm-gc" in ASCII).
const GC_LOCK_KEY: i64 = 0x0070_6d2d_6763;

/// The advisory lock key of lineage writes ("pm-lineage" in ASCII).
const LINEAGE_LOCK: i64 = 0x706d_2d6c_696e_6561;

/// Delivered to every listening agent when the transaction commits.
async fn announce_append(conn: &mut Conn, head: StreamHead) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(APPEND_CHANNEL)
        .bind(format!("{} {}", head.id, to_i64(head.next_offset)))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

include!("common.rs");
