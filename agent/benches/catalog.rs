//! `make bench` (catalog part): commits through the agent, stream appends
//! and append-to-subscriber latency, on SQLite and on PostgreSQL (a private,
//! durable cluster started here); then ListPayloads and GetLineage at
//! PM_BENCH_PAYLOADS rows (default 1,000,000) on each repository. Prints a
//! Markdown table (copy it into docs/benchmarks.md). Run some sections only
//! with PM_BENCH_ONLY=commits,streams,catalog-scale.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payload_catalog::testing::{create_database, PgCluster};
use payload_catalog::{ListQuery, PgRepository, Repository, SqliteRepository};
use payload_client::Client;
use payload_proto::core as pb;
use payload_proto::runtime::{self, subscribe_request::Start};
use support::{connect, kill, ms, percentile, scale, spawn, us, wanted};
use tokio::task::JoinSet;

/// One agent process with its own state and RAM directories.
struct Agent {
    child: std::process::Child,
    _state: tempfile::TempDir,
    _ram: tempfile::TempDir,
}

impl Agent {
    async fn start(catalog: Option<&str>, node: &str) -> (Agent, Client) {
        let state = tempfile::tempdir().unwrap();
        let ram = tempfile::Builder::new()
            .prefix("pm-bench-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let mut extra = vec!["--node-name", node];
        if let Some(url) = catalog {
            extra.extend(["--catalog", url]);
        }
        let child = spawn(state.path(), ram.path(), "2GiB", &extra);
        let client = connect(&state.path().join("agent.sock")).await;
        let agent = Agent {
            child,
            _state: state,
            _ram: ram,
        };
        (agent, client)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

const COMMITS: usize = 20_000;
const IN_FLIGHT: usize = 32;

/// The floor for a commit: a one-row INSERT in a transaction of its own,
/// straight into the same database engine with the same durability
/// settings, 32 in flight. What the agent must beat by batching.
async fn floor_commits<DB: sqlx::Database>(pool: sqlx::Pool<DB>) -> f64
where
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    use sqlx::Executor;
    pool.execute("CREATE TABLE floor (id BYTEA PRIMARY KEY, v BIGINT NOT NULL)")
        .await
        .unwrap();
    let n = COMMITS / 4;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (pool, next) = (pool.clone(), next.clone());
        workers.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let id = uuid::Uuid::new_v4().as_bytes().to_vec();
                sqlx::query::<DB>("INSERT INTO floor (id, v) VALUES ($1, 1)")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        });
    }
    while workers.join_next().await.is_some() {}
    n as f64 / start.elapsed().as_secs_f64()
}

/// Commit RPCs against allocations made beforehand, 32 in flight: the
/// agent's log append plus group commit into the catalog.
async fn commits(report: &mut Vec<String>, label: &str, catalog: Option<&str>, floor: f64, sync: bool) {
    const N: usize = COMMITS;
    let (agent, client) = Agent::start(catalog, "bench").await;
    let (_, catalog_rpc, _) = client.raw();
    let mut ids = Vec::with_capacity(N);
    for _ in 0..N {
        let request = runtime::AllocatePayloadRequest {
            size_bytes: 64,
            preferred_tier: pb::Tier::Ram as i32,
            ..Default::default()
        };
        let desc = catalog_rpc
            .clone()
            .allocate_payload(request)
            .await
            .unwrap()
            .into_inner();
        ids.push(desc.payload_descriptor.unwrap().payload_id.unwrap());
    }
    let ids = Arc::new(Mutex::new(ids));
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (ids, mut rpc) = (ids.clone(), catalog_rpc.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(id) = ids.lock().unwrap().pop() else {
                    return latencies;
                };
                let t = Instant::now();
                let request = runtime::CommitPayloadRequest {
                    id: Some(id),
                    sync,
                    ..Default::default()
                };
                rpc.commit_payload(request).await.unwrap();
                latencies.push(t.elapsed());
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = workers.join_next().await {
        latencies.extend(done.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let latencies = sorted(latencies);
    report.push(format!(
        "| commits through the agent ({label}{}), {IN_FLIGHT} in flight | {:.0} commits/s | p50 {:.0} µs, p99 {:.0} µs; floor (one INSERT per transaction) {floor:.0}/s: {:.1}× |",
        if sync { ", sync=true" } else { "" },
        N as f64 / secs,
        us(percentile(&latencies, 0.5)),
        us(percentile(&latencies, 0.99)),
        N as f64 / secs / floor,
    ));
    drop(client);
    drop(agent);
}

fn sid() -> Option<runtime::StreamId> {
    Some(runtime::StreamId {
        name: "bench".into(),
        namespace: String::new(),
    })
}

fn items(id: &pb::PayloadId, n: usize) -> Vec<runtime::AppendItem> {
    (0..n)
        .map(|_| runtime::AppendItem {
            payload_id: Some(id.clone()),
            ..Default::default()
        })
        .collect()
}

/// Append throughput (single entries, batches, concurrent appenders) and
/// the time from calling Append to a subscriber holding the entry.
/// `subscriber` is the agent the subscriber attaches to (another agent on a
/// shared catalog, or the appender's own).
async fn streams(report: &mut Vec<String>, label: &str, appender: &Client, subscriber: &Client) {
    let id = appender.put(b"entry").await.unwrap();
    let id = pb::PayloadId {
        value: id.as_bytes().to_vec(),
    };
    let mut s = appender.streams();
    let _ = s.delete_stream(runtime::DeleteStreamRequest { stream: sid() }).await;
    let create = runtime::CreateStreamRequest {
        stream: sid(),
        ..Default::default()
    };
    s.create_stream(create).await.unwrap();
    let append = |n| runtime::AppendRequest {
        stream: sid(),
        items: items(&id, n),
    };

    let mut single = Vec::new();
    for _ in 0..2_000 {
        let t = Instant::now();
        s.append(append(1)).await.unwrap();
        single.push(t.elapsed());
    }
    let single = sorted(single);
    let total: Duration = single.iter().sum();
    report.push(format!(
        "| stream append, 1 entry per call ({label}) | {:.0} appends/s | p50 {:.0} µs, p99 {:.0} µs |",
        single.len() as f64 / total.as_secs_f64(),
        us(percentile(&single, 0.5)),
        us(percentile(&single, 0.99)),
    ));

    let start = Instant::now();
    for _ in 0..100 {
        s.append(append(100)).await.unwrap();
    }
    report.push(format!(
        "| stream append, 100 entries per call ({label}) | {:.0} entries/s | |",
        10_000.0 / start.elapsed().as_secs_f64()
    ));

    let start = Instant::now();
    let mut writers = JoinSet::new();
    for _ in 0..16 {
        let (mut s, request) = (s.clone(), append(1));
        writers.spawn(async move {
            for _ in 0..250 {
                s.append(request.clone()).await.unwrap();
            }
        });
    }
    while writers.join_next().await.is_some() {}
    report.push(format!(
        "| stream append, 16 concurrent appenders ({label}) | {:.0} appends/s | |",
        4_000.0 / start.elapsed().as_secs_f64()
    ));

    // Latency: one append at a time; the subscriber stamps each arrival.
    let subscribe = runtime::SubscribeRequest {
        stream: sid(),
        start: Some(Start::FromLatest(true)),
        max_inflight: 0,
    };
    let mut sub = subscriber.streams().subscribe(subscribe).await.unwrap().into_inner();
    let (tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        while let Ok(Some(msg)) = sub.message().await {
            if tx.send((msg.entry.unwrap().offset, Instant::now())).is_err() {
                return;
            }
        }
    });
    let mut latency = Vec::new();
    for _ in 0..1_000 {
        let t = Instant::now();
        let done = s.append(append(1)).await.unwrap().into_inner();
        let (offset, at) = arrivals.recv().await.unwrap();
        assert_eq!(offset, done.first_offset);
        latency.push(at - t);
    }
    follower.abort();
    let latency = sorted(latency);
    report.push(format!(
        "| append → subscriber ({label}) | p50 {:.0} µs, p99 {:.0} µs | from calling Append to the entry in the subscriber |",
        us(percentile(&latency, 0.5)),
        us(percentile(&latency, 0.99)),
    ));
}

/// Rows made in bulk by SQL (a million through the API would take longer
/// than the measurement): `n` committed RAM payloads of node `bench`, one
/// `shard` label each, and lineage chains of 100 (each payload derives from
/// the one created just before it).
const BASE_MS: i64 = 1_700_000_000_000;

async fn seed_sqlite(path: &std::path::Path, n: usize) {
    let repo = SqliteRepository::open(path).await.unwrap();
    drop(repo);
    let url = format!("sqlite://{}", path.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < $1 - 1) \
         INSERT INTO payloads (id, tier, state, size_bytes, created_at_ms, version, labels, node) \
         SELECT randomblob(16), 2, 2, 1, $2 + i, 2, '{\"shard\":\"' || (i % 100) || '\"}', 'bench' FROM seq",
    )
    .bind(n as i64)
    .bind(BASE_MS)
    .execute(&pool)
    .await
    .unwrap();
    seed_common(&pool).await;
}

async fn seed_postgres(url: &str, n: usize) {
    PgRepository::connect(url, "bench").await.unwrap();
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO payloads (id, tier, state, size_bytes, created_at_ms, version, labels, node) \
         SELECT decode(md5(i::text || random()::text), 'hex'), 2, 2, 1, $2 + i, 2, \
         '{\"shard\":\"' || (i % 100) || '\"}', 'bench' FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(n as i64)
    .bind(BASE_MS)
    .execute(&pool)
    .await
    .unwrap();
    seed_common(&pool).await;
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
}

async fn seed_common<DB: sqlx::Database>(pool: &sqlx::Pool<DB>)
where
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    use sqlx::Executor;
    pool.execute(
        format!(
            "INSERT INTO payload_labels (payload_id, key, value, node, created_at_ms) \
             SELECT id, 'shard', CAST((created_at_ms - {BASE_MS}) % 100 AS TEXT), node, created_at_ms FROM payloads"
        )
        .as_str(),
    )
    .await
    .unwrap();
    pool.execute(
        format!(
            "INSERT INTO lineage (child, parent, operation, role) \
             SELECT c.id, p.id, 'derive', 'input' FROM payloads c \
             JOIN payloads p ON p.node = c.node AND p.created_at_ms = c.created_at_ms - 1 \
             WHERE (c.created_at_ms - {BASE_MS}) % 100 <> 0"
        )
        .as_str(),
    )
    .await
    .unwrap();
}

/// ListPayloads pages and GetLineage walks on a seeded repository.
async fn catalog_scale(report: &mut Vec<String>, label: &str, repo: &dyn Repository, n: usize) {
    let first_page = ListQuery {
        page_size: 100,
        ..Default::default()
    };
    let mut first = Vec::new();
    let mut later = Vec::new();
    for _ in 0..5 {
        let mut query = first_page.clone();
        for page in 0..40 {
            let t = Instant::now();
            let got = repo.list_payloads(&query).await.unwrap();
            if page == 0 {
                first.push(t.elapsed());
            } else {
                later.push(t.elapsed());
            }
            query.after = got.next;
        }
    }
    let (first, later) = (sorted(first), sorted(later));
    report.push(format!(
        "| ListPayloads page of 100 at {n} ({label}) | p50 {:.2} ms, p99 {:.2} ms | first page (counts the total): p50 {:.0} ms |",
        ms(percentile(&later, 0.5)),
        ms(percentile(&later, 0.99)),
        ms(percentile(&first, 0.5)),
    ));
    let filtered = ListQuery {
        labels: vec![("shard".into(), "7".into())],
        ..first_page.clone()
    };
    let mut query = filtered;
    let mut pages = Vec::new();
    let mut total = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let got = repo.list_payloads(&query).await.unwrap();
        pages.push(t.elapsed());
        total = got.total;
        query.after = got.next;
    }
    let first = pages.remove(0);
    let pages = sorted(pages);
    report.push(format!(
        "| ListPayloads label selector at {n} ({label}) | later pages p50 {:.2} ms | first page {:.0} ms; {total} match |",
        ms(percentile(&pages, 0.5)),
        ms(first),
    ));

    // Chain ends: the newest payload of each chain of 100, found by listing.
    let newest = repo.list_payloads(&first_page).await.unwrap().items;
    let mut deep = Vec::new();
    let mut shallow = Vec::new();
    for rec in newest
        .iter()
        .filter(|r| (r.created_at_ms as i64 - BASE_MS) % 100 == 99)
        .take(20)
    {
        for _ in 0..5 {
            let t = Instant::now();
            let edges = repo.get_lineage(rec.id, true, 0).await.unwrap();
            deep.push(t.elapsed());
            assert_eq!(edges.len(), 99);
            let t = Instant::now();
            repo.get_lineage(rec.id, true, 3).await.unwrap();
            shallow.push(t.elapsed());
        }
    }
    let (deep, shallow) = (sorted(deep), sorted(shallow));
    report.push(format!(
        "| GetLineage at {n} ({label}) | depth 3: p50 {:.2} ms; whole chain (99 edges): p50 {:.1} ms, p99 {:.1} ms | upstream |",
        ms(percentile(&shallow, 0.5)),
        ms(percentile(&deep, 0.5)),
        ms(percentile(&deep, 0.99)),
    ));
}

fn main() {
    let n = scale();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = PgCluster::start_durable().expect("a private PostgreSQL for the benchmark");
    rt.block_on(async {
        let mut report = vec![
            "| catalog benchmark | figure | detail |".to_string(),
            "|---|---|---|".to_string(),
        ];
        if wanted("commits") {
            let dir = tempfile::tempdir().unwrap();
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.path().join("floor.db"))
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                // As the agent runs its catalog: every transaction durable.
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(30));
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .unwrap();
            let floor = floor_commits(pool).await;
            commits(&mut report, "SQLite", None, floor, false).await;
            commits(&mut report, "SQLite", None, floor, true).await;
            let url = create_database(&cluster.url()).await.unwrap();
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(&url)
                .await
                .unwrap();
            let floor = floor_commits(pool).await;
            let url = create_database(&cluster.url()).await.unwrap();
            commits(&mut report, "PostgreSQL", Some(&url), floor, false).await;
            let url = create_database(&cluster.url()).await.unwrap();
            commits(&mut report, "PostgreSQL", Some(&url), floor, true).await;
        }
        if wanted("streams") {
            let (agent, client) = Agent::start(None, "a").await;
            streams(&mut report, "SQLite", &client, &client).await;
            drop((client, agent));
            let url = create_database(&cluster.url()).await.unwrap();
            let (agent_a, a) = Agent::start(Some(&url), "a").await;
            let (agent_b, b) = Agent::start(Some(&url), "b").await;
            streams(&mut report, "PostgreSQL, same agent", &a, &a).await;
            streams(&mut report, "PostgreSQL, subscriber on another agent", &a, &b).await;
            drop((a, b, agent_a, agent_b));
        }
        if wanted("catalog-scale") {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("catalog.db");
            let t = Instant::now();
            seed_sqlite(&path, n).await;
            report.push(format!(
                "| seeding {n} rows + lineage by SQL (SQLite) | {:.1} s | |",
                t.elapsed().as_secs_f64()
            ));
            let url = format!("sqlite://{}", path.display());
            let repo = SqliteRepository::open_url(&url, "bench").await.unwrap();
            catalog_scale(&mut report, "SQLite", &repo, n).await;
            let url = create_database(&cluster.url()).await.unwrap();
            let t = Instant::now();
            seed_postgres(&url, n).await;
            report.push(format!(
                "| seeding {n} rows + lineage by SQL (PostgreSQL) | {:.1} s | |",
                t.elapsed().as_secs_f64()
            ));
            let repo = PgRepository::connect(&url, "bench").await.unwrap();
            catalog_scale(&mut report, "PostgreSQL", &repo, n).await;
        }
        println!("{}", report.join("\n"));
    });
    drop(cluster);
}
