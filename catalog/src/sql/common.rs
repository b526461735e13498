// The repository, written once for both SQL backends. This file is not a
// module: `sqlite.rs` and `postgres.rs` each `include!` it after defining
// `Db`, `Conn`, `DbRow`, `Repo` (with `pool`, `node` and `hub` fields),
// `begin_write`, `lock_lineage` and `announce_append`. See `sql/mod.rs` for why.

const COLUMNS: &str = "id, tier, state, size_bytes, created_at_ms, expires_at_ms, write_deadline_ms, \
     priority, spill_target, min_residency_tier, require_durable, labels, sha256, version, pinned_until_ms, copies, owner";

/// [`COLUMNS`] of the payloads table aliased `p`.
fn qualified_columns() -> String {
    COLUMNS
        .split(", ")
        .map(|c| format!("p.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

const ENTRY_COLUMNS: &str = "entry_offset, payload_id, event_time_ms, append_time_ms, duration_ns, tags";

fn record_from_row(row: &DbRow) -> Result<PayloadRecord> {
    let id: Vec<u8> = row.try_get("id")?;
    let tier = Tier::from_i32(row.try_get("tier")?).ok_or_else(|| corrupt("tier"))?;
    let state = PayloadState::from_i32(row.try_get("state")?).ok_or_else(|| corrupt("state"))?;
    let spill_target = Tier::from_i32(row.try_get("spill_target")?).ok_or_else(|| corrupt("spill target"))?;
    let min_residency: Option<i32> = row.try_get("min_residency_tier")?;
    let labels: String = row.try_get("labels")?;
    let sha256: Option<Vec<u8>> = row.try_get("sha256")?;
    let copies: String = row.try_get("copies")?;
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
        copies: serde_json::from_str(&copies).map_err(|_| corrupt("copies"))?,
        owner: row.try_get("owner")?,
    })
}

fn entry_from_row(row: &DbRow) -> Result<StreamEntry> {
    let payload_id: Vec<u8> = row.try_get("payload_id")?;
    let tags: String = row.try_get("tags")?;
    Ok(StreamEntry {
        offset: to_u64(row.try_get("entry_offset")?),
        payload_id: PayloadId::from_slice(&payload_id).map_err(|_| corrupt("stream entry payload id"))?,
        event_time_ms: to_u64(row.try_get("event_time_ms")?),
        append_time_ms: to_u64(row.try_get("append_time_ms")?),
        duration_ns: to_u64(row.try_get("duration_ns")?),
        tags: serde_json::from_str(&tags).map_err(|_| corrupt("stream entry tags"))?,
    })
}

async fn upsert(conn: &mut Conn, node: &str, rec: &PayloadRecord, insert: bool) -> Result<()> {
    let labels = serde_json::to_string(&rec.labels).map_err(|e| CatalogError::Storage(e.to_string()))?;
    let copies = serde_json::to_string(&rec.copies).map_err(|e| CatalogError::Storage(e.to_string()))?;
    let sql = if insert {
        "INSERT INTO payloads (id, tier, state, size_bytes, created_at_ms, expires_at_ms, write_deadline_ms, \
         priority, spill_target, min_residency_tier, require_durable, labels, sha256, version, pinned_until_ms, node, copies, \
         owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT (id) DO UPDATE SET tier = excluded.tier, state = excluded.state, \
         size_bytes = excluded.size_bytes, created_at_ms = excluded.created_at_ms, \
         expires_at_ms = excluded.expires_at_ms, write_deadline_ms = excluded.write_deadline_ms, \
         priority = excluded.priority, spill_target = excluded.spill_target, \
         min_residency_tier = excluded.min_residency_tier, require_durable = excluded.require_durable, \
         labels = excluded.labels, sha256 = excluded.sha256, version = excluded.version, \
         pinned_until_ms = excluded.pinned_until_ms, copies = excluded.copies, \
         owner = excluded.owner WHERE payloads.node = excluded.node"
    } else {
        "UPDATE payloads SET tier = $2, state = $3, size_bytes = $4, created_at_ms = $5, expires_at_ms = $6, \
         write_deadline_ms = $7, priority = $8, spill_target = $9, min_residency_tier = $10, \
         require_durable = $11, labels = $12, sha256 = $13, version = $14, pinned_until_ms = $15, \
         copies = $17, owner = $18 WHERE id = $1 AND node = $16"
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
        .bind(node)
        .bind(copies)
        .bind(rec.owner.as_deref())
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        // Rows belong to the node that made them: another node's row is
        // neither taken over (an insert of its id) nor changed.
        return Err(match exists(conn, rec.id).await? {
            true => CatalogError::Conflict(format!(
                "payload {} belongs to another node; a node writes only its own rows",
                rec.id
            )),
            false => CatalogError::NotFound(format!("payload {} not found", rec.id)),
        });
    }
    sqlx::query("DELETE FROM payload_labels WHERE payload_id = $1")
        .bind(rec.id.as_bytes().as_slice())
        .execute(&mut *conn)
        .await?;
    for (key, value) in &rec.labels {
        sqlx::query(
            "INSERT INTO payload_labels (payload_id, key, value, node, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(rec.id.as_bytes().as_slice())
        .bind(key)
        .bind(value)
        .bind(node)
        .bind(to_i64(rec.created_at_ms))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The FROM clause and filters of a listing. With a label selector the
/// first label drives: its index rows carry the node and creation time, so a
/// page is one index range in listing order however rare the label is.
/// `d` names the driving table, whose `created_at_ms` and `{id}` order the
/// listing.
fn push_listing<'a>(
    qb: &mut QueryBuilder<'a, Db>,
    own: &'a str,
    query: &'a ListQuery,
) -> (&'static str, &'static str) {
    let node = match &query.scope {
        Scope::Own => Some(own),
        Scope::Node(other) => Some(other.as_str()),
        Scope::Cluster => None,
    };
    let driver = match query.labels.first() {
        Some((key, value)) => {
            qb.push(" FROM payload_labels d JOIN payloads p ON p.id = d.payload_id WHERE d.key = ")
                .push_bind(key.as_str())
                .push(" AND d.value = ")
                .push_bind(value.as_str());
            if let Some(node) = node {
                qb.push(" AND d.node = ").push_bind(node);
            }
            ("d", "payload_id")
        }
        None => {
            qb.push(" FROM payloads p WHERE ");
            match node {
                Some(node) => qb.push("p.node = ").push_bind(node),
                None => qb.push("TRUE"),
            };
            ("p", "id")
        }
    };
    if let Some(tier) = query.tier {
        qb.push(" AND p.tier = ").push_bind(tier as i32);
    }
    if let Some(state) = query.state {
        qb.push(" AND p.state = ").push_bind(state as i32);
    }
    let (d, _) = driver;
    if let Some(after) = query.created_after_ms {
        qb.push(format!(" AND {d}.created_at_ms > ")).push_bind(to_i64(after));
    }
    if let Some(before) = query.created_before_ms {
        qb.push(format!(" AND {d}.created_at_ms < ")).push_bind(to_i64(before));
    }
    for (key, value) in query.labels.iter().skip(1) {
        qb.push(" AND p.id IN (SELECT payload_id FROM payload_labels WHERE key = ")
            .push_bind(key.as_str())
            .push(" AND value = ")
            .push_bind(value.as_str())
            .push(")");
    }
    driver
}

async fn exists(conn: &mut Conn, id: PayloadId) -> Result<bool> {
    let row = sqlx::query("SELECT 1 FROM payloads WHERE id = $1")
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

async fn require_payload(conn: &mut Conn, id: PayloadId, what: &str) -> Result<()> {
    if exists(conn, id).await? {
        Ok(())
    } else {
        Err(CatalogError::NotFound(format!("{what} {id} not found")))
    }
}

async fn edges_of(conn: &mut Conn, id: PayloadId, upstream: bool) -> Result<Vec<LineageEdge>> {
    let sql = if upstream {
        "SELECT child, parent, operation, role, parameters FROM lineage WHERE child = $1 ORDER BY parent, operation, role"
    } else {
        "SELECT child, parent, operation, role, parameters FROM lineage WHERE parent = $1 ORDER BY child, operation, role"
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
async fn walk(conn: &mut Conn, start: PayloadId, upstream: bool, max_depth: u32) -> Result<Vec<LineageEdge>> {
    let mut seen = HashSet::from([start]);
    let mut queue = VecDeque::from([(start, 0u32)]);
    let mut out = Vec::new();
    while let Some((node, depth)) = queue.pop_front() {
        if max_depth != 0 && depth >= max_depth {
            continue;
        }
        for edge in edges_of(conn, node, upstream).await? {
            if edge.parent == edge.child {
                continue;
            }
            let next = if upstream { edge.parent } else { edge.child };
            if seen.insert(next) {
                queue.push_back((next, depth + 1));
            }
            out.push(edge);
        }
    }
    Ok(out)
}

async fn add_lineage(conn: &mut Conn, child: PayloadId, edges: &[LineageEdge]) -> Result<()> {
    lock_lineage(conn).await?;
    require_payload(conn, child, "lineage child").await?;
    for edge in edges {
        // A self edge is recorded (the reference accepts it and its client
        // examples send one) but never followed: `walk` skips it.
        let ancestors = if edge.parent == child {
            Vec::new()
        } else {
            require_payload(conn, edge.parent, "lineage parent").await?;
            walk(conn, edge.parent, true, 0).await?
        };
        if ancestors.iter().any(|e| e.parent == child) {
            return Err(CatalogError::InvalidArgument(format!(
                "adding {} as a parent of {child} would make a lineage cycle",
                edge.parent
            )));
        }
        sqlx::query(
            "INSERT INTO lineage (child, parent, operation, role, parameters) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(child.as_bytes().as_slice())
        .bind(edge.parent.as_bytes().as_slice())
        .bind(&edge.operation)
        .bind(&edge.role)
        .bind(&edge.parameters)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn get_metadata(conn: &mut Conn, id: PayloadId) -> Result<Option<Metadata>> {
    let row = sqlx::query("SELECT data, schema, updated_at_ms, version FROM metadata WHERE payload_id = $1")
        .bind(id.as_bytes().as_slice())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|row| {
        Ok(Metadata {
            data: row.try_get("data")?,
            schema: row.try_get("schema")?,
            updated_at_ms: to_u64(row.try_get("updated_at_ms")?),
            version: to_u64(row.try_get("version")?),
        })
    })
    .transpose()
}

async fn update_metadata(
    conn: &mut Conn,
    id: PayloadId,
    mode: MetadataMode,
    update: Metadata,
    expected_version: Option<u64>,
) -> Result<Metadata> {
    require_payload(conn, id, "payload").await?;
    // Without an expected version a lost race is retried on the newer value
    // (a MERGE must apply on top of it); with one, it is the caller's to see.
    for _ in 0..16 {
        let old = get_metadata(conn, id).await?.unwrap_or_default();
        let lost_race = || {
            CatalogError::Conflict(format!(
                "metadata of {id} is at version {}, not the expected {}; read it again and retry",
                old.version,
                expected_version.unwrap_or_default()
            ))
        };
        if expected_version.is_some_and(|v| v != old.version) {
            return Err(lost_race());
        }
        let mut stored = match mode {
            MetadataMode::Replace => update.clone(),
            MetadataMode::Merge => Metadata {
                data: merge_data(&old.data, update.data.clone()),
                schema: if update.schema.is_empty() {
                    old.schema.clone()
                } else {
                    update.schema.clone()
                },
                updated_at_ms: update.updated_at_ms,
                version: 0,
            },
        };
        stored.version = old.version + 1;
        // The version condition makes the write itself the check, so of two
        // writers that read the same version only one updates.
        let done = sqlx::query(
            "INSERT INTO metadata (payload_id, data, schema, updated_at_ms, version) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (payload_id) DO UPDATE SET data = excluded.data, schema = excluded.schema, \
             updated_at_ms = excluded.updated_at_ms, version = excluded.version \
             WHERE metadata.version = $6",
        )
        .bind(id.as_bytes().as_slice())
        .bind(&stored.data)
        .bind(&stored.schema)
        .bind(to_i64(stored.updated_at_ms))
        .bind(to_i64(stored.version))
        .bind(to_i64(old.version))
        .execute(&mut *conn)
        .await;
        // ON CONFLICT settles two first writers too: the second one waits for
        // the first and then takes the update path, where the version differs.
        if done?.rows_affected() == 1 {
            return Ok(stored);
        }
        if expected_version.is_some() {
            return Err(lost_race());
        }
    }
    Err(CatalogError::Conflict(format!(
        "metadata of {id} kept changing under this update; retry"
    )))
}

/// The row of a stream. With `reserve`, first moves its head past that many
/// new entries and returns the head as it was: the write takes the row lock
/// (PostgreSQL) before anything is read, so concurrent appends serialize on
/// the stream, and a failed append rolls the move back with the rest.
async fn stream_row(conn: &mut Conn, key: &StreamKey, reserve: Option<u64>) -> Result<(StreamHead, Retention)> {
    let query = match reserve {
        Some(n) => sqlx::query(
            "UPDATE streams SET next_offset = next_offset + $3 WHERE namespace = $1 AND name = $2 \
             RETURNING id, next_offset - $3 AS next_offset, retention_max_entries, retention_max_age_ms",
        )
        .bind(&key.namespace)
        .bind(&key.name)
        .bind(to_i64(n)),
        None => sqlx::query(
            "SELECT id, next_offset, retention_max_entries, retention_max_age_ms FROM streams \
             WHERE namespace = $1 AND name = $2",
        )
        .bind(&key.namespace)
        .bind(&key.name),
    };
    let row = query
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| CatalogError::NotFound(format!("stream {key} not found; create it first")))?;
    Ok((
        StreamHead {
            id: row.try_get("id")?,
            next_offset: to_u64(row.try_get("next_offset")?),
        },
        Retention {
            max_entries: to_u64(row.try_get("retention_max_entries")?),
            max_age_ms: to_u64(row.try_get("retention_max_age_ms")?),
        },
    ))
}

async fn commit_offset(conn: &mut Conn, key: &StreamKey, group: &str, offset: u64, now_ms: u64) -> Result<()> {
    if group.is_empty() {
        return Err(CatalogError::InvalidArgument(
            "consumer_group must not be empty".to_string(),
        ));
    }
    let (head, _) = stream_row(conn, key, None).await?;
    if offset > head.next_offset {
        return Err(CatalogError::OutOfRange(format!(
            "offset {offset} is past the head of stream {key} (next offset {})",
            head.next_offset
        )));
    }
    sqlx::query(
        "INSERT INTO consumer_offsets (stream_id, consumer_group, entry_offset, updated_at_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (stream_id, consumer_group) DO UPDATE SET entry_offset = excluded.entry_offset, \
         updated_at_ms = excluded.updated_at_ms",
    )
    .bind(head.id)
    .bind(group)
    .bind(to_i64(offset))
    .bind(to_i64(now_ms))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn apply(conn: &mut Conn, node: &str, write: &Write) -> Result<()> {
    match write {
        Write::Insert(rec) => upsert(conn, node, rec, true).await,
        Write::Update(rec) => upsert(conn, node, rec, false).await,
        // Another node's row stays (a replayed delete of one already gone is fine).
        Write::Delete(id) => {
            sqlx::query("DELETE FROM payloads WHERE id = $1 AND node = $2")
                .bind(id.as_bytes().as_slice())
                .bind(node)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }
        Write::Lineage { child, edges } => add_lineage(conn, *child, edges).await,
        Write::ReleaseManifest { id, now_ms } => release_manifest(conn, node, *id, *now_ms).await,
        Write::Metadata {
            id,
            mode,
            update,
            expected_version,
        } => update_metadata(conn, *id, *mode, update.clone(), *expected_version)
            .await
            .map(drop),
        Write::CommitOffset {
            stream,
            group,
            offset,
            now_ms,
        } => commit_offset(conn, stream, group, *offset, *now_ms).await,
    }
}

#[async_trait]
impl Repository for Repo {
    fn node(&self) -> &str {
        &self.node
    }

    async fn write_batch(&self, writes: &[Write]) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        for write in writes {
            apply(&mut tx, &self.node, write).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM payloads WHERE id = $1"))
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn locate_payload(&self, id: PayloadId) -> Result<Option<(PayloadRecord, String)>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS}, node FROM payloads WHERE id = $1"))
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(|row| Ok((record_from_row(row)?, row.try_get::<String, _>("node")?)))
            .transpose()
    }

    async fn load_payloads(&self) -> Result<Vec<PayloadRecord>> {
        use futures_util::TryStreamExt;
        // Streamed: a million rows are never held twice.
        let sql = format!("SELECT {COLUMNS} FROM payloads WHERE node = $1");
        let mut rows = sqlx::query(&sql).bind(&*self.node).fetch(&self.pool);
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
                let mut count = QueryBuilder::<Db>::new("SELECT COUNT(*)");
                push_listing(&mut count, &self.node, query);
                to_u64(count.build_query_scalar::<i64>().fetch_one(&self.pool).await?)
            }
        };

        let page_size = query.page_size.max(1) as usize;
        let mut select = QueryBuilder::<Db>::new(format!("SELECT {}, p.node AS row_node", qualified_columns()));
        let (d, id) = push_listing(&mut select, &self.node, query);
        if let Some(after) = query.after {
            // A row-value comparison lets the planner seek the index instead
            // of skipping every earlier row.
            select
                .push(format!(" AND ({d}.created_at_ms, {d}.{id}) < ("))
                .push_bind(to_i64(after.created_at_ms))
                .push(", ")
                .push_bind(after.id.as_bytes().to_vec())
                .push(")");
        }
        select
            .push(format!(" ORDER BY {d}.created_at_ms DESC, {d}.{id} DESC LIMIT "))
            .push_bind(page_size as i64 + 1);
        let rows = select.build().fetch_all(&self.pool).await?;
        let mut items = rows.iter().map(record_from_row).collect::<Result<Vec<_>>>()?;
        let mut nodes = rows
            .iter()
            .map(|row| row.try_get::<String, _>("row_node"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let next = if items.len() > page_size {
            items.truncate(page_size);
            nodes.truncate(page_size);
            items.last().map(|r| PageToken {
                created_at_ms: r.created_at_ms,
                id: r.id,
                total,
            })
        } else {
            None
        };
        Ok(Page {
            items,
            nodes,
            next,
            total,
        })
    }

    async fn add_lineage(&self, child: PayloadId, edges: &[LineageEdge]) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        add_lineage(&mut tx, child, edges).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_lineage(&self, id: PayloadId, upstream: bool, max_depth: u32) -> Result<Vec<LineageEdge>> {
        let mut conn = self.pool.acquire().await?;
        require_payload(&mut conn, id, "payload").await?;
        walk(&mut conn, id, upstream, max_depth).await
    }

    async fn update_metadata(
        &self,
        id: PayloadId,
        mode: MetadataMode,
        update: Metadata,
        expected_version: Option<u64>,
    ) -> Result<Metadata> {
        let mut tx = begin_write(&self.pool).await?;
        let stored = update_metadata(&mut tx, id, mode, update, expected_version).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_metadata(&self, id: PayloadId) -> Result<Option<Metadata>> {
        let mut conn = self.pool.acquire().await?;
        require_payload(&mut conn, id, "payload").await?;
        get_metadata(&mut conn, id).await
    }

    async fn append_metadata_event(&self, id: PayloadId, event: MetadataEvent) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        require_payload(&mut tx, id, "payload").await?;
        sqlx::query(
            "INSERT INTO metadata_events (payload_id, ts_ms, data, source, version) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.as_bytes().as_slice())
        .bind(to_i64(event.ts_ms))
        .bind(&event.data)
        .bind(&event.source)
        .bind(&event.version)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn metadata_history(&self, id: PayloadId, after: u64, limit: u32) -> Result<EventPage> {
        let mut conn = self.pool.acquire().await?;
        require_payload(&mut conn, id, "payload").await?;
        let limit = limit.max(1);
        let rows = sqlx::query(
            "SELECT seq, ts_ms, data, source, version FROM metadata_events WHERE payload_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(id.as_bytes().as_slice())
        .bind(to_i64(after))
        .bind(i64::from(limit) + 1)
        .fetch_all(&mut *conn)
        .await?;
        let mut page = EventPage::default();
        for row in rows.iter().take(limit as usize) {
            page.events.push(MetadataEvent {
                ts_ms: to_u64(row.try_get("ts_ms")?),
                data: row.try_get("data")?,
                source: row.try_get("source")?,
                version: row.try_get("version")?,
            });
            page.next = Some(to_u64(row.try_get("seq")?));
        }
        if rows.len() <= limit as usize {
            page.next = None;
        }
        Ok(page)
    }

    async fn create_stream(
        &self,
        key: &StreamKey,
        retention: Retention,
        owner: Option<&str>,
        now_ms: u64,
    ) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO streams (namespace, name, retention_max_entries, retention_max_age_ms, created_at_ms, owner) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (namespace, name) DO NOTHING",
        )
        .bind(&key.namespace)
        .bind(&key.name)
        .bind(to_i64(retention.max_entries))
        .bind(to_i64(retention.max_age_ms))
        .bind(to_i64(now_ms))
        .bind(owner)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(CatalogError::AlreadyExists(format!("stream {key} already exists")));
        }
        Ok(())
    }

    async fn stream_owner(&self, key: &StreamKey) -> Result<StreamOwner> {
        let row = sqlx::query("SELECT id, owner FROM streams WHERE namespace = $1 AND name = $2")
            .bind(&key.namespace)
            .bind(&key.name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("stream {key} not found; create it first")))?;
        Ok(StreamOwner {
            id: row.try_get("id")?,
            owner: row.try_get("owner")?,
        })
    }

    async fn delete_stream(&self, key: &StreamKey, owner: Option<&str>) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        let deleted = sqlx::query(
            "DELETE FROM streams WHERE namespace = $1 AND name = $2 AND owner IS NOT DISTINCT FROM $3 RETURNING id",
        )
        .bind(&key.namespace)
        .bind(&key.name)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = deleted else {
            return Ok(());
        };
        // Subscribers wake to the largest offset, find the stream gone and end.
        let gone = StreamHead {
            id: row.try_get("id")?,
            next_offset: u64::MAX,
        };
        announce_append(&mut tx, gone).await?;
        tx.commit().await?;
        self.hub.notify(gone.id, gone.next_offset);
        Ok(())
    }

    async fn append_to(
        &self,
        key: &StreamKey,
        stream: Option<i64>,
        items: &[AppendItem],
        now_ms: u64,
    ) -> Result<(u64, u64)> {
        let mut tx = begin_write(&self.pool).await?;
        let (head, retention) = stream_row(&mut tx, key, Some(items.len() as u64)).await?;
        if stream.is_some_and(|id| id != head.id) {
            // Rolled back with the transaction, the reservation too.
            return Err(CatalogError::NotFound(format!(
                "stream {key} was deleted and made again since it was checked; append again"
            )));
        }
        if items.is_empty() {
            return Ok((0, 0));
        }
        let mut checked = HashSet::new();
        for item in items {
            if checked.insert(item.payload_id) {
                require_payload(&mut tx, item.payload_id, "appended payload").await?;
            }
        }
        let first = head.next_offset;
        for (i, item) in items.iter().enumerate() {
            let tags = serde_json::to_string(&item.tags).map_err(|e| CatalogError::Storage(e.to_string()))?;
            sqlx::query(&format!(
                "INSERT INTO stream_entries (stream_id, {ENTRY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ))
            .bind(head.id)
            .bind(to_i64(first + i as u64))
            .bind(item.payload_id.as_bytes().as_slice())
            .bind(to_i64(item.event_time_ms))
            .bind(to_i64(now_ms))
            .bind(to_i64(item.duration_ns))
            .bind(tags)
            .execute(&mut *tx)
            .await?;
        }
        let next = first + items.len() as u64;
        if retention.max_entries > 0 && next > retention.max_entries {
            sqlx::query("DELETE FROM stream_entries WHERE stream_id = $1 AND entry_offset < $2")
                .bind(head.id)
                .bind(to_i64(next - retention.max_entries))
                .execute(&mut *tx)
                .await?;
        }
        if retention.max_age_ms > 0 {
            sqlx::query("DELETE FROM stream_entries WHERE stream_id = $1 AND append_time_ms < $2")
                .bind(head.id)
                .bind(to_i64(now_ms.saturating_sub(retention.max_age_ms)))
                .execute(&mut *tx)
                .await?;
        }
        let head = StreamHead {
            id: head.id,
            next_offset: next,
        };
        announce_append(&mut tx, head).await?;
        tx.commit().await?;
        self.hub.notify(head.id, next);
        Ok((first, next - 1))
    }

    async fn read_stream(&self, key: &StreamKey, query: ReadQuery) -> Result<Vec<StreamEntry>> {
        let mut conn = self.pool.acquire().await?;
        let (head, _) = stream_row(&mut conn, key, None).await?;
        if query.start > head.next_offset {
            return Err(CatalogError::OutOfRange(format!(
                "start offset {} is past the head of stream {key} (next offset {})",
                query.start, head.next_offset
            )));
        }
        let end = query.end.unwrap_or(u64::MAX);
        if end < query.start {
            return Err(CatalogError::InvalidArgument(format!(
                "end offset {end} is before start offset {}",
                query.start
            )));
        }
        let max = if query.max == 0 {
            MAX_READ
        } else {
            query.max.min(MAX_READ)
        };
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM stream_entries WHERE stream_id = $1 AND entry_offset >= $2 \
             AND entry_offset <= $3 AND append_time_ms >= $4 ORDER BY entry_offset LIMIT $5"
        ))
        .bind(head.id)
        .bind(to_i64(query.start))
        .bind(to_i64(end))
        .bind(to_i64(query.not_before_ms))
        .bind(to_i64(max))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn read_entries(&self, stream_id: i64, start: u64, max: u64) -> Result<Vec<StreamEntry>> {
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM stream_entries WHERE stream_id = $1 AND entry_offset >= $2 \
             ORDER BY entry_offset LIMIT $3"
        ))
        .bind(stream_id)
        .bind(to_i64(start))
        .bind(to_i64(max.min(MAX_READ)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn stream_head(&self, key: &StreamKey) -> Result<StreamHead> {
        let mut conn = self.pool.acquire().await?;
        Ok(stream_row(&mut conn, key, None).await?.0)
    }

    async fn commit_offset(&self, key: &StreamKey, group: &str, offset: u64, now_ms: u64) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        commit_offset(&mut tx, key, group, offset, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_committed(&self, key: &StreamKey, group: &str) -> Result<Option<u64>> {
        let mut conn = self.pool.acquire().await?;
        let (head, _) = stream_row(&mut conn, key, None).await?;
        let row = sqlx::query("SELECT entry_offset FROM consumer_offsets WHERE stream_id = $1 AND consumer_group = $2")
            .bind(head.id)
            .bind(group)
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|row| Ok(to_u64(row.try_get("entry_offset")?))).transpose()
    }

    async fn claim_manifest(&self, manifest: &Manifest, now_ms: u64) -> Result<Vec<BlockState>> {
        self.objects_claim(manifest, now_ms).await
    }

    async fn mark_blocks_stored(&self, hashes: &[BlockHash]) -> Result<()> {
        self.objects_mark_stored(hashes).await
    }

    async fn complete_manifest(&self, id: PayloadId) -> Result<()> {
        self.objects_complete(id).await
    }

    async fn get_manifest(&self, id: PayloadId) -> Result<Option<(Manifest, bool)>> {
        self.objects_manifest(id).await
    }

    async fn node_manifests(&self) -> Result<Vec<(PayloadId, bool)>> {
        self.objects_of_node().await
    }

    async fn gc_lock(&self) -> Result<GcLock> {
        gc_lock(self).await
    }

    async fn gc_begin(&self, cutoff_ms: u64, limit: u32) -> Result<Vec<BlockHash>> {
        self.objects_gc_begin(cutoff_ms, limit).await
    }

    async fn gc_finish(&self, hashes: &[BlockHash]) -> Result<()> {
        self.objects_gc_finish(hashes).await
    }

    async fn block_stats(&self) -> Result<BlockStats> {
        self.objects_stats().await
    }

    async fn policies(&self) -> Result<Vec<Policy>> {
        let rows = sqlx::query("SELECT spec FROM policies ORDER BY namespace, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let spec: String = row.try_get("spec")?;
                serde_json::from_str(&spec).map_err(|_| corrupt("policy"))
            })
            .collect()
    }

    fn watch_stream(&self, head: StreamHead) -> tokio::sync::watch::Receiver<u64> {
        self.hub.watch(head.id, head.next_offset)
    }
}

impl Repo {
    /// Stores an accepted policy (replacing the one of its name); agents
    /// pick it up within seconds. Only the operator calls this.
    pub async fn put_policy(&self, policy: &Policy, now_ms: u64) -> Result<()> {
        let spec = serde_json::to_string(policy).map_err(|e| CatalogError::Storage(format!("encoding a policy: {e}")))?;
        sqlx::query(
            "INSERT INTO policies (namespace, name, spec, updated_at_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (namespace, name) DO UPDATE SET spec = excluded.spec, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&policy.namespace)
        .bind(&policy.name)
        .bind(spec)
        .bind(to_i64(now_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records what a node last said of itself (the operator's, at its
    /// heartbeats).
    pub async fn record_node(&self, node: &NodeRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (name, pool, version, last_seen_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET pool = excluded.pool, version = excluded.version, \
             last_seen_ms = excluded.last_seen_ms WHERE nodes.last_seen_ms <= excluded.last_seen_ms",
        )
        .bind(&node.name)
        .bind(&node.pool)
        .bind(&node.version)
        .bind(to_i64(node.last_seen_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets the nodes not seen since `forget_before_ms` that hold no
    /// payload rows (nodes a cluster removed); one with rows stays, so its
    /// payloads show as unavailable. Says how many went.
    pub async fn forget_nodes(&self, forget_before_ms: u64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM nodes WHERE last_seen_ms < $1 \
             AND NOT EXISTS (SELECT 1 FROM payloads p WHERE p.node = nodes.name)",
        )
        .bind(to_i64(forget_before_ms))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Every recorded node, by name.
    pub async fn known_nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query("SELECT name, pool, version, last_seen_ms FROM nodes ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeRow {
                    name: row.try_get("name")?,
                    pool: row.try_get("pool")?,
                    version: row.try_get("version")?,
                    last_seen_ms: to_u64(row.try_get("last_seen_ms")?),
                })
            })
            .collect()
    }

    /// Drops a policy; a missing one is fine.
    pub async fn delete_policy(&self, namespace: &str, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM policies WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

include!("objects.rs");
