//! Conversions at the gRPC edge: wire messages are validated into domain
//! types on receipt, domain errors map to one status each.

use payload_catalog::{LeaseId, PayloadRecord, Tier};
use payload_proto::core as pb;
use payload_proto::runtime;
use tonic::Status;

pub use payload_proto::domain::{payload_id, pb_payload_id};

use crate::clock::timestamp;
use crate::error::AgentError;
use crate::node::Node;
use crate::tiers::Place;

/// Who sent a request: the peer's credentials on the Unix socket, the one
/// anonymous identity on TCP.
pub fn caller<T>(request: &tonic::Request<T>) -> crate::identity::Caller {
    use tonic::transport::server::UdsConnectInfo;
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    match cred {
        Some(cred) => crate::identity::Caller::Unix {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().unwrap_or(0),
        },
        None => crate::identity::Caller::Tcp,
    }
}

/// Domain and agent errors as gRPC statuses; the mapping lives in [`AgentError::status`].
pub fn status(err: impl Into<AgentError>) -> Status {
    err.into().status()
}

pub fn lease_id(id: Option<&pb::LeaseId>) -> Result<LeaseId, Status> {
    let id = id.ok_or_else(|| Status::invalid_argument("lease id is missing"))?;
    LeaseId::from_slice(&id.value).map_err(status)
}

/// A digest a commit must match: none, or 32 raw bytes.
pub fn expected_digest(raw: &[u8]) -> Result<Option<[u8; 32]>, Status> {
    match raw.len() {
        0 => Ok(None),
        32 => Ok(raw.try_into().ok()),
        n => Err(Status::invalid_argument(format!(
            "expected_sha256 must be 32 bytes (a raw SHA-256), got {n}"
        ))),
    }
}

/// A tier the caller must name (allocate, promote).
pub fn required_tier(value: i32, what: &str) -> Result<Tier, Status> {
    match Tier::from_i32(value) {
        Some(tier) => Ok(tier),
        None if value == 0 => Err(Status::invalid_argument(format!(
            "{what} is TIER_UNSPECIFIED; name a tier (TIER_RAM, TIER_DISK, or TIER_OBJECT with --object-store)"
        ))),
        None => Err(Status::invalid_argument(format!("{what} {value} is not a known tier"))),
    }
}

/// A tier where 0 means "no preference".
pub fn optional_tier(value: i32, what: &str) -> Result<Option<Tier>, Status> {
    if value == 0 {
        Ok(None)
    } else {
        required_tier(value, what).map(Some)
    }
}

/// The descriptor for a record: the location where its bytes live now.
pub fn descriptor(node: &Node, rec: &PayloadRecord) -> pb::PayloadDescriptor {
    use pb::payload_descriptor::Location;
    let disk = |path: std::path::PathBuf| {
        Location::Disk(pb::DiskLocation {
            path: path.display().to_string(),
            offset_bytes: 0,
            length_bytes: rec.size_bytes,
        })
    };
    let location = node
        .tier(rec.tier)
        .ok()
        .and_then(|t| t.place(rec.id))
        .and_then(|place| match place {
            Place::Shm(shm_name) => Some(Location::Ram(pb::RamLocation {
                shm_name,
                slab_id: 0,
                block_index: 0,
                length_bytes: rec.size_bytes,
            })),
            Place::File(path) => Some(disk(path)),
            // Nothing a v1 client could open by name: no location.
            Place::Sealed => None,
        });
    let copies = payload_proto::domain::copies(rec);
    pb::PayloadDescriptor {
        payload_id: Some(pb_payload_id(rec.id)),
        tier: rec.tier as i32,
        state: rec.state as i32,
        location,
        version: rec.version,
        created_at: Some(timestamp(rec.created_at_ms)),
        expires_at: (rec.expires_at_ms != 0).then(|| timestamp(rec.expires_at_ms)),
        eviction_policy: None,
        size_bytes: rec.size_bytes,
        sha256: rec.sha256.map(|d| d.to_vec()).unwrap_or_default(),
        object: None,
        copies,
        sealed: node.is_sealed(rec),
    }
}

/// The descriptor with the object copy's bucket, manifest and block keys
/// filled in (one catalog read; for calls that report a single payload).
pub async fn descriptor_with_object(node: &Node, rec: &PayloadRecord) -> pb::PayloadDescriptor {
    let mut d = descriptor(node, rec);
    let Ok(object) = node.object() else { return d };
    if !rec.in_object_store() {
        return d;
    }
    if let Ok(Some((manifest, true))) = node.repo().get_manifest(rec.id).await {
        d.object = Some(pb::ObjectLocation {
            bucket: object.bucket_name().to_string(),
            manifest_key: object.full_key(&crate::object::manifest_key(rec.id)),
            block_keys: manifest
                .blocks
                .iter()
                .map(|b| object.full_key(&crate::object::block_key(b)))
                .collect(),
            block_size_bytes: manifest.block_size,
        });
    }
    d
}

pub fn summary(node: &Node, rec: &PayloadRecord, active_leases: usize, now_ms: u64) -> runtime::PayloadSummary {
    runtime::PayloadSummary {
        sealed: node.is_sealed(rec),
        ..payload_proto::domain::summary(rec, active_leases, now_ms)
    }
}
