//! `PayloadAdminService`: per-tier counts and bytes, capacity, pins, leases.

use std::sync::Arc;

use payload_proto::admin;
use payload_proto::services::payload_admin_service_server::PayloadAdminService;
use tonic::{Request, Response, Status};

use super::convert::status;
use crate::node::Node;

pub struct AdminService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl PayloadAdminService for AdminService {
    async fn stats(&self, _request: Request<admin::StatsRequest>) -> Result<Response<admin::StatsResponse>, Status> {
        let stats = self.node.report().await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(stats))
    }

    async fn list_nodes(
        &self,
        _request: Request<admin::ListNodesRequest>,
    ) -> Result<Response<admin::ListNodesResponse>, Status> {
        let Some(operator) = self.node.operator() else {
            let stats = self.node.stats();
            let me = admin::NodeSummary {
                name: stats.node_name,
                live: true,
                last_seen_ms: self.node.now_ms(),
                tiers: stats.tiers,
                version: env!("CARGO_PKG_VERSION").into(),
                catalog_backlog: stats.catalog_backlog,
            };
            return Ok(Response::new(admin::ListNodesResponse {
                nodes: vec![me],
                cluster: false,
            }));
        };
        let nodes = operator
            .list_nodes()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(admin::ListNodesResponse {
            nodes: nodes.into_iter().map(payload_proto::domain::node_summary).collect(),
            cluster: true,
        }))
    }

    async fn collect_garbage(
        &self,
        request: Request<admin::CollectGarbageRequest>,
    ) -> Result<Response<admin::CollectGarbageResponse>, Status> {
        if !super::convert::caller(&request).is_agent() {
            return Err(Status::permission_denied(
                "collecting object-store garbage is for the agent's own user; ask the node's operator",
            ));
        }
        let report = self
            .node
            .collect_garbage(request.get_ref().grace_ms)
            .await
            .map_err(status)?;
        Ok(Response::new(admin::CollectGarbageResponse {
            blocks_deleted: report.blocks,
        }))
    }
}

impl Node {
    /// Everything Stats answers: [`Node::stats`], sealed regions and the
    /// object store's figures.
    pub async fn report(self: &Arc<Self>) -> Result<admin::StatsResponse, String> {
        let node = self.clone();
        // A scan of every entry: keep it off the async workers.
        let mut stats = tokio::task::spawn_blocking(move || node.stats())
            .await
            .map_err(|e| format!("stats task failed: {e}"))?;
        if let Ok(ram) = self.store(payload_catalog::Tier::Ram) {
            (stats.sealed_payloads, stats.sealed_bytes) = ram.memfd_usage();
        }
        if let Ok(object) = self.object() {
            if let Some(blocks) = object.block_stats().await {
                stats.object_blocks = blocks.blocks;
                stats.object_block_bytes = blocks.bytes;
                stats.object_unreferenced_blocks = blocks.unreferenced;
            }
            let t = object.traffic.figures();
            stats.object_puts = t.puts;
            stats.object_put_bytes = t.put_bytes;
            stats.object_gets = t.gets;
            stats.object_get_bytes = t.get_bytes;
            stats.object_deletes = t.deletes;
        }
        Ok(stats)
    }

    pub fn stats(&self) -> admin::StatsResponse {
        let usage = self.usage();
        let mut out = admin::StatsResponse {
            active_leases: self.lease_count() as u64,
            spill_queue_depth: usage.moving,
            node_name: self.config().node_name.clone(),
            catalog_backlog: self.writer.backlog() as u64,
            ..Default::default()
        };
        for tier in usage.tiers {
            match tier.tier {
                2 => (out.payloads_ram, out.bytes_ram) = (tier.payloads, tier.bytes),
                3 => (out.payloads_disk, out.bytes_disk) = (tier.payloads, tier.bytes),
                4 => (out.payloads_object, out.bytes_object) = (tier.payloads, tier.bytes),
                _ => {}
            }
            out.tiers.push(tier);
        }
        out
    }
}
