//! Periodic housekeeping: expired leases, allocations past their write
//! deadline, payloads past their TTL.

use std::sync::Arc;
use std::time::Duration;

use payload_catalog::lifecycle::{transition, Event};
use payload_catalog::PayloadState;

use super::{lock, Node};

impl Node {
    /// One housekeeping pass.
    pub async fn sweep(&self) {
        self.sweep_leases();
        let now = self.now_ms();
        let mut doomed = Vec::new();
        for entry in self.entries() {
            let mut e = lock(&entry);
            let event = match e.rec.state {
                PayloadState::Allocated if e.rec.write_deadline_ms <= now => Event::Abort,
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
            if let Ok(state) = transition(e.rec.state, event) {
                e.rec.state = state;
                e.gone = true;
                doomed.push(e.rec.clone());
            }
        }
        for rec in doomed {
            tracing::info!(id = %rec.id, state = rec.state.name(), "removing payload");
            if let Err(err) = self.forget(&rec).await {
                tracing::warn!(id = %rec.id, %err, "could not remove an expired payload");
            }
        }
    }

    pub async fn run_sweeper(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => self.sweep().await,
                _ = super::stopped(&mut stop) => return,
            }
        }
    }
}
