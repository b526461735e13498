//! The cluster catalog service (`payload-operator catalog`): the one
//! component with the PostgreSQL credentials. Node agents call it for every
//! catalog operation, each on its own node's rows (who a caller is comes
//! from [`identity`]); their heartbeats say what each node's tiers hold.
//! Agents keep their writes in their own log until the catalog has them,
//! so the operator being away never stops a node.

pub mod identity;
pub mod nodes;
pub mod serve;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use payload_catalog::remote::{dispatch, Call};
use payload_catalog::{CatalogError, PgRepository, Repository, StreamHead};
use payload_proto::cluster::cluster_catalog_server::ClusterCatalog;
use payload_proto::cluster::{
    Envelope, HeartbeatReply, HeartbeatRequest, ListNodesReply, ListNodesRequest, StreamNext,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub use payload_proto::cluster::cluster_catalog_server::ClusterCatalogServer;

pub struct CatalogService {
    base: PgRepository,
    /// One repository per node, sharing the base's connections.
    repos: Mutex<HashMap<String, Arc<dyn Repository>>>,
    gate: identity::Gate,
    nodes: nodes::Nodes,
}

impl CatalogService {
    pub fn new(base: PgRepository, gate: identity::Gate) -> Self {
        CatalogService {
            base,
            repos: Mutex::default(),
            gate,
            nodes: nodes::Nodes::default(),
        }
    }

    async fn repo<T>(&self, request: &Request<T>) -> Result<Arc<dyn Repository>, Status> {
        let node = self.gate.node_of(request.metadata()).await?;
        let mut repos = crate::lock(&self.repos);
        Ok(repos
            .entry(node)
            .or_insert_with_key(|node| Arc::new(self.base.for_node(node)))
            .clone())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A catalog failure as the agent's writer reads it: storage trouble is
/// worth retrying (UNAVAILABLE), the rest is an answer.
fn status(err: CatalogError) -> Status {
    match err {
        CatalogError::Storage(m) => Status::unavailable(m),
        other => Status::invalid_argument(other.to_string()),
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ClusterCatalog for CatalogService {
    async fn call(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let repo = self.repo(&request).await?;
        let call = Call::decode(&request.into_inner().json).map_err(status)?;
        let json = dispatch(repo.as_ref(), call).await;
        Ok(Response::new(Envelope { json }))
    }

    async fn hold_gc_lock(&self, request: Request<Envelope>) -> Result<Response<Streamed<Envelope>>, Status> {
        let repo = self.repo(&request).await?;
        let lock = repo.gc_lock().await.map_err(status)?;
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.send(Ok(Envelope::default())).await;
        // Held until the caller ends the call (or its connection drops).
        tokio::spawn(async move {
            tx.closed().await;
            drop(lock);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn watch_stream(&self, request: Request<Envelope>) -> Result<Response<Streamed<StreamNext>>, Status> {
        let repo = self.repo(&request).await?;
        let head: StreamHead = serde_json::from_slice(&request.into_inner().json)
            .map_err(|e| Status::invalid_argument(format!("not a stream head: {e}")))?;
        let mut woken = repo.watch_stream(head);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let next_offset = *woken.borrow_and_update();
                if tx.send(Ok(StreamNext { next_offset })).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = woken.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let node = self.gate.node_of(request.metadata()).await?;
        self.nodes.beat(&node, request.into_inner(), now_ms());
        Ok(Response::new(HeartbeatReply {
            interval_ms: nodes::INTERVAL.as_millis() as u64,
        }))
    }

    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesReply>, Status> {
        self.gate.node_of(request.metadata()).await?;
        Ok(Response::new(ListNodesReply {
            nodes: self.nodes.list(now_ms()),
        }))
    }
}
