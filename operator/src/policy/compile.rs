//! A `PayloadPolicy` as agents apply it: what the schema and its CEL rules
//! cannot check is checked here, and the spec becomes the catalog's
//! [`Policy`] (pure, so every case is a unit test).

use std::collections::HashSet;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use payload_catalog::policy::{Expression, Operator, Selector};
use payload_catalog::{Policy, Priority, Tier};

use crate::crd::{EvictionPriority, PayloadPolicySpec};

/// The policy `namespace/name` of `generation`, or why it cannot be applied.
pub fn compile(namespace: &str, name: &str, generation: i64, spec: &PayloadPolicySpec) -> Result<Policy, String> {
    let mut quotas = Vec::new();
    let mut seen = HashSet::new();
    for quota in &spec.quotas {
        let tier = tier(quota.tier);
        let shown = tier.name().to_uppercase();
        if !seen.insert(tier) {
            return Err(format!("quotas name the {shown} tier twice; give each tier one quota"));
        }
        let field = format!("quotas[tier={shown}].bytes");
        quotas.push((tier, quota_bytes(&field, &quota.bytes)?));
    }
    // The schema's bounds and CEL rule, again: `payload-operator policy
    // apply` reaches here without an API server.
    if spec.ttl_seconds.is_some_and(|s| !(1..=315_360_000).contains(&s)) {
        return Err("ttlSeconds must be 1 to 315360000 (ten years)".into());
    }
    if spec.max_lease_seconds.is_some_and(|s| !(1..=86_400).contains(&s)) {
        return Err("maxLeaseSeconds must be 1 to 86400".into());
    }
    if spec.ttl_seconds.is_some() && spec.eviction_priority == Some(EvictionPriority::Never) {
        return Err(
            "a payload whose evictionPriority is Never never expires: drop ttlSeconds or choose another priority"
                .into(),
        );
    }
    Ok(Policy {
        namespace: namespace.into(),
        name: name.into(),
        generation,
        selector: selector(spec)?,
        ttl_ms: spec.ttl_seconds.map(|s| s.saturating_mul(1000)),
        max_lease_ms: spec.max_lease_seconds.map(|s| s.saturating_mul(1000)),
        never_evict: spec.eviction_priority == Some(EvictionPriority::Never),
        priority: match spec.eviction_priority {
            Some(EvictionPriority::Low) => Some(Priority::Low),
            Some(EvictionPriority::High) => Some(Priority::High),
            Some(EvictionPriority::Normal) => Some(Priority::Normal),
            Some(EvictionPriority::Never) | None => None,
        },
        min_lease_tier: spec.min_lease_tier.map(tier),
        quotas,
    })
}

/// The settings of `spec` agents do not apply yet (they are stored and
/// shown, so a user is not misled into relying on them).
pub fn not_applied(spec: &PayloadPolicySpec) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if spec.durability != Default::default() {
        fields.push("durability");
    }
    if spec.tier_preference.is_some() {
        fields.push("tierPreference");
    }
    if spec.dedup {
        fields.push("dedup");
    }
    fields
}

/// A quota's bytes: unlike a capacity, 0 (nothing on that tier) is one.
fn quota_bytes(field: &str, q: &Quantity) -> Result<u64, String> {
    const SUFFIXES: [&str; 13] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E"];
    let text = q.0.trim();
    let rest = text.trim_start_matches('0');
    if rest.len() < text.len() && SUFFIXES.contains(&rest) {
        return Ok(0);
    }
    crate::quantity::bytes(field, q)
}

fn tier(tier: crate::crd::Tier) -> Tier {
    match tier {
        crate::crd::Tier::Gpu => Tier::Gpu,
        crate::crd::Tier::Ram => Tier::Ram,
        crate::crd::Tier::Disk => Tier::Disk,
        crate::crd::Tier::Object => Tier::Object,
    }
}

fn selector(spec: &PayloadPolicySpec) -> Result<Selector, String> {
    let labels = spec
        .selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let expressions = spec
        .selector
        .match_expressions
        .iter()
        .flatten()
        .map(|e| {
            let op = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(format!(
                        "selector expression on {:?} has operator {other:?}; use In, NotIn, Exists or DoesNotExist",
                        e.key
                    ))
                }
            };
            let values = e.values.clone().unwrap_or_default();
            let wants_values = matches!(op, Operator::In | Operator::NotIn);
            if wants_values == values.is_empty() {
                return Err(format!(
                    "selector expression on {:?} with {}: {}",
                    e.key,
                    e.operator,
                    if wants_values {
                        "give at least one value"
                    } else {
                        "give no values"
                    }
                ));
            }
            Ok(Expression {
                key: e.key.clone(),
                op,
                values,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Selector { labels, expressions })
}
