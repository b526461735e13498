//! What the mock-API-server tests share: the server's handle and a way to
//! answer one call.

use http::{Request, Response};
use kube::client::Body;
use serde_json::Value;
use tower_test::mock::{Handle, SendResponse};

pub type ApiServer = Handle<Request<Body>, Response<Body>>;

/// Answers a call with `status` and `body` as JSON.
pub fn answer(reply: SendResponse<Response<Body>>, status: u16, body: &Value) {
    let response = Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    reply.send_response(response);
}
