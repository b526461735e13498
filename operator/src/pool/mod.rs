//! The `PayloadPool` controller's steps, one file each.

pub mod desired;
