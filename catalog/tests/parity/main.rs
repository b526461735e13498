//! The parity suite: every repository operation, written once and run
//! against SQLite and against PostgreSQL (a private cluster the harness
//! starts; see `payload_catalog::testing`). A behaviour that differs between
//! the backends fails here.

mod lineage_metadata;
mod objects;
mod payloads;
mod policies;
mod streams;
mod transactions;

use std::sync::Arc;

use payload_catalog::*;
use sqlx::Connection;

/// One catalog under test, and the way to open more handles on it (other
/// agents sharing it).
pub struct Backend {
    pub repo: Arc<dyn Repository>,
    target: Target,
}

enum Target {
    Sqlite(tempfile::TempDir),
    Postgres(String),
    /// SQLite reached through the remote encoding, as agents reach the
    /// operator's catalog.
    Remote(tempfile::TempDir),
}

impl Backend {
    pub async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let repo = SqliteRepository::open(&dir.path().join("catalog.db")).await.unwrap();
        Backend {
            repo: Arc::new(repo),
            target: Target::Sqlite(dir),
        }
    }

    pub async fn remote() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::Remote(dir);
        Backend {
            repo: remote_sqlite(&target, "standalone").await.unwrap(),
            target,
        }
    }

    pub async fn postgres() -> Option<Backend> {
        let url = payload_catalog::testing::fresh_database().await?;
        let repo = PgRepository::connect(&url, "standalone").await.unwrap();
        Some(Backend {
            repo: Arc::new(repo),
            target: Target::Postgres(url),
        })
    }

    /// Another repository on the same catalog, as node `node`.
    pub async fn open(&self, node: &str) -> Arc<dyn Repository> {
        self.try_open(node).await.unwrap()
    }

    pub async fn try_open(&self, node: &str) -> Result<Arc<dyn Repository>> {
        Ok(match &self.target {
            Target::Sqlite(dir) => {
                let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
                Arc::new(SqliteRepository::open_url(&url, node).await?)
            }
            Target::Postgres(url) => Arc::new(PgRepository::connect(url, node).await?),
            Target::Remote(_) => remote_sqlite(&self.target, node).await?,
        })
    }

    /// Stores or drops a policy as the operator does: on the backend
    /// itself (agents only read them, through whatever they were given).
    pub async fn put_policy(&self, policy: &Policy) {
        match &self.target {
            Target::Sqlite(dir) | Target::Remote(dir) => {
                let repo = SqliteRepository::open(&dir.path().join("catalog.db")).await.unwrap();
                repo.put_policy(policy, 1).await.unwrap();
            }
            Target::Postgres(url) => PgRepository::connect(url, "operator")
                .await
                .unwrap()
                .put_policy(policy, 1)
                .await
                .unwrap(),
        }
    }

    pub async fn delete_policy(&self, namespace: &str, name: &str) {
        match &self.target {
            Target::Sqlite(dir) | Target::Remote(dir) => {
                let repo = SqliteRepository::open(&dir.path().join("catalog.db")).await.unwrap();
                repo.delete_policy(namespace, name).await.unwrap();
            }
            Target::Postgres(url) => PgRepository::connect(url, "operator")
                .await
                .unwrap()
                .delete_policy(namespace, name)
                .await
                .unwrap(),
        }
    }

    /// Records a migration as applied, as a newer binary would have.
    pub async fn stamp_schema_version(&self, version: i64) {
        const STAMP: &str = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                             VALUES ($1, 'from a newer binary', TRUE, $2, 0)";
        let checksum = vec![0u8; 48];
        match &self.target {
            Target::Sqlite(dir) | Target::Remote(dir) => {
                let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::query(STAMP)
                    .bind(version)
                    .bind(checksum)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            Target::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::query(STAMP)
                    .bind(version)
                    .bind(checksum)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }
}

/// A repository of node `node` on the SQLite catalog in `target`'s
/// directory, every call encoded, dispatched and decoded on the way.
async fn remote_sqlite(target: &Target, node: &str) -> Result<Arc<dyn Repository>> {
    let Target::Remote(dir) = target else {
        unreachable!("only remote targets")
    };
    let url = format!("sqlite://{}", dir.path().join("catalog.db").display());
    let inner: Arc<dyn Repository> = Arc::new(SqliteRepository::open_url(&url, node).await?);
    let link = payload_catalog::remote::Loopback(inner);
    Ok(Arc::new(payload_catalog::remote::RemoteRepository::new(node, link)))
}

/// A committed RAM payload row.
pub fn record(created_at_ms: u64, tier: Tier, labels: &[(&str, &str)]) -> PayloadRecord {
    PayloadRecord {
        state: PayloadState::Active,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..PayloadRecord::allocated(PayloadId::random(), tier, 10, created_at_ms)
    }
}

pub fn edge(child: PayloadId, parent: PayloadId) -> LineageEdge {
    LineageEdge {
        child,
        parent,
        operation: "derive".into(),
        role: "input".into(),
        parameters: vec![1],
    }
}

pub async fn insert(repo: &dyn Repository, records: &[PayloadRecord]) {
    let writes: Vec<Write> = records.iter().cloned().map(Write::Insert).collect();
    repo.write_batch(&writes).await.unwrap();
}

/// Instantiates each named test once per backend: `sqlite::name`,
/// `postgres::name` and `remote::name` (SQLite through the remote encoding).
macro_rules! parity {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::super::Backend::sqlite().await).await;
                }
            )*
        }
        mod remote {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::super::Backend::remote().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = super::super::Backend::postgres().await {
                        super::$name(backend).await;
                    }
                }
            )*
        }
    };
}
pub(crate) use parity;
