//! The containerd snapshotter: containerd's snapshots API (`api/services/snapshots/v1`, a
//! proxy plugin over gRPC) served by the process that owns the pool, beside NBD and the
//! control socket. A frontend like `nbd/`: `snapshots` says what each request does to the
//! pool, `keys` and `info` how a snapshot is kept in a layer's name and attributes, `base` the
//! formatted empty filesystems new image chains start from, `grpc` the wire side, `status`
//! the gRPC codes, `writeback` what Usage syncs first. The layers reach containerd as live files (`crate::fuse`) that it mounts
//! with the `loop` option.

mod api;
mod base;
mod dead_log;
mod ext4;
mod files;
mod grpc;
mod info;
mod keys;
mod remote;
mod snapshots;
mod status;
mod writeback;

pub use grpc::Server;
pub use remote::{LayerAt, RemoteLayers};
pub use snapshots::{Files, Snapshots, SIZE_LABEL};
