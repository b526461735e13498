//! The Kubernetes side of Payload Manager: the `PayloadPool` and
//! `PayloadPolicy` resources.

pub mod crd;
