//! Leader election on a `coordination.k8s.io` Lease: only the holder runs
//! the controllers, so two operators (a rolling update's old and new pod)
//! never both write a pool's objects. The holder renews every third of the
//! lease's duration; one that cannot renew before the lease would lapse
//! stops (the process exits and Kubernetes starts it again as a follower),
//! since another may have taken it by then. Every write carries the
//! resourceVersion read, so two candidates cannot both take a free lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

/// How long a lease holds without renewal.
pub const DURATION: Duration = Duration::from_secs(15);

/// What a candidate does about the lease as it stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it, held.
    Create,
    /// Free, lapsed or ours: write it as held by us now (with the
    /// resourceVersion read); `transition` when it changes hands.
    Take { transition: bool },
    /// Another holds it until then.
    Wait(Duration),
}

/// The decision for `me` at `now` given the lease read (pure).
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return match lease {
            None => Decision::Create,
            Some(_) => Decision::Take { transition: true },
        };
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Decision::Take { transition: false };
    }
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    let until = renewed.map(|t| t.as_second().saturating_add(seconds));
    match until {
        Some(until) if !holder.is_empty() && until > now.as_second() => {
            Decision::Wait(Duration::from_secs((until - now.as_second()) as u64))
        }
        _ => Decision::Take { transition: true },
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
}

impl Elector {
    /// Candidate `me` for the lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, me: &str) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            me: me.into(),
        }
    }

    /// One attempt: true when we hold the lease afterwards, else how long
    /// to wait before the next.
    pub async fn try_hold(&self) -> Result<Result<(), Duration>, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let now = Timestamp::now();
        let held = |previous: Option<&LeaseSpec>, transition: bool| LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(DURATION.as_secs() as i32),
            acquire_time: match (transition, previous) {
                (false, Some(p)) => p.acquire_time.clone(),
                _ => Some(MicroTime(now)),
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(transition && previous.is_some()),
            ),
            ..Default::default()
        };
        let written = match decide(lease.as_ref(), &self.me, now) {
            Decision::Wait(for_) => return Ok(Err(for_.min(DURATION))),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(held(None, true)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Decision::Take { transition } => {
                let mut lease = lease.expect("only an existing lease is taken");
                lease.spec = Some(held(lease.spec.as_ref(), transition));
                // Carries the resourceVersion read: a write lost to another
                // candidate is a 409.
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok(Ok(())),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Err(Duration::from_secs(1))),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&self) {
        let mut logged = false;
        loop {
            let wait = match self.try_hold().await {
                Ok(Ok(())) => return,
                Ok(Err(wait)) => {
                    if !logged {
                        tracing::info!(lease = %self.name, "another operator leads; waiting for its lease");
                        logged = true;
                    }
                    wait
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "could not read or write the leader lease");
                    Duration::from_secs(2)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Renews the held lease until a renewal fails for as long as the
    /// lease lasts, or another took it; then returns why.
    pub async fn keep(&self) -> String {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(DURATION / 3).await;
            match self.try_hold().await {
                Ok(Ok(())) => last = tokio::time::Instant::now(),
                Ok(Err(_)) => return format!("lease {} was taken by another operator", self.name),
                Err(e) if last.elapsed() >= DURATION - DURATION / 3 => {
                    return format!("could not renew lease {} before it lapsed: {e}", self.name)
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "renewing the leader lease failed; retrying"),
            }
        }
    }
}
