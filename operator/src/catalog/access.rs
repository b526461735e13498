//! Who may use the operator's v1 services (the cluster view that
//! `payloadctl --operator` shows). In a cluster a caller sends a Kubernetes
//! token (`kubectl create token …`, or a kubeconfig's) as a bearer token:
//! TokenReview says whose it is and a SubjectAccessReview whether that user
//! may do the verb on a resource of the `payload-manager.io` group
//! (`payloads`, `streams`), so ordinary RBAC grants it: the chart's
//! ClusterRoles `payload-manager-viewer` and `payload-manager-editor` hold
//! these rules. Outside a cluster the operator listens on loopback only and
//! every caller there is one local identity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tonic::{metadata::MetadataMap, Status};

/// The API group the rules name.
pub const GROUP: &str = "payload-manager.io";
/// The one identity of a loopback caller outside a cluster.
pub const LOCAL: &str = "local";
/// How long an allowed (token, verb, resource) is trusted before it is
/// reviewed again; refusals are not remembered.
const ALLOWED_TTL: Duration = Duration::from_secs(30);
const CACHE: usize = 4096;

/// A token's SHA-256, a verb and a resource.
type Asked = ([u8; 32], &'static str, &'static str);

pub enum Access {
    Open,
    Kubernetes {
        client: kube::Client,
        allowed: Mutex<HashMap<Asked, (String, Instant)>>,
    },
}

impl Access {
    pub fn new(client: Option<kube::Client>) -> Self {
        match client {
            None => Access::Open,
            Some(client) => Access::Kubernetes {
                client,
                allowed: Mutex::default(),
            },
        }
    }

    /// The caller, as streams it creates record their owner, once it is
    /// found to be allowed `verb` on `resource`.
    pub async fn check(
        &self,
        headers: &MetadataMap,
        verb: &'static str,
        resource: &'static str,
    ) -> Result<String, Status> {
        let Access::Kubernetes { client, allowed } = self else {
            return Ok(LOCAL.to_string());
        };
        let token = bearer(headers)?;
        let key = (Sha256::digest(token.as_bytes()).into(), verb, resource);
        if let Some((user, at)) = crate::lock(allowed).get(&key) {
            if at.elapsed() < ALLOWED_TTL {
                return Ok(user.clone());
            }
        }
        let (user, groups) = who(client, token).await?;
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(groups),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(resource.into()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "asking the API server whether {user} may {verb} {resource}: {e}"
                ))
            })?;
        if !reviewed.status.is_some_and(|s| s.allowed) {
            return Err(Status::permission_denied(format!(
                "{user} may not {verb} {resource}.{GROUP}: bind the ClusterRole payload-manager-viewer (ls, stat, \
                 nodes, stats, stream read) or payload-manager-editor (rm, stream changes) to them"
            )));
        }
        let principal = format!("k8s:{user}");
        let mut allowed = crate::lock(allowed);
        if allowed.len() >= CACHE {
            allowed.clear();
        }
        allowed.insert(key, (principal.clone(), Instant::now()));
        Ok(principal)
    }
}

/// The user and groups a token is, by TokenReview for the API server's
/// own audience (the token a kubeconfig or `kubectl create token` holds).
async fn who(client: &kube::Client, token: &str) -> Result<(String, Vec<String>), Status> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: None,
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
            "the API server did not accept the caller's token: {why}"
        )));
    }
    let user = status.user.unwrap_or_default();
    Ok((user.username.unwrap_or_default(), user.groups.unwrap_or_default()))
}

fn bearer(headers: &MetadataMap) -> Result<&str, Status> {
    super::identity::bearer_token(headers).ok_or_else(|| {
        Status::unauthenticated(
            "the operator's cluster view takes a Kubernetes token as `authorization: Bearer …`: pass payloadctl \
             --token-file PATH (e.g. from `kubectl create token NAME`)",
        )
    })
}
