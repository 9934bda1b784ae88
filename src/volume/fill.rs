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
            let extent = inner.pool.alloc.extent();
            let Some((p, got)) = inner.pool.alloc.alloc_run((j - i) as u64, reserve) else {
                return Err(Error::NoSpace(inner.pool.alloc.full_message()));
            };
            // The allocator hands out freed space the file still holds first (DESIGN §3), and
            // what it holds is stale: the fake data must read as zeros, so make it a hole.
            // Blocks past the extent were never written.
            if p.0 < extent {
                let bs = u64::from(inner.block_size);
                let n = got.min(extent - p.0);
                self.storage.punch_hole(p.0 * bs, n * bs).map_err(|e| {
                    Error::io(
                        format!("punching pool blocks {}..{} for a bench fill", p.0, p.0 + n),
                        e,
                    )
                })?;
            }
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

#[cfg(test)]
mod tests {
    use crate::pool::MemStorage;
    use crate::volume::{CreateOptions, Store};
    use std::sync::Arc;

    #[test]
    fn filled_blocks_read_as_zeros_where_freed_space_is_reused() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem, &CreateOptions::default()).unwrap();
        let bs = s.block_size() as u64;
        let a = s.create_layer("a", None, Some(64 * bs)).unwrap().id;
        s.write_layer(a, 0, &vec![0xa5; 64 * bs as usize]).unwrap();
        s.flush().unwrap();
        s.remove_layer("a").unwrap();
        s.flush().unwrap();
        // a's blocks are free, kept for reuse unpunched, and handed out before new space.
        let extent = s.write().unwrap().pool.alloc.extent();
        let b = s.create_layer("b", None, Some(64 * bs)).unwrap().id;
        s.fill_for_bench(b, &(0..64).collect::<Vec<_>>()).unwrap();
        assert_eq!(
            s.write().unwrap().pool.alloc.extent(),
            extent,
            "reused no freed space"
        );
        let mut buf = vec![1u8; 64 * bs as usize];
        s.read_layer(b, 0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0),
            "a filled block holds stale bytes"
        );
    }
}
