//! Shared foundations of hotswap that every binary needs and that know nothing
//! about servers: the generated protocol (`pb`, the one place wire types live),
//! conversions from wire messages to domain types (`convert`, `model`), the PKI
//! (certificate authority, CSRs, identities carried in certificates), TLS
//! configuration and the gRPC connector, operator profiles, label and duration
//! parsing, and crash-safe file writes.
//!
//! The `daemon` feature adds what both daemons share and the CLI must not pull:
//! the admin HTTP server (`/healthz`, `/readyz`, `/metrics`) and log setup.

pub mod artifact;
pub mod codec;
pub mod convert;
pub mod fsutil;
pub mod host;
pub mod ids;
pub mod labels;
pub mod manifest;
pub mod model;
pub mod pki;
pub mod profile;
pub mod roles;
pub mod status;
pub mod timefmt;
pub mod tls;

#[cfg(feature = "daemon")]
pub mod admin;
#[cfg(feature = "daemon")]
pub mod logging;
#[cfg(feature = "daemon")]
pub mod signals;
#[cfg(feature = "daemon")]
pub mod telemetry;

/// Generated protobuf and gRPC code for `proto/hotswap/v1`. Domain code converts
/// at the edge (see [`convert`]) rather than passing these types around.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("hotswap.v1");

    /// Encoded `FileDescriptorSet` of every hotswap proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hotswap_descriptor.bin"));
}

/// The gRPC path (`/package.Service/Method`) of every method the hotswap
/// protos define, from the embedded descriptor set.
pub fn rpc_method_paths() -> Vec<String> {
    let Ok(set) =
        <prost_types::FileDescriptorSet as prost::Message>::decode(pb::FILE_DESCRIPTOR_SET)
    else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        for service in file.service {
            let service_name = service.name.unwrap_or_default();
            for method in service.method {
                paths.push(format!(
                    "/{package}.{service_name}/{}",
                    method.name.unwrap_or_default()
                ));
            }
        }
    }
    paths
}

/// Version of this build, reported by agents in their hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Install the process-wide rustls crypto provider (ring). Safe to call more
/// than once; every binary and test harness calls it before building TLS
/// configs, because tonic and rustls otherwise panic when no provider is set.
pub fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}
