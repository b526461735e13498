//! `PayloadDataService`: snapshots and read leases.

use std::sync::Arc;

use payload_proto::core::PromotionPolicy;
use payload_proto::runtime::{self, LeaseMode};
use payload_proto::services::payload_data_service_server::PayloadDataService;
use tonic::{Request, Response, Status};

use super::convert::{caller, descriptor, descriptor_with_object, lease_id, optional_tier, payload_id, status};
use crate::clock::timestamp;
use crate::limits::known_enum;
use crate::node::{LeaseGrant, Node};

pub struct DataService {
    pub node: Arc<Node>,
}

impl DataService {
    fn lease_response(&self, grant: &LeaseGrant) -> runtime::AcquireReadLeaseResponse {
        runtime::AcquireReadLeaseResponse {
            payload_descriptor: Some(descriptor(&self.node, &grant.rec)),
            lease_id: Some(payload_proto::core::LeaseId {
                value: grant.lease.as_bytes().to_vec(),
            }),
            lease_expires_at: Some(timestamp(grant.expires_ms)),
        }
    }
}

/// A v1 lease on a sealed payload: there is no name to hand out.
fn sealed_error(id: payload_catalog::PayloadId) -> Status {
    Status::failed_precondition(format!(
        "payload {id} is a sealed memfd (written over the native socket): it has no /dev/shm name a v1 client can \
         open; read it with payload-client or payloadctl (native socket), or spill it to DISK and lease that"
    ))
}

fn check_mode(mode: i32) -> Result<(), Status> {
    if mode == LeaseMode::Unspecified as i32 || mode == LeaseMode::Read as i32 {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "lease mode {mode} is not supported; use LEASE_MODE_READ"
        )))
    }
}

#[tonic::async_trait]
impl PayloadDataService for DataService {
    async fn resolve_snapshot(
        &self,
        request: Request<runtime::ResolveSnapshotRequest>,
    ) -> Result<Response<runtime::ResolveSnapshotResponse>, Status> {
        // Advisory, like GetPayload and ListPayloads: where a payload is,
        // not its bytes (leases are the reads the rule governs).
        let id = payload_id(request.get_ref().id.as_ref())?;
        let (rec, _) = self.node.get(id).map_err(status)?;
        Ok(Response::new(runtime::ResolveSnapshotResponse {
            payload_descriptor: Some(descriptor(&self.node, &rec)),
        }))
    }

    async fn acquire_read_lease(
        &self,
        request: Request<runtime::AcquireReadLeaseRequest>,
    ) -> Result<Response<runtime::AcquireReadLeaseResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let id = payload_id(req.id.as_ref())?;
        check_mode(req.mode)?;
        let min_tier = optional_tier(req.min_tier, "min_tier")?;
        known_enum("promotion_policy", req.promotion_policy, &[0, 1, 2])?;
        self.node.reach(id, &caller).await.map_err(status)?;
        self.node.authorize_read(id, &caller).map_err(status)?;
        let blocking = req.promotion_policy != PromotionPolicy::BestEffort as i32;
        let grant = self
            .node
            .acquire(id, min_tier, blocking, req.min_lease_duration_ms)
            .await
            .map_err(status)?;
        if self.node.is_sealed(&grant.rec) {
            self.node.release(grant.lease);
            return Err(sealed_error(id));
        }
        let mut response = self.lease_response(&grant);
        if grant.rec.tier == payload_catalog::Tier::Object {
            // Bucket, manifest and blocks, for readers that want them.
            response.payload_descriptor = Some(descriptor_with_object(&self.node, &grant.rec).await);
        }
        Ok(Response::new(response))
    }

    async fn release_lease(&self, request: Request<runtime::ReleaseLeaseRequest>) -> Result<Response<()>, Status> {
        let lease = lease_id(request.get_ref().lease_id.as_ref())?;
        // Idempotent, as in the reference: releasing twice or late is fine.
        self.node.release(lease);
        Ok(Response::new(()))
    }

    async fn renew_lease(
        &self,
        request: Request<runtime::RenewLeaseRequest>,
    ) -> Result<Response<runtime::RenewLeaseResponse>, Status> {
        let req = request.get_ref();
        let lease = lease_id(req.lease_id.as_ref())?;
        let expires = self.node.renew(lease, req.extend_ms).map_err(status)?;
        if expires == u64::MAX {
            return Err(Status::failed_precondition(format!(
                "lease {lease} is a session lease: it lasts as long as its native connection and needs no renewal"
            )));
        }
        Ok(Response::new(runtime::RenewLeaseResponse {
            lease_expires_at: Some(timestamp(expires)),
        }))
    }

    async fn batch_acquire_read_lease(
        &self,
        request: Request<runtime::BatchAcquireReadLeaseRequest>,
    ) -> Result<Response<runtime::BatchAcquireReadLeaseResponse>, Status> {
        let caller = caller(&request);
        let requests = request.into_inner().requests;
        self.node.config().limits.batch("requests", requests.len())?;
        // Validate each item; invalid ones answer in place, valid ones go in one batch.
        let parsed: Vec<Result<_, Status>> = requests
            .iter()
            .map(|r| {
                check_mode(r.mode)?;
                let id = payload_id(r.id.as_ref())?;
                self.node.authorize_read(id, &caller).map_err(status)?;
                Ok((id, optional_tier(r.min_tier, "min_tier")?, r.min_lease_duration_ms))
            })
            .collect();
        let valid: Vec<_> = parsed.iter().filter_map(|p| p.as_ref().ok().copied()).collect();
        let mut granted = self.node.acquire_many(&valid).into_iter();
        let results = parsed
            .into_iter()
            .map(|p| {
                let outcome = p.and_then(|(id, ..)| {
                    let grant = granted.next().expect("one result per valid request").map_err(status)?;
                    if self.node.is_sealed(&grant.rec) {
                        self.node.release(grant.lease);
                        return Err(sealed_error(id));
                    }
                    Ok(grant)
                });
                match outcome {
                    Ok(grant) => runtime::LeaseResult {
                        lease: Some(self.lease_response(&grant)),
                        ..Default::default()
                    },
                    Err(st) => runtime::LeaseResult {
                        lease: None,
                        error_code: st.code() as i32,
                        error_message: st.message().to_string(),
                    },
                }
            })
            .collect();
        Ok(Response::new(runtime::BatchAcquireReadLeaseResponse { results }))
    }

    async fn batch_release_lease(
        &self,
        request: Request<runtime::BatchReleaseLeaseRequest>,
    ) -> Result<Response<runtime::BatchReleaseLeaseResponse>, Status> {
        let req = request.get_ref();
        self.node.config().limits.batch("lease_ids", req.lease_ids.len())?;
        let leases = req
            .lease_ids
            .iter()
            .map(|l| lease_id(Some(l)))
            .collect::<Result<Vec<_>, _>>()?;
        let released = self.node.release_many(&leases) as u32;
        Ok(Response::new(runtime::BatchReleaseLeaseResponse { released }))
    }
}
