//! The Kubernetes side of Payload Manager: the `PayloadPool` and
//! `PayloadPolicy` resources, what a pool becomes on the cluster, and the
//! cluster catalog the pools' agents report to.

pub mod catalog;
pub mod conditions;
pub mod crd;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod quantity;

/// A mutex's guard, even if a panicking holder poisoned it: what it guards
/// here (caches, the node list) stays consistent at every step.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
