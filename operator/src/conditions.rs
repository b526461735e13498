//! Status conditions: their types and reasons (stable strings: alerts and
//! scripts match on them), and how a new condition replaces an old one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// A policy's one condition: whether agents apply it.
pub const ACCEPTED: &str = "Accepted";

pub mod reason {
    pub const AGENTS_READY: &str = "AgentsReady";
    pub const AGENTS_NOT_READY: &str = "AgentsNotReady";
    pub const NO_NODES: &str = "NoNodes";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const STABLE: &str = "Stable";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const VALID: &str = "Valid";
}

/// A condition of `generation`, keeping the previous transition time when
/// its status has not changed (so "since when" stays true).
pub fn set(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}
