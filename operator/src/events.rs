//! Kubernetes Events, one when a condition changes (its status or reason),
//! with the condition's reason as the Event's: `kubectl describe` shows
//! the history the status alone cannot. A failed publish is logged and
//! never fails the reconcile.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// The Events of one controller (`None` in tests that leave them out).
pub type Events = Option<Recorder>;

/// A recorder reporting as `controller` from this pod.
pub fn recorder(client: kube::Client, controller: &str) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: controller.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}

/// Publishes an Event for each condition of `now` whose status or reason
/// differs from `before`; `bad` says which (type, status) pairs warn.
pub async fn changed(
    events: &Events,
    object: &ObjectReference,
    before: &[Condition],
    now: &[Condition],
    bad: impl Fn(&str, &str) -> bool,
) {
    let Some(recorder) = events else { return };
    for c in now {
        let same = before
            .iter()
            .any(|b| b.type_ == c.type_ && b.status == c.status && b.reason == c.reason);
        if same {
            continue;
        }
        let event = Event {
            type_: if bad(&c.type_, &c.status) {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: c.reason.clone(),
            note: Some(format!("{} is {}: {}", c.type_, c.status, c.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, object).await {
            tracing::warn!(error = %e, reason = %c.reason, "could not publish an Event");
        }
    }
}
