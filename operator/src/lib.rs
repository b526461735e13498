//! The Kubernetes side of Payload Manager: the `PayloadPool` and
//! `PayloadPolicy` resources, and what a pool becomes on the cluster.

pub mod conditions;
pub mod crd;
pub mod pool;
pub mod quantity;
