//! Command line of `payload-agent`. Every flag has an environment variable,
//! so the Helm chart and systemd units configure it the same way.

// Doc comments here are `--help` text, written for people, not rustdoc.
#![allow(rustdoc::invalid_html_tags)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use payload_catalog::remote::RemoteRepository;
use payload_catalog::Repository;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::limits::Limits;
use crate::node::{Node, NodeConfig};
use crate::server;
use crate::state::StateDir;
use crate::store::FileStore;

#[derive(Parser, Debug)]
#[command(name = "payload-agent", version, about = "Payload Manager node agent", long_about = None)]
pub struct Cli {
    /// Threads serving requests (default: one per CPU). 1 runs everything
    /// on one thread, which gives the lowest latency per call.
    #[arg(long, env = "PM_WORKER_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a standalone node: the agent and an embedded SQLite catalog in one
    /// process, no Kubernetes (or a PostgreSQL catalog shared with other
    /// agents, with --catalog postgres://...). Serves the v1 gRPC services on
    /// a Unix socket and on TCP.
    Standalone(Box<StandaloneArgs>),
    /// Run a node of a cluster (what a PayloadPool's DaemonSet runs): the
    /// agent as standalone, its catalog the operator's (`payload-operator
    /// catalog`). Its catalog writes wait in the node's log while the
    /// operator is away, and the node keeps serving.
    Node(Box<NodeArgs>),
    /// Hold the memfds of sealed RAM payloads across agent restarts (the
    /// agent starts it itself; see docs/native.md).
    #[command(hide = true)]
    Keeper(KeeperArgs),
}

#[derive(Args, Debug, Clone)]
pub struct KeeperArgs {
    /// The socket to serve the agent on (`<state-dir>/keeper.sock`).
    #[arg(long)]
    pub socket: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The operator's catalog service: http://HOST:PORT (loopback, or
    /// inside the cluster's network), or https://HOST:PORT with
    /// --operator-ca-file.
    #[arg(long, env = "PM_OPERATOR")]
    pub operator: String,
    /// A file holding this agent's projected ServiceAccount token (audience
    /// payload-manager-catalog), re-read as the kubelet rotates it. Unset:
    /// no token (an operator outside a cluster, on loopback).
    #[arg(long, env = "PM_OPERATOR_TOKEN_FILE")]
    pub operator_token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the operator's, for https.
    #[arg(long, env = "PM_OPERATOR_CA_FILE")]
    pub operator_ca_file: Option<PathBuf>,
    /// The PayloadPool this agent runs for (the operator sets PM_POOL):
    /// the operator sums this node's tiers into that pool's status.
    #[arg(long, env = "PM_POOL", default_value = "")]
    pub pool: String,
    #[command(flatten)]
    pub agent: StandaloneArgs,
}

impl NodeArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let NodeArgs {
            operator,
            operator_token_file,
            operator_ca_file,
            pool,
            agent,
        } = self;
        anyhow::ensure!(
            agent.catalog.is_none(),
            "--catalog is for standalone nodes: a cluster node's catalog is the operator's (--operator)"
        );
        anyhow::ensure!(
            agent.node_name != "standalone",
            "a cluster node needs --node-name (its Kubernetes node's name; the DaemonSet sets PM_NODE_NAME)"
        );
        let link = crate::cluster::OperatorLink::new(
            &operator,
            &agent.node_name,
            operator_token_file,
            operator_ca_file.as_deref(),
        )?
        .for_pool(pool);
        tracing::info!(%operator, "this node's catalog is the operator's");
        agent.serve(Some(std::sync::Arc::new(link))).await
    }
}

#[derive(Args, Debug, Clone)]
pub struct StandaloneArgs {
    /// Directory for everything the node keeps: catalog, lease journal,
    /// socket and (by default) the disk tier. Default:
    /// $XDG_STATE_HOME/payload-manager, else ~/.local/state/payload-manager.
    #[arg(long, env = "PM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Unix socket clients connect to. Default: <state-dir>/agent.sock.
    #[arg(long, env = "PM_SOCKET")]
    pub socket: Option<PathBuf>,
    /// TCP address for clients that cannot use the socket, or `off`.
    #[arg(long, env = "PM_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// HTTP address of `/metrics` (Prometheus), `/healthz` and `/readyz`,
    /// or `off`. They show figures, never payload bytes or names.
    #[arg(long, env = "PM_METRICS_LISTEN", default_value = "off")]
    pub metrics_listen: String,
    /// Catalog database URL: sqlite://PATH (the default is
    /// sqlite://<state-dir>/catalog.db) or postgres://USER@HOST:PORT/DB, a
    /// catalog several agents may share (give each a distinct --node-name).
    #[arg(long, env = "PM_CATALOG")]
    pub catalog: Option<String>,
    /// Where RAM payloads live: /dev/shm or a tmpfs directory below it
    /// (clients open /dev/shm/<shm_name>).
    #[arg(long, env = "PM_RAM_ROOT", default_value = "/dev/shm")]
    pub ram_root: PathBuf,
    /// Prefix of shared-memory names: /<prefix>-<node-id>-<uuid>, where the
    /// node id is made once in the state dir (agents sharing /dev/shm never
    /// touch each other's regions).
    #[arg(long, env = "PM_SHM_PREFIX", default_value = "pm")]
    pub shm_prefix: String,
    /// RAM tier capacity (bytes, or with a unit: 512MiB, 4GiB, 1G).
    #[arg(long, env = "PM_RAM_CAPACITY", default_value = "1GiB", value_parser = parse_size)]
    pub ram_capacity: u64,
    /// Directory of the disk tier. Default: <state-dir>/disk.
    #[arg(long, env = "PM_DISK_ROOT")]
    pub disk_root: Option<PathBuf>,
    /// Disk tier capacity (bytes, or with a unit).
    #[arg(long, env = "PM_DISK_CAPACITY", default_value = "10GiB", value_parser = parse_size)]
    pub disk_capacity: u64,
    /// Spill RAM to disk above this fraction of its capacity...
    #[arg(long, env = "PM_RAM_HIGH_WATERMARK", default_value_t = 0.9)]
    pub ram_high_watermark: f64,
    /// ...down to this fraction.
    #[arg(long, env = "PM_RAM_LOW_WATERMARK", default_value_t = 0.7)]
    pub ram_low_watermark: f64,
    /// Lease duration when a client asks for none (milliseconds).
    #[arg(long, env = "PM_LEASE_DEFAULT_MS", default_value_t = 20_000)]
    pub lease_default_ms: u64,
    /// Longest lease granted (milliseconds); longer requests are capped.
    #[arg(long, env = "PM_LEASE_MAX_MS", default_value_t = 120_000)]
    pub lease_max_ms: u64,
    /// Uncommitted allocations are aborted after this long (milliseconds).
    #[arg(long, env = "PM_WRITE_DEADLINE_MS", default_value_t = 600_000)]
    pub write_deadline_ms: u64,
    /// Largest payload accepted (bytes, or with a unit).
    #[arg(long, env = "PM_MAX_PAYLOAD_SIZE", default_value = "128GiB", value_parser = parse_size)]
    pub max_payload_size: u64,
    /// Name of this node: in stats and messages, and on the catalog rows
    /// that describe this node's payload copies.
    #[arg(long, env = "PM_NODE_NAME", default_value = "standalone")]
    pub node_name: String,
    /// Catalog writes that may wait in the node's log while the catalog is
    /// unavailable; past it, Allocate, Commit and Pin answer UNAVAILABLE.
    #[arg(long, env = "PM_CATALOG_BACKLOG", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub catalog_backlog: u64,
    /// Who may read (lease) a payload besides its owner: `owner`, `group`
    /// (the owner's group too) or `node` (every local user). Changes stay
    /// the owner's. The sockets' modes follow (0600, 0660, 0666), and so do
    /// named regions' once sealed (0400, 0440, 0444).
    #[arg(long, env = "PM_READ_ACCESS", value_enum, default_value_t = crate::identity::ReadAccess::Owner)]
    pub read_access: crate::identity::ReadAccess,
    /// A file holding the token TCP callers must send as `authorization:
    /// Bearer <token>`. Without it TCP is for loopback only, and its callers
    /// are one anonymous identity.
    #[arg(long, env = "PM_TCP_TOKEN_FILE")]
    pub tcp_token_file: Option<PathBuf>,
    /// After answering on an idle native connection, poll it this long
    /// (microseconds) for the next request before parking: a parked thread's
    /// wake-up can cost more than the round trip. 0 turns polling off (less
    /// CPU on a busy node, slower back-to-back calls). One connection polls
    /// at a time, so at most one worker thread is held.
    #[arg(long, env = "PM_NATIVE_SPIN_US", default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub native_spin_us: u64,
    #[command(flatten)]
    pub object: crate::object::args::ObjectArgs,
    #[command(flatten)]
    pub limits: Limits,
}

/// Parses `4096`, `64KiB`, `512MiB`, `2GiB`, `1G`, `10TB`...
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 4096, 512MiB or 2GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?}; use KiB, MiB, GiB or TiB")),
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `HOST:PORT`, or `off` (or empty): `None`.
fn parse_listen(text: &str, flag: &str) -> anyhow::Result<Option<SocketAddr>> {
    match text {
        "off" | "" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .with_context(|| format!("{flag} {addr:?} is not host:port or off")),
    }
}

/// How long SIGTERM waits for in-flight calls.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TCP token: the file's first line, which must not be empty.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --tcp-token-file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        !token.is_empty() && token.chars().all(|c| c.is_ascii_graphic()),
        "--tcp-token-file {} must hold one token of printable ASCII on its first line",
        path.display()
    );
    Ok(token)
}

fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("payload-manager"));
    }
    let home = std::env::var_os("HOME").context("neither XDG_STATE_HOME nor HOME is set; pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/payload-manager"))
}

impl StandaloneArgs {
    /// Runs the node until SIGTERM or SIGINT, then drains and returns.
    pub async fn run(self) -> anyhow::Result<()> {
        self.serve(None).await
    }

    /// Runs the node with its own catalog, or with the operator's through
    /// `operator`.
    async fn serve(self, operator: Option<std::sync::Arc<crate::cluster::OperatorLink>>) -> anyhow::Result<()> {
        let StandaloneArgs {
            state_dir,
            socket,
            listen,
            metrics_listen,
            catalog,
            ram_root,
            shm_prefix,
            ram_capacity,
            disk_root,
            disk_capacity,
            ram_high_watermark,
            ram_low_watermark,
            lease_default_ms,
            lease_max_ms,
            write_deadline_ms,
            max_payload_size,
            node_name,
            catalog_backlog,
            read_access,
            tcp_token_file,
            native_spin_us,
            object,
            limits,
        } = self;
        anyhow::ensure!(
            0.0 < ram_low_watermark && ram_low_watermark <= ram_high_watermark && ram_high_watermark <= 1.0,
            "watermarks must satisfy 0 < low <= high <= 1 (got low {ram_low_watermark}, high {ram_high_watermark})"
        );
        anyhow::ensure!(
            lease_default_ms > 0 && lease_default_ms <= lease_max_ms,
            "need 0 < --lease-default-ms <= --lease-max-ms"
        );
        let state_dir = match state_dir {
            Some(dir) => dir,
            None => default_state_dir()?,
        };
        let state = StateDir::open(&state_dir)?;
        let socket = socket.unwrap_or_else(|| state_dir.join("agent.sock"));
        let tcp = parse_listen(&listen, "--listen")?;
        let metrics_addr = parse_listen(&metrics_listen, "--metrics-listen")?;
        let token = match &tcp_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        if let Some(addr) = tcp {
            anyhow::ensure!(
                addr.ip().is_loopback() || token.is_some(),
                "--listen {addr} is reachable from other hosts: give it a token with --tcp-token-file (or listen on \
                 127.0.0.1)"
            );
        }
        let catalog = catalog.unwrap_or_else(|| format!("sqlite://{}", state_dir.join("catalog.db").display()));
        anyhow::ensure!(
            !node_name.is_empty() && node_name.len() <= 253 && !node_name.contains('\0'),
            "--node-name must be 1 to 253 bytes without NUL (a host or Kubernetes node name)"
        );
        let repo = match &operator {
            Some(link) => Arc::new(RemoteRepository::new(&node_name, link.clone())) as Arc<dyn Repository>,
            None => open_own_catalog(&catalog, &node_name).await?,
        };
        let mut ram = FileStore::ram(&ram_root, &shm_prefix, state.node_id(), ram_capacity)?;
        ram.set_sealed_mode(read_access.region_mode());
        let (keeper, kept) = crate::keeper::Keeper::start(&state_dir)?;
        ram.keep_memfds(keeper, kept);
        let mut disk = FileStore::disk(
            &disk_root.unwrap_or_else(|| state_dir.join("disk")),
            state.node_id(),
            disk_capacity,
        )?;
        disk.set_sealed_mode(read_access.region_mode());
        let cfg = NodeConfig {
            node_name,
            lease_default_ms,
            lease_max_ms,
            write_deadline_ms,
            max_payload_bytes: max_payload_size,
            ram_high_watermark,
            ram_low_watermark,
            disk_high_watermark: object.disk_high_watermark,
            disk_low_watermark: object.disk_low_watermark,
            object_gc_grace_ms: object.object_gc_grace_ms,
            object_gc_interval_ms: object.object_gc_interval_ms,
            catalog_backlog: usize::try_from(catalog_backlog).unwrap_or(usize::MAX),
            limits,
            read_access,
            native_spin: std::time::Duration::from_micros(native_spin_us),
            clock: crate::clock::Clock::new(),
        };
        let (stop_tx, stop) = watch::channel(false);
        // Probes answer from the start: recovery (which may hash a whole
        // disk tier after a reboot) is alive, only not ready.
        let (serving_tx, serving) = watch::channel(None);
        let metrics = match metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --metrics-listen {addr}"))?,
            ),
            None => None,
        };
        let metrics_at = metrics.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = metrics {
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(serving, listener, stop).await {
                    tracing::warn!(%e, "the metrics server stopped");
                }
            });
        }
        let object = object.open(repo.clone(), &state_dir).await?;
        let (node, _) = Node::open(cfg, repo, ram, disk, object, state).await?;
        let _ = serving_tx.send(Some(node.clone()));

        // The native socket first: a client that finds the gRPC socket finds it too.
        let native_socket = payload_proto::native::socket_path(&socket);
        let native = crate::native::bind(&native_socket, read_access.socket_mode())?;
        let uds = server::bind_socket_with_mode(&socket, read_access.socket_mode())?;
        let tcp = match tcp {
            Some(addr) => Some(server::bind_tcp(addr).await?),
            None => None,
        };
        tokio::spawn(node.clone().run_spiller(stop.clone()));
        tokio::spawn(node.clone().run_sweeper(stop.clone()));
        tokio::spawn(node.clone().run_policies(stop.clone()));
        tokio::spawn(crate::native::serve(node.clone(), native, stop.clone()));
        if node.object().is_ok() {
            tokio::spawn(node.clone().run_collector(stop.clone()));
        }
        if let Some(link) = operator {
            node.join(link.clone());
            tokio::spawn(crate::cluster::heartbeats(node.clone(), link.clone(), stop.clone()));
            tokio::spawn(crate::control::serve(node.clone(), link, stop.clone()));
        }
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: draining in-flight calls");
            let _ = stop_tx.send(true);
        });
        tracing::info!(
            socket = %socket.display(),
            native = %native_socket.display(),
            tcp = ?tcp.as_ref().and_then(|l| l.local_addr().ok()),
            metrics = ?metrics_at,
            "payload-agent is serving"
        );
        let mut draining = stop.clone();
        tokio::select! {
            served = server::serve_with_token(node.clone(), uds, tcp, token, stop) => served?,
            // Idle clients that never close their connections must not hold the exit.
            _ = async {
                let _ = draining.wait_for(|s| *s).await;
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } => tracing::warn!("in-flight calls did not finish within {DRAIN_TIMEOUT:?}; exiting anyway"),
        }
        node.flush().await?;
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&native_socket);
        tracing::info!("stopped");
        Ok(())
    }
}

/// A standalone node's catalog: SQLite in the state directory, or a
/// PostgreSQL server shared with other agents.
async fn open_own_catalog(catalog: &str, node_name: &str) -> anyhow::Result<Arc<dyn Repository>> {
    // Whatever the catalog creates (a SQLite file and its WAL) is private
    // from the first byte; the umask only ever takes permissions away.
    // SAFETY: umask has no preconditions.
    let umask = unsafe { libc::umask(0o077) };
    let repo = payload_catalog::open_catalog(catalog, node_name).await;
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    let repo = repo.with_context(|| format!("opening catalog {}", payload_catalog::redact_url(catalog)))?;
    if let Some(path) = catalog.strip_prefix("sqlite://") {
        make_private(Path::new(path.split('?').next().unwrap_or(path)));
    }
    Ok(repo)
}

/// Tightens a SQLite catalog and its WAL files to 0600 (SQLite creates
/// them by the umask); files the agent does not own are left as they are.
fn make_private(db: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::set_permissions(Path::new(&name), std::fs::Permissions::from_mode(0o600));
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
