//! Generates the message types, clients and servers from `proto/*.proto`.
//!
//! protoc comes from the `protoc-bin-vendored` crate and is handed to
//! prost-build directly, so a fresh machine needs nothing installed and no
//! process-wide environment is changed.

use std::path::PathBuf;

const PROTO_DIR: &str = "proto";
const PROTOS: &[&str] = &[
    "metapb.proto",
    "errorpb.proto",
    "kvrpcpb.proto",
    "pdpb.proto",
    "tikvpb.proto",
    "cdcpb.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    println!("cargo:rerun-if-changed=build.rs");

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    let protos: Vec<PathBuf> = PROTOS
        .iter()
        .map(|file| PathBuf::from(PROTO_DIR).join(file))
        .collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &[PathBuf::from(PROTO_DIR)])?;
    Ok(())
}
