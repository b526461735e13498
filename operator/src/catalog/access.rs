//! Who may use the operator's v1 services (the cluster view that
//! `payloadctl --operator` shows). In a cluster a caller sends a Kubernetes
//! token of the view's own audience (`kubectl create token NAME --audience
//! payload-manager-view`) as a bearer token: TokenReview says whose it is,
//! and a SubjectAccessReview whether that user may do the verb on a
//! resource of the `payload-manager.io` group (`payloads`, or `streams` in
//! the stream's namespace), so ordinary RBAC grants it: the chart's
//! ClusterRoles `payload-manager-viewer` and `payload-manager-editor` hold
//! these rules. Outside a cluster the operator listens on loopback only and
//! every caller there is one local identity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tonic::{metadata::MetadataMap, Status};

use super::identity::{bearer_token, token_review};

/// The API group the rules name.
pub const GROUP: &str = "payload-manager.io";
/// The audience of the tokens the cluster view takes.
pub const AUDIENCE: &str = "payload-manager-view";
/// The one identity of a loopback caller outside a cluster.
pub const LOCAL: &str = "local";
/// How long an answer of the API server is trusted before it is asked
/// again: an allowed one, and a refusal (kept briefly, so a caller retrying
/// a refused call does not cost the API server a review each time).
const ALLOWED_TTL: Duration = Duration::from_secs(30);
const REFUSED_TTL: Duration = Duration::from_secs(5);
/// Answers remembered at most (past it, stale ones are dropped, then all).
const CACHE: usize = 4096;

/// A token's SHA-256 (the token itself is not kept).
type TokenHash = [u8; 32];
/// A token, a verb, a resource and a namespace ("" for none).
type Asked = (TokenHash, &'static str, &'static str, String);

/// Answers of the API server, each with when it was given.
struct Cache<K, V>(Mutex<HashMap<K, (V, Instant)>>);

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn get(&self, key: &K, fresh: impl Fn(&V) -> Duration) -> Option<V> {
        let cache = crate::lock(&self.0);
        let (value, at) = cache.get(key)?;
        (at.elapsed() < fresh(value)).then(|| value.clone())
    }

    fn put(&self, key: K, value: V, fresh: impl Fn(&V) -> Duration) {
        let mut cache = crate::lock(&self.0);
        if cache.len() >= CACHE {
            cache.retain(|_, (v, at)| at.elapsed() < fresh(v));
        }
        if cache.len() >= CACHE {
            cache.clear();
        }
        cache.insert(key, (value, Instant::now()));
    }
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache(Mutex::default())
    }
}

/// A review's outcome as kept: who the token is, or why it is refused.
type Who = Result<(String, Vec<String>), (tonic::Code, String)>;

fn ttl<T, E>(answer: &Result<T, E>) -> Duration {
    if answer.is_ok() {
        ALLOWED_TTL
    } else {
        REFUSED_TTL
    }
}

/// Who may use the cluster view: everyone (no Kubernetes API: a loopback
/// listener), or whom the API server allows.
pub struct Access(Option<Reviews>);

struct Reviews {
    client: kube::Client,
    tokens: Cache<TokenHash, Who>,
    decisions: Cache<Asked, Result<String, String>>,
}

impl Access {
    pub fn new(client: Option<kube::Client>) -> Self {
        Access(client.map(|client| Reviews {
            client,
            tokens: Cache::default(),
            decisions: Cache::default(),
        }))
    }

    /// The caller, as streams it creates record their owner, once it is
    /// found to be allowed `verb` on `resource` (in `namespace`, for a
    /// namespaced grant; none: cluster-wide grants only).
    pub async fn check(
        &self,
        headers: &MetadataMap,
        verb: &'static str,
        resource: &'static str,
        namespace: Option<&str>,
    ) -> Result<String, Status> {
        let Some(Reviews {
            client,
            tokens,
            decisions,
        }) = &self.0
        else {
            return Ok(LOCAL.to_string());
        };
        let token = bearer_token(headers).ok_or_else(|| {
            Status::unauthenticated(format!(
                "the operator's cluster view takes a Kubernetes token of audience {AUDIENCE} as `authorization: \
                 Bearer …`: pass payloadctl --token-file PATH (from `kubectl create token NAME --audience {AUDIENCE}`)"
            ))
        })?;
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        let asked = (hash, verb, resource, namespace.unwrap_or_default().to_string());
        let decided = match decisions.get(&asked, ttl) {
            Some(decided) => decided,
            None => {
                let (user, groups) = who(client, tokens, hash, token).await?;
                let decided = allowed(client, &user, groups, verb, resource, namespace).await?;
                decisions.put(asked, decided.clone(), ttl);
                decided
            }
        };
        decided.map_err(Status::permission_denied)
    }
}

/// The token's user and groups, reviewed once per [`ALLOWED_TTL`].
async fn who(
    client: &kube::Client,
    tokens: &Cache<TokenHash, Who>,
    hash: TokenHash,
    token: &str,
) -> Result<(String, Vec<String>), Status> {
    let who = match tokens.get(&hash, ttl) {
        Some(who) => who,
        None => {
            let who = match token_review(client, token, AUDIENCE).await {
                Ok(user) => Ok((user.username.unwrap_or_default(), user.groups.unwrap_or_default())),
                // The API server unreachable is not the token's fault.
                Err(st) if st.code() == tonic::Code::Unavailable => return Err(st),
                Err(st) => Err((st.code(), st.message().to_string())),
            };
            tokens.put(hash, who.clone(), ttl);
            who
        }
    };
    who.map_err(|(code, message)| Status::new(code, message))
}

/// Whether `user` may: the caller's principal, or the refusal to give.
async fn allowed(
    client: &kube::Client,
    user: &str,
    groups: Vec<String>,
    verb: &'static str,
    resource: &'static str,
    namespace: Option<&str>,
) -> Result<Result<String, String>, Status> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(groups),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(resource.into()),
                verb: Some(verb.into()),
                namespace: namespace.filter(|n| !n.is_empty()).map(str::to_string),
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
    if reviewed.status.is_some_and(|s| s.allowed) {
        return Ok(Ok(format!("k8s:{user}")));
    }
    let role = match verb {
        "get" | "list" => "payload-manager-viewer",
        _ => "payload-manager-editor",
    };
    let place = match namespace.filter(|n| !n.is_empty()) {
        Some(ns) => format!(" in namespace {ns}"),
        None => String::new(),
    };
    Ok(Err(format!(
        "{user} may not {verb} {resource}.{GROUP}{place}: bind the ClusterRole {role} to them (a \
         ClusterRoleBinding, or for streams a RoleBinding in the stream's namespace)"
    )))
}
