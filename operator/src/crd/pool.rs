//! `PayloadPool` (cluster-scoped): which nodes run an agent, what each tier
//! there may hold, and how the agents are run. The operator turns a pool
//! into the agent DaemonSet and its ConfigMap, ServiceAccount and RBAC.
//!
//! What the schema cannot say is said in CEL rules (`x-kubernetes-
//! validations`), so the API server refuses a bad pool at `kubectl apply`;
//! the controller checks the rest and reports it in the pool's status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// True unless the agent's own limit for the RAM tier's resource is set
/// below `ram.capacity`.
const AGENT_LIMIT_HOLDS_RAM: &str = "!has(self.agent.resources) || !has(self.agent.resources.limits) \
    || !isQuantity(string(self.ram.capacity)) \
    || (self.ram.hugePages \
        ? !('hugepages-2Mi' in self.agent.resources.limits) \
          || !quantity(string(self.agent.resources.limits['hugepages-2Mi'])).isLessThan(quantity(string(self.ram.capacity))) \
        : !('memory' in self.agent.resources.limits) \
          || !quantity(string(self.agent.resources.limits.memory)).isLessThan(quantity(string(self.ram.capacity))))";

/// A set of nodes whose agents keep payloads in RAM, on disk, on GPUs and
/// in an object store.
// Each printcolumn(...) repeats keys such as `type_`; clippy reads them as
// one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "payload-manager.io",
    version = "v1alpha1",
    kind = "PayloadPool",
    plural = "payloadpools",
    shortname = "ppool",
    category = "payload-manager",
    status = "PayloadPoolStatus",
    cel,
    validation = Rule::new("size(self.metadata.name) <= 49")
        .message("a pool's name is at most 49 characters: its agents' objects are named payload-agent-<pool>, within Kubernetes' 63"),
    doc = "A set of nodes whose agents keep immutable payloads in RAM, on disk, on GPUs and in an object store; they report to the operator's catalog, one per cluster",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodesReady",
        description = "nodes whose agent is ready"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.nodesDesired",
        description = "nodes selected"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
// Unset, the disk tier is in the state directory: adding one later moves it too.
#[x_kube(validation = Rule::new("has(oldSelf.disk) == has(self.disk) && (!has(self.disk) || self.disk.path == oldSelf.disk.path)")
    .message("disk cannot be added, removed or moved to another path after the pool is created: the payloads stored in the old place would be lost; make a new pool instead"))]
// With huge pages the RAM tier is charged to hugepages-2Mi, not memory.
#[x_kube(validation = Rule::new(AGENT_LIMIT_HOLDS_RAM)
    .message("agent.resources.limits must hold ram.capacity (memory, or hugepages-2Mi with ram.hugePages): the agent is charged for the pages it reserves"))]
#[serde(rename_all = "camelCase")]
pub struct PayloadPoolSpec {
    /// Labels a node must have to run an agent of this pool (as a Pod's
    /// nodeSelector). Empty: every node the tolerations allow.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the agents tolerate, as in a Pod's tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The RAM tier: shared memory the agent owns and pods map.
    #[serde(default)]
    pub ram: RamTier,
    /// The disk tier: a host directory that survives agent restarts and
    /// upgrades. Unset: 10Gi in the agent's state directory on the host
    /// (/var/lib/payload-manager/POOL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskTier>,
    /// The GPU tier: device memory shared by CUDA IPC. Unset: no GPU tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuTier>,
    /// The object tier: an S3-compatible bucket. Unset: no object tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectTier>,
    /// When the agents spill payloads to a slower tier.
    #[serde(default)]
    pub watermarks: Watermarks,
    /// How the agent pods are run.
    #[serde(default)]
    pub agent: AgentSpec,
}

/// The RAM tier of every agent in the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(cel)]
#[serde(rename_all = "camelCase")]
pub struct RamTier {
    /// Bytes of RAM each agent may hold (a quantity: 8Gi, 512Mi). The
    /// agent reserves the pages it hands out, and its memory limit is sized
    /// from this.
    #[serde(default = "one_gibibyte")]
    #[x_kube(validation = super::positive_quantity("ram.capacity", "8Gi"))]
    pub capacity: Quantity,
    /// Back the RAM root with huge pages where the host's tmpfs has them.
    #[serde(default)]
    pub huge_pages: bool,
}

// Defaults on the leaves, not the object: a server-side apply that sets
// only `hugePages` still gets a capacity.
impl Default for RamTier {
    fn default() -> Self {
        RamTier {
            capacity: one_gibibyte(),
            huge_pages: false,
        }
    }
}

fn one_gibibyte() -> Quantity {
    Quantity("1Gi".into())
}

/// The disk tier of every agent in the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiskTier {
    /// The host directory that holds the disk tier (mounted into the agent
    /// as a hostPath). Once set it cannot change or go: the payloads
    /// stored there would be left behind.
    #[schemars(regex(pattern = r"^(/[^/]+)+$"), length(min = 2, max = 4096))]
    #[x_kube(validation = Rule::new("!self.matches('/[.][.]?(/|$)')")
        .message("disk.path must not contain . or .. components: give the directory's own absolute path"))]
    pub path: String,
    /// Bytes of disk each agent may use (a quantity: 500Gi).
    #[x_kube(validation = super::positive_quantity("disk.capacity", "500Gi"))]
    pub capacity: Quantity,
}

/// The GPU tier of every agent in the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!(has(self.fraction) && has(self.capacity))")
    .message("set gpu.fraction or gpu.capacity, not both"))]
#[serde(rename_all = "camelCase")]
pub struct GpuTier {
    /// The devices the pool may use, by CUDA ordinal ("0") or UUID
    /// ("GPU-…"). Empty: every device on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub devices: Vec<String>,
    /// The share of each device's memory the pool may use, from 0.01 to 1.
    /// Unset (and no capacity): 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub fraction: Option<f64>,
    /// Bytes of each device the pool may use (a quantity: 40Gi), instead
    /// of a fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = super::positive_quantity("gpu.capacity", "40Gi"))]
    pub capacity: Option<Quantity>,
}

/// The object tier: where payloads go to outlive their nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectTier {
    /// The bucket and key prefix: s3://BUCKET/PREFIX.
    #[schemars(regex(pattern = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"))]
    pub url: String,
    /// The endpoint of an S3-compatible store (MinIO, Ceph). Unset: AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && (url(self).getScheme() == 'https' || url(self).getScheme() == 'http')")
        .message("objectStore.endpoint must be an http or https URL"))]
    pub endpoint: Option<String>,
    /// The bucket's region. Unset: from the endpoint, or us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A Secret in the operator's namespace holding AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY. Unset: the node's own credentials (an
    /// instance role, a workload identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Fractions of a tier's capacity: above `high` the agent spills to the
/// next slower tier until use is back under `low`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.low < self.high").message("watermarks.low must be below watermarks.high"))]
#[serde(rename_all = "camelCase")]
pub struct Watermarks {
    /// Start spilling above this share of capacity (0 to 1). Unset: 0.9.
    #[serde(default = "high")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub high: f64,
    /// Stop spilling once under this share of capacity (0 to 1). Unset: 0.75.
    #[serde(default = "low")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub low: f64,
}

impl Default for Watermarks {
    fn default() -> Self {
        Watermarks {
            high: high(),
            low: low(),
        }
    }
}

fn high() -> f64 {
    0.9
}

fn low() -> f64 {
    0.75
}

/// How the agent pods run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// The agent's container image. Unset: the image the operator was
    /// installed with (its --agent-image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The agent container's resources. Unset: sized from the pool (memory
    /// at least the RAM capacity, requests equal to limits, so the agent
    /// runs with Guaranteed QoS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The agents' PriorityClass. Unset: system-node-critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Which pods may read a payload, by the user that stored it (each
    /// caller is known by its uid and gid on the agent's socket). Changing
    /// a payload is always its owner's (or root's, the agent's user).
    #[serde(default)]
    pub read_access: ReadAccess,
}

/// Who reads a payload; the agent's socket is opened to the same callers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadAccess {
    /// Pods running as the payload's uid, and root; the socket is the
    /// agent's (root's) alone, so only pods running as root reach it.
    #[default]
    Owner,
    /// Pods whose gid is the payload's; the socket opens to the agent's
    /// group (0: give pods the supplemental group 0).
    Group,
    /// Every pod on the node: use this when pods run as different,
    /// non-root users.
    Node,
}

impl ReadAccess {
    /// The agent's --read-access value.
    pub fn flag(self) -> &'static str {
        match self {
            ReadAccess::Owner => "owner",
            ReadAccess::Group => "group",
            ReadAccess::Node => "node",
        }
    }
}

/// What the operator last saw of the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PayloadPoolStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded, each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Nodes the pool selects.
    #[serde(default)]
    pub nodes_desired: i32,
    /// Nodes whose agent is running and sending heartbeats.
    #[serde(default)]
    pub nodes_ready: i32,
    /// Capacity and use of each tier, summed over the agents' heartbeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["tier".into()]))]
    pub tiers: Vec<TierUsage>,
}

/// One tier's capacity and use across the pool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TierUsage {
    /// The tier.
    pub tier: super::Tier,
    /// Bytes the agents may hold in this tier.
    pub capacity_bytes: i64,
    /// Bytes they hold now.
    pub used_bytes: i64,
}
