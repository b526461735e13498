//! The operator's requests for this node, over one call the agent holds
//! open while it runs (`ClusterCatalog.Control`): a deletion asked for
//! through the operator (`payloadctl --operator URL rm`) is carried out
//! here, where the payload's bytes and leases are, and answered on the
//! same call. The operator has already checked the caller may delete.

use std::sync::Arc;
use std::time::Duration;

use payload_catalog::PayloadId;
use payload_proto::cluster::control_request::Request;
use payload_proto::cluster::{ControlReply, ControlRequest};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::backoff::Backoff;
use crate::cluster::OperatorLink;
use crate::node::Node;

/// Requests carried out at once; more wait their turn (the operator's
/// callers wait on their answers).
const CONCURRENT: usize = 16;

/// Holds the control call open until `stop`, opening it again (with
/// backoff) whenever the operator goes away.
pub async fn serve(node: Arc<Node>, link: Arc<OperatorLink>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let running = Arc::new(Semaphore::new(CONCURRENT));
    let mut refused_before = false;
    loop {
        let (replies, outgoing) = mpsc::channel(CONCURRENT);
        match link.control(outgoing).await {
            Ok(mut requests) => {
                backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
                refused_before = false;
                loop {
                    tokio::select! {
                        request = requests.message() => match request {
                            Ok(Some(request)) => {
                                let Ok(turn) = running.clone().acquire_owned().await else { return };
                                let (node, replies) = (node.clone(), replies.clone());
                                tokio::spawn(async move {
                                    answer(&node, request, &replies).await;
                                    drop(turn);
                                });
                            }
                            // The operator stopped or the connection broke.
                            _ => break,
                        },
                        () = stopped(&mut stop) => return,
                    }
                }
            }
            // Said once per outage: deletions through the operator wait.
            Err(err) if !refused_before => {
                refused_before = true;
                tracing::warn!(
                    "the operator's control call is not open ({err}): `payloadctl --operator rm` cannot reach this \
                     node until it is"
                );
            }
            Err(_) => {}
        }
        tokio::select! {
            () = backoff.wait() => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once `stop` says so (or its sender is gone); the guard
/// `wait_for` returns must not live across the caller's awaits.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn answer(node: &Node, request: ControlRequest, replies: &mpsc::Sender<ControlReply>) {
    let outcome = match request.request {
        Some(Request::Delete(delete)) => match PayloadId::from_slice(&delete.id) {
            Ok(id) => {
                let done = node.delete(id, delete.force).await.map_err(|e| e.status());
                tracing::info!(payload = %id, force = delete.force, requester = %request.requester,
                               ok = done.is_ok(), "deleted at the operator's request");
                done
            }
            Err(err) => Err(tonic::Status::invalid_argument(format!(
                "the operator's request names no payload: {err}"
            ))),
        },
        // An operator of a later release asks for something this agent
        // does not know.
        None => Err(tonic::Status::unimplemented(
            "this agent does not know the operator's request: upgrade the agent",
        )),
    };
    let reply = match outcome {
        Ok(()) => ControlReply {
            seq: request.seq,
            code: 0,
            message: String::new(),
        },
        Err(status) => ControlReply {
            seq: request.seq,
            code: status.code() as i32,
            message: status.message().to_string(),
        },
    };
    // The call ended meanwhile: the operator has answered its caller.
    let _ = replies.send(reply).await;
}
