//! The operator's requests for this node, over one call the agent holds
//! open while it runs (`ClusterCatalog.Control`): a deletion asked for
//! through the operator (`payloadctl --operator URL rm`) is carried out
//! here, where the payload's bytes and leases are, and answered on the
//! same call. The operator has already checked the caller may delete.

use std::sync::Arc;
use std::time::Duration;

use payload_catalog::PayloadId;
use payload_proto::cluster::{ControlReply, ControlRequest};
use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::cluster::OperatorLink;
use crate::node::Node;

/// Answers waiting to go out; a full queue holds back reading requests.
const QUEUE: usize = 64;

/// Holds the control call open until `stop`, opening it again (with
/// backoff) whenever the operator goes away.
pub async fn serve(node: Arc<Node>, link: Arc<OperatorLink>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let (replies, outgoing) = mpsc::channel(QUEUE);
        if let Ok(mut requests) = link.control(outgoing).await {
            backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
            loop {
                tokio::select! {
                    request = requests.message() => match request {
                        Ok(Some(request)) => {
                            tokio::spawn(answer(node.clone(), request, replies.clone()));
                        }
                        // The operator stopped or the connection broke.
                        _ => break,
                    },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
        tokio::select! {
            () = backoff.wait() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn answer(node: Arc<Node>, request: ControlRequest, replies: mpsc::Sender<ControlReply>) {
    let outcome = match PayloadId::from_slice(&request.delete_payload) {
        Ok(id) => node.delete(id, request.force).await.map_err(|e| e.status()),
        Err(err) => Err(tonic::Status::invalid_argument(format!(
            "the operator's request names no payload: {err}"
        ))),
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
