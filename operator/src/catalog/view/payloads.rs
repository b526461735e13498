//! `PayloadCatalogService` on the operator: every node's payloads, read
//! from the catalog; deletions carried out by the payload's node.

use std::sync::Arc;

use payload_catalog::Scope;
use payload_proto::catalog as pbc;
use payload_proto::domain::{self, payload_id};
use payload_proto::runtime;
use payload_proto::services::payload_catalog_service_server::PayloadCatalogService;
use tonic::{Request, Response, Status};

use super::{on_a_node, View};
use crate::catalog::status;

/// The deepest lineage walk asked for in one call (the agents' default
/// --max-lineage-depth).
const LINEAGE_DEPTH: u32 = 1_000;
const DEFAULT_EVENT_PAGE: u32 = 100;
const MAX_EVENT_PAGE: u32 = 1_000;
/// The most terms a label selector may have (the agents' default
/// --max-selector-terms).
const SELECTOR_TERMS: usize = 16;

pub struct Payloads(pub(super) Arc<View>);

/// What a change of a payload's lineage or metadata answers here: its
/// owner is a caller on the payload's node, and that node's agent checks it.
fn owners_node(what: &str) -> Status {
    Status::failed_precondition(format!(
        "{what} is done through the agent on the payload's node, which checks the caller owns it; the operator \
         serves lineage and metadata for reading"
    ))
}

#[tonic::async_trait]
impl PayloadCatalogService for Payloads {
    async fn allocate_payload(
        &self,
        _request: Request<runtime::AllocatePayloadRequest>,
    ) -> Result<Response<runtime::AllocatePayloadResponse>, Status> {
        Err(on_a_node("allocating a payload"))
    }

    async fn commit_payload(
        &self,
        _request: Request<runtime::CommitPayloadRequest>,
    ) -> Result<Response<runtime::CommitPayloadResponse>, Status> {
        Err(on_a_node("committing a payload"))
    }

    /// Carried out by the node that holds the payload, which checks its
    /// leases (`force` as on the node).
    async fn delete(&self, request: Request<runtime::DeleteRequest>) -> Result<Response<()>, Status> {
        let requester = self
            .0
            .access
            .check(request.metadata(), "delete", "payloads", None)
            .await?;
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        let Some((_, node)) = self.0.repo.locate_payload(id).await.map_err(status)? else {
            return Err(Status::not_found(format!("payload {id} is on no node")));
        };
        self.0.controls.delete(&node, id, req.force, &requester).await?;
        Ok(Response::new(()))
    }

    async fn promote(
        &self,
        _request: Request<runtime::PromoteRequest>,
    ) -> Result<Response<runtime::PromoteResponse>, Status> {
        Err(on_a_node("promoting a payload"))
    }

    async fn spill(
        &self,
        _request: Request<runtime::SpillRequest>,
    ) -> Result<Response<runtime::SpillResponse>, Status> {
        Err(on_a_node("spilling a payload"))
    }

    async fn prefetch(&self, _request: Request<runtime::PrefetchRequest>) -> Result<Response<()>, Status> {
        Err(on_a_node("prefetching a payload"))
    }

    async fn pin(&self, _request: Request<runtime::PinRequest>) -> Result<Response<()>, Status> {
        Err(on_a_node("pinning a payload"))
    }

    async fn unpin(&self, _request: Request<runtime::UnpinRequest>) -> Result<Response<()>, Status> {
        Err(on_a_node("unpinning a payload"))
    }

    async fn add_lineage(&self, _request: Request<pbc::AddLineageRequest>) -> Result<Response<()>, Status> {
        Err(owners_node("adding lineage"))
    }

    async fn get_lineage(
        &self,
        request: Request<pbc::GetLineageRequest>,
    ) -> Result<Response<pbc::GetLineageResponse>, Status> {
        self.0.access.check(request.metadata(), "get", "payloads", None).await?;
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        let depth = match req.max_depth {
            0 => LINEAGE_DEPTH,
            n if n > LINEAGE_DEPTH => {
                return Err(Status::invalid_argument(format!(
                    "max_depth {n} is deeper than the limit of {LINEAGE_DEPTH}; 0 walks that far"
                )))
            }
            n => n,
        };
        let edges = self.0.repo.get_lineage(id, req.upstream, depth).await.map_err(status)?;
        Ok(Response::new(pbc::GetLineageResponse {
            edges: edges.into_iter().map(domain::lineage_edge).collect(),
        }))
    }

    async fn update_payload_metadata(
        &self,
        _request: Request<pbc::UpdatePayloadMetadataRequest>,
    ) -> Result<Response<pbc::UpdatePayloadMetadataResponse>, Status> {
        Err(owners_node("changing a payload's metadata"))
    }

    async fn append_payload_metadata_event(
        &self,
        _request: Request<pbc::AppendPayloadMetadataEventRequest>,
    ) -> Result<Response<pbc::AppendPayloadMetadataEventResponse>, Status> {
        Err(owners_node("adding a metadata event"))
    }

    async fn list_payloads(
        &self,
        request: Request<runtime::ListPayloadsRequest>,
    ) -> Result<Response<runtime::ListPayloadsResponse>, Status> {
        self.0
            .access
            .check(request.metadata(), "list", "payloads", None)
            .await?;
        let req = request.into_inner();
        let terms = req.label_selector.split(',').filter(|t| !t.trim().is_empty()).count();
        if terms > SELECTOR_TERMS {
            return Err(Status::invalid_argument(format!(
                "label_selector has {terms} terms; the limit is {SELECTOR_TERMS}"
            )));
        }
        // No node named: every node's (the operator has none of its own).
        let query = domain::list_query(&req, Scope::Cluster)?;
        let page = self.0.repo.list_payloads(&query).await.map_err(status)?;
        let down = self.0.down_nodes();
        let now = super::super::now_ms();
        if page.nodes.len() != page.items.len() {
            return Err(Status::internal(
                "the catalog's page names no node for some of its payloads",
            ));
        }
        let payloads = page
            .items
            .iter()
            .zip(page.nodes.iter())
            .map(|(rec, node)| runtime::PayloadSummary {
                node: node.clone(),
                // Its node is down and no other copy exists.
                unavailable: down.contains(node) && !rec.in_object_store(),
                ..domain::summary(rec, 0, now)
            })
            .collect();
        Ok(Response::new(payload_proto::domain::list_response(
            payloads, page.next, page.total,
        )))
    }

    async fn import_payload(
        &self,
        _request: Request<runtime::ImportPayloadRequest>,
    ) -> Result<Response<runtime::ImportPayloadResponse>, Status> {
        Err(on_a_node("importing an upload"))
    }

    async fn abort_payload(&self, _request: Request<runtime::AbortPayloadRequest>) -> Result<Response<()>, Status> {
        Err(on_a_node("aborting an allocation"))
    }

    /// The payload's row, its node, and no location (its bytes are on the
    /// node); leases are the node's to count.
    async fn get_payload(
        &self,
        request: Request<runtime::GetPayloadRequest>,
    ) -> Result<Response<runtime::GetPayloadResponse>, Status> {
        self.0.access.check(request.metadata(), "get", "payloads", None).await?;
        let id = payload_id(request.get_ref().id.as_ref())?;
        let Some((rec, node)) = self.0.repo.locate_payload(id).await.map_err(status)? else {
            return Err(Status::not_found(format!("payload {id} is on no node")));
        };
        let unavailable = self.0.down_nodes().contains(&node) && !rec.in_object_store();
        let payload = runtime::PayloadSummary {
            node,
            unavailable,
            ..domain::summary(&rec, 0, super::super::now_ms())
        };
        let descriptor = payload_proto::core::PayloadDescriptor {
            payload_id: Some(domain::pb_payload_id(rec.id)),
            tier: rec.tier as i32,
            state: rec.state as i32,
            version: rec.version,
            created_at: Some(domain::timestamp(rec.created_at_ms)),
            expires_at: (rec.expires_at_ms != 0).then(|| domain::timestamp(rec.expires_at_ms)),
            size_bytes: rec.size_bytes,
            sha256: rec.sha256.map(|d| d.to_vec()).unwrap_or_default(),
            copies: domain::copies(&rec),
            ..Default::default()
        };
        Ok(Response::new(runtime::GetPayloadResponse {
            payload: Some(payload),
            payload_descriptor: Some(descriptor),
        }))
    }

    async fn get_payload_metadata(
        &self,
        request: Request<pbc::GetPayloadMetadataRequest>,
    ) -> Result<Response<pbc::PayloadMetadata>, Status> {
        self.0.access.check(request.metadata(), "get", "payloads", None).await?;
        let id = payload_id(request.into_inner().id.as_ref())?;
        let stored = self.0.repo.get_metadata(id).await.map_err(status)?;
        Ok(Response::new(domain::metadata(id, stored.unwrap_or_default())))
    }

    async fn list_payload_metadata_events(
        &self,
        request: Request<pbc::ListPayloadMetadataEventsRequest>,
    ) -> Result<Response<pbc::ListPayloadMetadataEventsResponse>, Status> {
        self.0.access.check(request.metadata(), "get", "payloads", None).await?;
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        let after = match req.page_token.as_str() {
            "" => 0,
            token => token.parse().map_err(|_| {
                Status::invalid_argument("page_token is not one the operator gave out; start again without it")
            })?,
        };
        let size = if req.page_size <= 0 {
            DEFAULT_EVENT_PAGE
        } else {
            (req.page_size as u32).min(MAX_EVENT_PAGE)
        };
        let page = self.0.repo.metadata_history(id, after, size).await.map_err(status)?;
        Ok(Response::new(domain::metadata_events(id, page)))
    }
}
