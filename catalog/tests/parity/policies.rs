//! Policies: stored by the operator, read whole by every agent.

use payload_catalog::policy::{Expression, Operator, Selector};
use payload_catalog::*;

use super::Backend;

fn policy(namespace: &str, name: &str, quota: u64) -> Policy {
    Policy {
        namespace: namespace.into(),
        name: name.into(),
        generation: 3,
        selector: Selector {
            labels: vec![("app".into(), "llm".into())],
            expressions: vec![Expression {
                key: "stage".into(),
                op: Operator::NotIn,
                values: vec!["prod".into()],
            }],
        },
        ttl_ms: Some(60_000),
        max_lease_ms: None,
        never_evict: false,
        priority: Some(Priority::High),
        min_lease_tier: Some(Tier::Ram),
        quotas: vec![(Tier::Ram, quota), (Tier::Disk, 0)],
    }
}

async fn policies_are_replaced_by_name_and_listed_in_order(backend: Backend) {
    assert_eq!(backend.repo.policies().await.unwrap(), vec![]);
    backend.put_policy(&policy("team-b", "cap", 1)).await;
    backend.put_policy(&policy("team-a", "cap", 2)).await;
    backend.put_policy(&policy("team-a", "cap", 5)).await;
    let stored = backend.repo.policies().await.unwrap();
    assert_eq!(stored, vec![policy("team-a", "cap", 5), policy("team-b", "cap", 1)]);
    // Another node's repository sees the same set.
    let other = backend.open("node-2").await;
    assert_eq!(other.policies().await.unwrap(), stored);

    backend.delete_policy("team-a", "cap").await;
    backend.delete_policy("team-a", "never-was").await;
    assert_eq!(backend.repo.policies().await.unwrap(), vec![policy("team-b", "cap", 1)]);
}

super::parity!(policies_are_replaced_by_name_and_listed_in_order);
