//! The repository trait: the one interface every catalog backend implements.

use async_trait::async_trait;

use crate::error::{CatalogError, Result};
use crate::model::{LineageEdge, Metadata, MetadataMode, PayloadId, PayloadRecord, PayloadState, Tier};

/// One change to the payload table; a batch of them commits atomically.
/// Applying the same write twice is harmless (inserts are upserts), so a
/// log of writes can be replayed after a crash.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Write {
    Insert(PayloadRecord),
    Update(PayloadRecord),
    Delete(PayloadId),
}

/// Filters and paging for [`Repository::list_payloads`]. Results are newest
/// first; the page token is a keyset position, stable under inserts.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub tier: Option<Tier>,
    pub state: Option<PayloadState>,
    pub labels: Vec<(String, String)>,
    pub created_after_ms: Option<u64>,
    pub created_before_ms: Option<u64>,
    pub page_size: u32,
    pub after: Option<PageToken>,
}

/// A keyset position: the last row of the previous page, and the total the
/// first page counted (a listing reports one total throughout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub created_at_ms: u64,
    pub id: PayloadId,
    pub total: u64,
}

impl PageToken {
    pub fn encode(&self) -> String {
        format!(
            "k1.{}.{}.{}",
            self.created_at_ms,
            hex::encode(self.id.as_bytes()),
            self.total
        )
    }

    pub fn decode(token: &str) -> Result<PageToken> {
        let bad = || {
            CatalogError::InvalidArgument(format!(
                "page_token {token:?} is not a token this server issued; pass next_page_token back unchanged, or omit it for the first page"
            ))
        };
        let mut parts = token.split('.');
        if parts.next() != Some("k1") {
            return Err(bad());
        }
        let created_at_ms = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let id = parts.next().and_then(|p| hex::decode(p).ok()).ok_or_else(bad)?;
        let id = PayloadId::from_slice(&id).map_err(|_| bad())?;
        let total = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(PageToken {
            created_at_ms,
            id,
            total,
        })
    }
}

/// Parses a label selector `k=v,k2=v2` (empty = match everything).
pub fn parse_label_selector(selector: &str) -> Result<Vec<(String, String)>> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| match term.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(CatalogError::InvalidArgument(format!(
                "label selector term {term:?} must be key=value (terms separated by commas)"
            ))),
        })
        .collect()
}

/// One page of a listing.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub items: Vec<PayloadRecord>,
    pub next: Option<PageToken>,
    /// Rows matching the filters when the listing began (first page).
    pub total: u64,
}

/// An audit event appended to a payload's metadata history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataEvent {
    pub data: Vec<u8>,
    pub source: String,
    pub version: String,
    pub ts_ms: u64,
}

#[async_trait]
pub trait Repository: Send + Sync + 'static {
    /// Applies every write in one transaction: all of them or none. An
    /// update of a missing row fails with `NotFound`.
    async fn write_batch(&self, writes: &[Write]) -> Result<()>;
    async fn get_payload(&self, id: PayloadId) -> Result<Option<PayloadRecord>>;
    /// Every payload row, for an agent rebuilding its in-memory view.
    async fn load_payloads(&self) -> Result<Vec<PayloadRecord>>;
    async fn list_payloads(&self, query: &ListQuery) -> Result<Page>;
    /// Adds edges `parent -> child`; both ends must exist and no cycle may form.
    async fn add_lineage(&self, child: PayloadId, edges: &[LineageEdge]) -> Result<()>;
    /// Edges reachable from `id` upstream (parents) or downstream (children),
    /// breadth first, up to `max_depth` hops (0 = unlimited).
    async fn get_lineage(&self, id: PayloadId, upstream: bool, max_depth: u32) -> Result<Vec<LineageEdge>>;
    async fn update_metadata(&self, id: PayloadId, mode: MetadataMode, update: Metadata) -> Result<Metadata>;
    async fn append_metadata_event(&self, id: PayloadId, event: MetadataEvent) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let token = PageToken {
            created_at_ms: 42,
            id: PayloadId::random(),
            total: 7,
        };
        assert_eq!(PageToken::decode(&token.encode()).unwrap(), token);
        for garbage in [
            "",
            "7",
            "k1.x.y.z",
            "k1.1.00.1",
            "k2.1.0011.1",
            &format!("{}.9", token.encode()),
        ] {
            assert!(
                matches!(PageToken::decode(garbage), Err(CatalogError::InvalidArgument(_))),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn label_selectors_parse_terms_and_refuse_bare_keys() {
        assert_eq!(parse_label_selector("").unwrap(), vec![]);
        assert_eq!(
            parse_label_selector("a=1, b = 2").unwrap(),
            vec![("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]
        );
        assert!(parse_label_selector("a").is_err());
        assert!(parse_label_selector("=1").is_err());
    }
}
