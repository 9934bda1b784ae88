//! A layer chain as a block device, and the store that owns the open pool.
pub mod committer;
pub mod device;
pub mod diff;
pub mod exports;
pub mod fill;
pub mod gate;
pub mod handle;
pub mod importing;
pub mod invariants;
pub mod io;
pub mod journal;
pub mod layers;
pub mod lazy_open;
pub mod loading;
pub mod migrate;
pub(crate) mod pacing;
pub mod remote;
pub mod store;

pub use committer::Committer;
pub use device::{BlockDevice, ExportCatalog, ExportInfo, Extent, ExtentState};
pub use handle::{StoreExports, Volume};
pub use layers::{AttrChanges, LayerInfo, PoolUsage};
pub use remote::RemoteSource;
pub use store::{CreateOptions, Store};
