//! The bearer token TCP callers present (`--tcp-token-file`): checked on
//! every call before it reaches a service. A missing or wrong token is
//! UNAUTHENTICATED, as the reference's later versions answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::Status;
use tower::{Layer, Service};

/// Not `Debug`: it holds the token, which must not reach a log.
#[derive(Clone)]
pub struct TokenLayer {
    /// `Bearer <token>`, as the header carries it.
    expected: Arc<Vec<u8>>,
}

impl TokenLayer {
    pub fn new(token: &str) -> Self {
        Self {
            expected: Arc::new(format!("Bearer {token}").into_bytes()),
        }
    }
}

impl<S> Layer<S> for TokenLayer {
    type Service = TokenCheck<S>;

    fn layer(&self, inner: S) -> TokenCheck<S> {
        TokenCheck {
            inner,
            expected: self.expected.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TokenCheck<S> {
    inner: S,
    expected: Arc<Vec<u8>>,
}

/// Equal without returning early: how much of a guess matched stays unseen.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S, B, R> Service<http::Request<B>> for TokenCheck<S>
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
        let given = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        if given.is_some_and(|given| same(given, &self.expected)) {
            return Box::pin(self.inner.call(request));
        }
        let why = if given.is_none() {
            "this agent's TCP port needs a token: send `authorization: Bearer <token>` (the token is in its --tcp-token-file)"
        } else {
            "the token sent in `authorization` is not this agent's; check --tcp-token-file"
        };
        Box::pin(async move { Ok(Status::unauthenticated(why).into_http()) })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_by_every_byte() {
        assert!(super::same(b"Bearer abc", b"Bearer abc"));
        assert!(!super::same(b"Bearer abd", b"Bearer abc"));
        assert!(!super::same(b"Bearer ab", b"Bearer abc"));
    }
}
