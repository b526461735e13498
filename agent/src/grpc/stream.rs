//! `PayloadStreamService`: streams in the catalog, and subscriptions that
//! are pushed new entries as appends commit (through this agent or any other
//! sharing the catalog), with per-subscriber flow control.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use payload_catalog::follow::{follow, read_range, subscription_start};
use payload_catalog::{AppendItem, ReadQuery, Repository, Retention, StreamEntry, StreamKey, StreamOwner};
use payload_proto::runtime;
use payload_proto::runtime::subscribe_request::Start;
use payload_proto::services::payload_stream_service_server::PayloadStreamService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use payload_proto::domain::stream_entry;

use super::convert::{caller, payload_id, status};
use crate::appender::Appender;
use crate::clock::millis;
use crate::identity::Caller;
use crate::limits::Limits;
use crate::node::Node;

pub struct StreamService {
    node: Arc<Node>,
    appender: Appender,
    subscribers: Arc<Subscribers>,
}

/// Entries queued per subscriber when the request names no `max_inflight`.
const DEFAULT_INFLIGHT: u32 = 64;
const MAX_INFLIGHT: u32 = 4_096;

fn stream_key(limits: &Limits, stream: Option<&runtime::StreamId>) -> Result<StreamKey, Status> {
    let stream = stream.ok_or_else(|| Status::invalid_argument("stream is missing; name the stream"))?;
    limits.name("stream.namespace", &stream.namespace)?;
    limits.name("stream.name", &stream.name)?;
    StreamKey::new(stream.namespace.as_str(), stream.name.as_str()).map_err(status)
}

/// Open subscriptions, in all and per stream, so that no client can hold
/// an unbounded number of follower tasks.
#[derive(Default)]
struct Subscribers {
    per_stream: Mutex<HashMap<StreamKey, usize>>,
}

/// One open subscription; counted until its follower task ends.
struct Subscription {
    subscribers: Arc<Subscribers>,
    key: StreamKey,
}

impl Subscribers {
    fn open(self: &Arc<Self>, key: &StreamKey, limits: &Limits) -> Result<Subscription, Status> {
        let mut open = self.per_stream.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        if total >= limits.subscribers {
            return Err(Status::resource_exhausted(format!(
                "this agent serves {total} subscriptions, its limit (--max-subscribers); close one or retry later"
            )));
        }
        let here = open.entry(key.clone()).or_default();
        if *here >= limits.subscribers_per_stream {
            return Err(Status::resource_exhausted(format!(
                "stream {key} has {here} subscriptions, its limit (--max-subscribers-per-stream); close one or retry later"
            )));
        }
        *here += 1;
        Ok(Subscription {
            subscribers: self.clone(),
            key: key.clone(),
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut open = self.subscribers.per_stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl StreamService {
    pub fn new(node: Arc<Node>) -> Self {
        let appender = Appender::new(node.repo().clone());
        Self {
            node,
            appender,
            subscribers: Arc::default(),
        }
    }

    fn repo(&self) -> Arc<dyn Repository> {
        self.node.repo().clone()
    }

    fn key(&self, stream: Option<&runtime::StreamId>) -> Result<StreamKey, Status> {
        stream_key(&self.node.config().limits, stream)
    }

    fn limits(&self) -> &Limits {
        &self.node.config().limits
    }

    /// The stream's owner, once `caller` is found to be it (or the agent's
    /// own user): appending, deleting. The owner never changes while the
    /// stream lives; a delete is conditional on it and an append on the
    /// stream's row id, so a stream deleted and made again by someone else
    /// after this check is left alone.
    async fn may_change(&self, caller: &Caller, key: &StreamKey, what: &str) -> Result<StreamOwner, Status> {
        let owned = self.repo().stream_owner(key).await.map_err(status)?;
        caller
            .may_change_owned(owned.owner.as_deref(), format_args!("{what} stream {key}"))
            .map_err(status)?;
        Ok(owned)
    }

    /// Whether `caller` may read the stream under the node's read rule:
    /// reading, subscribing, and a consumer group's offsets.
    async fn may_read(&self, caller: &Caller, key: &StreamKey) -> Result<(), Status> {
        let owned = self.repo().stream_owner(key).await.map_err(status)?;
        let rule = self.node.config().read_access;
        caller
            .may_read_owned(owned.owner.as_deref(), rule, format_args!("reading stream {key}"))
            .map_err(status)
    }
}

#[tonic::async_trait]
impl PayloadStreamService for StreamService {
    async fn create_stream(&self, request: Request<runtime::CreateStreamRequest>) -> Result<Response<()>, Status> {
        let owner = caller(&request).principal();
        let req = request.into_inner();
        let key = self.key(req.stream.as_ref())?;
        let retention = Retention {
            max_entries: req.retention_max_entries,
            max_age_ms: req.retention_max_age_sec.saturating_mul(1_000),
        };
        self.repo()
            .create_stream(&key, retention, Some(&owner), self.node.now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn delete_stream(&self, request: Request<runtime::DeleteStreamRequest>) -> Result<Response<()>, Status> {
        let caller = caller(&request);
        let key = self.key(request.into_inner().stream.as_ref())?;
        let owned = match self.may_change(&caller, &key, "deleting").await {
            Ok(owned) => owned,
            // Deleting a missing stream is fine.
            Err(st) if st.code() == tonic::Code::NotFound => return Ok(Response::new(())),
            Err(st) => return Err(st),
        };
        self.repo()
            .delete_stream(&key, owned.owner.as_deref())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn append(
        &self,
        request: Request<runtime::AppendRequest>,
    ) -> Result<Response<runtime::AppendResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let key = self.key(req.stream.as_ref())?;
        let now = self.node.now_ms();
        self.limits().batch("items", req.items.len())?;
        let items = req
            .items
            .into_iter()
            .map(|item| {
                self.limits().labels("tag", &item.tags)?;
                Ok(AppendItem {
                    payload_id: payload_id(item.payload_id.as_ref())?,
                    // An entry without an event time happened when appended.
                    event_time_ms: item.event_time.as_ref().map_or(now, millis),
                    duration_ns: item.duration_ns,
                    tags: item.tags.into_iter().collect(),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let owned = self.may_change(&caller, &key, "appending to").await?;
        // Payloads committed a moment ago may still be on their way to the
        // catalog; the existence check must see them.
        self.node.flush().await.map_err(status)?;
        let (first_offset, last_offset) = self
            .appender
            .append(key, Some(owned.id), items, now)
            .await
            .map_err(status)?;
        Ok(Response::new(runtime::AppendResponse {
            first_offset,
            last_offset,
        }))
    }

    async fn read(&self, request: Request<runtime::ReadRequest>) -> Result<Response<runtime::ReadResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let key = self.key(req.stream.as_ref())?;
        self.may_read(&caller, &key).await?;
        let query = ReadQuery {
            start: req.start_offset,
            end: None,
            max: req.max_entries,
            not_before_ms: req.not_before.as_ref().map_or(0, millis),
        };
        let entries = self.repo().read_stream(&key, query).await.map_err(status)?;
        Ok(Response::new(runtime::ReadResponse {
            entries: entries.into_iter().map(|e| stream_entry(&key, e)).collect(),
        }))
    }

    async fn subscribe(
        &self,
        request: Request<runtime::SubscribeRequest>,
    ) -> Result<Response<BoxStream<runtime::SubscribeResponse>>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let key = self.key(req.stream.as_ref())?;
        self.may_read(&caller, &key).await?;
        let repo = self.repo();
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
        let subscription = self.subscribers.open(&key, self.limits())?;
        let (tx, rx) = mpsc::channel(inflight as usize);
        let entries = ReceiverStream::new(rx).map({
            let key = key.clone();
            move |entry: Result<StreamEntry, payload_catalog::CatalogError>| {
                entry
                    .map(|e| runtime::SubscribeResponse {
                        entry: Some(stream_entry(&key, e)),
                    })
                    .map_err(status)
            }
        });
        tokio::spawn(async move {
            follow(repo, key, head, start, u64::from(inflight), tx).await;
            drop(subscription);
        });
        Ok(Response::new(Box::pin(entries)))
    }

    async fn commit(&self, request: Request<runtime::CommitRequest>) -> Result<Response<()>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let key = self.key(req.stream.as_ref())?;
        self.may_read(&caller, &key).await?;
        self.limits().name("consumer_group", &req.consumer_group)?;
        self.repo()
            .commit_offset(&key, &req.consumer_group, req.offset, self.node.now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn get_committed(
        &self,
        request: Request<runtime::GetCommittedRequest>,
    ) -> Result<Response<runtime::GetCommittedResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let key = self.key(req.stream.as_ref())?;
        self.may_read(&caller, &key).await?;
        self.limits().name("consumer_group", &req.consumer_group)?;
        let committed = self
            .repo()
            .get_committed(&key, &req.consumer_group)
            .await
            .map_err(status)?;
        Ok(Response::new(payload_proto::domain::committed(committed)))
    }

    async fn get_range(
        &self,
        request: Request<runtime::GetRangeRequest>,
    ) -> Result<Response<runtime::GetRangeResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let key = self.key(req.stream.as_ref())?;
        self.may_read(&caller, &key).await?;
        let entries = read_range(self.repo().as_ref(), &key, req.start_offset, req.end_offset)
            .await
            .map_err(status)?;
        Ok(Response::new(runtime::GetRangeResponse {
            entries: entries.into_iter().map(|e| stream_entry(&key, e)).collect(),
        }))
    }
}
