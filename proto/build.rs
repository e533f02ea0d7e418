//! Generates the message types, clients and servers from `proto/*.proto`
//! and the etcd subset from `proto/etcd/*.proto` (the server side for PD's
//! embedded etcd reads, the client side for the benchmarks' comparison).
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
/// etcd's v3 API subset.
const ETCD_DIR: &str = "proto/etcd";
const ETCD_PROTOS: &[&str] = &["kv.proto", "rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    println!("cargo:rerun-if-changed=build.rs");

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);

    let protos: Vec<PathBuf> = PROTOS
        .iter()
        .map(|file| PathBuf::from(PROTO_DIR).join(file))
        .collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Smaller per-call buffers than tonic's default: see `src/codec.rs`.
        .codec_path("crate::codec::LeanCodec")
        // A change-feed row's key, value and old value are `bytes::Bytes`:
        // the owner hands the same row to every subscriber, so a clone is a
        // reference-count bump instead of a copy, a value read from the
        // store moves in without a copy, and a client decodes the fields as
        // slices of the receive buffer. Every other message keeps `Vec<u8>`.
        .bytes(".cdcpb.Event.Row")
        .compile_with_config(config, &protos, &[PathBuf::from(PROTO_DIR)])?;

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    let protos: Vec<PathBuf> = ETCD_PROTOS
        .iter()
        .map(|file| PathBuf::from(ETCD_DIR).join(file))
        .collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &[PathBuf::from(ETCD_DIR)])?;
    Ok(())
}
