//! The seam between the store and its block-device frontends (NBD server, image export, tests).
//! A frontend sees byte ranges only; blocks, layers and chains stay behind this trait.

use crate::error::Result;
use std::sync::Arc;

/// What a byte range reads as, and whether the pool holds anything for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Stored data in some layer of the chain.
    Data,
    /// Allocated as zeros: a layer of the chain holds a zero (whiteout) entry here. Reads zeros.
    Zero,
    /// Mapped nowhere in the chain: reads zeros and costs nothing.
    Hole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub state: ExtentState,
}

/// A layer chain seen as a block device. All offsets and lengths are in bytes and may be
/// unaligned; callers (the protocol edge) have already checked `offset + len <= size()`.
/// Implementations are shared between connections and must be safe to call concurrently.
pub trait BlockDevice: Send + Sync {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    fn is_read_only(&self) -> bool;
    /// The copy-on-write granularity: writes aligned to it avoid read-modify-write.
    fn block_size(&self) -> u32;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make the range read as zeros. `may_unmap` = the client allows a hole (NBD without NO_HOLE).
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Discard the range; afterwards it reads as zeros (parent data stays hidden).
    fn trim(&self, offset: u64, len: u64) -> Result<()>;
    /// Make every write acknowledged so far, on any device of the same pool, durable.
    fn flush(&self) -> Result<()>;
    /// Describe `[offset, offset+len)` as consecutive extents covering it exactly, from the
    /// block maps only (no data is read). Adjacent extents of the same state are merged.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

/// What a server lists for one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
}

/// The set of devices a server can hand out by name.
pub trait ExportCatalog: Send + Sync {
    fn exports(&self) -> Result<Vec<ExportInfo>>;
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>>;
    /// Open for a connection that `client` names (a server with a registry of who holds what
    /// uses it; others need not).
    fn open_for(&self, name: &str, client: &str) -> Result<Arc<dyn BlockDevice>> {
        let _ = client;
        self.open(name)
    }
    /// Commit everything (called at shutdown).
    fn flush_all(&self) -> Result<()>;
}
