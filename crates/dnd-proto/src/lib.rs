//! dnd-proto: the gRPC contract between the coordinator, its workers and its clients
//! (`proto/dnd.proto`), and the transport settings every dnd server and client shares:
//! bearer-token auth, TLS and message limits; and the conversions between the messages and
//! dnd's domain types ([`convert`]).

pub mod auth;
pub mod convert;
pub mod transport;

/// Generated from `proto/dnd.proto`.
pub mod v1 {
    tonic::include_proto!("dnd.v1");
}

pub use auth::{BearerToken, TokenError};
pub use convert::{InvalidMessage, LeasedTask};
pub use transport::{ClientConfig, ServerConfig, TransportError};

/// The protocol version this build speaks; every request carries it.
pub const PROTOCOL_VERSION: u32 = v1::ProtocolVersion::Current as u32;

/// Refuses a request from a peer speaking another protocol version.
#[allow(clippy::result_large_err)]
pub fn check_version(version: u32) -> Result<(), tonic::Status> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(tonic::Status::failed_precondition(format!(
            "protocol version {version} is not supported by this server (it speaks {PROTOCOL_VERSION}); run the same dnd version on the coordinator, workers and clients"
        )))
    }
}
