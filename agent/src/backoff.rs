//! Exponential backoff with jitter, so that many clients retrying against
//! one server that comes back do not retry in step.

use std::time::Duration;

pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// Sleeps for the current delay plus up to half of it, then doubles it.
    pub async fn wait(&mut self) {
        let jitter = uuid::Uuid::new_v4().as_u128() as u64 % (self.next.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(self.next + Duration::from_millis(jitter)).await;
        self.next = (self.next * 2).min(self.max);
    }
}
