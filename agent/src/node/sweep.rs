//! Periodic housekeeping: expired leases, allocations past their write
//! deadline, payloads past their TTL.

use std::sync::Arc;
use std::time::Duration;

use payload_catalog::lifecycle::Event;
use payload_catalog::PayloadState;

use super::{lock, Node};

impl Node {
    /// One housekeeping pass.
    pub async fn sweep(&self) {
        self.sweep_leases();
        let now = self.now_ms();
        self.sweep_visitors(now);
        let mut doomed = Vec::new();
        for entry in self.entries() {
            let mut e = lock(&entry);
            self.drop_idle_copies(&mut e, now);
            let event = match e.rec.state {
                PayloadState::Allocated if e.rec.write_deadline_ms <= now && !e.moving => Event::Abort,
                _ if e.rec.expires_at_ms != 0
                    && e.rec.expires_at_ms <= now
                    && !e.moving
                    && !e.rec.is_pinned(now)
                    && e.live_leases(now) == 0 =>
                {
                    Event::Expire
                }
                _ => continue,
            };
            match self.end(&mut e, event) {
                Ok(()) => doomed.push(e.rec.clone()),
                // Tried again at the next pass.
                Err(err) => tracing::warn!(id = %e.rec.id, %err, "could not remove an expired payload"),
            }
        }
        for rec in doomed {
            tracing::info!(id = %rec.id, state = rec.state.name(), "removed payload");
            self.free_all(&rec);
        }
    }

    pub async fn run_sweeper(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    self.sweep().await;
                    if self.store(payload_catalog::Tier::Ram).is_ok_and(|s| s.keeper_lost()) {
                        let node = self.clone();
                        let rekept = tokio::task::spawn_blocking(move || {
                            node.store(payload_catalog::Tier::Ram).map(|s| s.rekeep())
                        })
                        .await;
                        if !matches!(rekept, Ok(Ok(Ok(())))) {
                            tracing::error!("could not hand the sealed payloads to a new keeper; retrying");
                        }
                    }
                    let node = self.clone();
                    let _ = tokio::task::spawn_blocking(move || node.maybe_compact_journal()).await;
                }
                _ = super::stopped(&mut stop) => return,
            }
        }
    }
}
