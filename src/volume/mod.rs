//! A layer chain as a block device.
pub mod device;
pub use device::{BlockDevice, ExportCatalog, ExportInfo, Extent, ExtentState};
