// The object tier's rows, for both SQL backends: manifests and block
// reference counts. Like `common.rs`, not a module: `include!`d by it.
//
// A collection of unreferenced blocks runs in two transactions around the
// store's deletes: `gc_begin` marks the blocks `deleting`, the caller
// deletes their objects, `gc_finish` drops the rows. A manifest claiming a
// block marked `deleting` learns so and uploads it only after `gc_finish`,
// so a delete can never land after the upload that replaced it.

use crate::objects::{BlockHash, BlockState, BlockStats, Manifest};

fn manifest_from_row(row: &DbRow) -> Result<(Manifest, bool)> {
    let id: Vec<u8> = row.try_get("payload_id")?;
    let sha256: Vec<u8> = row.try_get("sha256")?;
    let blocks: String = row.try_get("blocks")?;
    let manifest = Manifest {
        payload: PayloadId::from_slice(&id).map_err(|_| corrupt("manifest payload id"))?,
        size_bytes: to_u64(row.try_get("size_bytes")?),
        sha256: sha256.try_into().map_err(|_| corrupt("manifest sha256"))?,
        block_size: to_u64(row.try_get("block_size")?),
        blocks: Manifest::parse_blocks(&blocks).ok_or_else(|| corrupt("manifest block list"))?,
    };
    Ok((manifest, row.try_get("complete")?))
}

async fn manifest_row(conn: &mut Conn, id: PayloadId) -> Result<Option<(Manifest, bool)>> {
    let row = sqlx::query(
        "SELECT payload_id, size_bytes, sha256, block_size, blocks, complete FROM object_manifests \
         WHERE payload_id = $1",
    )
    .bind(id.as_bytes().as_slice())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(manifest_from_row).transpose()
}

async fn block_state(conn: &mut Conn, hash: &BlockHash, size_bytes: u64) -> Result<BlockState> {
    let row = sqlx::query("SELECT stored, deleting FROM object_blocks WHERE hash = $1")
        .bind(hash.as_slice())
        .fetch_one(&mut *conn)
        .await?;
    Ok(BlockState {
        hash: *hash,
        size_bytes,
        stored: row.try_get("stored")?,
        deleting: row.try_get("deleting")?,
    })
}

/// Records the manifest (pending) and takes one reference on each of its
/// distinct blocks. Claiming the same manifest again takes nothing more.
async fn claim_manifest(conn: &mut Conn, node: &str, m: &Manifest, now_ms: u64) -> Result<Vec<BlockState>> {
    let distinct = m.distinct();
    let owner: Option<String> = sqlx::query_scalar("SELECT node FROM object_manifests WHERE payload_id = $1")
        .bind(m.payload.as_bytes().as_slice())
        .fetch_optional(&mut *conn)
        .await?;
    if owner.as_deref().is_some_and(|owner| owner != node) {
        // Its references are that node's: sharing the row would let that
        // node's release drop what this one counts on.
        return Err(CatalogError::Conflict(format!(
            "payload {} already has a manifest on node {}; import it there",
            m.payload,
            owner.unwrap_or_default()
        )));
    }
    match manifest_row(conn, m.payload).await? {
        Some((stored, _)) if stored == *m => {
            let mut states = Vec::with_capacity(distinct.len());
            for (hash, size) in &distinct {
                states.push(block_state(conn, hash, *size).await?);
            }
            return Ok(states);
        }
        Some(_) => {
            return Err(CatalogError::Conflict(format!(
                "payload {} already has a different manifest; payload bytes never change",
                m.payload
            )))
        }
        None => {}
    }
    sqlx::query(
        "INSERT INTO object_manifests (payload_id, node, size_bytes, sha256, block_size, blocks, complete, \
         created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, FALSE, $7)",
    )
    .bind(m.payload.as_bytes().as_slice())
    .bind(node)
    .bind(to_i64(m.size_bytes))
    .bind(m.sha256.as_slice())
    .bind(to_i64(m.block_size))
    .bind(m.blocks_text())
    .bind(to_i64(now_ms))
    .execute(&mut *conn)
    .await?;
    let mut states = Vec::with_capacity(distinct.len());
    for (hash, size) in distinct {
        let row = sqlx::query(
            "INSERT INTO object_blocks (hash, size_bytes, refs) VALUES ($1, $2, 1) \
             ON CONFLICT (hash) DO UPDATE SET refs = object_blocks.refs + 1, zero_since_ms = 0 \
             RETURNING stored, deleting",
        )
        .bind(hash.as_slice())
        .bind(to_i64(size))
        .fetch_one(&mut *conn)
        .await?;
        states.push(BlockState {
            hash,
            size_bytes: size,
            stored: row.try_get("stored")?,
            deleting: row.try_get("deleting")?,
        });
    }
    Ok(states)
}

/// Drops this node's manifest and its block references; a missing one is
/// fine, so a replayed release changes nothing, and another node's
/// manifest is not this node's to release.
async fn release_manifest(conn: &mut Conn, node: &str, id: PayloadId, now_ms: u64) -> Result<()> {
    let Some((m, _)) = manifest_row(conn, id).await? else {
        return Ok(());
    };
    let deleted = sqlx::query("DELETE FROM object_manifests WHERE payload_id = $1 AND node = $2")
        .bind(id.as_bytes().as_slice())
        .bind(node)
        .execute(&mut *conn)
        .await?;
    if deleted.rows_affected() == 0 {
        return Ok(());
    }
    for (hash, _) in m.distinct() {
        sqlx::query(
            "UPDATE object_blocks SET refs = refs - 1, \
             zero_since_ms = CASE WHEN refs = 1 THEN $2 ELSE zero_since_ms END \
             WHERE hash = $1 AND refs > 0",
        )
        .bind(hash.as_slice())
        .bind(to_i64(now_ms))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

impl Repo {
    async fn objects_claim(&self, m: &Manifest, now_ms: u64) -> Result<Vec<BlockState>> {
        let mut tx = begin_write(&self.pool).await?;
        let states = claim_manifest(&mut tx, &self.node, m, now_ms).await?;
        tx.commit().await?;
        Ok(states)
    }

    async fn objects_mark_stored(&self, hashes: &[BlockHash]) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        for hash in hashes {
            sqlx::query("UPDATE object_blocks SET stored = TRUE WHERE hash = $1 AND NOT deleting")
                .bind(hash.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn objects_complete(&self, id: PayloadId) -> Result<()> {
        let done = sqlx::query("UPDATE object_manifests SET complete = TRUE WHERE payload_id = $1 AND node = $2")
            .bind(id.as_bytes().as_slice())
            .bind(&*self.node)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(CatalogError::NotFound(format!("payload {id} has no manifest")));
        }
        Ok(())
    }

    async fn objects_manifest(&self, id: PayloadId) -> Result<Option<(Manifest, bool)>> {
        let mut conn = self.pool.acquire().await?;
        manifest_row(&mut conn, id).await
    }

    async fn objects_of_node(&self) -> Result<Vec<(PayloadId, bool)>> {
        let rows = sqlx::query("SELECT payload_id, complete FROM object_manifests WHERE node = $1")
            .bind(&*self.node)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: Vec<u8> = row.try_get("payload_id")?;
                let id = PayloadId::from_slice(&id).map_err(|_| corrupt("manifest payload id"))?;
                Ok((id, row.try_get("complete")?))
            })
            .collect()
    }

    async fn objects_gc_begin(&self, cutoff_ms: u64, limit: u32) -> Result<Vec<BlockHash>> {
        let mut tx = begin_write(&self.pool).await?;
        sqlx::query(
            // The outer conditions are checked again on the row as it is
            // when updated: a block claimed meanwhile is not marked.
            "UPDATE object_blocks SET deleting = TRUE WHERE hash IN (SELECT hash FROM object_blocks \
             WHERE refs = 0 AND NOT deleting AND zero_since_ms <= $1 LIMIT $2) \
             AND refs = 0 AND NOT deleting AND zero_since_ms <= $1",
        )
        .bind(to_i64(cutoff_ms))
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await?;
        // Blocks a collection that did not finish had marked are taken too.
        let rows = sqlx::query("SELECT hash FROM object_blocks WHERE deleting LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                let hash: Vec<u8> = row.try_get("hash")?;
                hash.try_into().map_err(|_| corrupt("block hash"))
            })
            .collect()
    }

    async fn objects_gc_finish(&self, hashes: &[BlockHash]) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        for hash in hashes {
            sqlx::query("DELETE FROM object_blocks WHERE hash = $1 AND deleting AND refs = 0")
                .bind(hash.as_slice())
                .execute(&mut *tx)
                .await?;
            // Claimed during the collection: its object is gone, upload it again.
            sqlx::query("UPDATE object_blocks SET deleting = FALSE, stored = FALSE WHERE hash = $1 AND deleting")
                .bind(hash.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn objects_stats(&self) -> Result<BlockStats> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS blocks, CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) AS bytes, \
             CAST(COALESCE(SUM(CASE WHEN refs = 0 THEN 1 ELSE 0 END), 0) AS BIGINT) AS unreferenced \
             FROM object_blocks",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(BlockStats {
            blocks: to_u64(row.try_get("blocks")?),
            bytes: to_u64(row.try_get("bytes")?),
            unreferenced: to_u64(row.try_get("unreferenced")?),
        })
    }
}
