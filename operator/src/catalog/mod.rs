//! The cluster catalog service (`payload-operator catalog`): the one
//! component with the PostgreSQL credentials. Node agents call it for every
//! catalog operation, each on its own node's rows (who a caller is comes
//! from [`identity`]); their heartbeats say what each node's tiers hold.
//! Agents keep their writes in their own log until the catalog has them,
//! so the operator being away never stops a node.

pub mod access;
pub mod control;
pub mod identity;
pub mod nodes;
pub mod serve;
pub mod usage;
pub mod view;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use payload_catalog::remote::{dispatch, refusal, Call};
use payload_catalog::{CatalogError, PgRepository, Repository, StreamHead};
use payload_proto::cluster::cluster_catalog_server::ClusterCatalog;
use payload_proto::cluster::{
    ControlReply, ControlRequest, Envelope, HeartbeatReply, HeartbeatRequest, ListNodesReply, ListNodesRequest,
    StreamNext,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use payload_proto::cluster::cluster_catalog_server::ClusterCatalogServer;

/// The longest a write of a node's row may take before the next beat
/// tries again.
const RECORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct CatalogService {
    base: PgRepository,
    /// One repository per node, sharing the base's connections.
    repos: Mutex<HashMap<String, Arc<dyn Repository>>>,
    gate: identity::Gate,
    nodes: Arc<nodes::Nodes>,
    /// Whether the last write of a node's row failed (warned once).
    recording_fails: Arc<std::sync::atomic::AtomicBool>,
    /// The nodes' control calls, for deletions asked of the operator.
    controls: Arc<control::Controls>,
    /// Nodes holding (or waiting for) the GC lock: one call each. A
    /// collection's steps are refused to a node not in it, so one whose
    /// lock went with an operator restart stops instead of racing the next.
    collecting: Arc<Mutex<HashSet<String>>>,
    /// Ends the long calls (watches, GC locks) when the server stops.
    stop: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl CatalogService {
    pub fn new(
        base: PgRepository,
        gate: identity::Gate,
        nodes: nodes::Nodes,
        stop: watch::Receiver<bool>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        CatalogService {
            base,
            repos: Mutex::default(),
            gate,
            nodes: Arc::new(nodes),
            recording_fails: Arc::default(),
            controls: Arc::default(),
            collecting: Arc::default(),
            stop,
            metrics,
        }
    }

    /// The nodes heard from, shared with whatever reports on them.
    pub fn nodes(&self) -> Arc<nodes::Nodes> {
        self.nodes.clone()
    }

    /// The v1 services over this catalog: the cluster view.
    pub fn view(&self, access: access::Access) -> view::Services {
        view::View::services(
            Arc::new(self.base.clone()),
            self.nodes.clone(),
            access,
            self.controls.clone(),
            self.stop.clone(),
        )
    }

    async fn repo<T>(&self, request: &Request<T>) -> Result<(String, Arc<dyn Repository>), Status> {
        let node = self.gate.node_of(request.metadata()).await?;
        let mut repos = crate::lock(&self.repos);
        let repo = repos
            .entry(node.clone())
            .or_insert_with_key(|node| Arc::new(self.base.for_node(node)))
            .clone();
        Ok((node, repo))
    }
}

/// Takes `node`'s place among the collectors until dropped.
struct Collecting {
    node: String,
    set: Arc<Mutex<HashSet<String>>>,
}

impl Drop for Collecting {
    fn drop(&mut self) {
        crate::lock(&self.set).remove(&self.node);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A catalog failure outside a call's answer (the GC lock, a malformed
/// call). The agent's link treats every status as an outage to wait out.
fn status(err: CatalogError) -> Status {
    match err {
        CatalogError::Storage(m) => Status::unavailable(m),
        CatalogError::NotFound(m) => Status::not_found(m),
        CatalogError::AlreadyExists(m) => Status::already_exists(m),
        CatalogError::InvalidState(m) => Status::failed_precondition(m),
        CatalogError::Conflict(m) => Status::aborted(m),
        CatalogError::ResourceExhausted(m) => Status::resource_exhausted(m),
        CatalogError::InvalidArgument(m) => Status::invalid_argument(m),
        CatalogError::OutOfRange(m) => Status::out_of_range(m),
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ClusterCatalog for CatalogService {
    async fn call(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let (node, repo) = self.repo(&request).await?;
        let started = std::time::Instant::now();
        let call = Call::decode(&request.into_inner().json).map_err(|e| {
            // An agent of a later release, most likely.
            self.metrics.catalog_call("unknown", false, started);
            status(e)
        })?;
        let name = call.name();
        let collecting = matches!(call, Call::GcBegin(..) | Call::GcFinish(..));
        if collecting && !crate::lock(&self.collecting).contains(&node) {
            let lost = CatalogError::Storage(
                "this node does not hold the catalog's GC lock (it was lost: did the operator restart?); \
                 the collection stops and runs again later"
                    .into(),
            );
            return Ok(Response::new(Envelope { json: refusal(lost) }));
        }
        let json = dispatch(repo.as_ref(), call).await;
        // serde's encoding of the answer's Result: {"Ok":...} or {"Err":...}.
        self.metrics.catalog_call(name, json.starts_with(b"{\"Ok\""), started);
        Ok(Response::new(Envelope { json }))
    }

    async fn hold_gc_lock(&self, request: Request<Envelope>) -> Result<Response<Streamed<Envelope>>, Status> {
        let (node, repo) = self.repo(&request).await?;
        if !crate::lock(&self.collecting).insert(node.clone()) {
            return Err(Status::resource_exhausted(format!(
                "node {node} already holds or waits for the GC lock: one collection per node"
            )));
        }
        let place = Collecting {
            node,
            set: self.collecting.clone(),
        };
        let lock = repo.gc_lock().await.map_err(status)?;
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.send(Ok(Envelope::default())).await;
        let mut stop = self.stop.clone();
        // Held until the caller ends the call, its connection drops (the
        // server's keepalive notices a dead peer) or the server stops.
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            drop(place);
            drop(lock);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn watch_stream(&self, request: Request<Envelope>) -> Result<Response<Streamed<StreamNext>>, Status> {
        let (_, repo) = self.repo(&request).await?;
        let head: StreamHead = serde_json::from_slice(&request.into_inner().json)
            .map_err(|e| Status::invalid_argument(format!("not a stream head: {e}")))?;
        let mut woken = repo.watch_stream(head);
        let (tx, rx) = mpsc::channel(4);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let next_offset = *woken.borrow_and_update();
                if tx.send(Ok(StreamNext { next_offset })).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = woken.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let node = self.gate.node_of(request.metadata()).await?;
        let beat = request.into_inner();
        if beat.tiers.len() > nodes::MAX_TIERS
            || beat.version.len() > nodes::MAX_VERSION
            || beat.pool.len() > nodes::MAX_POOL
        {
            return Err(Status::invalid_argument(format!(
                "a heartbeat reports at most {} tiers, a version of {} bytes and a pool name of {}",
                nodes::MAX_TIERS,
                nodes::MAX_VERSION,
                nodes::MAX_POOL
            )));
        }
        if let Some(row) = self.nodes.beat(&node, beat, now_ms()) {
            // Off the heartbeat's path: a slow or absent database must not
            // make a live node miss its beats. A failed write is tried
            // again at the next beat.
            let (base, nodes, failing) = (self.base.clone(), self.nodes.clone(), self.recording_fails.clone());
            tokio::spawn(async move {
                let stored = match tokio::time::timeout(RECORD_TIMEOUT, base.record_node(&row)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(err)) => {
                        if !failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!(node = %row.name, error = %err, "could not record a node in the catalog; trying at each heartbeat");
                        }
                        false
                    }
                    Err(_) => false,
                };
                if stored && failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!("recording nodes in the catalog again");
                }
                nodes.saved(row, stored);
            });
        }
        Ok(Response::new(HeartbeatReply {
            interval_ms: self.nodes.interval.as_millis() as u64,
        }))
    }

    /// Held open by each agent: the operator's requests of its node.
    async fn control(
        &self,
        request: Request<Streaming<ControlReply>>,
    ) -> Result<Response<Streamed<ControlRequest>>, Status> {
        let node = self.gate.node_of(request.metadata()).await?;
        let replies = request.into_inner();
        Ok(Response::new(Box::pin(self.controls.attach(
            node,
            replies,
            self.stop.clone(),
        ))))
    }

    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesReply>, Status> {
        self.gate.node_of(request.metadata()).await?;
        Ok(Response::new(ListNodesReply {
            nodes: self.nodes.list(now_ms()),
        }))
    }
}
