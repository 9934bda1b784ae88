//! thinlayer: a block-level, thin-provisioned copy-on-write layer store.
//!
//! Layers of the crate depend downward only (docs/DESIGN.md §1 says what each owns):
//!
//! * `format` — bytes ↔ structures, checksums, layout constants; `fault` — what is wrong and
//!   where; `error` — the crate's `Error` and its kinds; `units` — sizes as people write them.
//! * `pool` — the pool file: storage seam, allocator, metadata streams, the commit protocol.
//! * `layer` — the catalogue and each layer's sparse block map; reading through a chain.
//! * `volume` — the store (one open pool), a chain as a block device, background commits, the
//!   live exports registry.
//! * `listen` — the one accept-until-stop loop and its `Stop`; `log` — the one logging path,
//!   with levels (library code never prints).
//! * the core frontends: `nbd` (server and wire codec), `image` (raw import/export), `stream`
//!   (send/receive, content and chain IDs), `control` (the control socket), `check` (the fsck).
//! * the optional frontends, each behind a Cargo feature (on by default; `features` names
//!   them): `fuse` (live files; without the `fuse` feature its `LiveFiles` refuses to mount),
//!   `snapshot` (containerd's snapshotter, feature `containerd`), `registry` (push and pull
//!   through an OCI registry, feature `registry`).
//! * `live` — the live pool's rules, which every frontend changes layers through; `server` —
//!   the live server: NBD, control, live files and the snapshotter in one process, what each
//!   management request does, restarts; `calls` — one typed call per management request, to
//!   the server or a direct open; `cli` — one file per subcommand.
pub mod calls;
pub mod check;
pub mod cli;
pub mod control;
pub mod error;
pub mod fault;
pub mod features;
pub mod format;
pub mod fuse;
pub mod image;
pub mod layer;
pub mod listen;
pub mod live;
pub mod log;
pub mod nbd;
pub mod pool;
#[cfg(feature = "registry")]
pub mod registry;
pub mod server;
#[cfg(feature = "containerd")]
pub mod snapshot;
pub mod stream;
pub mod units;
pub mod volume;

pub use error::{Error, Result};
pub use volume::{BlockDevice, CreateOptions, LayerInfo, PoolUsage, Store, Volume};
