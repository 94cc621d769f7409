//! The gRPC API `bazaar.v1`, generated from `proto/bazaar/v1/bazaar.proto`.
//!
//! Only this crate touches prost's generated types' definitions; the node
//! translates them to and from its service layer in `node/src/grpc.rs`.
//! [`FILE_DESCRIPTOR_SET`] is what server reflection serves, so `grpcurl`
//! lists and calls every method with no `.proto` at hand.

#![allow(clippy::doc_markdown, clippy::large_enum_variant, clippy::derive_partial_eq_without_eq)]

pub mod v1 {
    //! `bazaar.v1`: the services, messages and enums of the public API.
    tonic::include_proto!("bazaar.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` of this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("bazaar_descriptor");
