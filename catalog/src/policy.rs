//! Policies as the catalog stores them and agents apply them: a
//! `PayloadPolicy` the operator accepted, compiled into what an agent needs
//! at Allocate and at lease time (no Kubernetes types here).
//!
//! A payload belongs to a namespace through its label [`NAMESPACE_LABEL`];
//! a policy governs the payloads of its namespace whose labels match its
//! selector. Where several match, each one's quotas hold and the strictest
//! of their other settings wins.

use serde::{Deserialize, Serialize};

use crate::model::{Priority, Tier};

/// The label naming a payload's Kubernetes namespace. In-pod clients set it
/// (from the downward API); payloads without it are in no namespace and no
/// policy governs them.
pub const NAMESPACE_LABEL: &str = "payload-manager.io/namespace";

/// One accepted policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// The Kubernetes generation it was compiled from, for status and logs.
    pub generation: i64,
    pub selector: Selector,
    /// Lifetime after allocation; a shorter TTL asked for at Allocate stays.
    pub ttl_ms: Option<u64>,
    /// The longest lease a reader gets.
    pub max_lease_ms: Option<u64>,
    /// Never evicted or expired (eviction priority Never).
    pub never_evict: bool,
    /// Which payloads leave a full tier first (Low or High), in place of
    /// the priority asked for at Allocate. Absent from policies stored by
    /// an earlier release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// The slowest tier a lease reads from: a payload below it is promoted
    /// before the lease is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lease_tier: Option<Tier>,
    /// Bytes the namespace's matching payloads may hold on each tier of a node.
    pub quotas: Vec<(Tier, u64)>,
}

impl Policy {
    /// `namespace/name`, how messages name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy governs a payload with these labels.
    pub fn governs<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>) -> bool {
        labels(NAMESPACE_LABEL) == Some(self.namespace.as_str()) && self.selector.matches(labels)
    }

    pub fn quota(&self, tier: Tier) -> Option<u64> {
        self.quotas.iter().find(|(t, _)| *t == tier).map(|(_, bytes)| *bytes)
    }
}

/// A Kubernetes label selector: every `labels` pair and every expression
/// must hold (empty: every payload).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    pub labels: Vec<(String, String)>,
    pub expressions: Vec<Expression>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expression {
    pub key: String,
    pub op: Operator,
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn matches<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.labels.iter().all(|(k, v)| labels(k) == Some(v.as_str()))
            && self.expressions.iter().all(|e| {
                let value = labels(&e.key);
                match e.op {
                    Operator::In => value.is_some_and(|v| e.values.iter().any(|w| w == v)),
                    Operator::NotIn => value.is_none_or(|v| e.values.iter().all(|w| w != v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn policy(selector: Selector) -> Policy {
        Policy {
            namespace: "team-a".into(),
            name: "p".into(),
            generation: 1,
            selector,
            ttl_ms: None,
            max_lease_ms: None,
            never_evict: false,
            priority: None,
            min_lease_tier: None,
            quotas: vec![(Tier::Ram, 10)],
        }
    }

    #[test]
    fn a_policy_governs_matching_payloads_of_its_namespace_only() {
        let p = policy(Selector {
            labels: vec![("app".into(), "llm".into())],
            expressions: vec![
                Expression {
                    key: "stage".into(),
                    op: Operator::In,
                    values: vec!["train".into(), "eval".into()],
                },
                Expression {
                    key: "tmp".into(),
                    op: Operator::DoesNotExist,
                    values: vec![],
                },
            ],
        });
        let ok = labels(&[(NAMESPACE_LABEL, "team-a"), ("app", "llm"), ("stage", "eval")]);
        assert!(p.governs(|k| ok.get(k).map(String::as_str)));
        for bad in [
            labels(&[(NAMESPACE_LABEL, "team-b"), ("app", "llm"), ("stage", "eval")]),
            labels(&[("app", "llm"), ("stage", "eval")]),
            labels(&[(NAMESPACE_LABEL, "team-a"), ("app", "llm"), ("stage", "prod")]),
            labels(&[
                (NAMESPACE_LABEL, "team-a"),
                ("app", "llm"),
                ("stage", "eval"),
                ("tmp", "1"),
            ]),
        ] {
            assert!(!p.governs(|k| bad.get(k).map(String::as_str)), "{bad:?}");
        }
        assert_eq!(p.quota(Tier::Ram), Some(10));
        assert_eq!(p.quota(Tier::Disk), None);
    }

    #[test]
    fn not_in_and_exists_read_a_missing_label_as_kubernetes_does() {
        let not_in = Selector {
            labels: vec![],
            expressions: vec![Expression {
                key: "k".into(),
                op: Operator::NotIn,
                values: vec!["x".into()],
            }],
        };
        assert!(not_in.matches(|_| None));
        assert!(!not_in.matches(|_| Some("x")));
        let exists = Selector {
            labels: vec![],
            expressions: vec![Expression {
                key: "k".into(),
                op: Operator::Exists,
                values: vec![],
            }],
        };
        assert!(!exists.matches(|_| None));
        assert!(Selector::default().matches(|_| None));
    }
}
