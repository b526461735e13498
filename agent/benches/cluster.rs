//! `make bench` (cluster part): how soon a commit on a node is in the
//! cluster catalog. Light load (one put at a time, 20 ms apart), each
//! timed from the put's answer until its row is in PostgreSQL, for a node
//! whose catalog is the operator's (`payload-agent node` against
//! `payload-operator catalog`) and, as the floor, for a standalone agent
//! writing the same PostgreSQL itself. Prints a Markdown table.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use payload_catalog::testing::{create_database, PgCluster};
use payload_catalog::{PayloadId, PgRepository, Repository};
use support::{connect, kill, ms, percentile, spawn, spawn_mode};

const PUTS: usize = 200;

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

fn operator(database: &str, port: u16) -> std::process::Child {
    let bin = Path::new(env!("CARGO_BIN_EXE_payload-agent")).with_file_name("payload-operator");
    assert!(
        bin.exists(),
        "build it first: cargo build --release -p payload-operator"
    );
    std::process::Command::new(bin)
        .args(["catalog", "--auth", "none", "--database", database])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("the operator starts")
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

        println!(
            "| commit → visible in the catalog ({PUTS} puts, 20 ms apart) | p50 ms | p99 ms | max ms | p50 vs floor |"
        );
        println!("|---|---|---|---|---|");
        println!("{}", row("standalone agent → its PostgreSQL (floor)", &floor, &floor));
        println!("{}", row("node agent → operator → PostgreSQL", &through, &floor));
        println!("\ntarget: visible at the operator within 2 s under light load (max above)");
    });
}
