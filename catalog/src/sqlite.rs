//! SQLite backend: the embedded default catalog of a standalone node.
//! WAL mode with `synchronous=NORMAL`: a commit survives a process crash
//! (SIGKILL) without an fsync per transaction; callers that batch writes get
//! group commit for free.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use crate::error::{CatalogError, Result};
use crate::model::*;
use crate::repo::*;

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

const COLUMNS: &str = "id, tier, state, size_bytes, created_at_ms, expires_at_ms, write_deadline_ms, \
     priority, spill_target, min_residency_tier, require_durable, labels, sha256, version, pinned_until_ms";

/// A catalog in one SQLite file.
#[derive(Clone)]
pub struct SqliteRepository {
    pool: SqlitePool,
}

impl SqliteRepository {
    /// Opens (creating if needed) the database at `path` and applies every
    /// pending migration.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        Self::connect(options).await
    }

    /// Opens a connection string such as `sqlite:///var/lib/pm/catalog.db`.
    pub async fn open_url(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| CatalogError::InvalidArgument(format!("bad SQLite URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true);
        Self::connect(options).await
    }

    async fn connect(options: SqliteConnectOptions) -> Result<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await.map_err(|e| {
            CatalogError::Storage(format!(
                "applying SQLite migrations failed ({e}); a database written by a newer binary cannot be opened by this one"
            ))
        })?;
        Ok(Self { pool })
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    if value == i64::MAX {
        u64::MAX
    } else {
        u64::try_from(value).unwrap_or(0)
    }
}

fn corrupt(what: &str) -> CatalogError {
    CatalogError::Storage(format!("catalog row has an invalid {what}"))
}

fn record_from_row(row: &SqliteRow) -> Result<PayloadRecord> {
    let id: Vec<u8> = row.try_get("id")?;
    let tier = Tier::from_i32(row.try_get("tier")?).ok_or_else(|| corrupt("tier"))?;
    let state = PayloadState::from_i32(row.try_get("state")?).ok_or_else(|| corrupt("state"))?;
    let spill_target = Tier::from_i32(row.try_get("spill_target")?).ok_or_else(|| corrupt("spill target"))?;
    let min_residency: Option<i32> = row.try_get("min_residency_tier")?;
    let labels: String = row.try_get("labels")?;
    let sha256: Option<Vec<u8>> = row.try_get("sha256")?;
    Ok(PayloadRecord {
        id: PayloadId::from_slice(&id).map_err(|_| corrupt("id"))?,
        tier,
        state,
        size_bytes: to_u64(row.try_get("size_bytes")?),
        created_at_ms: to_u64(row.try_get("created_at_ms")?),
        expires_at_ms: to_u64(row.try_get("expires_at_ms")?),
        write_deadline_ms: to_u64(row.try_get("write_deadline_ms")?),
        priority: Priority::from_i32(row.try_get("priority")?),
        spill_target,
        min_residency_tier: min_residency.and_then(Tier::from_i32),
        require_durable: row.try_get("require_durable")?,
        labels: serde_json::from_str(&labels).map_err(|_| corrupt("labels"))?,
        sha256: match sha256 {
            Some(bytes) => Some(bytes.try_into().map_err(|_| corrupt("sha256"))?),
            None => None,
        },
        version: to_u64(row.try_get("version")?),
        pinned_until_ms: to_u64(row.try_get("pinned_until_ms")?),
    })
}

async fn upsert(conn: &mut SqliteConnection, rec: &PayloadRecord, insert: bool) -> Result<()> {
    let labels = serde_json::to_string(&rec.labels).map_err(|e| CatalogError::Storage(e.to_string()))?;
    let sql = if insert {
        "INSERT INTO payloads (id, tier, state, size_bytes, created_at_ms, expires_at_ms, write_deadline_ms, \
         priority, spill_target, min_residency_tier, require_durable, labels, sha256, version, pinned_until_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
         ON CONFLICT (id) DO UPDATE SET tier = excluded.tier, state = excluded.state, \
         size_bytes = excluded.size_bytes, created_at_ms = excluded.created_at_ms, \
         expires_at_ms = excluded.expires_at_ms, write_deadline_ms = excluded.write_deadline_ms, \
         priority = excluded.priority, spill_target = excluded.spill_target, \
         min_residency_tier = excluded.min_residency_tier, require_durable = excluded.require_durable, \
         labels = excluded.labels, sha256 = excluded.sha256, version = excluded.version, \
         pinned_until_ms = excluded.pinned_until_ms"
    } else {
        "UPDATE payloads SET tier = ?2, state = ?3, size_bytes = ?4, created_at_ms = ?5, expires_at_ms = ?6, \
         write_deadline_ms = ?7, priority = ?8, spill_target = ?9, min_residency_tier = ?10, \
         require_durable = ?11, labels = ?12, sha256 = ?13, version = ?14, pinned_until_ms = ?15 WHERE id = ?1"
    };
    let done = sqlx::query(sql)
        .bind(rec.id.as_bytes().as_slice())
        .bind(rec.tier as i32)
        .bind(rec.state as i32)
        .bind(to_i64(rec.size_bytes))
        .bind(to_i64(rec.created_at_ms))
        .bind(to_i64(rec.expires_at_ms))
        .bind(to_i64(rec.write_deadline_ms))
        .bind(rec.priority as i32)
        .bind(rec.spill_target as i32)
        .bind(rec.min_residency_tier.map(|t| t as i32))
        .bind(rec.require_durable)
        .bind(labels)
        .bind(rec.sha256.as_ref().map(|d| d.as_slice()))
        .bind(to_i64(rec.version))
        .bind(to_i64(rec.pinned_until_ms))
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(CatalogError::NotFound(format!("payload {} not found", rec.id)));
    }
    {
        sqlx::query("DELETE FROM payload_labels WHERE payload_id = ?1")
            .bind(rec.id.as_bytes().as_slice())
            .execute(&mut *conn)
            .await?;
    }
    for (key, value) in &rec.labels {
        sqlx::query("INSERT INTO payload_labels (payload_id, key, value) VALUES (?1, ?2, ?3)")
            .bind(rec.id.as_bytes().as_slice())
            .bind(key)
            .bind(value)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

fn push_filters(qb: &mut QueryBuilder<'_, Sqlite>, query: &ListQuery) {
    qb.push(" WHERE 1 = 1");
    if let Some(tier) = query.tier {
        qb.push(" AND tier = ").push_bind(tier as i32);
    }
    if let Some(state) = query.state {
        qb.push(" AND state = ").push_bind(state as i32);
    }
    if let Some(after) = query.created_after_ms {
        qb.push(" AND created_at_ms > ").push_bind(to_i64(after));
    }
    if let Some(before) = query.created_before_ms {
        qb.push(" AND created_at_ms < ").push_bind(to_i64(before));
    }
    // IN (not EXISTS) lets SQLite drive the query from the (key, value) index.
    for (key, value) in &query.labels {
        qb.push(" AND id IN (SELECT payload_id FROM payload_labels WHERE key = ")
            .push_bind(key.clone())
            .push(" AND value = ")
            .push_bind(value.clone())
            .push(")");
    }
}

async fn exists(conn: &mut SqliteConnection, id: PayloadId) -> Result<bool> {
    let row = sqlx::query("SELECT 1 FROM payloads WHERE id = ?1")
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

async fn edges_of(conn: &mut SqliteConnection, id: PayloadId, upstream: bool) -> Result<Vec<LineageEdge>> {
    let sql = if upstream {
        "SELECT child, parent, operation, role, parameters FROM lineage WHERE child = ?1 ORDER BY parent, operation, role"
    } else {
        "SELECT child, parent, operation, role, parameters FROM lineage WHERE parent = ?1 ORDER BY child, operation, role"
    };
    let rows = sqlx::query(sql)
        .bind(id.as_bytes().as_slice())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            let child: Vec<u8> = row.try_get("child")?;
            let parent: Vec<u8> = row.try_get("parent")?;
            Ok(LineageEdge {
                child: PayloadId::from_slice(&child).map_err(|_| corrupt("lineage child"))?,
                parent: PayloadId::from_slice(&parent).map_err(|_| corrupt("lineage parent"))?,
                operation: row.try_get("operation")?,
                role: row.try_get("role")?,
                parameters: row.try_get("parameters")?,
            })
        })
        .collect()
}

/// Breadth-first walk over lineage edges from `start`.
async fn walk(
    conn: &mut SqliteConnection,
    start: PayloadId,
    upstream: bool,
    max_depth: u32,
) -> Result<Vec<LineageEdge>> {
    let mut seen = HashSet::from([start]);
    let mut queue = VecDeque::from([(start, 0u32)]);
    let mut out = Vec::new();
    while let Some((node, depth)) = queue.pop_front() {
        if max_depth != 0 && depth >= max_depth {
            continue;
        }
        for edge in edges_of(conn, node, upstream).await? {
            let next = if upstream { edge.parent } else { edge.child };
            if seen.insert(next) {
                queue.push_back((next, depth + 1));
            }
            out.push(edge);
        }
    }
    Ok(out)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(&key);
                } else {
                    merge_patch(target.entry(key).or_insert(serde_json::Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch,
    }
}

fn merge_data(old: &[u8], new: Vec<u8>) -> Vec<u8> {
    if new.is_empty() {
        return old.to_vec();
    }
    let parsed = (
        serde_json::from_slice::<serde_json::Value>(old),
        serde_json::from_slice::<serde_json::Value>(&new),
    );
    match parsed {
        (Ok(mut old @ serde_json::Value::Object(_)), Ok(patch @ serde_json::Value::Object(_))) => {
            merge_patch(&mut old, patch);
            serde_json::to_vec(&old).unwrap_or(new)
        }
        _ => new,
    }
}

#[async_trait]
impl Repository for SqliteRepository {
    async fn write_batch(&self, writes: &[Write]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for write in writes {
            match write {
                Write::Insert(rec) => upsert(&mut tx, rec, true).await?,
                Write::Update(rec) => upsert(&mut tx, rec, false).await?,
                Write::Delete(id) => {
                    sqlx::query("DELETE FROM payloads WHERE id = ?1")
                        .bind(id.as_bytes().as_slice())
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM payloads WHERE id = ?1"))
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn load_payloads(&self) -> Result<Vec<PayloadRecord>> {
        use futures_util::TryStreamExt;
        // Streamed: a million rows are never held twice.
        let sql = format!("SELECT {COLUMNS} FROM payloads");
        let mut rows = sqlx::query(&sql).fetch(&self.pool);
        let mut out = Vec::new();
        while let Some(row) = rows.try_next().await? {
            out.push(record_from_row(&row)?);
        }
        Ok(out)
    }

    async fn list_payloads(&self, query: &ListQuery) -> Result<Page> {
        // Counted once, on the first page; later pages carry it in their token.
        let total = match query.after {
            Some(after) => after.total,
            None => {
                let mut count = QueryBuilder::<Sqlite>::new("SELECT COUNT(*) FROM payloads");
                push_filters(&mut count, query);
                to_u64(count.build_query_scalar::<i64>().fetch_one(&self.pool).await?)
            }
        };

        let page_size = query.page_size.max(1) as usize;
        let mut select = QueryBuilder::<Sqlite>::new(format!("SELECT {COLUMNS} FROM payloads"));
        push_filters(&mut select, query);
        if let Some(after) = query.after {
            // A row-value comparison lets SQLite seek the index instead of
            // skipping every earlier row.
            select
                .push(" AND (created_at_ms, id) < (")
                .push_bind(to_i64(after.created_at_ms))
                .push(", ")
                .push_bind(after.id.as_bytes().to_vec())
                .push(")");
        }
        select
            .push(" ORDER BY created_at_ms DESC, id DESC LIMIT ")
            .push_bind(page_size as i64 + 1);
        let rows = select.build().fetch_all(&self.pool).await?;
        let mut items = rows.iter().map(record_from_row).collect::<Result<Vec<_>>>()?;
        let next = if items.len() > page_size {
            items.truncate(page_size);
            items.last().map(|r| PageToken {
                created_at_ms: r.created_at_ms,
                id: r.id,
                total,
            })
        } else {
            None
        };
        Ok(Page { items, next, total })
    }

    async fn add_lineage(&self, child: PayloadId, edges: &[LineageEdge]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if !exists(&mut tx, child).await? {
            return Err(CatalogError::NotFound(format!("lineage child {child} not found")));
        }
        for edge in edges {
            if edge.parent == child {
                return Err(CatalogError::InvalidArgument(format!(
                    "payload {child} cannot be its own parent"
                )));
            }
            if !exists(&mut tx, edge.parent).await? {
                return Err(CatalogError::NotFound(format!(
                    "lineage parent {} not found",
                    edge.parent
                )));
            }
            let ancestors = walk(&mut tx, edge.parent, true, 0).await?;
            if ancestors.iter().any(|e| e.parent == child) {
                return Err(CatalogError::InvalidArgument(format!(
                    "adding {} as a parent of {child} would make a lineage cycle",
                    edge.parent
                )));
            }
            sqlx::query(
                "INSERT OR IGNORE INTO lineage (child, parent, operation, role, parameters) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(child.as_bytes().as_slice())
            .bind(edge.parent.as_bytes().as_slice())
            .bind(&edge.operation)
            .bind(&edge.role)
            .bind(&edge.parameters)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_lineage(&self, id: PayloadId, upstream: bool, max_depth: u32) -> Result<Vec<LineageEdge>> {
        let mut conn = self.pool.acquire().await?;
        if !exists(&mut conn, id).await? {
            return Err(CatalogError::NotFound(format!("payload {id} not found")));
        }
        walk(&mut conn, id, upstream, max_depth).await
    }

    async fn update_metadata(&self, id: PayloadId, mode: MetadataMode, update: Metadata) -> Result<Metadata> {
        let mut tx = self.pool.begin().await?;
        if !exists(&mut tx, id).await? {
            return Err(CatalogError::NotFound(format!("payload {id} not found")));
        }
        let old = sqlx::query("SELECT data, schema FROM metadata WHERE payload_id = ?1")
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?;
        let (old_data, old_schema): (Vec<u8>, String) = match &old {
            Some(row) => (row.try_get("data")?, row.try_get("schema")?),
            None => (Vec::new(), String::new()),
        };
        let stored = match mode {
            MetadataMode::Replace => update,
            MetadataMode::Merge => Metadata {
                data: merge_data(&old_data, update.data),
                schema: if update.schema.is_empty() {
                    old_schema
                } else {
                    update.schema
                },
                updated_at_ms: update.updated_at_ms,
            },
        };
        sqlx::query(
            "INSERT INTO metadata (payload_id, data, schema, updated_at_ms) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (payload_id) DO UPDATE SET data = excluded.data, schema = excluded.schema, \
             updated_at_ms = excluded.updated_at_ms",
        )
        .bind(id.as_bytes().as_slice())
        .bind(&stored.data)
        .bind(&stored.schema)
        .bind(to_i64(stored.updated_at_ms))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn append_metadata_event(&self, id: PayloadId, event: MetadataEvent) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        if !exists(&mut conn, id).await? {
            return Err(CatalogError::NotFound(format!("payload {id} not found")));
        }
        sqlx::query(
            "INSERT INTO metadata_events (payload_id, ts_ms, data, source, version) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(id.as_bytes().as_slice())
        .bind(to_i64(event.ts_ms))
        .bind(&event.data)
        .bind(&event.source)
        .bind(&event.version)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
