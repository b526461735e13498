//! A time limit on every call but those that wait on purpose or whose
//! length is their own work: Subscribe (held open for as long as the
//! subscriber likes), blocking promotions and spills, lease acquisition
//! (which may promote first), and Allocate and Commit (which may reserve,
//! hash or fsync gigabytes; cutting them off half way would leave a client
//! unsure of a commit that happened). A call past the limit is answered
//! DEADLINE_EXCEEDED and its work is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::Status;
use tower::{Layer, Service};

/// Methods that may take as long as their own policy says.
const UNBOUNDED: [&str; 6] = [
    "/Subscribe",
    "/Promote",
    "/Spill",
    "/AcquireReadLease",
    "/AllocatePayload",
    "/CommitPayload",
];

#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    pub limit: Duration,
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B, R> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let call = self.inner.call(request);
        let limit = self.limit;
        if UNBOUNDED.iter().any(|m| path.ends_with(m)) {
            return Box::pin(call);
        }
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "{path} did not finish within {limit:?} (--request-timeout-ms); retry, or ask the operator"
                ))
                .into_http()),
            }
        })
    }
}
