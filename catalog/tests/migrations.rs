//! Migrations: a database at any earlier schema version, brought up to date,
//! has exactly the schema of one created fresh, and keeps its rows.

use std::borrow::Cow;

use payload_catalog::sql::{postgres, sqlite};
use payload_catalog::*;
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, Row, SqliteConnection};

/// The first `version_count` migrations of `all`, as an older binary had them.
fn prefix(all: &Migrator, version_count: usize) -> Migrator {
    Migrator {
        migrations: Cow::Owned(all.migrations[..version_count].to_vec()),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

/// A row as version 1 of the schema knows it.
const V1_ROW: &str = "INSERT INTO payloads (id, tier, state, size_bytes, created_at_ms, version) \
                      VALUES ($1, 2, 2, 10, 1, 1)";

async fn sqlite_schema(url: &str) -> Vec<String> {
    let mut conn = SqliteConnection::connect(url).await.unwrap();
    sqlx::query("SELECT type, name, COALESCE(sql, '') AS sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{} {}: {}", r.get::<String, _>(0), r.get::<String, _>(1), r.get::<String, _>(2)))
        .collect()
}

#[tokio::test]
async fn sqlite_upgrades_from_every_version_match_a_fresh_schema() {
    let count = sqlite::MIGRATOR.migrations.len();
    assert!(count >= 2, "the test needs an earlier version to start from");
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.db");
    SqliteRepository::open(&fresh).await.unwrap();
    let want = sqlite_schema(&format!("sqlite://{}", fresh.display())).await;
    for version_count in 1..count {
        let path = dir.path().join(format!("from-{version_count}.db"));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let id = PayloadId::random();
        {
            let mut conn = SqliteConnection::connect(&url).await.unwrap();
            prefix(&sqlite::MIGRATOR, version_count).run(&mut conn).await.unwrap();
            sqlx::query(V1_ROW)
                .bind(id.as_bytes().as_slice())
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let repo = SqliteRepository::open(&path).await.unwrap();
        assert_eq!(
            sqlite_schema(&url).await,
            want,
            "upgraded from {version_count} migration(s)"
        );
        let rows = repo.load_payloads().await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![id],
            "rows survive the upgrade"
        );
    }
}

async fn postgres_schema(url: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let queries = [
        "SELECT table_name || '.' || column_name || ' ' || ordinal_position || ' ' || data_type || ' ' || \
         is_nullable || ' ' || COALESCE(column_default, '') FROM information_schema.columns \
         WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
        "SELECT indexname || ': ' || indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname",
        "SELECT conrelid::regclass::text || ' ' || conname || ': ' || pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE connamespace = 'public'::regnamespace ORDER BY 1",
    ];
    let mut out = Vec::new();
    for sql in queries {
        for row in sqlx::query(sql).fetch_all(&mut conn).await.unwrap() {
            out.push(row.get::<String, _>(0));
        }
    }
    out
}

#[tokio::test]
async fn postgres_upgrades_from_every_version_match_a_fresh_schema() {
    let count = postgres::MIGRATOR.migrations.len();
    assert!(count >= 2, "the test needs an earlier version to start from");
    let Some(fresh) = payload_catalog::testing::fresh_database().await else {
        return;
    };
    PgRepository::connect(&fresh, "n").await.unwrap();
    let want = postgres_schema(&fresh).await;
    assert!(want.iter().any(|c| c.starts_with("stream_entries.")), "{want:?}");
    for version_count in 1..count {
        let url = payload_catalog::testing::fresh_database().await.unwrap();
        let id = PayloadId::random();
        {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            prefix(&postgres::MIGRATOR, version_count).run(&mut conn).await.unwrap();
            sqlx::query(V1_ROW)
                .bind(id.as_bytes().as_slice())
                .execute(&mut conn)
                .await
                .unwrap();
        }
        PgRepository::connect(&url, "n").await.unwrap();
        assert_eq!(
            postgres_schema(&url).await,
            want,
            "upgraded from {version_count} migration(s)"
        );
        // A shared catalog never had rows without a node; the row is kept as is.
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payloads WHERE id = $1")
            .bind(id.as_bytes().as_slice())
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept, 1, "rows survive the upgrade");
    }
}

/// Both backends are at the same schema version: a migration added to one
/// and not the other fails here.
#[test]
fn both_backends_have_the_same_migrations() {
    let names = |m: &Migrator| {
        m.iter()
            .map(|m| (m.version, m.description.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&sqlite::MIGRATOR), names(&postgres::MIGRATOR));
}
