//! The v1 gRPC services served by the agent.

pub mod admin;
pub mod catalog;
pub mod convert;
pub mod data;
pub mod stream;

use std::sync::Arc;

use payload_proto::services::payload_admin_service_server::PayloadAdminServiceServer;
use payload_proto::services::payload_catalog_service_server::PayloadCatalogServiceServer;
use payload_proto::services::payload_data_service_server::PayloadDataServiceServer;
use payload_proto::services::payload_stream_service_server::PayloadStreamServiceServer;
use tonic::service::Routes;

use crate::node::Node;

/// All four services, ready to serve on any listener.
/// A request larger than `--max-message-size` is refused before it is decoded.
pub fn routes(node: Arc<Node>) -> Routes {
    let max = usize::try_from(node.config().limits.message_bytes).unwrap_or(usize::MAX);
    Routes::new(PayloadDataServiceServer::new(data::DataService { node: node.clone() }).max_decoding_message_size(max))
        .add_service(
            PayloadCatalogServiceServer::new(catalog::CatalogService { node: node.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            PayloadAdminServiceServer::new(admin::AdminService { node: node.clone() }).max_decoding_message_size(max),
        )
        .add_service(PayloadStreamServiceServer::new(stream::StreamService::new(node)).max_decoding_message_size(max))
}
