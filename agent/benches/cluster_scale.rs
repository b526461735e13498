//! `make bench` (cluster at scale): the cluster listing (`ListPayloads`
//! with `node_filter = "*"`, `payloadctl ls --all-nodes`) at a million
//! payloads across 100 nodes, seeded by SQL into the operator's
//! PostgreSQL. Pages of 100, 40 deep, five times, four ways: on the
//! repository in process (the floor), through the operator's catalog
//! service (the agents' protocol), through a node agent's gRPC, and
//! through the operator's v1 service (`payloadctl --operator URL ls`).
//! `PM_BENCH_PAYLOADS` sets the count. Prints a Markdown table.

mod support;

use std::time::{Duration, Instant};

use payload_catalog::remote::RemoteRepository;
use payload_catalog::testing::{create_database, PgCluster};
use payload_catalog::{ListQuery, PgRepository, Repository, Scope};
use payload_proto::runtime::ListPayloadsRequest;
use support::{connect, kill, ms, operator, percentile, scale, spawn_mode};

const NODES: usize = 100;
const PAGES: usize = 40;
const ROUNDS: usize = 5;
const BASE_MS: i64 = 1_700_000_000_000;

async fn seed(url: &str, n: usize) {
    PgRepository::connect(url, "seed").await.unwrap();
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO payloads (id, tier, state, size_bytes, created_at_ms, version, labels, node) \
         SELECT decode(md5(i::text || random()::text), 'hex'), 2, 2, 1, $2 + i, 2, '{}', \
         'node-' || (i % $3) FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(n as i64)
    .bind(BASE_MS)
    .bind(NODES as i64)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
}

/// Later pages and first pages (which count the total), each sorted.
struct Pages {
    later: Vec<Duration>,
    first: Vec<Duration>,
}

impl Pages {
    fn row(&self, label: &str, floor: &Pages) -> String {
        let p50 = percentile(&self.later, 0.5);
        format!(
            "| {label} | {:.2} | {:.2} | {:.0} | {:.2}× |",
            ms(p50),
            ms(percentile(&self.later, 0.99)),
            ms(percentile(&self.first, 0.5)),
            p50.as_secs_f64() / percentile(&floor.later, 0.5).as_secs_f64()
        )
    }
}

/// Walks the listing [`ROUNDS`] times, [`PAGES`] deep; `page` takes the
/// previous page's token and gives the next one.
async fn walk<F, Fut>(mut page: F) -> Pages
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let (mut later, mut first) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut token = None;
        for n in 0..PAGES {
            let t = Instant::now();
            token = page(token).await;
            let took = t.elapsed();
            if n == 0 { &mut first } else { &mut later }.push(took);
            assert!(token.is_some(), "the listing ended early");
        }
    }
    later.sort();
    first.sort();
    Pages { later, first }
}

async fn repository(repo: &dyn Repository) -> Pages {
    walk(|token| async move {
        let query = ListQuery {
            page_size: 100,
            scope: Scope::Cluster,
            after: token.map(|t| payload_catalog::PageToken::decode(&t).unwrap()),
            ..Default::default()
        };
        let page = repo.list_payloads(&query).await.unwrap();
        assert_eq!(page.items.len(), 100);
        page.next.map(|t| t.encode())
    })
    .await
}

/// The v1 listing a client sends (`payloadctl ls`), page by page.
async fn v1(client: &payload_client::Client, node_filter: &str) -> Pages {
    walk(|token| {
        let client = client.clone();
        let node_filter = node_filter.to_string();
        async move {
            let page = client
                .list(ListPayloadsRequest {
                    node_filter,
                    page_size: 100,
                    page_token: token.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(page.payloads.len(), 100);
            Some(page.next_page_token).filter(|t| !t.is_empty())
        }
    })
    .await
}

fn main() {
    let n = scale();
    let cluster = PgCluster::start_durable().expect("a private PostgreSQL for the benchmark");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let url = create_database(&cluster.url()).await.unwrap();
        let t = Instant::now();
        seed(&url, n).await;
        let seeded = t.elapsed();

        let direct = PgRepository::connect(&url, "reader").await.unwrap();
        let floor = repository(&direct).await;

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut op = operator(&url, port);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        let link = payload_agent::cluster::OperatorLink::new(&endpoint, "reader", None, None).unwrap();
        let remote = RemoteRepository::new("reader", std::sync::Arc::new(link));
        let served = repository(&remote).await;

        let state = tempfile::tempdir().unwrap();
        let ram = tempfile::Builder::new()
            .prefix("pm-bench-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let mut node = spawn_mode(
            "node",
            state.path(),
            ram.path(),
            "1GiB",
            &["--operator", &endpoint, "--node-name", "reader-node"],
        );
        let client = connect(&state.path().join("agent.sock")).await;
        let through_agent = v1(&client, "*").await;
        // The operator's own v1 service lists every node without a filter.
        let view = payload_client::Client::connect_operator(&endpoint, None, None)
            .await
            .unwrap();
        let through_view = v1(&view, "").await;
        kill(&mut node);
        kill(&mut op);

        println!(
            "seeded {n} payload rows across {NODES} nodes by SQL in {:.1} s\n",
            seeded.as_secs_f64()
        );
        println!(
            "| cluster ListPayloads, page of 100, {n} rows / {NODES} nodes | later pages p50 ms | p99 ms | \
             first page p50 ms (counts the total) | p50 vs floor |"
        );
        println!("|---|---|---|---|---|");
        println!("{}", floor.row("PostgreSQL repository in process (floor)", &floor));
        println!("{}", served.row("through the operator's catalog service", &floor));
        println!(
            "{}",
            through_agent.row("through a node agent (payloadctl ls --all-nodes)", &floor)
        );
        println!(
            "{}",
            through_view.row("the operator's v1 service (payloadctl --operator URL ls)", &floor)
        );
    });
}
