//! A real node for tests: SQLite catalog file, RAM tier in a private
//! directory under /dev/shm, disk tier in a temp dir, gRPC on a real Unix
//! socket.

#![allow(dead_code)]

pub mod noise;
pub mod operator;
pub mod process;
pub mod s3;
pub mod tmpfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use payload_agent::node::{Node, NodeConfig, Recovery};
use payload_agent::server;
use payload_agent::state::StateDir;
use payload_agent::store::FileStore;
use payload_catalog::{Repository, SqliteRepository};
use payload_client::Client;
use tempfile::TempDir;
use tokio::sync::watch;

// Not every test binary uses it.
#[allow(unused_imports)]
pub use noise::noise;

pub const MIB: u64 = 1 << 20;

/// A TCP port on 127.0.0.1 that nothing listens on (as of now).
pub fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Directories that outlive one node, so a test can restart on them.
pub struct Dirs {
    pub state: TempDir,
    pub ram: TempDir,
}

impl Dirs {
    pub fn new() -> Dirs {
        Dirs {
            state: tempfile::tempdir().expect("state dir"),
            ram: tempfile::Builder::new()
                .prefix("pm-test-")
                .tempdir_in("/dev/shm")
                .expect("ram dir under /dev/shm"),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.state.path().join("agent.sock")
    }

    pub fn disk(&self) -> PathBuf {
        self.state.path().join("disk")
    }

    pub fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

pub struct Capacity {
    pub ram: u64,
    pub disk: u64,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            ram: 64 * MIB,
            disk: 256 * MIB,
        }
    }
}

pub async fn open_node(dirs: &Dirs, cfg: NodeConfig, cap: &Capacity) -> (Arc<Node>, Recovery) {
    let repo = SqliteRepository::open(&dirs.state.path().join("catalog.db"))
        .await
        .expect("catalog");
    open_node_on(dirs, cfg, cap, Arc::new(repo)).await
}

/// A node on a catalog of the caller's choosing (a shared PostgreSQL, say).
pub async fn open_node_on(
    dirs: &Dirs,
    cfg: NodeConfig,
    cap: &Capacity,
    repo: Arc<dyn Repository>,
) -> (Arc<Node>, Recovery) {
    open_node_with(dirs, cfg, cap, repo, None).await
}

/// A node with an object tier, if one is given.
pub async fn open_node_with(
    dirs: &Dirs,
    cfg: NodeConfig,
    cap: &Capacity,
    repo: Arc<dyn Repository>,
    object: Option<payload_agent::object::ObjectTier>,
) -> (Arc<Node>, Recovery) {
    let state = StateDir::open(dirs.state.path()).expect("state dir");
    let ram = FileStore::ram(dirs.ram.path(), "pm", state.node_id(), cap.ram).expect("ram store");
    let disk = FileStore::disk(&dirs.disk(), state.node_id(), cap.disk).expect("disk store");
    Node::open(cfg, repo, ram, disk, object, state)
        .await
        .expect("node opens")
}

/// A node serving on its socket until dropped.
pub struct Served {
    pub node: Arc<Node>,
    pub client: Client,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    pub async fn start(dirs: &Dirs, cfg: NodeConfig, cap: &Capacity) -> Served {
        let (node, _) = open_node(dirs, cfg, cap).await;
        Self::serve(dirs, node).await
    }

    pub async fn start_on(dirs: &Dirs, cfg: NodeConfig, repo: Arc<dyn Repository>) -> Served {
        let (node, _) = open_node_on(dirs, cfg, &Capacity::default(), repo).await;
        Self::serve(dirs, node).await
    }

    async fn serve(dirs: &Dirs, node: Arc<Node>) -> Served {
        let uds = server::bind_socket(&dirs.socket()).expect("socket");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn({
            let node = node.clone();
            async move { server::serve(node, uds, None, rx).await.expect("serve") }
        });
        let client = Client::connect(dirs.socket().to_str().unwrap())
            .await
            .expect("client connects");
        Served {
            node,
            client,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        drop(self.client);
        let _ = self.task.await;
        self.node.flush().await.expect("flush");
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Allocates, writes and commits `bytes` on a node, in process.
pub async fn put_on(node: &Arc<Node>, tier: payload_catalog::Tier, bytes: &[u8]) -> payload_catalog::PayloadId {
    let rec = node
        .allocate(payload_agent::node::AllocateRequest::new(bytes.len() as u64, tier))
        .await
        .unwrap();
    std::fs::write(node.store(tier).unwrap().path(rec.id), bytes).unwrap();
    node.commit(rec.id, None, false, false).await.unwrap();
    rec.id
}

/// Waits until `check` holds, polling every 20 ms for at most 30 s, then
/// fails the test naming `what` (a wait that never ends must fail, not hang).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1_500 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

/// Holds SQLite's write lock on `db`, as another process running
/// `BEGIN IMMEDIATE` would, until `ROLLBACK` or drop.
pub async fn lock_sqlite(db: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
    conn
}

/// `GET path` on 127.0.0.1:`port` over HTTP/1.1: (status code, the whole
/// response).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (code, response)
}
