//! `PayloadCatalogService`: the node-local lifecycle calls, plus lineage,
//! metadata and listings answered from the catalog.

use std::sync::Arc;

use payload_catalog::{CatalogError, LineageEdge, Metadata, MetadataEvent, MetadataMode, Priority, Scope};
use payload_proto::catalog as pbc;
use payload_proto::core::{MetadataUpdateMode, PromotionPolicy, SpillPolicy};
use payload_proto::runtime;
use payload_proto::services::payload_catalog_service_server::PayloadCatalogService;
use tonic::{Request, Response, Status};

use super::convert::{
    caller, descriptor, descriptor_with_object, expected_digest, optional_tier, payload_id, pb_payload_id,
    required_tier, status, summary,
};
use crate::clock::timestamp;
use crate::limits::{known_enum, no_nul};
use crate::node::{AllocateRequest, MoveOutcome, Node};

pub struct CatalogService {
    pub node: Arc<Node>,
}

const DEFAULT_EVENT_PAGE: u32 = 100;
const MAX_EVENT_PAGE: u32 = 1_000;

#[tonic::async_trait]
impl PayloadCatalogService for CatalogService {
    async fn allocate_payload(
        &self,
        request: Request<runtime::AllocatePayloadRequest>,
    ) -> Result<Response<runtime::AllocatePayloadResponse>, Status> {
        let owner = Some(caller(&request).principal());
        let req = request.into_inner();
        let tier = required_tier(req.preferred_tier, "preferred_tier")?;
        let policy = req.eviction_policy.unwrap_or_default();
        let cfg = self.node.config();
        cfg.limits.labels("label", &req.labels)?;
        cfg.limits.duration("ttl_ms", req.ttl_ms)?;
        known_enum("eviction_policy.priority", policy.priority, &[0, 1, 2, 3, 4])?;
        if req.write_deadline_ms > cfg.write_deadline_ms {
            return Err(Status::invalid_argument(format!(
                "write_deadline_ms {} is longer than this agent allows ({} ms, --write-deadline-ms)",
                req.write_deadline_ms, cfg.write_deadline_ms
            )));
        }
        let alloc = AllocateRequest {
            size_bytes: req.size_bytes,
            tier,
            ttl_ms: req.ttl_ms,
            no_evict: req.no_evict,
            priority: Priority::from_i32(policy.priority),
            spill_target: optional_tier(policy.spill_target, "eviction_policy.spill_target")?,
            min_residency_tier: optional_tier(policy.min_residency_tier, "eviction_policy.min_residency_tier")?,
            require_durable: policy.require_durable,
            labels: req.labels.into_iter().collect(),
            write_deadline_ms: req.write_deadline_ms,
            owner,
        };
        let rec = self.node.allocate(alloc).await.map_err(status)?;
        let object_upload_path = match (tier, self.node.object()) {
            (payload_catalog::Tier::Object, Ok(object)) => object.upload_url(rec.id),
            _ => String::new(),
        };
        Ok(Response::new(runtime::AllocatePayloadResponse {
            payload_descriptor: Some(descriptor(&self.node, &rec)),
            object_upload_path,
        }))
    }

    async fn commit_payload(
        &self,
        request: Request<runtime::CommitPayloadRequest>,
    ) -> Result<Response<runtime::CommitPayloadResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        self.node.authorize_change(id, &caller, "committing").map_err(status)?;
        let expected = expected_digest(&req.expected_sha256)?;
        let rec = self
            .node
            .commit(id, expected, req.sync, req.object_durable)
            .await
            .map_err(status)?;
        Ok(Response::new(runtime::CommitPayloadResponse {
            payload_descriptor: Some(descriptor_with_object(&self.node, &rec).await),
        }))
    }

    async fn delete(&self, request: Request<runtime::DeleteRequest>) -> Result<Response<()>, Status> {
        let req = request.get_ref();
        let id = payload_id(req.id.as_ref())?;
        if let Err(err) = self.node.authorize_change(id, &caller(&request), "deleting") {
            return Err(self.elsewhere(id, err, "delete").await);
        }
        self.node.delete(id, req.force).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn promote(
        &self,
        request: Request<runtime::PromoteRequest>,
    ) -> Result<Response<runtime::PromoteResponse>, Status> {
        let req = request.get_ref();
        let id = payload_id(req.id.as_ref())?;
        let target = required_tier(req.target_tier, "target_tier")?;
        known_enum("policy", req.policy, &[0, 1, 2])?;
        self.node
            .authorize_change(id, &caller(&request), "promoting")
            .map_err(status)?;
        let (rec, _) = self.node.get(id).map_err(status)?;
        if rec.tier.faster_than(target) {
            return Err(Status::failed_precondition(format!(
                "payload {id} is on the {} tier, already faster than {}; use Spill to move it down",
                rec.tier.name(),
                target.name()
            )));
        }
        self.node.check_tier(target).map_err(status)?;
        let rec = if req.policy == PromotionPolicy::BestEffort as i32 {
            self.node.spawn_relocate(id, target);
            rec
        } else {
            match self.node.relocate(id, target, false, false).await.map_err(status)? {
                MoveOutcome::Moved(rec) | MoveOutcome::Unchanged(rec) => rec,
                MoveOutcome::Deleted => return Err(Status::not_found(format!("payload {id} was deleted"))),
            }
        };
        Ok(Response::new(runtime::PromoteResponse {
            payload_descriptor: Some(descriptor(&self.node, &rec)),
        }))
    }

    async fn spill(&self, request: Request<runtime::SpillRequest>) -> Result<Response<runtime::SpillResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let target = optional_tier(req.target_tier, "target_tier")?;
        known_enum("policy", req.policy, &[0, 1, 2])?;
        self.node.config().limits.batch("ids", req.ids.len())?;
        let background = req.policy == SpillPolicy::BestEffort as i32;
        let mut results = Vec::with_capacity(req.ids.len());
        for raw in &req.ids {
            let outcome = self
                .spill_one(raw, &caller, target, background, req.wait_for_leases, req.fsync)
                .await;
            results.push(match outcome {
                Ok(rec) => runtime::spill_response::Result {
                    id: Some(raw.clone()),
                    ok: true,
                    error_message: String::new(),
                    payload_descriptor: rec.map(|r| descriptor(&self.node, &r)),
                    error_code: 0,
                },
                Err(err) => runtime::spill_response::Result {
                    id: Some(raw.clone()),
                    ok: false,
                    error_message: err.message().to_string(),
                    payload_descriptor: None,
                    error_code: err.code() as i32,
                },
            });
        }
        Ok(Response::new(runtime::SpillResponse { results }))
    }

    async fn prefetch(&self, request: Request<runtime::PrefetchRequest>) -> Result<Response<()>, Status> {
        let req = request.get_ref();
        let id = payload_id(req.id.as_ref())?;
        let target = required_tier(req.target_tier, "target_tier")?;
        self.node.check_tier(target).map_err(status)?;
        self.node
            .authorize_change(id, &caller(&request), "prefetching")
            .map_err(status)?;
        let (rec, _) = self.node.get(id).map_err(status)?;
        // A hint: start the promotion and return.
        if target.faster_than(rec.tier) {
            self.node.spawn_relocate(id, target);
        }
        Ok(Response::new(()))
    }

    async fn pin(&self, request: Request<runtime::PinRequest>) -> Result<Response<()>, Status> {
        let req = request.get_ref();
        let id = payload_id(req.id.as_ref())?;
        self.node.config().limits.duration("duration_ms", req.duration_ms)?;
        self.node
            .authorize_change(id, &caller(&request), "pinning")
            .map_err(status)?;
        self.node.pin(id, req.duration_ms).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn unpin(&self, request: Request<runtime::UnpinRequest>) -> Result<Response<()>, Status> {
        let id = payload_id(request.get_ref().id.as_ref())?;
        match self.node.authorize_change(id, &caller(&request), "unpinning") {
            // Unpinning what is not here is fine, as in the reference.
            Ok(()) | Err(crate::error::AgentError::NotFound(_)) => {}
            Err(err) => return Err(status(err)),
        }
        self.node.unpin(id).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn add_lineage(&self, request: Request<pbc::AddLineageRequest>) -> Result<Response<()>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let child = payload_id(req.child.as_ref())?;
        self.authorize_local(child, &caller, "adding lineage to")?;
        if req.parents.is_empty() {
            return Err(Status::invalid_argument("AddLineage needs at least one parent edge"));
        }
        let limits = &self.node.config().limits;
        if req.parents.len() > limits.lineage_parents {
            return Err(Status::invalid_argument(format!(
                "AddLineage has {} parents; the limit is {} (--max-lineage-parents)",
                req.parents.len(),
                limits.lineage_parents
            )));
        }
        let edges = req
            .parents
            .into_iter()
            .map(|e| {
                limits.name("operation", &e.operation)?;
                limits.name("role", &e.role)?;
                limits.metadata("parameters", e.parameters.len())?;
                Ok(LineageEdge {
                    child,
                    parent: payload_id(e.parent.as_ref())?,
                    operation: e.operation,
                    role: e.role,
                    parameters: e.parameters,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        self.repo().await?.add_lineage(child, &edges).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn get_lineage(
        &self,
        request: Request<pbc::GetLineageRequest>,
    ) -> Result<Response<pbc::GetLineageResponse>, Status> {
        let req = request.get_ref();
        let id = payload_id(req.id.as_ref())?;
        let most = self.node.config().limits.lineage_depth;
        let depth = match req.max_depth {
            0 => most,
            n if n > most => {
                return Err(Status::invalid_argument(format!(
                    "max_depth {n} is deeper than the limit of {most} (--max-lineage-depth); 0 walks that far"
                )))
            }
            n => n,
        };
        let edges = self
            .node
            .repo()
            .get_lineage(id, req.upstream, depth)
            .await
            .map_err(status)?;
        let edges = edges.into_iter().map(payload_proto::domain::lineage_edge).collect();
        Ok(Response::new(pbc::GetLineageResponse { edges }))
    }

    async fn update_payload_metadata(
        &self,
        request: Request<pbc::UpdatePayloadMetadataRequest>,
    ) -> Result<Response<pbc::UpdatePayloadMetadataResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        self.authorize_local(id, &caller, "changing the metadata of")?;
        known_enum("mode", req.mode, &[0, 1, 2])?;
        let mode = if req.mode == MetadataUpdateMode::Replace as i32 {
            MetadataMode::Replace
        } else {
            MetadataMode::Merge
        };
        let md = req.metadata.unwrap_or_default();
        let limits = &self.node.config().limits;
        no_nul("metadata.schema", &md.schema)?;
        limits.metadata("metadata", md.data.len() + md.schema.len())?;
        limits.name("actor", &req.actor)?;
        no_nul("reason", &req.reason)?;
        limits.metadata("reason", req.reason.len())?;
        let now = self.node.now_ms();
        let update = Metadata {
            data: md.data,
            schema: md.schema,
            updated_at_ms: now,
            version: 0,
        };
        let stored = self
            .repo()
            .await?
            .update_metadata(id, mode, update, req.expected_version)
            .await
            .map_err(status)?;
        Ok(Response::new(pbc::UpdatePayloadMetadataResponse {
            id: Some(pb_payload_id(id)),
            updated_at: Some(timestamp(stored.updated_at_ms)),
            metadata: Some(payload_proto::domain::metadata(id, stored)),
        }))
    }

    async fn append_payload_metadata_event(
        &self,
        request: Request<pbc::AppendPayloadMetadataEventRequest>,
    ) -> Result<Response<pbc::AppendPayloadMetadataEventResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        self.authorize_local(id, &caller, "adding metadata events to")?;
        let limits = &self.node.config().limits;
        limits.name("source", &req.source)?;
        limits.name("version", &req.version)?;
        let md = req.metadata.as_ref();
        limits.metadata("metadata", md.map_or(0, |m| m.data.len() + m.schema.len()))?;
        let now = self.node.now_ms();
        let event = MetadataEvent {
            data: req.metadata.map(|m| m.data).unwrap_or_default(),
            source: req.source,
            version: req.version,
            ts_ms: now,
        };
        self.repo()
            .await?
            .append_metadata_event(id, event)
            .await
            .map_err(status)?;
        Ok(Response::new(pbc::AppendPayloadMetadataEventResponse {
            id: Some(pb_payload_id(id)),
            event_time: Some(timestamp(now)),
        }))
    }

    async fn get_payload_metadata(
        &self,
        request: Request<pbc::GetPayloadMetadataRequest>,
    ) -> Result<Response<pbc::PayloadMetadata>, Status> {
        let id = payload_id(request.into_inner().id.as_ref())?;
        let stored = self.repo().await?.get_metadata(id).await.map_err(status)?;
        Ok(Response::new(payload_proto::domain::metadata(
            id,
            stored.unwrap_or_default(),
        )))
    }

    async fn list_payload_metadata_events(
        &self,
        request: Request<pbc::ListPayloadMetadataEventsRequest>,
    ) -> Result<Response<pbc::ListPayloadMetadataEventsResponse>, Status> {
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        let after = match req.page_token.as_str() {
            "" => 0,
            token => token.parse().map_err(|_| {
                Status::invalid_argument("page_token is not one this agent gave out; start again without it")
            })?,
        };
        let size = if req.page_size <= 0 {
            DEFAULT_EVENT_PAGE
        } else {
            (req.page_size as u32).min(MAX_EVENT_PAGE)
        };
        let page = self
            .repo()
            .await?
            .metadata_history(id, after, size)
            .await
            .map_err(status)?;
        Ok(Response::new(payload_proto::domain::metadata_events(id, page)))
    }

    async fn list_payloads(
        &self,
        request: Request<runtime::ListPayloadsRequest>,
    ) -> Result<Response<runtime::ListPayloadsResponse>, Status> {
        let req = request.into_inner();
        self.node.config().limits.selector(&req.label_selector)?;
        let query = payload_proto::domain::list_query(&req, Scope::Own)?;
        let scoped = query.scope != Scope::Own;
        let page = self.repo().await?.list_payloads(&query).await.map_err(status)?;
        if scoped && page.nodes.len() != page.items.len() {
            // An older operator ignores the scope and lists this node's rows.
            return Err(Status::failed_precondition(
                "the catalog did not say whose rows these are: it does not know node_filter (an older operator?); \
                 upgrade the operator first",
            ));
        }
        let now = self.node.now_ms();
        let own = &self.node.config().node_name;
        // Another node's payload with no copy elsewhere is unavailable
        // while that node is down (known only on a cluster node). Without
        // the operator's answer the page is still worth having.
        let others = page.nodes.iter().any(|n| n != own);
        let down = match (others, self.node.operator()) {
            (true, Some(operator)) => operator
                .down_nodes()
                .await
                .inspect_err(|err| tracing::warn!(%err, "no node list from the operator: availability not shown"))
                .ok(),
            _ => None,
        };
        let payloads = page
            .items
            .iter()
            .zip(page.nodes.iter().map(String::as_str).chain(std::iter::repeat("")))
            .map(|(rec, node)| {
                let mut out = if node.is_empty() || node == own {
                    // The node's view is fresher than the row (tier moves, leases).
                    let (rec, leases) = self.node.get(rec.id).unwrap_or_else(|_| (rec.clone(), 0));
                    summary(&self.node, &rec, leases, now)
                } else {
                    // Another node's: its leases are that node's to know.
                    let mut out = summary(&self.node, rec, 0, now);
                    out.unavailable = down
                        .as_ref()
                        .is_some_and(|down| down.contains(node) && !rec.in_object_store());
                    out
                };
                out.node = node.to_string();
                out
            })
            .collect();
        Ok(Response::new(payload_proto::domain::list_response(
            payloads, page.next, page.total,
        )))
    }

    async fn import_payload(
        &self,
        request: Request<runtime::ImportPayloadRequest>,
    ) -> Result<Response<runtime::ImportPayloadResponse>, Status> {
        let req = request.get_ref();
        let id = payload_id(req.id.as_ref())?;
        let caller = caller(&request);
        // An allocation here is its owner's to import; a bare upload
        // becomes the importer's.
        self.authorize_local(id, &caller, "importing")?;
        self.node
            .import_as(id, req.size_bytes, Some(caller.principal()))
            .await
            .map_err(status)?;
        Ok(Response::new(runtime::ImportPayloadResponse {}))
    }

    async fn abort_payload(&self, request: Request<runtime::AbortPayloadRequest>) -> Result<Response<()>, Status> {
        let id = payload_id(request.get_ref().id.as_ref())?;
        self.node
            .authorize_change(id, &caller(&request), "aborting")
            .map_err(status)?;
        self.node.abort(id).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn get_payload(
        &self,
        request: Request<runtime::GetPayloadRequest>,
    ) -> Result<Response<runtime::GetPayloadResponse>, Status> {
        let id = payload_id(request.get_ref().id.as_ref())?;
        let (rec, leases) = match self.node.get(id) {
            Ok(found) => found,
            Err(err @ crate::error::AgentError::NotFound(_)) => return self.get_elsewhere(id, err).await,
            Err(err) => return Err(status(err)),
        };
        Ok(Response::new(runtime::GetPayloadResponse {
            payload: Some(summary(&self.node, &rec, leases, self.node.now_ms())),
            payload_descriptor: Some(descriptor_with_object(&self.node, &rec).await),
        }))
    }
}

impl CatalogService {
    /// GetPayload of a payload that is not on this node: the catalog's row
    /// when another node holds it, with that node's name and no location
    /// (its bytes are not here), or `missing`.
    async fn get_elsewhere(
        &self,
        id: payload_catalog::PayloadId,
        missing: crate::error::AgentError,
    ) -> Result<Response<runtime::GetPayloadResponse>, Status> {
        // No flush first: rows of this node are not what is looked for.
        let Some((rec, holder)) = self.node.locate(id).await.map_err(status)? else {
            return Err(status(missing));
        };
        let mut payload = summary(&self.node, &rec, 0, self.node.now_ms());
        if let Some(operator) = self.node.operator() {
            let down = operator.down_nodes().await.ok();
            payload.unavailable = down.is_some_and(|down| down.contains(&holder)) && !rec.in_object_store();
        }
        payload.node = holder;
        let mut payload_descriptor = descriptor_with_object(&self.node, &rec).await;
        payload_descriptor.location = None;
        payload_descriptor.sealed = false;
        Ok(Response::new(runtime::GetPayloadResponse {
            payload: Some(payload),
            payload_descriptor: Some(payload_descriptor),
        }))
    }

    /// `err` (a change refused here), or, when it is `NotFound` and another
    /// node holds the payload, a refusal naming that node.
    async fn elsewhere(&self, id: payload_catalog::PayloadId, err: crate::error::AgentError, what: &str) -> Status {
        if !matches!(err, crate::error::AgentError::NotFound(_)) {
            return status(err);
        }
        match self.node.locate(id).await {
            Ok(Some((_, holder))) => Status::failed_precondition(format!(
                "payload {id} belongs to node {holder}; {what} it through that node's agent (payloadctl --agent \
                 on node {holder})"
            )),
            Ok(None) => status(err),
            Err(unavailable) => status(unavailable),
        }
    }

    /// Checks `caller` may change payload `id` when this node holds it
    /// (payloads of other nodes are their agents' to guard).
    fn authorize_local(
        &self,
        id: payload_catalog::PayloadId,
        caller: &crate::identity::Caller,
        what: &str,
    ) -> Result<(), Status> {
        match self.node.authorize_change(id, caller, what) {
            Ok(()) | Err(crate::error::AgentError::NotFound(_)) => Ok(()),
            Err(err) => Err(status(err)),
        }
    }

    /// The catalog, once every write made so far has reached it.
    async fn repo(&self) -> Result<&Arc<dyn payload_catalog::Repository>, Status> {
        self.node.flush().await.map_err(status)?;
        Ok(self.node.repo())
    }

    async fn spill_one(
        &self,
        raw: &payload_proto::core::PayloadId,
        caller: &crate::identity::Caller,
        target: Option<payload_catalog::Tier>,
        background: bool,
        wait_for_leases: bool,
        fsync: bool,
    ) -> Result<Option<payload_catalog::PayloadRecord>, Status> {
        let id = payload_id(Some(raw))?;
        self.node.authorize_change(id, caller, "spilling").map_err(status)?;
        let target = self.node.spill_target(id, target).map_err(status)?;
        let (rec, _) = self.node.get(id).map_err(status)?;
        if target.faster_than(rec.tier) {
            return Err(status(CatalogError::InvalidState(format!(
                "spill moves payloads down, but {} is faster than the current {} tier; use Promote",
                target.name(),
                rec.tier.name()
            ))));
        }
        if background {
            self.node.spawn_relocate(id, target);
            return Ok(None);
        }
        let outcome = self
            .node
            .relocate(id, target, wait_for_leases, fsync)
            .await
            .map_err(status)?;
        Ok(outcome.record().cloned())
    }
}
