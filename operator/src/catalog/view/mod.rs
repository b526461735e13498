//! The cluster view: the v1 services served by the operator itself, on
//! the catalog's listener, for `payloadctl --operator URL` and any v1
//! client. Everything the catalog can answer is answered (every node's
//! payloads with their node, lineage, metadata, streams, nodes, stats);
//! a deletion is carried out by the payload's node over its control call;
//! what needs a payload's bytes (allocate, lease, tier moves) is refused
//! with the way to do it on a node. Callers are checked by [`Access`].

mod payloads;
mod streams;

use std::sync::Arc;

use payload_catalog::{ListQuery, Repository, Scope, Tier};
use payload_proto::admin;
use payload_proto::services::payload_admin_service_server::{PayloadAdminService, PayloadAdminServiceServer};
use payload_proto::services::payload_catalog_service_server::PayloadCatalogServiceServer;
use payload_proto::services::payload_stream_service_server::PayloadStreamServiceServer;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::access::Access;
use super::control::Controls;
use super::nodes::Nodes;

pub struct View {
    repo: Arc<dyn Repository>,
    nodes: Arc<Nodes>,
    access: Access,
    controls: Arc<Controls>,
    /// Ends subscriptions when the server stops.
    stop: watch::Receiver<bool>,
}

/// The three services over one view.
pub struct Services {
    pub catalog: PayloadCatalogServiceServer<payloads::Payloads>,
    pub streams: PayloadStreamServiceServer<streams::Streams>,
    pub admin: PayloadAdminServiceServer<Admin>,
}

impl View {
    pub fn services(
        repo: Arc<dyn Repository>,
        nodes: Arc<Nodes>,
        access: Access,
        controls: Arc<Controls>,
        stop: watch::Receiver<bool>,
    ) -> Services {
        let view = Arc::new(View {
            repo,
            nodes,
            access,
            controls,
            stop,
        });
        Services {
            catalog: PayloadCatalogServiceServer::new(payloads::Payloads(view.clone())),
            streams: PayloadStreamServiceServer::new(streams::Streams::new(view.clone())),
            admin: PayloadAdminServiceServer::new(Admin(view)),
        }
    }

    /// Nodes whose heartbeats have stopped.
    fn down_nodes(&self) -> std::collections::HashSet<String> {
        let now = super::now_ms();
        self.nodes
            .list(now)
            .into_iter()
            .filter(|n| !n.live)
            .map(|n| n.name)
            .collect()
    }
}

/// What a call that needs a payload's bytes answers here.
fn on_a_node(what: &str) -> Status {
    Status::failed_precondition(format!(
        "{what} needs the payload's node: the operator serves the cluster view (list, stat, lineage, metadata, \
         streams, rm, nodes, stats) and holds no payload bytes; call the agent on the node (payloadctl --agent)"
    ))
}

pub struct Admin(Arc<View>);

#[tonic::async_trait]
impl PayloadAdminService for Admin {
    /// The cluster's: tier use summed over live nodes' heartbeats, payload
    /// counts from the catalog.
    async fn stats(&self, request: Request<admin::StatsRequest>) -> Result<Response<admin::StatsResponse>, Status> {
        self.0
            .access
            .check(request.metadata(), "list", "payloads", None)
            .await?;
        let mut out = admin::StatsResponse::default();
        let mut tiers = std::collections::BTreeMap::<u32, admin::TierUsage>::new();
        for node in self.0.nodes.list(super::now_ms()).into_iter().filter(|n| n.live) {
            out.catalog_backlog += node.backlog;
            for t in node.tiers {
                let sum = tiers.entry(t.tier as u32).or_default();
                sum.tier = t.tier as u32;
                sum.bytes += t.used_bytes;
                sum.capacity_bytes += t.capacity_bytes;
            }
        }
        for tier in [Tier::Gpu, Tier::Ram, Tier::Disk, Tier::Object] {
            let payloads = self.count(tier).await?;
            let sum = tiers.entry(tier as u32).or_default();
            sum.tier = tier as u32;
            sum.payloads = payloads;
            match tier {
                Tier::Gpu => (out.payloads_gpu, out.bytes_gpu) = (payloads, sum.bytes),
                Tier::Ram => (out.payloads_ram, out.bytes_ram) = (payloads, sum.bytes),
                Tier::Disk => (out.payloads_disk, out.bytes_disk) = (payloads, sum.bytes),
                _ => (out.payloads_object, out.bytes_object) = (payloads, sum.bytes),
            }
        }
        out.tiers = tiers
            .into_values()
            .filter(|t| t.payloads > 0 || t.capacity_bytes > 0)
            .collect();
        if let Ok(blocks) = self.0.repo.block_stats().await {
            out.object_blocks = blocks.blocks;
            out.object_block_bytes = blocks.bytes;
            out.object_unreferenced_blocks = blocks.unreferenced;
        }
        Ok(Response::new(out))
    }

    async fn list_nodes(
        &self,
        request: Request<admin::ListNodesRequest>,
    ) -> Result<Response<admin::ListNodesResponse>, Status> {
        self.0
            .access
            .check(request.metadata(), "list", "payloads", None)
            .await?;
        let nodes = self.0.nodes.list(super::now_ms());
        Ok(Response::new(admin::ListNodesResponse {
            nodes: nodes.into_iter().map(payload_proto::domain::node_summary).collect(),
            cluster: true,
        }))
    }

    async fn collect_garbage(
        &self,
        _request: Request<admin::CollectGarbageRequest>,
    ) -> Result<Response<admin::CollectGarbageResponse>, Status> {
        Err(on_a_node("collecting object-store garbage"))
    }
}

impl Admin {
    /// Payloads on `tier` across the cluster, whatever their state (one
    /// counted query).
    async fn count(&self, tier: Tier) -> Result<u64, Status> {
        let query = ListQuery {
            tier: Some(tier),
            page_size: 1,
            scope: Scope::Cluster,
            ..Default::default()
        };
        let page = self.0.repo.list_payloads(&query).await.map_err(super::status)?;
        Ok(page.total)
    }
}
