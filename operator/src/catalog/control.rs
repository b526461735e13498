//! The agents' control calls (`ClusterCatalog.Control`), one per node,
//! through which the operator asks a node to do what only it can: delete
//! a payload whose bytes and leases are there. Each request waits for its
//! node's answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use payload_catalog::PayloadId;
use payload_proto::cluster::control_request::Request;
use payload_proto::cluster::{ControlReply, ControlRequest, DeletePayload};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// How long a node has to answer (a delete under load, a slow disk).
const ANSWER: Duration = Duration::from_secs(30);

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<ControlReply>>>>;

/// One node's open control call.
struct Agent {
    /// Tells this call from the node's earlier or later ones.
    call: u64,
    requests: mpsc::Sender<Result<ControlRequest, Status>>,
    waiting: Waiters,
}

#[derive(Default)]
pub struct Controls {
    agents: Mutex<HashMap<String, Agent>>,
    next: AtomicU64,
}

impl Controls {
    /// Takes `node`'s control call (replacing an older one of the node:
    /// its agent restarted) and returns the requests to stream to it.
    pub fn attach(
        self: &Arc<Self>,
        node: String,
        mut replies: Streaming<ControlReply>,
        mut stop: watch::Receiver<bool>,
    ) -> ReceiverStream<Result<ControlRequest, Status>> {
        let (requests, outgoing) = mpsc::channel(16);
        let call = self.next.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiters::default();
        let agent = Agent {
            call,
            requests,
            waiting: waiting.clone(),
        };
        crate::lock(&self.agents).insert(node.clone(), agent);
        let controls = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    reply = replies.message() => match reply {
                        Ok(Some(reply)) => {
                            if let Some(waiter) = crate::lock(&waiting).remove(&reply.seq) {
                                let _ = waiter.send(reply);
                            }
                        }
                        _ => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            {
                let mut agents = crate::lock(&controls.agents);
                if agents.get(&node).is_some_and(|a| a.call == call) {
                    agents.remove(&node);
                }
            }
            // Its waiters hear at once that it went away.
            crate::lock(&waiting).clear();
        });
        ReceiverStream::new(outgoing)
    }

    /// Has `node`'s agent delete payload `id` for `requester`, and says
    /// how that went.
    pub async fn delete(&self, node: &str, id: PayloadId, force: bool, requester: &str) -> Result<(), Status> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        let (requests, waiting) = {
            let agents = crate::lock(&self.agents);
            let agent = agents.get(node).ok_or_else(|| {
                Status::unavailable(format!(
                    "payload {id} is on node {node}, whose agent is not connected to the operator (is it down?); \
                     nothing was deleted: try again once it is back"
                ))
            })?;
            crate::lock(&agent.waiting).insert(seq, answer);
            (agent.requests.clone(), agent.waiting.clone())
        };
        let request = ControlRequest {
            seq,
            requester: requester.to_string(),
            request: Some(Request::Delete(DeletePayload {
                id: id.as_bytes().to_vec(),
                force,
            })),
        };
        tracing::info!(payload = %id, node, force, requester, "asking the payload's node to delete it");
        let gone = || {
            Status::unavailable(format!(
                "node {node}'s agent went away before it answered; payload {id} may or may not be deleted: look again"
            ))
        };
        let exchange = async {
            requests.send(Ok(request)).await.map_err(|_| gone())?;
            answered.await.map_err(|_| gone())
        };
        let reply = match tokio::time::timeout(ANSWER, exchange).await {
            Ok(reply) => reply,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node {node} did not answer the deletion of payload {id} within {} s; look again",
                ANSWER.as_secs()
            ))),
        };
        // Answered or not, this request waits no longer.
        crate::lock(&waiting).remove(&seq);
        let reply = reply?;
        match reply.code {
            0 => Ok(()),
            code => Err(Status::new(
                tonic::Code::from(code),
                format!("node {node}: {}", reply.message),
            )),
        }
    }
}
