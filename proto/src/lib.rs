//! The public `payload.manager.*.v1` gRPC contract, compiled from the `.proto`
//! files beside this crate. Field numbers and names follow the reference
//! implementation exactly; our additions use new numbers only.

#![allow(clippy::all, missing_docs)]

// The comments come from the .proto files, written for protobuf, not rustdoc.
#[allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links, rustdoc::bare_urls)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/payload_v1.rs"));
}

pub use generated::payload::cluster;
pub use generated::payload::manager::admin::v1 as admin;
pub use generated::payload::manager::catalog::v1 as catalog;
pub use generated::payload::manager::core::v1 as core;
pub use generated::payload::manager::runtime::v1 as runtime;
pub use generated::payload::manager::services::v1 as services;

#[cfg(feature = "catalog")]
pub mod domain;
pub mod native;

/// The TCP port the reference implementation listens on; clients expect it.
pub const DEFAULT_TCP_PORT: u16 = 50051;
