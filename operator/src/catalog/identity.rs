//! Who is calling the catalog, as a node name. In a cluster an agent sends
//! the projected ServiceAccount token of the catalog's audience, and the
//! API server (TokenReview) says whose it is: the token of a pod bound to
//! a node carries that node's name, so an agent can only ever act as the
//! node it runs on. Outside a cluster (tests, a laptop) the catalog listens
//! on loopback only and takes the name the agent gives.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tonic::{metadata::MetadataMap, Status};

/// The audience of the agents' projected tokens (the pool's DaemonSet asks
/// for tokens of this audience only).
pub const AUDIENCE: &str = "payload-manager-catalog";
/// The header an agent names its node in.
pub const NODE_HEADER: &str = "x-payload-node";
/// Where the API server puts the node of a pod-bound token.
const NODE_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// How long a reviewed token is trusted before it is reviewed again.
const REVIEW_TTL: Duration = Duration::from_secs(60);
/// Reviewed tokens remembered at most (past it, expired ones are dropped,
/// then all).
const REVIEW_CACHE: usize = 4096;

pub enum Gate {
    /// No Kubernetes API: loopback callers name their node.
    Open,
    Kubernetes(Reviewer),
}

pub struct Reviewer {
    client: kube::Client,
    /// The namespace the agents' ServiceAccounts are in (the operator's).
    namespace: String,
    /// Reviewed tokens by their SHA-256 (the tokens themselves are not
    /// kept), with the node each names and when it was reviewed.
    cache: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

/// Who the API server says `token` is, for `audience` only: a token of
/// another audience (the API server's own, say) is refused, so no caller
/// need hand the operator a credential that works elsewhere.
pub(super) async fn token_review(client: &kube::Client, token: &str, audience: &str) -> Result<UserInfo, Status> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Status::unavailable(format!("reviewing the caller's token with the API server: {e}")))?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(Status::unauthenticated(format!(
            "the API server did not accept the caller's token for audience {audience}: {why}"
        )));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(Status::unauthenticated(format!(
            "the caller's token is not for audience {audience}"
        )));
    }
    Ok(status.user.unwrap_or_default())
}

impl Reviewer {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Reviewer {
            client,
            namespace: namespace.to_string(),
            cache: Mutex::default(),
        }
    }
}

impl Gate {
    /// The Kubernetes API, when callers are checked through it.
    pub fn client(&self) -> Option<kube::Client> {
        match self {
            Gate::Open => None,
            Gate::Kubernetes(reviewer) => Some(reviewer.client.clone()),
        }
    }

    /// The node the caller may act as, or why it may not call at all.
    pub async fn node_of(&self, headers: &MetadataMap) -> Result<String, Status> {
        let claimed = match headers.get(NODE_HEADER).map(|v| v.to_str()) {
            Some(Ok(name)) => Some(valid_node(name)?),
            Some(Err(_)) => return Err(Status::invalid_argument(format!("{NODE_HEADER} is not ASCII"))),
            None => None,
        };
        match self {
            Gate::Open => claimed.ok_or_else(|| {
                Status::invalid_argument(format!(
                    "the call names no node ({NODE_HEADER}): only `payload-agent node` calls the cluster catalog"
                ))
            }),
            Gate::Kubernetes(reviewer) => {
                let token = bearer(headers)?;
                let node = reviewer.review(token).await?;
                match claimed {
                    Some(claimed) if claimed != node => Err(Status::permission_denied(format!(
                        "this agent's token is bound to node {node:?}, not {claimed:?}: an agent acts only for its own node"
                    ))),
                    _ => Ok(node),
                }
            }
        }
    }
}

fn valid_node(name: &str) -> Result<String, Status> {
    if name.is_empty() || name.len() > 253 {
        return Err(Status::invalid_argument(format!(
            "{NODE_HEADER} must be a node name of 1 to 253 characters"
        )));
    }
    Ok(name.to_string())
}

/// The token of an `authorization: Bearer …` header, if one is sent.
pub(super) fn bearer_token(headers: &MetadataMap) -> Option<&str> {
    let value = headers.get("authorization").and_then(|v| v.to_str().ok())?;
    value.strip_prefix("Bearer ").filter(|t| !t.is_empty())
}

fn bearer(headers: &MetadataMap) -> Result<&str, Status> {
    bearer_token(headers).ok_or_else(|| {
        Status::unauthenticated(format!(
            "the cluster catalog takes a ServiceAccount token of audience {AUDIENCE} as `authorization: Bearer …` \
             (the agent's --operator-token-file)"
        ))
    })
}

impl Reviewer {
    async fn review(&self, token: &str) -> Result<String, Status> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((node, at)) = crate::lock(&self.cache).get(&key) {
            if at.elapsed() < REVIEW_TTL {
                return Ok(node.clone());
            }
        }
        let node = self.node_in(token_review(&self.client, token, AUDIENCE).await?)?;
        let mut cache = crate::lock(&self.cache);
        if cache.len() >= REVIEW_CACHE {
            cache.retain(|_, (_, at)| at.elapsed() < REVIEW_TTL);
        }
        if cache.len() >= REVIEW_CACHE {
            cache.clear();
        }
        cache.insert(key, (node.clone(), Instant::now()));
        Ok(node)
    }

    /// The node of a reviewed token, if it is an agent's.
    fn node_in(&self, user: UserInfo) -> Result<String, Status> {
        let username = user.username.unwrap_or_default();
        let agents = format!("system:serviceaccount:{}:payload-agent-", self.namespace);
        if !username.starts_with(&agents) {
            return Err(Status::permission_denied(format!(
                "{username} is not a pool's agent ({agents}POOL): only agents write the catalog"
            )));
        }
        let node = user
            .extra
            .and_then(|mut extra| extra.remove(NODE_EXTRA))
            .and_then(|names| names.into_iter().next())
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "{username}'s token is not bound to a node (no {NODE_EXTRA}): mount the projected token of the \
                     agent's pod (Kubernetes 1.32 or later binds it)"
                ))
            })?;
        valid_node(&node)
    }
}
