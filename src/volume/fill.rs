//! Benchmark-only: map many blocks fast without writing their data (`tools/bench-scale`
//! builds pools of millions of mapped blocks with it in seconds and without the disk space).
//! Each mapped block gets a fresh pool block that is never written: the pool file has a hole
//! there, which reads as zeros, and the entry carries the crc of a zero block, so reads verify
//! and `check` accepts the pool. Only the data is fake; the maps, records and allocation are
//! the ones a real write makes.

use super::store::Store;
use crate::error::{Error, Result};
use crate::format::checksum;
use crate::format::{LayerId, VBlock};
use crate::layer::{Change, Mapping};

impl Store {
    /// Map each of `vblocks` (in the order given) of writable layer `id` to a new pool block.
    /// Consecutive virtual blocks get consecutive pool blocks where the allocator has them, as
    /// an import's would. Not durable until the next flush.
    #[doc(hidden)]
    pub fn fill_for_bench(&self, id: LayerId, vblocks: &[u64]) -> Result<()> {
        let mut g = self.write()?;
        let crc = checksum::data(&vec![0u8; g.block_size as usize]);
        let mut i = 0;
        while i < vblocks.len() {
            let mut j = i + 1;
            while j < vblocks.len() && j - i < 4096 && vblocks[j] == vblocks[j - 1] + 1 {
                j += 1;
            }
            let inner = &mut *g;
            let reserve = inner.pool.metadata_reserve(&inner.pending);
            let Some((p, got)) = inner.pool.alloc.alloc_run((j - i) as u64, reserve) else {
                return Err(Error::NoSpace(inner.pool.alloc.full_message()));
            };
            for k in 0..got {
                let c = Change::Map {
                    layer: id,
                    vblock: VBlock(vblocks[i + k as usize]),
                    to: Some(Mapping::data(crate::format::PBlock(p.0 + k), crc)),
                };
                let alloc = &mut inner.pool.alloc;
                inner
                    .catalog
                    .change(&mut inner.pending, c, |b| alloc.free(b))?;
            }
            i += got as usize;
        }
        Ok(())
    }
}
