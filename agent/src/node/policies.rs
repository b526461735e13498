//! PayloadPolicies, as this node applies them: read from the catalog every
//! [`REFRESH`], matched against a payload's labels at Allocate (quotas,
//! TTL, never-evict) and at lease time (the longest lease).
//!
//! A quota is the bytes the namespace's matching payloads hold in one tier
//! of this node. What they hold is counted by a scan after each refresh
//! (only while some policy has quotas), plus what was allocated since the
//! scan before it began: a delete frees quota at the next count, and an
//! allocation stays counted through the scan that sees it (twice, for a
//! moment), so a quota errs on the side of refusing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use payload_catalog::{Policy, Priority, Tier};

use super::lifecycle::AllocateRequest;
use super::{lock, Node};
use crate::error::AgentError;

/// How often the catalog's policies are read again.
pub const REFRESH: Duration = Duration::from_secs(2);
/// How often an operator that does not know the call is asked again.
const OLDER_OPERATOR: Duration = Duration::from_secs(60);

/// Bytes per tier, indexed by the tier's wire number.
type PerTier = [u64; 6];

#[derive(Default)]
pub(crate) struct Policies {
    /// Whether any policy is in force: the hot paths look no further when not.
    any: AtomicBool,
    set: Mutex<Arc<Vec<Policy>>>,
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    /// The last count, by policy key.
    counted: HashMap<String, PerTier>,
    /// Allocated while that count ran and since it began...
    previous: HashMap<String, PerTier>,
    /// ...and since it ended.
    since: HashMap<String, PerTier>,
}

impl Policies {
    fn current(&self) -> Option<Arc<Vec<Policy>>> {
        self.any.load(Ordering::Acquire).then(|| lock(&self.set).clone())
    }

    /// Replaces the set; says whether it changed.
    fn replace(&self, policies: Vec<Policy>) -> bool {
        let mut set = lock(&self.set);
        if **set == policies {
            return false;
        }
        self.any.store(!policies.is_empty(), Ordering::Release);
        *set = Arc::new(policies);
        true
    }
}

/// Bytes an allocation took from its quotas: given back when dropped
/// unless kept (the allocation failed, or its caller went away).
#[must_use]
pub(crate) struct Charge<'a> {
    book: &'a Mutex<Book>,
    keys: Vec<String>,
    tier: usize,
    bytes: u64,
    kept: bool,
}

impl Charge<'_> {
    /// The payload exists: its bytes stay counted.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if self.kept || self.keys.is_empty() {
            return;
        }
        let book = &mut *lock(self.book);
        for key in &self.keys {
            // Charged to `since`, or to `previous` if a count began since.
            for window in [&mut book.since, &mut book.previous] {
                if let Some(held) = window.get_mut(key).filter(|t| t[self.tier] >= self.bytes) {
                    held[self.tier] -= self.bytes;
                    break;
                }
            }
        }
    }
}

impl Node {
    /// Applies the policies governing a new payload to its request: a
    /// shorter TTL, never-evict, the eviction priority (the highest of
    /// theirs), and every quota on its tier (its bytes
    /// charged against them until the returned [`Charge`] is kept or dropped).
    pub(super) fn apply_policies(&self, req: &mut AllocateRequest) -> Result<Charge<'_>, AgentError> {
        let mut charge = Charge {
            book: &self.policies.book,
            keys: Vec::new(),
            tier: req.tier as usize,
            bytes: req.size_bytes,
            kept: false,
        };
        let Some(set) = self.policies.current() else {
            return Ok(charge);
        };
        let governing: Vec<&Policy> = set
            .iter()
            .filter(|p| p.governs(|k| req.labels.get(k).map(String::as_str)))
            .collect();
        if governing.is_empty() {
            return Ok(charge);
        }
        if let Some(ttl) = governing.iter().filter_map(|p| p.ttl_ms).min() {
            req.ttl_ms = if req.ttl_ms == 0 { ttl } else { req.ttl_ms.min(ttl) };
        }
        req.no_evict |= governing.iter().any(|p| p.never_evict);
        // A caller's Never (pinned for good) stands.
        if let Some(priority) = governing.iter().filter_map(|p| p.priority).max() {
            if req.priority != Priority::Never && !req.no_evict {
                req.priority = priority;
            }
        }
        let tier = req.tier as usize;
        let mut book = lock(&self.policies.book);
        let quotas: Vec<(&Policy, u64)> = governing
            .iter()
            .filter_map(|p| p.quota(req.tier).map(|q| (*p, q)))
            .collect();
        for (policy, quota) in &quotas {
            let key = policy.key();
            let held = [&book.counted, &book.previous, &book.since]
                .iter()
                .map(|m| m.get(&key).map_or(0, |t| t[tier]))
                .sum::<u64>();
            let shown = req.tier.name().to_uppercase();
            if *quota == 0 {
                return Err(AgentError::ResourceExhausted(format!(
                    "PayloadPolicy {key} forbids namespace {}'s payloads it governs on the {shown} tier; \
                     allocate on another tier",
                    policy.namespace
                )));
            }
            if held.saturating_add(req.size_bytes) > *quota {
                return Err(AgentError::ResourceExhausted(format!(
                    "PayloadPolicy {key} allows namespace {}'s payloads it governs {quota} bytes on the {shown} tier of node {}; \
                     they hold {held}, so {} more do not fit: delete some, or raise the policy's quota",
                    policy.namespace,
                    self.cfg.node_name,
                    req.size_bytes
                )));
            }
        }
        for (policy, _) in quotas {
            let key = policy.key();
            book.since.entry(key.clone()).or_default()[tier] += req.size_bytes;
            charge.keys.push(key);
        }
        Ok(charge)
    }

    /// The longest lease the policies governing a payload with these
    /// labels allow, if any limits it.
    pub(super) fn policy_lease_cap(&self, labels: &std::collections::BTreeMap<String, String>) -> Option<u64> {
        let set = self.policies.current()?;
        set.iter()
            .filter(|p| p.governs(|k| labels.get(k).map(String::as_str)))
            .filter_map(|p| p.max_lease_ms)
            .min()
    }

    /// The tier a lease on a payload with these labels must read from:
    /// `asked`, or the faster minLeaseTier of the policies governing it.
    /// Not for another node's payload (`visitor`), which this node reads
    /// from its object cache and cannot promote, nor a tier this node does
    /// not have. Called under the payload's lock: takes no other lock that
    /// is ever held while taking one.
    pub(super) fn lease_floor(
        &self,
        visitor: bool,
        asked: Option<Tier>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Option<Tier> {
        if visitor {
            return asked;
        }
        let Some(set) = self.policies.current() else {
            return asked;
        };
        let floor = set
            .iter()
            .filter(|p| p.governs(|k| labels.get(k).map(String::as_str)))
            .filter_map(|p| p.min_lease_tier)
            .min_by_key(|t| *t as i32);
        match floor {
            Some(floor) if asked.is_none_or(|a| floor.faster_than(a)) && self.tier(floor).is_ok() => Some(floor),
            _ => asked,
        }
    }

    /// Reads the catalog's policies now; says whether the catalog is an
    /// operator of an earlier release, which has none to give.
    async fn refresh_policies(&self) -> Result<bool, AgentError> {
        let (policies, older) = match self.repo.policies().await {
            Ok(policies) => (policies, false),
            Err(e) if payload_catalog::remote::is_unknown_call(&e) => (Vec::new(), true),
            Err(e) => return Err(e.into()),
        };
        if self.policies.replace(policies) {
            let set = lock(&self.policies.set).clone();
            let names: Vec<String> = set.iter().map(Policy::key).collect();
            tracing::info!(policies = ?names, "applying PayloadPolicies");
        }
        Ok(older)
    }

    fn count_quota_use(&self) {
        let set = lock(&self.policies.set).clone();
        let with_quotas: Vec<&Policy> = set.iter().filter(|p| !p.quotas.is_empty()).collect();
        {
            let book = &mut *lock(&self.policies.book);
            book.previous = std::mem::take(&mut book.since);
        }
        let mut counted: HashMap<String, PerTier> = HashMap::new();
        if !with_quotas.is_empty() {
            self.payloads.for_each(|_, entry| {
                let e = lock(entry);
                if e.gone {
                    return;
                }
                for p in &with_quotas {
                    if p.governs(|k| e.rec.labels.get(k).map(String::as_str)) {
                        counted.entry(p.key()).or_default()[e.rec.tier as usize] += e.rec.size_bytes;
                    }
                }
            });
        }
        lock(&self.policies.book).counted = counted;
    }

    /// Keeps the policies current until the node stops; a catalog that
    /// cannot be read leaves the last ones in force.
    pub async fn run_policies(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut failing = false;
        // An older operator is asked again only now and then, not every
        // tick with a call it refuses.
        let mut next_read = tokio::time::Instant::now();
        loop {
            let due = tokio::time::Instant::now() >= next_read;
            match if due { self.refresh_policies().await } else { Ok(false) } {
                Ok(true) => next_read = tokio::time::Instant::now() + OLDER_OPERATOR,
                Ok(false) => failing = false,
                Err(err) if !failing => {
                    failing = true;
                    tracing::warn!(%err, "could not read PayloadPolicies; the last ones read stay in force");
                }
                Err(_) => {}
            }
            // Whether or not the catalog answered: deletes give quota back.
            let node = self.clone();
            let _ = tokio::task::spawn_blocking(move || node.count_quota_use()).await;
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = super::stopped(&mut stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str) -> Policy {
        Policy {
            namespace: "ns".into(),
            name: name.into(),
            generation: 1,
            selector: Default::default(),
            ttl_ms: None,
            max_lease_ms: None,
            never_evict: false,
            priority: None,
            min_lease_tier: None,
            quotas: vec![],
        }
    }

    #[test]
    fn replacing_says_whether_anything_changed_and_empty_turns_the_fast_path_on() {
        let p = Policies::default();
        assert!(p.current().is_none());
        assert!(p.replace(vec![policy("a")]));
        assert!(!p.replace(vec![policy("a")]));
        assert_eq!(p.current().unwrap().len(), 1);
        assert!(p.replace(vec![]));
        assert!(p.current().is_none());
    }
}
