//! SQLite backend: the embedded default catalog of a standalone node.
//! WAL mode with `synchronous=FULL`: a commit survives power loss (the agent
//! truncates its write log once a write is here, so this file must be the
//! durable copy); callers that batch writes share the fsync.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, QueryBuilder, Row, Transaction};

use super::{corrupt, merge_data, migrate_error, to_i64, to_u64, StreamHub};
use crate::error::{CatalogError, Result};
use crate::model::*;
use crate::policy::Policy;
use crate::repo::*;
use crate::stream::*;

/// The SQLite schema, embedded; applied in order at open.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

type Db = sqlx::Sqlite;
type Conn = sqlx::SqliteConnection;
type DbRow = sqlx::sqlite::SqliteRow;
type Repo = SqliteRepository;

/// A catalog in one SQLite file.
#[derive(Clone)]
pub struct SqliteRepository {
    pool: Pool<Db>,
    /// The database file (none in memory), for the collection lock.
    path: Option<Arc<Path>>,
    node: Arc<str>,
    hub: Arc<StreamHub>,
}

impl SqliteRepository {
    /// Opens (creating if needed) the database at `path` for node
    /// `standalone` and applies every pending migration.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::connect(SqliteConnectOptions::new().filename(path), "standalone").await
    }

    /// Opens a connection string such as `sqlite:///var/lib/pm/catalog.db`
    /// for node `node`.
    pub async fn open_url(url: &str, node: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| CatalogError::InvalidArgument(format!("bad SQLite URL {url:?}: {e}")))?;
        Self::connect(options, node).await
    }

    async fn connect(options: SqliteConnectOptions, node: &str) -> Result<Self> {
        let path = options.get_filename();
        let path = (!path.as_os_str().is_empty() && path != Path::new(":memory:")).then(|| Arc::from(path));
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| migrate_error("SQLite", &MIGRATOR, e))?;
        // Rows written before rows named their node (schema version 1) belong
        // to the one node a SQLite catalog serves. The index answers the
        // probe, so a catalog without such rows pays nothing more.
        let unowned = sqlx::query("SELECT 1 FROM payloads WHERE node = '' LIMIT 1")
            .fetch_optional(&pool)
            .await?;
        if unowned.is_some() {
            for table in ["payloads", "payload_labels"] {
                sqlx::query(&format!("UPDATE {table} SET node = $1 WHERE node = ''"))
                    .bind(node)
                    .execute(&pool)
                    .await?;
            }
        }
        Ok(Self {
            pool,
            path,
            node: node.into(),
            hub: Arc::default(),
        })
    }
}

/// Takes the database's write lock up front: a transaction that read first
/// and wrote later could fail to upgrade (`SQLITE_BUSY`) under contention.
async fn begin_write(pool: &Pool<Db>) -> Result<Transaction<'static, Db>> {
    Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
}

/// `BEGIN IMMEDIATE` already serializes every writer.
async fn lock_lineage(_conn: &mut Conn) -> Result<()> {
    Ok(())
}

/// Holds the catalog's collection lock: an exclusive lock on a file next
/// to the database (any process, or repository, opening it takes the same
/// one). An in-memory catalog has a single repository and needs none.
async fn gc_lock(repo: &Repo) -> Result<GcLock> {
    let Some(path) = repo.path.as_ref().map(|db| {
        let mut name = db.as_os_str().to_owned();
        name.push("-gc.lock");
        std::path::PathBuf::from(name)
    }) else {
        return Ok(GcLock::new(()));
    };
    let locked = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        file.lock()?;
        Ok(file)
    })
    .await
    .map_err(|e| CatalogError::Storage(format!("taking the collection lock: {e}")))?
    .map_err(|e| CatalogError::Storage(format!("taking the collection lock: {e}")))?;
    Ok(GcLock::new(locked))
}

/// One process owns a SQLite catalog, so its own hub hears every append.
async fn announce_append(_conn: &mut Conn, _head: StreamHead) -> Result<()> {
    Ok(())
}

include!("common.rs");
