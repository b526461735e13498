//! `PayloadPolicy` (namespaced): rules for the payloads of one namespace
//! whose labels match a selector: how durable they are, where they live,
//! how long they last and how much of each tier the namespace may use.
//! Accepted policies are stored in the catalog and applied by every agent.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Tier;

/// Rules for the payloads of this namespace whose labels match a selector.
// Each printcolumn(...) repeats keys such as `type_`; clippy reads them as
// one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "payload-manager.io",
    version = "v1alpha1",
    kind = "PayloadPolicy",
    plural = "payloadpolicies",
    shortname = "ppol",
    category = "payload-manager",
    namespaced,
    status = "PayloadPolicyStatus",
    cel,
    doc = "Rules for the payloads of a namespace whose labels match a selector: durability, placement, lifetime and quotas",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(name = "Durability", type_ = "string", json_path = ".spec.durability"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!(has(self.ttlSeconds) && has(self.evictionPriority) && self.evictionPriority == 'Never')")
    .message("a payload whose evictionPriority is Never never expires: drop ttlSeconds or choose another priority"))]
#[serde(rename_all = "camelCase")]
pub struct PayloadPolicySpec {
    /// Which payloads of the namespace the policy governs, by their labels.
    /// Empty: all of them.
    #[serde(default)]
    pub selector: LabelSelector,
    /// What a commit waits for before it is acknowledged.
    #[serde(default)]
    pub durability: Durability,
    /// The tiers new payloads are placed in, in order of preference, each
    /// at most once; a payload goes to the first with room. Unset: the
    /// agent's default (RAM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4))]
    // The order is the meaning: replaced whole, never merged as a set.
    #[x_kube(merge_strategy = ListMerge::Atomic)]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u == t))")
        .message("tierPreference names each tier at most once"))]
    pub tier_preference: Option<Vec<Tier>>,
    /// The slowest tier a lease may read from: a payload below it (where
    /// it was placed, or spilled) is promoted before the lease is granted.
    /// It need not be in tierPreference: place on DISK, lease from RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lease_tier: Option<Tier>,
    /// Seconds a payload lives after its allocation, at most ten years. Unset:
    /// until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 315_360_000))]
    pub ttl_seconds: Option<u64>,
    /// The longest lease a reader may take, in seconds. Unset: the agent's
    /// --lease-max-ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_lease_seconds: Option<u64>,
    /// Which payloads leave a full tier first. Unset: Normal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_priority: Option<EvictionPriority>,
    /// Store payloads with the same bytes once.
    #[serde(default)]
    pub dedup: bool,
    /// The most bytes the namespace's matching payloads may hold in each
    /// tier of one node; an allocation past it is refused
    /// (RESOURCE_EXHAUSTED naming this policy). Checked at Allocate only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["tier".into()]))]
    pub quotas: Vec<TierQuota>,
}

/// What a commit waits for.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Nothing: the payload is lost with its node's memory.
    #[default]
    Memory,
    /// A copy on the node's disk, synced.
    Disk,
    /// A copy in the object store, which outlives the node.
    Object,
}

// The contract's eviction priorities (undocumented: see `Tier`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionPriority {
    /// Leaves first.
    Low,
    /// The default.
    Normal,
    /// Leaves last.
    High,
    /// Never evicted or expired; only deleted.
    Never,
}

/// A namespace's cap on one tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TierQuota {
    /// The tier.
    pub tier: Tier,
    /// The most bytes (a quantity: 100Gi), a whole number of them.
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && !quantity(string(self)).isLessThan(quantity('0')) && quantity(string(self)).isInteger()")
        .message("a quota must be a whole number of bytes of at least 0, such as 100Gi"))]
    pub bytes: Quantity,
}

/// What the operator last decided about the policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PayloadPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted (with the reason when it is not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
