//! A pool's status, from what was applied (its DaemonSet as the API server
//! returned it) or from why nothing could be: pure, so every case is a
//! unit test.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::conditions::{self, reason, DEGRADED, PROGRESSING, READY};
use crate::crd::{PayloadPool, PayloadPoolStatus};

fn previous(pool: &PayloadPool) -> &[Condition] {
    pool.status.as_ref().map_or(&[], |s| &s.conditions[..])
}

/// The status of a pool whose agents' DaemonSet is `ds`.
pub fn applied(pool: &PayloadPool, ds: &DaemonSet, now: &Time) -> PayloadPoolStatus {
    let generation = pool.metadata.generation;
    let old = previous(pool);
    let counts = ds.status.as_ref();
    let desired = counts.map_or(0, |s| s.desired_number_scheduled);
    let ready = counts.map_or(0, |s| s.number_ready);
    let updated = counts.and_then(|s| s.updated_number_scheduled).unwrap_or(0);
    // The DaemonSet controller has not yet seen the spec we applied.
    let unseen = counts.and_then(|s| s.observed_generation) < ds.metadata.generation;
    let (is_ready, why, said) = match (desired, ready) {
        (0, _) => (
            false,
            reason::NO_NODES,
            "no node matches the pool's nodeSelector and tolerations".to_string(),
        ),
        (d, r) if r >= d => (true, reason::AGENTS_READY, format!("{r} of {d} agents ready")),
        (d, r) => (false, reason::AGENTS_NOT_READY, format!("{r} of {d} agents ready")),
    };
    let rolling = unseen || updated < desired;
    let progress = match rolling {
        true => (
            reason::ROLLING_OUT,
            format!("{updated} of {desired} agents run the current spec"),
        ),
        false => (reason::STABLE, "every agent runs the current spec".to_string()),
    };
    PayloadPoolStatus {
        observed_generation: generation,
        conditions: vec![
            conditions::set(old, READY, is_ready, why, said, generation, now),
            conditions::set(old, PROGRESSING, rolling, progress.0, progress.1, generation, now),
            conditions::set(
                old,
                DEGRADED,
                false,
                reason::AS_EXPECTED,
                "the agents' objects are applied".into(),
                generation,
                now,
            ),
        ],
        nodes_desired: desired,
        nodes_ready: ready,
        // Written by the catalog (its own field manager) from heartbeats.
        tiers: Vec::new(),
    }
}

/// The status of a pool that cannot be built: `why` says what to change.
pub fn invalid(pool: &PayloadPool, why: &str, now: &Time) -> PayloadPoolStatus {
    let generation = pool.metadata.generation;
    let old = previous(pool);
    let said = format!("{why}; fix the pool's spec");
    let kept = pool.status.clone().unwrap_or_default();
    PayloadPoolStatus {
        observed_generation: generation,
        conditions: vec![
            conditions::set(old, READY, false, reason::INVALID_SPEC, said.clone(), generation, now),
            conditions::set(
                old,
                PROGRESSING,
                false,
                reason::INVALID_SPEC,
                "nothing is applied until the spec is fixed".into(),
                generation,
                now,
            ),
            conditions::set(old, DEGRADED, true, reason::INVALID_SPEC, said, generation, now),
        ],
        // The agents of the last good spec still run: their counts stay.
        ..kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;
    use k8s_openapi::jiff::Timestamp;

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn pool(generation: i64) -> PayloadPool {
        let mut pool = PayloadPool::new("p", Default::default());
        pool.metadata.generation = Some(generation);
        pool
    }

    fn daemon_set(desired: i32, ready: i32, updated: i32, seen: bool) -> DaemonSet {
        let mut ds = DaemonSet::default();
        ds.metadata.generation = Some(3);
        ds.status = Some(DaemonSetStatus {
            desired_number_scheduled: desired,
            number_ready: ready,
            updated_number_scheduled: Some(updated),
            observed_generation: Some(if seen { 3 } else { 2 }),
            ..Default::default()
        });
        ds
    }

    fn condition<'a>(status: &'a PayloadPoolStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn all_agents_ready_and_current_is_ready_and_stable() {
        let status = applied(&pool(7), &daemon_set(3, 3, 3, true), &time(100));
        assert_eq!(status.observed_generation, Some(7));
        assert_eq!((status.nodes_desired, status.nodes_ready), (3, 3));
        let ready = condition(&status, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", reason::AGENTS_READY)
        );
        assert_eq!(ready.observed_generation, Some(7));
        assert_eq!(condition(&status, PROGRESSING).status, "False");
        assert_eq!(condition(&status, DEGRADED).status, "False");
    }

    #[test]
    fn a_rollout_or_a_missing_agent_shows() {
        let status = applied(&pool(1), &daemon_set(4, 3, 2, true), &time(100));
        let ready = condition(&status, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::AGENTS_NOT_READY)
        );
        assert_eq!(ready.message, "3 of 4 agents ready");
        let progressing = condition(&status, PROGRESSING);
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", reason::ROLLING_OUT)
        );
        // Not yet seen by the DaemonSet controller: still rolling out.
        let unseen = applied(&pool(1), &daemon_set(4, 4, 4, false), &time(100));
        assert_eq!(condition(&unseen, PROGRESSING).status, "True");
        let nowhere = applied(&pool(1), &daemon_set(0, 0, 0, true), &time(100));
        assert_eq!(condition(&nowhere, READY).reason, reason::NO_NODES);
    }

    #[test]
    fn a_transition_time_moves_only_when_the_status_does() {
        let mut p = pool(1);
        p.status = Some(applied(&p, &daemon_set(2, 2, 2, true), &time(100)));
        let same = applied(&p, &daemon_set(3, 3, 3, true), &time(200));
        assert_eq!(condition(&same, READY).last_transition_time, time(100));
        let changed = applied(&p, &daemon_set(3, 2, 3, true), &time(300));
        assert_eq!(condition(&changed, READY).last_transition_time, time(300));
    }

    #[test]
    fn an_invalid_spec_is_degraded_and_keeps_the_counts() {
        let mut p = pool(2);
        p.status = Some(applied(&p, &daemon_set(2, 2, 2, true), &time(100)));
        let status = invalid(&p, "ram.capacity is \"100m\", a fraction of a byte", &time(200));
        let degraded = condition(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", reason::INVALID_SPEC)
        );
        assert!(degraded.message.contains("ram.capacity"), "{}", degraded.message);
        assert_eq!(condition(&status, READY).status, "False");
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!((status.nodes_desired, status.nodes_ready), (2, 2));
    }
}
