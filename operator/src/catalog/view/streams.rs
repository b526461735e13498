//! `PayloadStreamService` on the operator: the catalog's streams, for any
//! caller Kubernetes RBAC allows (`streams` in the `payload-manager.io`
//! group, in the stream's namespace: get to read, update to append or
//! move a consumer group's offset, create, delete). RBAC stands in for a
//! node's owner and read rules here: an editor may append to or delete any
//! stream it is granted, whoever created it. The streams a node's agent
//! serves are the same rows; an entry appended here names payloads on any
//! node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use payload_catalog::follow::{follow, read_range, subscription_start};
use payload_catalog::{AppendItem, CatalogError, ReadQuery, Retention, StreamEntry, StreamKey};
use payload_proto::domain::{millis, payload_id, stream_entry};
use payload_proto::runtime;
use payload_proto::runtime::subscribe_request::Start;
use payload_proto::services::payload_stream_service_server::PayloadStreamService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::View;
use crate::catalog::{now_ms, status};

/// The bounds an agent applies by default, here fixed.
const NAME_BYTES: usize = 256;
const ITEMS: usize = 10_000;
const TAGS: usize = 64;
const TAG_KEY_BYTES: usize = 256;
const TAG_VALUE_BYTES: usize = 2_048;
const DEFAULT_INFLIGHT: u32 = 64;
const MAX_INFLIGHT: u32 = 4_096;
/// Subscriptions the operator feeds at once, over all callers.
const SUBSCRIPTIONS: usize = 1_024;

pub struct Streams {
    view: Arc<View>,
    open: Arc<AtomicUsize>,
}

/// One open subscription, counted until its feeder ends.
struct Subscription(Arc<AtomicUsize>);

impl Drop for Subscription {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn name(what: &str, text: &str) -> Result<(), Status> {
    if text.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{what} contains a NUL byte; strings must not"
        )));
    }
    if text.len() > NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes; the limit is {NAME_BYTES}: shorten it",
            text.len()
        )));
    }
    Ok(())
}

fn tags(tags: &HashMap<String, String>) -> Result<(), Status> {
    if tags.len() > TAGS {
        return Err(Status::invalid_argument(format!(
            "{} tags; the limit is {TAGS}",
            tags.len()
        )));
    }
    for (key, value) in tags {
        if key.is_empty() {
            return Err(Status::invalid_argument("tag keys must not be empty"));
        }
        name(&format!("tag key {key:?}"), key)?;
        if key.len() > TAG_KEY_BYTES || value.len() > TAG_VALUE_BYTES || value.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "tag {key:?}: keys hold at most {TAG_KEY_BYTES} bytes and values {TAG_VALUE_BYTES}, without NUL"
            )));
        }
    }
    Ok(())
}

fn key(stream: Option<&runtime::StreamId>) -> Result<StreamKey, Status> {
    let stream = stream.ok_or_else(|| Status::invalid_argument("stream is missing; name the stream"))?;
    name("stream.namespace", &stream.namespace)?;
    name("stream.name", &stream.name)?;
    StreamKey::new(stream.namespace.as_str(), stream.name.as_str()).map_err(status)
}

fn entries(key: &StreamKey, entries: Vec<StreamEntry>) -> Vec<runtime::StreamEntry> {
    entries.into_iter().map(|e| stream_entry(key, e)).collect()
}

impl Streams {
    pub(super) fn new(view: Arc<View>) -> Self {
        Streams {
            view,
            open: Arc::default(),
        }
    }

    /// The stream a request names and its body, once the caller is found
    /// to be allowed `verb` on streams in the stream's namespace; with the
    /// caller's principal.
    async fn allow<T>(
        &self,
        request: Request<T>,
        verb: &'static str,
        stream: impl Fn(&T) -> Option<&runtime::StreamId>,
    ) -> Result<(StreamKey, T, String), Status> {
        let (headers, _, body) = request.into_parts();
        let key = key(stream(&body))?;
        let principal = self
            .view
            .access
            .check(&headers, verb, "streams", Some(&key.namespace))
            .await?;
        Ok((key, body, principal))
    }

    fn subscription(&self) -> Result<Subscription, Status> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let held = Subscription(self.open.clone());
        if before >= SUBSCRIPTIONS {
            return Err(Status::resource_exhausted(format!(
                "the operator feeds {SUBSCRIPTIONS} subscriptions, its limit; close one, retry later, or subscribe \
                 through a node's agent"
            )));
        }
        Ok(held)
    }
}

#[tonic::async_trait]
impl PayloadStreamService for Streams {
    async fn create_stream(&self, request: Request<runtime::CreateStreamRequest>) -> Result<Response<()>, Status> {
        let (key, req, owner) = self.allow(request, "create", |r| r.stream.as_ref()).await?;
        let retention = Retention {
            max_entries: req.retention_max_entries,
            max_age_ms: req.retention_max_age_sec.saturating_mul(1_000),
        };
        self.view
            .repo
            .create_stream(&key, retention, Some(&owner), now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn delete_stream(&self, request: Request<runtime::DeleteStreamRequest>) -> Result<Response<()>, Status> {
        let (key, _, _) = self.allow(request, "delete", |r| r.stream.as_ref()).await?;
        let owned = match self.view.repo.stream_owner(&key).await {
            Ok(owned) => owned,
            // Deleting a missing stream is fine, as on a node.
            Err(CatalogError::NotFound(_)) => return Ok(Response::new(())),
            Err(err) => return Err(status(err)),
        };
        // Conditional on the owner read: a stream made again meanwhile stays.
        self.view
            .repo
            .delete_stream(&key, owned.owner.as_deref())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn append(
        &self,
        request: Request<runtime::AppendRequest>,
    ) -> Result<Response<runtime::AppendResponse>, Status> {
        let (key, req, _) = self.allow(request, "update", |r| r.stream.as_ref()).await?;
        if req.items.len() > ITEMS {
            return Err(Status::invalid_argument(format!(
                "items has {} entries; the limit is {ITEMS} per call: split the batch",
                req.items.len()
            )));
        }
        let now = now_ms();
        let items = req
            .items
            .into_iter()
            .map(|item| {
                tags(&item.tags)?;
                Ok(AppendItem {
                    payload_id: payload_id(item.payload_id.as_ref())?,
                    event_time_ms: item.event_time.as_ref().map_or(now, millis),
                    duration_ns: item.duration_ns,
                    tags: item.tags.into_iter().collect(),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let owned = self.view.repo.stream_owner(&key).await.map_err(status)?;
        let (first_offset, last_offset) = self
            .view
            .repo
            .append_to(&key, Some(owned.id), &items, now)
            .await
            .map_err(status)?;
        Ok(Response::new(runtime::AppendResponse {
            first_offset,
            last_offset,
        }))
    }

    async fn read(&self, request: Request<runtime::ReadRequest>) -> Result<Response<runtime::ReadResponse>, Status> {
        let (key, req, _) = self.allow(request, "get", |r| r.stream.as_ref()).await?;
        let query = ReadQuery {
            start: req.start_offset,
            end: None,
            max: req.max_entries,
            not_before_ms: req.not_before.as_ref().map_or(0, millis),
        };
        let read = self.view.repo.read_stream(&key, query).await.map_err(status)?;
        Ok(Response::new(runtime::ReadResponse {
            entries: entries(&key, read),
        }))
    }

    async fn subscribe(
        &self,
        request: Request<runtime::SubscribeRequest>,
    ) -> Result<Response<BoxStream<runtime::SubscribeResponse>>, Status> {
        let (key, req, _) = self.allow(request, "get", |r| r.stream.as_ref()).await?;
        let repo = self.view.repo.clone();
        let head = repo.stream_head(&key).await.map_err(status)?;
        let start = match req.start {
            Some(Start::Offset(offset)) => offset,
            Some(Start::FromLatest(true)) => head.next_offset,
            _ => 0,
        };
        let start = subscription_start(&key, head, start).map_err(status)?;
        let inflight = match req.max_inflight {
            0 => DEFAULT_INFLIGHT,
            n => n.min(MAX_INFLIGHT),
        };
        let subscription = self.subscription()?;
        let (tx, rx) = mpsc::channel(inflight as usize);
        let fed = ReceiverStream::new(rx).map({
            let key = key.clone();
            move |entry: Result<StreamEntry, CatalogError>| {
                entry
                    .map(|e| runtime::SubscribeResponse {
                        entry: Some(stream_entry(&key, e)),
                    })
                    .map_err(status)
            }
        });
        let mut stop = self.view.stop.clone();
        tokio::spawn(async move {
            // The server's drain would wait on an endless subscription.
            tokio::select! {
                () = follow(repo, key, head, start, u64::from(inflight), tx) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            drop(subscription);
        });
        Ok(Response::new(Box::pin(fed)))
    }

    async fn commit(&self, request: Request<runtime::CommitRequest>) -> Result<Response<()>, Status> {
        let (key, req, _) = self.allow(request, "update", |r| r.stream.as_ref()).await?;
        name("consumer_group", &req.consumer_group)?;
        self.view
            .repo
            .commit_offset(&key, &req.consumer_group, req.offset, now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn get_committed(
        &self,
        request: Request<runtime::GetCommittedRequest>,
    ) -> Result<Response<runtime::GetCommittedResponse>, Status> {
        let (key, req, _) = self.allow(request, "get", |r| r.stream.as_ref()).await?;
        name("consumer_group", &req.consumer_group)?;
        let committed = self
            .view
            .repo
            .get_committed(&key, &req.consumer_group)
            .await
            .map_err(status)?;
        Ok(Response::new(payload_proto::domain::committed(committed)))
    }

    async fn get_range(
        &self,
        request: Request<runtime::GetRangeRequest>,
    ) -> Result<Response<runtime::GetRangeResponse>, Status> {
        let (key, req, _) = self.allow(request, "get", |r| r.stream.as_ref()).await?;
        let read = read_range(self.view.repo.as_ref(), &key, req.start_offset, req.end_offset)
            .await
            .map_err(status)?;
        Ok(Response::new(runtime::GetRangeResponse {
            entries: entries(&key, read),
        }))
    }
}
