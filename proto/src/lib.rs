//! Wire definitions for the subset of TiKV's gRPC protocol that kvfeed
//! serves: the placement driver (`pdpb.PD`), the KV service (`tikvpb.Tikv`)
//! and the change feed (`cdcpb.ChangeData`), with their message packages.
//!
//! The `.proto` sources under `proto/` are kvfeed's own. Package, service,
//! method, message and field names and field numbers match upstream exactly,
//! because they are the wire format: the official clients (the `tikv-client`
//! crate, TiCDC) talk to kvfeed without knowing it is not TiKV. Fields kvfeed
//! never reads or writes are left out and their numbers reserved; protobuf
//! decoders skip unknown fields, so omitting is compatible in both directions
//! while renumbering never is. `tests/wire.rs` pins encodings byte for byte.
//!
//! Each module holds the prost messages of one package, plus tonic clients
//! and servers for packages with a service (`pd_client`/`pd_server`,
//! `tikv_client`/`tikv_server`, `change_data_client`/`change_data_server`).
//!
//! `etcdserverpb` and `mvccpb` hold the part of etcd's v3 API kvfeed
//! speaks, from its own `proto/etcd/*.proto`: the server side of `KV`
//! (PD embeds etcd, and PD clients read a few keys through `KV.Range`) and
//! the client side of `KV.Put` and `Watch.Watch`, which the benchmarks drive
//! against a real etcd. The same rule applies: names and numbers are
//! etcd's, `tests/etcd_wire.rs` pins them.

#![warn(missing_docs)]

pub mod codec;

/// Expands to a module holding generated code, with the lints that
/// generated code trips switched off for that module only.
macro_rules! generated {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::nursery,
            missing_docs,
            rustdoc::broken_intra_doc_links,
            rustdoc::bare_urls,
            rustdoc::invalid_html_tags
        )]
        pub mod $name {
            // Same expansion as `tonic::include_proto!`, which takes only a
            // string literal.
            include!(concat!(env!("OUT_DIR"), "/", stringify!($name), ".rs"));
        }
    };
}

generated!(
    /// Cluster metadata: stores, regions, peers and region epochs.
    metapb
);
generated!(
    /// Region errors returned by the KV service and the change feed.
    errorpb
);
generated!(
    /// Requests and responses of the transactional and raw KV commands.
    kvrpcpb
);
generated!(
    /// The placement driver: members, timestamp oracle, routing, GC safe point.
    pdpb
);
generated!(
    /// The KV service (`Tikv`) client and server.
    tikvpb
);
generated!(
    /// The change feed (`ChangeData`): subscriptions, events, resolved ts.
    cdcpb
);
generated!(
    /// etcd's key-value records and watch events.
    mvccpb
);
generated!(
    /// etcd's `KV` service (served: Range; refused: writes) and the `KV`
    /// and `Watch` clients.
    etcdserverpb
);
