//! The Payload Manager node agent: RAM and disk tiers, leases and their
//! journal, spill and promotion, and the v1 gRPC services over a Unix socket
//! and TCP. `payload-agent standalone` runs it with an embedded SQLite catalog.

pub mod appender;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod control;
pub mod deadline;
pub mod durable;
pub mod error;
pub mod failpoint;
pub mod grpc;
pub mod identity;
pub mod ids;
pub mod journal;
pub mod keeper;
pub mod limits;
pub mod memfd;
pub mod metrics;
pub mod native;
pub mod node;
pub mod object;
pub mod server;
pub mod smallmaps;
pub mod state;
pub mod store;
pub mod tiers;
pub mod token;
pub mod writer;
