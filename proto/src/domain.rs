//! Conversions between the wire and the catalog's domain types that every
//! server of the v1 services makes alike (the node agent, and the operator
//! serving the cluster view): ids, timestamps, lineage, metadata, stream
//! entries, payload summaries.

use payload_catalog::{EventPage, LineageEdge, Metadata, PageToken, PayloadId, PayloadRecord, StreamEntry, StreamKey};
use tonic::Status;

use crate::catalog as pbc;
use crate::core as pb;
use crate::runtime;

pub fn payload_id(id: Option<&pb::PayloadId>) -> Result<PayloadId, Status> {
    let id = id.ok_or_else(|| Status::invalid_argument("payload id is missing"))?;
    PayloadId::from_slice(&id.value).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub fn pb_payload_id(id: PayloadId) -> pb::PayloadId {
    pb::PayloadId {
        value: id.as_bytes().to_vec(),
    }
}

/// A protobuf timestamp for a Unix-millisecond instant.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The Unix-millisecond instant of a protobuf timestamp (before 1970: 0).
pub fn millis(ts: &prost_types::Timestamp) -> u64 {
    let ms = ts
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000);
    u64::try_from(ms).unwrap_or(0)
}

pub fn lineage_edge(e: LineageEdge) -> pbc::LineageEdge {
    pbc::LineageEdge {
        parent: Some(pb_payload_id(e.parent)),
        operation: e.operation,
        role: e.role,
        parameters: e.parameters,
        child: Some(pb_payload_id(e.child)),
    }
}

pub fn metadata(id: PayloadId, stored: Metadata) -> pbc::PayloadMetadata {
    pbc::PayloadMetadata {
        id: Some(pb_payload_id(id)),
        data: stored.data,
        schema: stored.schema,
        version: stored.version,
    }
}

pub fn metadata_events(id: PayloadId, page: EventPage) -> pbc::ListPayloadMetadataEventsResponse {
    pbc::ListPayloadMetadataEventsResponse {
        events: page
            .events
            .into_iter()
            .map(|e| pbc::PayloadMetadataEvent {
                id: Some(pb_payload_id(id)),
                ts: Some(timestamp(e.ts_ms)),
                data: e.data,
                source: e.source,
                version: e.version,
            })
            .collect(),
        next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
    }
}

pub fn stream_entry(key: &StreamKey, entry: StreamEntry) -> runtime::StreamEntry {
    runtime::StreamEntry {
        stream: Some(runtime::StreamId {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
        }),
        offset: entry.offset,
        payload_id: Some(pb_payload_id(entry.payload_id)),
        event_time: Some(timestamp(entry.event_time_ms)),
        append_time: Some(timestamp(entry.append_time_ms)),
        duration_ns: entry.duration_ns,
        tags: entry.tags.into_iter().collect(),
    }
}

/// A payload's summary as its row says; `sealed` and `node` are for the
/// server to fill in (only a node knows how it holds the bytes).
pub fn summary(rec: &PayloadRecord, active_leases: usize, now_ms: u64) -> runtime::PayloadSummary {
    runtime::PayloadSummary {
        id: Some(pb_payload_id(rec.id)),
        tier: rec.tier as i32,
        state: rec.state as i32,
        size_bytes: rec.size_bytes,
        created_at_ms: rec.created_at_ms,
        expires_at_ms: rec.expires_at_ms,
        active_leases: active_leases as u32,
        labels: rec.labels.clone().into_iter().collect(),
        pinned: rec.is_pinned(now_ms),
        sha256: rec.sha256.map(|d| d.to_vec()).unwrap_or_default(),
        sealed: false,
        node: String::new(),
        unavailable: false,
    }
}

/// A ListPayloads answer: the page's rows as the server shows them, and
/// where the next page starts.
pub fn list_response(
    payloads: Vec<runtime::PayloadSummary>,
    next: Option<PageToken>,
    total: u64,
) -> runtime::ListPayloadsResponse {
    runtime::ListPayloadsResponse {
        payloads,
        next_page_token: next.map(|t| t.encode()).unwrap_or_default(),
        total_count: i32::try_from(total).unwrap_or(i32::MAX),
    }
}

/// GetCommitted's answer for a consumer group's offset, if it has one.
pub fn committed(offset: Option<u64>) -> runtime::GetCommittedResponse {
    runtime::GetCommittedResponse {
        offset: offset.unwrap_or(0),
        committed: offset.is_some(),
    }
}

/// The copies a descriptor lists: the authoritative one first.
pub fn copies(rec: &PayloadRecord) -> Vec<pb::PayloadCopy> {
    std::iter::once(pb::PayloadCopy {
        tier: rec.tier as i32,
        authoritative: true,
        verified: rec.sha256.is_some(),
    })
    .chain(rec.copies.iter().map(|c| pb::PayloadCopy {
        tier: c.tier as i32,
        authoritative: false,
        verified: c.verified,
    }))
    .collect()
}

/// The default and the largest page a ListPayloads answers.
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;

/// A ListPayloads request as a catalog query; `own` is what an empty
/// `node_filter` means to this server (a node: its own rows; the
/// operator: every node's).
pub fn list_query(
    req: &runtime::ListPayloadsRequest,
    own: payload_catalog::Scope,
) -> Result<payload_catalog::ListQuery, Status> {
    use payload_catalog::{PageToken, PayloadState, Scope, Tier};
    let invalid = |e: payload_catalog::CatalogError| Status::invalid_argument(e.to_string());
    for (what, text) in [
        ("page_token", &req.page_token),
        ("node_filter", &req.node_filter),
        ("label_selector", &req.label_selector),
    ] {
        if text.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "{what} contains a NUL byte; strings must not"
            )));
        }
    }
    if req.node_filter.len() > 253 {
        return Err(Status::invalid_argument(
            "node_filter is a node name (at most 253 bytes), or \"*\" for every node",
        ));
    }
    let state = match req.state_filter {
        0 => None,
        n => Some(
            PayloadState::from_i32(n)
                .ok_or_else(|| Status::invalid_argument(format!("state_filter {n} is not a known state")))?,
        ),
    };
    let tier = match req.tier_filter {
        0 => None,
        n => Some(
            Tier::from_i32(n)
                .ok_or_else(|| Status::invalid_argument(format!("tier_filter {n} is not a known tier")))?,
        ),
    };
    Ok(payload_catalog::ListQuery {
        tier,
        state,
        labels: payload_catalog::repo::parse_label_selector(&req.label_selector).map_err(invalid)?,
        created_after_ms: (req.created_after_ms != 0).then_some(req.created_after_ms),
        created_before_ms: (req.created_before_ms != 0).then_some(req.created_before_ms),
        page_size: if req.page_size <= 0 {
            DEFAULT_PAGE
        } else {
            (req.page_size as u32).min(MAX_PAGE)
        },
        after: match req.page_token.as_str() {
            "" => None,
            token => Some(PageToken::decode(token).map_err(invalid)?),
        },
        scope: match req.node_filter.as_str() {
            "" => own,
            "*" => Scope::Cluster,
            name => Scope::Node(name.to_string()),
        },
    })
}

/// A node as `ListNodes` shows it, from its heartbeat.
pub fn node_summary(info: crate::cluster::NodeInfo) -> crate::admin::NodeSummary {
    crate::admin::NodeSummary {
        name: info.name,
        live: info.live,
        last_seen_ms: info.last_seen_ms,
        tiers: info
            .tiers
            .into_iter()
            .map(|t| crate::admin::TierUsage {
                tier: t.tier as u32,
                capacity_bytes: t.capacity_bytes,
                bytes: t.used_bytes,
                ..Default::default()
            })
            .collect(),
        version: info.version,
        catalog_backlog: info.backlog,
    }
}
