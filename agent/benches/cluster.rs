//! `make bench` (cluster part): how soon a commit on a node is in the
//! cluster catalog. Light load (one put at a time, 20 ms apart), each
//! timed from the put's answer until its row is in PostgreSQL, for a node
//! whose catalog is the operator's (`payload-agent node` against
//! `payload-operator catalog`) and, as the floor, for a standalone agent
//! writing the same PostgreSQL itself. Then the load of the issue: three
//! node agents each asked for 1,000 puts a second at once, a sample of
//! them timed the same way. Prints Markdown tables.

mod support;

use std::time::{Duration, Instant};

use payload_catalog::testing::{create_database, PgCluster};
use payload_catalog::{PayloadId, PgRepository, Repository};
use support::{connect, kill, ms, operator, percentile, spawn, spawn_mode};

const PUTS: usize = 200;
/// Under load: agents, the puts a second asked of each, for how long, and
/// every how many puts one is timed until visible.
const AGENTS: usize = 3;
const RATE: u64 = 1_000;
const LOAD_SECS: u64 = 3;
const SAMPLE_EVERY: u64 = 50;

/// What [`under_load`] measured.
struct Load {
    /// Puts answered a second, all agents together.
    rate: f64,
    lags: Vec<Duration>,
    /// From the last put's answer until every row is in PostgreSQL.
    drain: Duration,
}

/// Each client puts at [`RATE`] a second for [`LOAD_SECS`] (as fast as it
/// can when it falls behind); every [`SAMPLE_EVERY`]th put is timed from
/// its answer until its row is visible.
async fn under_load(clients: Vec<(payload_client::Client, String)>, database: &str) -> Load {
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for (client, node) in clients {
        let repo = std::sync::Arc::new(PgRepository::connect(database, &node).await.unwrap());
        agents.spawn(async move {
            let mut samples = tokio::task::JoinSet::new();
            for n in 0..RATE * LOAD_SECS {
                let due = started + Duration::from_micros(n * 1_000_000 / RATE);
                tokio::time::sleep_until(due.into()).await;
                let id = client.put(&n.to_le_bytes()).await.unwrap();
                if n % SAMPLE_EVERY == 0 {
                    let (repo, answered) = (repo.clone(), Instant::now());
                    samples.spawn(async move {
                        while repo.get_payload(PayloadId(id)).await.unwrap().is_none() {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        answered.elapsed()
                    });
                }
            }
            let done = Instant::now();
            (samples.join_all().await, done)
        });
    }
    let mut lags = Vec::new();
    let mut last = started;
    for (samples, done) in agents.join_all().await {
        lags.extend(samples);
        last = last.max(done);
    }
    let total = AGENTS as u64 * RATE * LOAD_SECS;
    let rate = total as f64 / (last - started).as_secs_f64();
    let pool = sqlx::PgPool::connect(database).await.unwrap();
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM payloads")
            .fetch_one(&pool)
            .await
            .unwrap();
        if rows as u64 >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    lags.sort();
    Load {
        rate,
        lags,
        drain: last.elapsed(),
    }
}

/// Put-answered → row-visible, for each of [`PUTS`] puts.
async fn visibility(client: &payload_client::Client, database: &str, node: &str) -> Vec<Duration> {
    let repo = PgRepository::connect(database, node).await.unwrap();
    let mut lags = Vec::with_capacity(PUTS);
    for n in 0..PUTS {
        let id = client.put(&(n as u64).to_le_bytes()).await.unwrap();
        let answered = Instant::now();
        while repo.get_payload(PayloadId(id)).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        lags.push(answered.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lags.sort();
    lags
}

fn row(label: &str, lags: &[Duration], floor: &[Duration]) -> String {
    let p50 = percentile(lags, 0.5);
    format!(
        "| {label} | {:.1} | {:.1} | {:.1} | {:.2}× |",
        ms(p50),
        ms(percentile(lags, 0.99)),
        ms(*lags.last().unwrap()),
        p50.as_secs_f64() / percentile(floor, 0.5).as_secs_f64()
    )
}

fn main() {
    let cluster = PgCluster::start_durable().expect("a private PostgreSQL for the benchmark");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dirs = || {
            let state = tempfile::tempdir().unwrap();
            let ram = tempfile::Builder::new()
                .prefix("pm-bench-")
                .tempdir_in("/dev/shm")
                .unwrap();
            (state, ram)
        };
        let direct = create_database(&cluster.url()).await.unwrap();
        let (state, ram) = dirs();
        let mut agent = spawn(
            state.path(),
            ram.path(),
            "1GiB",
            &["--catalog", &direct, "--node-name", "direct"],
        );
        let client = connect(&state.path().join("agent.sock")).await;
        let floor = visibility(&client, &direct, "direct").await;
        kill(&mut agent);

        let served = create_database(&cluster.url()).await.unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut op = operator(&served, port);
        // A node loads its rows from the operator at start: wait for it.
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let url = format!("http://127.0.0.1:{port}");
        let (state, ram) = dirs();
        let mut node = spawn_mode(
            "node",
            state.path(),
            ram.path(),
            "1GiB",
            &["--operator", &url, "--node-name", "n1"],
        );
        let client = connect(&state.path().join("agent.sock")).await;
        let through = visibility(&client, &served, "n1").await;
        kill(&mut node);
        kill(&mut op);

        let loaded = create_database(&cluster.url()).await.unwrap();
        let mut op = operator(&loaded, port);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (mut nodes, mut clients, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        for n in 0..AGENTS {
            let (state, ram) = dirs();
            let name = format!("load-{n}");
            nodes.push(spawn_mode(
                "node",
                state.path(),
                ram.path(),
                "1GiB",
                &["--operator", &url, "--node-name", &name],
            ));
            clients.push((connect(&state.path().join("agent.sock")).await, name));
            kept.push((state, ram));
        }
        let load = under_load(clients, &loaded).await;
        nodes.iter_mut().for_each(kill);
        kill(&mut op);

        println!(
            "| commit → visible in the catalog ({PUTS} puts, 20 ms apart) | p50 ms | p99 ms | max ms | p50 vs floor |"
        );
        println!("|---|---|---|---|---|");
        println!("{}", row("standalone agent → its PostgreSQL (floor)", &floor, &floor));
        println!("{}", row("node agent → operator → PostgreSQL", &through, &floor));
        println!("\ntarget: visible at the operator within 2 s under light load (max above)");
        println!(
            "\n| {AGENTS} node agents × {RATE} puts/s asked, {LOAD_SECS} s | puts/s answered | lag p50 ms | p99 ms | \
             max ms | p50 vs floor | all visible after the last put, ms |"
        );
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| every {SAMPLE_EVERY}th put timed ({} samples) | {:.0} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.0} |",
            load.lags.len(),
            load.rate,
            ms(percentile(&load.lags, 0.5)),
            ms(percentile(&load.lags, 0.99)),
            ms(*load.lags.last().unwrap()),
            percentile(&load.lags, 0.5).as_secs_f64() / percentile(&floor, 0.5).as_secs_f64(),
            ms(load.drain)
        );
        drop(kept);
    });
}
