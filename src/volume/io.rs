//! Byte-range I/O on a layer chain: read through the chain, copy-on-write, zero and trim.
//! Requests are cut into an unaligned head, whole blocks, and an unaligned tail; partial blocks
//! are read-modify-written, whole blocks go straight to newly allocated pool blocks.

use super::device::{Extent, ExtentState};
use super::store::{Inner, Store};
use crate::error::{Error, Result};
use crate::fault::{Fault, What, Where};
use crate::format::checksum;
use crate::format::{LayerId, PBlock, VBlock};
use crate::layer::{Change, Layer, Mapping, Resolved};
use crate::pool::Storage;

/// Whether `b` is all zeros, 16 bytes at a time (all-zero blocks are never stored).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, mid, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0)
}

/// A write planned by `Inner::plan_new_blocks`: runs of new pool blocks, each as (index of its
/// first block in the request, first pool block, count). The blocks are used in the allocator
/// and named by no map until `Inner::map_planned`.
struct Planned {
    block_size: usize,
    runs: Vec<(usize, PBlock, usize)>,
}

impl Planned {
    /// Write the planned blocks (no lock held), `bulk`: as `Storage::write_bulk_at`; the crc of
    /// each, in order.
    fn write(&self, storage: &dyn Storage, data: &[u8], bulk: bool) -> Result<Vec<u32>> {
        let bs = self.block_size;
        let mut crcs = Vec::with_capacity(self.runs.iter().map(|r| r.2).sum());
        for (i, p, got) in self.merged() {
            let run = &data[i * bs..(i + got) * bs];
            let at = p.0 * bs as u64;
            if bulk {
                storage.write_bulk_at(run, at)
            } else {
                storage.write_at(run, at)
            }
            .map_err(|e| Error::io(format!("writing {p}"), e))?;
            crcs.extend(run.chunks_exact(bs).map(checksum::data));
        }
        Ok(crcs)
    }

    /// The runs, with those that follow each other both in the request and in the pool joined:
    /// the allocator hands out at most 256 blocks a run, so without this a 4 MiB chunk of an
    /// import went to the disk as four direct writes of 1 MiB, each waiting for the last.
    fn merged(&self) -> Vec<(usize, PBlock, usize)> {
        let mut out: Vec<(usize, PBlock, usize)> = Vec::with_capacity(self.runs.len());
        for &(i, p, got) in &self.runs {
            match out.last_mut() {
                Some((li, lp, lgot)) if *li + *lgot == i && lp.0 + *lgot as u64 == p.0 => {
                    *lgot += got
                }
                _ => out.push((i, p, got)),
            }
        }
        out
    }

    /// Give the blocks back (the write failed or was refused): nothing names them.
    fn free(&self, inner: &mut Inner) {
        for &(_, p, got) in &self.runs {
            for k in 0..got as u64 {
                inner.pool.alloc.free(PBlock(p.0 + k));
            }
        }
    }
}

impl Inner {
    fn layer(&self, id: LayerId) -> Result<&Layer> {
        self.catalog
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("layer {id} no longer exists")))
    }

    fn check_range(&self, id: LayerId, offset: u64, len: u64, write: bool) -> Result<&Layer> {
        let l = self.layer(id)?;
        if write && !l.writable {
            return Err(Error::ReadOnly(format!(
                "{} is read-only (committed); create a child layer to change it",
                l.describe()
            )));
        }
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > l.disk_size) {
            let m = format!(
                "{}: range at byte {offset} of {len} bytes goes past its end ({} bytes)",
                l.describe(),
                l.disk_size
            );
            return Err(if write {
                Error::NoSpace(m)
            } else {
                Error::InvalidInput(m)
            });
        }
        Ok(l)
    }

    /// Read whole blocks `vb0..vb0+n` of the chain topped by `top` into `out`, verifying data
    /// checksums; `bulk`: through `Storage::read_bulk_at`.
    fn read_blocks(
        &self,
        storage: &dyn Storage,
        top: LayerId,
        vb0: u64,
        out: &mut [u8],
        bulk: bool,
    ) -> Result<()> {
        let n = (out.len() / self.block_size as usize) as u64;
        self.read_spans(storage, top, &[(vb0, n)], out, bulk)
    }

    /// `read_blocks` of several spans `(first block, count)`, their blocks back to back in
    /// `out`. Blocks laid out contiguously in the pool are read in one call, across the spans'
    /// boundaries too: an export packs the data extents on both sides of a hole into one
    /// request when the pool holds them side by side.
    fn read_spans(
        &self,
        storage: &dyn Storage,
        top: LayerId,
        spans: &[(u64, u64)],
        out: &mut [u8],
        bulk: bool,
    ) -> Result<()> {
        let bs = self.block_size as usize;
        let n = out.len() / bs;
        debug_assert_eq!(spans.iter().map(|s| s.1).sum::<u64>(), n as u64);
        let mut resolved = Vec::with_capacity(n);
        for &(vb0, count) in spans {
            // A block a remote layer does not hold yet is never read through to its parent;
            // the Store made the range local before taking the lock, so this only catches a
            // race.
            if let Some((l, vb)) = self.first_gap(top, vb0, count) {
                return Err(self.not_local(l, vb));
            }
            self.catalog.resolver(top).range(vb0, count, &mut resolved);
        }
        // The virtual block at index `i` of `out` (for an error's message).
        let vb_at = |mut i: u64| {
            for &(vb0, count) in spans {
                if i < count {
                    return vb0 + i;
                }
                i -= count;
            }
            unreachable!("index past the spans")
        };
        let mut i = 0;
        while i < n {
            match resolved[i] {
                Resolved::Hole | Resolved::Zero => {
                    out[i * bs..(i + 1) * bs].fill(0);
                    i += 1;
                }
                Resolved::Data { pblock, .. } => {
                    // Blocks laid out contiguously in the pool are read in one call.
                    let mut j = i + 1;
                    while j < n
                        && matches!(resolved[j], Resolved::Data { pblock: p, .. } if p.0 == pblock.0 + (j - i) as u64)
                    {
                        j += 1;
                    }
                    let buf = &mut out[i * bs..j * bs];
                    let at = pblock.0 * bs as u64;
                    if bulk {
                        storage.read_bulk_at(buf, at)
                    } else {
                        storage.read_at(buf, at)
                    }
                    .map_err(|e| Error::io(format!("reading {pblock}"), e))?;
                    for (k, blk) in buf.chunks_exact(bs).enumerate() {
                        if let Resolved::Data { pblock, crc, owner } = resolved[i + k] {
                            // A paged crc is read now, after the data: its page was likely
                            // read with the data's neighbours and is in the cache.
                            let crc = self.crc(storage, crc)?;
                            let actual = checksum::data(blk);
                            if actual != crc {
                                return Err(self.checksum_error(
                                    owner,
                                    vb_at((i + k) as u64),
                                    pblock,
                                    crc,
                                    actual,
                                ));
                            }
                        }
                    }
                    i = j;
                }
            }
        }
        Ok(())
    }

    fn checksum_error(
        &self,
        owner: LayerId,
        vb: u64,
        p: PBlock,
        stored: u32,
        computed: u32,
    ) -> Error {
        let at = match self.catalog.get(owner) {
            Some(l) => Where::layer(l.id, &l.name),
            None => Where::layer(owner, "?"),
        };
        let at = at.block(VBlock(vb), self.block_size).pblock(p);
        Error::Corrupt(Fault::new(What::Checksum { stored, computed }, at).to_string())
    }

    pub(crate) fn read(
        &self,
        storage: &dyn Storage,
        id: LayerId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        self.read_with(storage, id, offset, buf, false)
    }

    /// `read`, `bulk`: whole blocks through `Storage::read_bulk_at` (`Store::read_layer_bulk`).
    fn read_with(
        &self,
        storage: &dyn Storage,
        id: LayerId,
        offset: u64,
        buf: &mut [u8],
        bulk: bool,
    ) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(id, offset, len, false)?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size as u64;
        let vb0 = offset / bs;
        let vb1 = (offset + len - 1) / bs + 1;
        if offset.is_multiple_of(bs) && len.is_multiple_of(bs) {
            return self.read_blocks(storage, id, vb0, buf, bulk);
        }
        let mut tmp = vec![0u8; ((vb1 - vb0) * bs) as usize];
        self.read_blocks(storage, id, vb0, &mut tmp, false)?;
        let skip = (offset - vb0 * bs) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    pub(crate) fn write(
        &mut self,
        storage: &dyn Storage,
        id: LayerId,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        self.check_range(id, offset, data.len() as u64, true)?;
        let bs = self.block_size as u64;
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let vb = pos / bs;
            let within = pos % bs;
            let src = &data[(pos - offset) as usize..];
            if within != 0 || end - pos < bs {
                let n = (bs - within).min(end - pos);
                let mut blk = vec![0u8; bs as usize];
                self.read_blocks(storage, id, vb, &mut blk, false)?;
                blk[within as usize..(within + n) as usize].copy_from_slice(&src[..n as usize]);
                self.put_blocks(storage, id, vb, &blk)?;
                pos += n;
            } else {
                let n = (end - pos) / bs;
                self.put_blocks(storage, id, vb, &src[..(n * bs) as usize])?;
                pos += n * bs;
            }
        }
        Ok(())
    }

    /// Store whole blocks into layer `id` from `vb0`. Blocks the layer already holds in this
    /// transaction are overwritten in place; all others get new pool blocks (copy-on-write, and
    /// redirect-on-write for committed blocks, so committed data never changes under a crash).
    fn put_blocks(
        &mut self,
        storage: &dyn Storage,
        id: LayerId,
        vb0: u64,
        data: &[u8],
    ) -> Result<()> {
        let bs = self.block_size as usize;
        let n = data.len() / bs;
        let mut i = 0;
        while i < n {
            let blk = &data[i * bs..(i + 1) * bs];
            let vb = VBlock(vb0 + i as u64);
            if is_zero(blk) {
                self.zero_block(id, vb, true)?;
                i += 1;
                continue;
            }
            let own = self.layer(id)?.map.get(vb);
            if let Some(Mapping::Data { pblock, .. }) = own {
                if self.pool.alloc.is_fresh(pblock) {
                    let at = pblock.0 * bs as u64;
                    if let Err(e) = storage.write_at(blk, at) {
                        // The failed write may have reached part of the block, so the recorded
                        // checksum may no longer match it: the layer would read as corrupt here
                        // from now on, and `check` would call the pool damaged after the next
                        // flush. After a failed write the block's content is the device's (each
                        // sector old or new): record the checksum of what is there now. If even
                        // that read fails, reads of it keep failing with I/O errors, as they should.
                        let mut now = vec![0u8; bs];
                        if storage.read_at(&mut now, at).is_ok() {
                            let crc = checksum::data(&now);
                            self.set_mapping(id, vb, Some(Mapping::data(pblock, crc)))?;
                        }
                        return Err(Error::io(format!("writing {pblock}"), e));
                    }
                    let crc = checksum::data(blk);
                    self.set_mapping(id, vb, Some(Mapping::data(pblock, crc)))?;
                    i += 1;
                    continue;
                }
            }
            // A run of blocks that all need new pool blocks goes out in one write.
            let mut j = i + 1;
            while j < n && j - i < 256 {
                let b = &data[j * bs..(j + 1) * bs];
                let fresh = matches!(self.layer(id)?.map.get(VBlock(vb0 + j as u64)),
                    Some(Mapping::Data { pblock, .. }) if self.pool.alloc.is_fresh(pblock));
                if fresh || is_zero(b) {
                    break;
                }
                j += 1;
            }
            let reserve = self.pool.metadata_reserve(&self.pending);
            let Some((p, got)) = self.pool.alloc.alloc_run((j - i) as u64, reserve) else {
                return Err(Error::NoSpace(format!(
                    "{}: writing at byte {}: {}",
                    self.catalog.get(id).map_or(String::new(), |l| l.describe()),
                    vb.0 * bs as u64,
                    self.pool.alloc.full_message()
                )));
            };
            let got = got as usize;
            if let Err(e) = storage.write_at(&data[i * bs..(i + got) * bs], p.0 * bs as u64) {
                for k in 0..got as u64 {
                    self.pool.alloc.free(PBlock(p.0 + k));
                }
                return Err(Error::io(format!("writing {p}"), e));
            }
            for k in 0..got {
                let blk = &data[(i + k) * bs..(i + k + 1) * bs];
                let m = Mapping::data(PBlock(p.0 + k as u64), checksum::data(blk));
                self.set_mapping(id, VBlock(vb0 + (i + k) as u64), Some(m))?;
            }
            i += got;
        }
        Ok(())
    }

    /// Plan a write of whole blocks into new pool blocks, to be carried out without the lock
    /// (`Store::write_layer`): None if the request is not block-aligned or overwrites a block
    /// in place (rule 2), which `write` then does under the lock. Every non-zero block gets a
    /// pool block now; none is mapped until `map_planned`, after its data is written.
    fn plan_new_blocks(
        &mut self,
        id: LayerId,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<Planned>> {
        self.check_range(id, offset, data.len() as u64, true)?;
        let bs = self.block_size as usize;
        if data.is_empty() || !offset.is_multiple_of(bs as u64) || !data.len().is_multiple_of(bs) {
            return Ok(None);
        }
        let vb0 = offset / bs as u64;
        let n = data.len() / bs;
        let l = self.layer(id)?;
        let in_place = (0..n).any(|i| {
            matches!(l.map.get(VBlock(vb0 + i as u64)),
                Some(Mapping::Data { pblock, .. }) if self.pool.alloc.is_fresh(pblock))
        });
        if in_place {
            return Ok(None);
        }
        let mut plan = Planned {
            block_size: bs,
            runs: Vec::new(),
        };
        let mut i = 0;
        while i < n {
            if is_zero(&data[i * bs..(i + 1) * bs]) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && j - i < 256 && !is_zero(&data[j * bs..(j + 1) * bs]) {
                j += 1;
            }
            let reserve = self.pool.metadata_reserve(&self.pending);
            let Some((p, got)) = self.pool.alloc.alloc_run((j - i) as u64, reserve) else {
                plan.free(self);
                return Err(Error::NoSpace(format!(
                    "{}: writing at byte {}: {}",
                    self.catalog.get(id).map_or(String::new(), |l| l.describe()),
                    (vb0 + i as u64) * bs as u64,
                    self.pool.alloc.full_message()
                )));
            };
            plan.runs.push((i, p, got as usize));
            i += got as usize;
        }
        Ok(Some(plan))
    }

    /// Map the blocks of a planned write whose data is written (`crcs`: one per planned block,
    /// in order), and turn its zero blocks into unmaps or whiteouts: the whole request in one
    /// hold of the lock, so a commit holds all of it or none (§6). If the layer went away or
    /// became read-only meanwhile, the blocks are given back and the write is refused.
    fn map_planned(
        &mut self,
        id: LayerId,
        offset: u64,
        data: &[u8],
        plan: &Planned,
        crcs: &[u32],
    ) -> Result<()> {
        if let Err(e) = self.check_range(id, offset, data.len() as u64, true) {
            plan.free(self);
            return Err(e);
        }
        let bs = self.block_size as usize;
        let vb0 = offset / bs as u64;
        let mut crcs = crcs.iter();
        let mut runs = plan.runs.iter().peekable();
        let mut i = 0;
        while i < data.len() / bs {
            match runs.peek() {
                Some(&&(at, p, got)) if at == i => {
                    for k in 0..got {
                        let crc = *crcs.next().expect("one crc per planned block");
                        let m = Mapping::data(PBlock(p.0 + k as u64), crc);
                        self.set_mapping(id, VBlock(vb0 + (i + k) as u64), Some(m))?;
                    }
                    runs.next();
                    i += got;
                }
                _ => {
                    debug_assert!(is_zero(&data[i * bs..(i + 1) * bs]));
                    self.zero_block(id, VBlock(vb0 + i as u64), true)?;
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// Store the blocks of remote layer `id` from `vb0` that it does not hold yet (FORMAT.md
    /// §6.1: a fill only adds). An all-zero block becomes a whiteout, never a hole: a hole in a
    /// remote layer would stay missing. The data may end inside the last block.
    pub(crate) fn fill(
        &mut self,
        storage: &dyn Storage,
        id: LayerId,
        vb0: u64,
        data: &[u8],
    ) -> Result<()> {
        let bs = self.block_size as usize;
        let mut padded;
        let data = if !data.len().is_multiple_of(bs) {
            padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(bs), 0);
            &padded[..]
        } else {
            data
        };
        let n = data.len() / bs;
        let mut i = 0;
        while i < n {
            let held = |s: &Self, k: usize| -> Result<bool> {
                Ok(s.layer(id)?.map.get(VBlock(vb0 + k as u64)).is_some())
            };
            let blk = &data[i * bs..(i + 1) * bs];
            if held(self, i)? {
                i += 1;
            } else if is_zero(blk) {
                self.set_mapping(id, VBlock(vb0 + i as u64), Some(Mapping::Zero))?;
                i += 1;
            } else {
                // A run of missing data blocks goes out in one write.
                let mut j = i + 1;
                while j < n && !held(self, j)? && !is_zero(&data[j * bs..(j + 1) * bs]) {
                    j += 1;
                }
                self.put_blocks(storage, id, vb0 + i as u64, &data[i * bs..j * bs])?;
                i = j;
            }
        }
        Ok(())
    }

    /// Change one entry of a layer's own map (logged), freeing the block it replaces.
    fn set_mapping(&mut self, id: LayerId, vb: VBlock, m: Option<Mapping>) -> Result<()> {
        let alloc = &mut self.pool.alloc;
        let c = Change::Map {
            layer: id,
            vblock: vb,
            to: m,
        };
        self.catalog.change(&mut self.pending, c, |p| alloc.free(p))
    }

    /// Make one block of layer `id` read as zeros. Only a block the parents hold data for needs
    /// a whiteout; elsewhere the layer's own entry is simply dropped (unless a hole is refused).
    fn zero_block(&mut self, id: LayerId, vb: VBlock, may_unmap: bool) -> Result<()> {
        let l = self.layer(id)?;
        let below_data = match l.parent {
            None => false,
            // A block a remote parent has not fetched yet counts as data: unmapped here, it
            // would read whatever the fetch brings, not zeros.
            Some(p) => {
                self.first_gap(p, vb.0, 1).is_some()
                    || matches!(self.catalog.resolver(p).block(vb), Resolved::Data { .. })
            }
        };
        let want = if !may_unmap || below_data {
            Some(Mapping::Zero)
        } else {
            None
        };
        if l.map.get(vb) == want {
            return Ok(());
        }
        self.set_mapping(id, vb, want)
    }

    pub(crate) fn zero(
        &mut self,
        storage: &dyn Storage,
        id: LayerId,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<()> {
        self.check_range(id, offset, len, true)?;
        let bs = self.block_size as u64;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let vb = pos / bs;
            let within = pos % bs;
            let n = (bs - within).min(end - pos);
            if n == bs {
                self.zero_block(id, VBlock(vb), may_unmap)?;
            } else {
                // A partial block keeps its other bytes: write zeros into it.
                let zeros = vec![0u8; n as usize];
                self.write(storage, id, pos, &zeros)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Drop the blocks layer `id` holds in whole blocks of `offset..offset + len` that read
    /// exactly as its parent's chain does there, so they read through to the parent again and
    /// cost nothing; the number dropped. Checksums are compared first (from the maps), bytes
    /// only where they match. A filesystem rewrites blocks it did not change (a mount's
    /// superblock fields set back, a journal superblock rewound by the snapshotter), and a
    /// sealed layer should hold only what differs.
    pub(crate) fn drop_unchanged(
        &mut self,
        storage: &dyn Storage,
        id: LayerId,
        offset: u64,
        len: u64,
    ) -> Result<u64> {
        let l = self.check_range(id, offset, len, true)?;
        let Some(parent) = l.parent else {
            // Without a parent a block equals what is below only if it reads zeros, and
            // zero blocks are never stored as data (`put_blocks`).
            return Ok(0);
        };
        let bs = self.block_size as u64;
        let (vb0, vb1) = (offset.div_ceil(bs), (offset + len) / bs);
        if vb1 <= vb0 {
            return Ok(0);
        }
        let own = l.map.range(vb0, vb1);
        let mut same = Vec::new();
        let (mut mine, mut theirs) = (vec![0u8; bs as usize], vec![0u8; bs as usize]);
        for (vb, m) in own {
            if self.first_gap(parent, vb.0, 1).is_some() {
                // A remote parent has not fetched it: not known to be equal, so kept.
                continue;
            }
            let below = self.catalog.resolver(parent).block(vb);
            let equal = match (m, below) {
                (Mapping::Zero, Resolved::Zero | Resolved::Hole) => true,
                (Mapping::Data { crc, .. }, Resolved::Data { crc: c, .. })
                    if self.crc(storage, crc)? == self.crc(storage, c)? =>
                {
                    self.read_blocks(storage, id, vb.0, &mut mine, false)?;
                    self.read_blocks(storage, parent, vb.0, &mut theirs, false)?;
                    mine == theirs
                }
                _ => false,
            };
            if equal {
                same.push(vb);
            }
        }
        for &vb in &same {
            self.set_mapping(id, vb, None)?;
        }
        Ok(same.len() as u64)
    }

    /// Describe a byte range of the chain as extents, from the maps alone.
    pub(crate) fn extents(&self, id: LayerId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(id, offset, len, false)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = self.block_size as u64;
        let end = offset + len;
        let mut push = |start: u64, stop: u64, state: ExtentState| {
            let (s, e) = (start.max(offset), stop.min(end));
            if s >= e {
                return;
            }
            match out.last_mut() {
                Some(x) if x.state == state && x.offset + x.len == s => x.len += e - s,
                _ => out.push(Extent {
                    offset: s,
                    len: e - s,
                    state,
                }),
            }
        };
        let r = self.catalog.resolver(id);
        r.runs(offset / bs, (end - 1) / bs + 1, |vb, n, r| {
            let state = match r {
                Resolved::Data { .. } => ExtentState::Data,
                Resolved::Zero => ExtentState::Zero,
                Resolved::Hole => ExtentState::Hole,
            };
            if state == ExtentState::Data || !self.catalog.has_remote() {
                push(vb * bs, (vb + n) * bs, state);
                return;
            }
            // A block a remote layer has not fetched yet will read as data.
            for k in vb..vb + n {
                let s = match self.first_gap(id, k, 1) {
                    Some(_) => ExtentState::Data,
                    None => state,
                };
                push(k * bs, (k + 1) * bs, s);
            }
        });
        Ok(out)
    }
}

impl Store {
    pub fn read_layer(&self, id: LayerId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _visit = self.block_paths.enter();
        self.make_local(id, offset, buf.len() as u64)?;
        self.load_for(id, offset, buf.len() as u64)?;
        self.read_now().read(&*self.storage, id, offset, buf)
    }

    /// `read_layer` for a bulk reader (an export) that reads each block once: whole blocks may
    /// bypass the pool file's page cache (`Storage::read_bulk_at`).
    pub fn read_layer_bulk(&self, id: LayerId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _visit = self.block_paths.enter();
        self.make_local(id, offset, buf.len() as u64)?;
        self.load_for(id, offset, buf.len() as u64)?;
        self.read_now()
            .read_with(&*self.storage, id, offset, buf, true)
    }

    /// `read_layer_bulk` of several block-aligned ranges `(offset, len)` of layer `id`, in
    /// order, back to back into `buf` (as long as they are together). Pool blocks contiguous
    /// across the ranges' boundaries are read in one call: an export's few large requests.
    pub fn read_layer_ranges(
        &self,
        id: LayerId,
        ranges: &[(u64, u64)],
        buf: &mut [u8],
    ) -> Result<()> {
        let bs = self.block_size() as u64;
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        if let Some(&(off, len)) = ranges.iter().find(|r| r.0 % bs != 0 || r.1 % bs != 0) {
            return Err(Error::InvalidInput(format!(
                "layer {id}: range at byte {off} of {len} bytes is not aligned to the {bs}-byte block"
            )));
        }
        if total != buf.len() as u64 {
            return Err(Error::InvalidInput(format!(
                "layer {id}: ranges of {total} bytes read into a buffer of {}",
                buf.len()
            )));
        }
        let _visit = self.block_paths.enter();
        for &(off, len) in ranges {
            self.make_local(id, off, len)?;
            self.load_for(id, off, len)?;
        }
        let g = self.read_now();
        let mut spans = Vec::with_capacity(ranges.len());
        for &(off, len) in ranges {
            g.check_range(id, off, len, false)?;
            spans.push((off / bs, len / bs));
        }
        g.read_spans(&*self.storage, id, &spans, buf, true)
    }

    /// Write `data` at `offset` of layer `id`. Whole blocks that all go to new pool blocks (the
    /// common case: first writes, rewrites of committed data) are written without the store
    /// lock (docs/DESIGN.md §9): allocated under it, written, then mapped under it again, so a
    /// flush, a read or another layer's write never waits behind this one's data. The rest
    /// (partial blocks, in-place overwrites of fresh blocks) is done under the lock.
    pub fn write_layer(&self, id: LayerId, offset: u64, data: &[u8]) -> Result<()> {
        self.write_layer_with(id, offset, data, false)
    }

    /// `write_layer` for a bulk writer (an image import): its new blocks may bypass the pool
    /// file's page cache (`Storage::write_bulk_at`), since nothing reads them while it runs.
    pub fn write_layer_bulk(&self, id: LayerId, offset: u64, data: &[u8]) -> Result<()> {
        self.write_layer_with(id, offset, data, true)
    }

    fn write_layer_with(&self, id: LayerId, offset: u64, data: &[u8], bulk: bool) -> Result<()> {
        // A capped pool full above the file's extent while the maps load: wait for the rest.
        self.with_room(|| self.write_layer_once(id, offset, data, bulk))
    }

    fn write_layer_once(&self, id: LayerId, offset: u64, data: &[u8], bulk: bool) -> Result<()> {
        let _visit = self.block_paths.enter();
        self.edges_local(id, offset, data.len() as u64)?;
        // A lazily opened pool: the ranges this write reads or changes, in every layer of the
        // chain, are loaded first, and it goes on without waiting for the rest (`write_now`).
        self.load_for(id, offset, data.len() as u64)?;
        let mut g = self.write_now()?;
        let Some(plan) = g.plan_new_blocks(id, offset, data)? else {
            return g.write(&*self.storage, id, offset, data);
        };
        drop(g);
        // No lock: the planned blocks are used in the allocator but named by no map, so no
        // reader, commit or punch touches them (§3 rule 5).
        let written = plan.write(&*self.storage, data, bulk);
        let mut g = self.write_now()?;
        match written {
            Ok(crcs) => g.map_planned(id, offset, data, &plan, &crcs),
            Err(e) => {
                plan.free(&mut g);
                Err(e)
            }
        }
    }

    pub fn zero_layer(&self, id: LayerId, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let visit = self.block_paths.enter();
        self.edges_local(id, offset, len)?;
        self.load_for(id, offset, len)?;
        // Not over `with_room`: a capped pool's zero waiting for the load must not hold it up.
        drop(visit);
        self.with_room(|| {
            self.write_now()?
                .zero(&*self.storage, id, offset, len, may_unmap)
        })
    }

    /// A write keeps the other bytes of the blocks it covers partly: those blocks are read,
    /// so a remote layer below must hold them first.
    fn edges_local(&self, id: LayerId, offset: u64, len: u64) -> Result<()> {
        let bs = self.block_size() as u64;
        let end = offset.saturating_add(len);
        if len > 0 && !offset.is_multiple_of(bs) {
            self.make_local(id, offset, 1)?;
        }
        if len > 0 && !end.is_multiple_of(bs) {
            self.make_local(id, end - 1, 1)?;
        }
        Ok(())
    }

    /// Drop what layer `id` holds in `offset..offset + len` that equals its parent's
    /// (`Inner::drop_unchanged`); the number of blocks dropped.
    pub fn drop_unchanged(&self, id: LayerId, offset: u64, len: u64) -> Result<u64> {
        let _visit = self.block_paths.enter();
        self.load_for(id, offset, len)?;
        self.write_now()?
            .drop_unchanged(&*self.storage, id, offset, len)
    }

    pub fn extents_layer(&self, id: LayerId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _visit = self.block_paths.enter();
        self.load_for(id, offset, len)?;
        self.read_now().extents(id, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use crate::pool::MemStorage;
    use crate::volume::{CreateOptions, Store};
    use std::sync::Arc;

    #[test]
    fn drop_unchanged_keeps_only_the_blocks_that_differ_from_the_parent() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let bs = s.block_size() as usize;
        let base = s.create_layer("base", None, Some(1 << 20)).unwrap();
        for (i, b) in [1u8, 2, 3].iter().enumerate() {
            s.write_layer(base.id, (i * bs) as u64, &vec![*b; bs])
                .unwrap();
        }
        s.commit_layer("base").unwrap();
        let c = s.create_layer("c", Some("base"), None).unwrap();
        // Block 0 rewritten as it was, block 1 changed, block 2 zeroed (a whiteout over the
        // parent's data), block 4 explicitly zero over the parent's hole, block 5 new data.
        s.write_layer(c.id, 0, &vec![1; bs]).unwrap();
        s.write_layer(c.id, bs as u64, &vec![9; bs]).unwrap();
        s.zero_layer(c.id, 2 * bs as u64, bs as u64, true).unwrap();
        s.zero_layer(c.id, 4 * bs as u64, bs as u64, false).unwrap();
        s.write_layer(c.id, 5 * bs as u64, &vec![5; bs]).unwrap();
        let read = |s: &Store| {
            let mut all = vec![0u8; 6 * bs];
            s.read_layer(c.id, 0, &mut all).unwrap();
            all
        };
        let before = read(&s);
        // Only whole blocks inside the range are looked at: nothing before block 0's end.
        assert_eq!(s.drop_unchanged(c.id, 1, bs as u64).unwrap(), 0);
        assert_eq!(s.drop_unchanged(c.id, 0, 1 << 20).unwrap(), 2);
        assert_eq!(read(&s), before);
        let own: Vec<u64> = s
            .read()
            .catalog
            .get(c.id)
            .unwrap()
            .map
            .iter()
            .map(|(vb, _)| vb.0)
            .collect();
        assert_eq!(
            own,
            [1, 2, 5],
            "the changed block, the whiteout and the new block"
        );
        assert_eq!(s.drop_unchanged(c.id, 0, 1 << 20).unwrap(), 0);
        // A committed layer does not change.
        let e = s.drop_unchanged(base.id, 0, 1 << 20).unwrap_err();
        assert!(matches!(e, crate::error::Error::ReadOnly(_)), "{e}");
        s.flush().unwrap();
        s.verify_consistency().unwrap();
        drop(s);
        let s = Store::open_in(mem, false).unwrap();
        assert_eq!(read(&s), before);
        assert_eq!(s.layer("c").unwrap().size, 2 * bs as u64);
    }

    /// Several ranges read into one buffer come back as the ranges read one by one, data,
    /// whiteouts and holes alike, across a parent and its child; a bad checksum in the second
    /// range names that range's block, not the buffer's index.
    #[test]
    fn ranges_read_together_equal_ranges_read_apart_and_a_fault_names_its_block() {
        use crate::format::VBlock;
        use crate::layer::Mapping;
        use crate::pool::Storage;
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let bs = s.block_size() as u64;
        let base = s.create_layer("base", None, Some(64 * bs)).unwrap();
        for vb in [0u64, 1, 4, 5, 6, 9] {
            s.write_layer(base.id, vb * bs, &vec![vb as u8 + 1; bs as usize])
                .unwrap();
        }
        s.commit_layer("base").unwrap();
        let c = s.create_layer("c", Some("base"), None).unwrap();
        s.write_layer(c.id, 5 * bs, &vec![50; bs as usize]).unwrap();
        s.zero_layer(c.id, 6 * bs, bs, true).unwrap();
        let ranges = [(0, 2 * bs), (4 * bs, 4 * bs), (9 * bs, bs), (20 * bs, bs)];
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let mut together = vec![7u8; total as usize];
        s.read_layer_ranges(c.id, &ranges, &mut together).unwrap();
        let mut apart = Vec::new();
        for &(off, len) in &ranges {
            let mut b = vec![7u8; len as usize];
            s.read_layer(c.id, off, &mut b).unwrap();
            apart.extend(b);
        }
        assert!(
            together == apart,
            "the same bytes as ranges read one by one"
        );
        assert_eq!(
            together[(4 * bs) as usize],
            0,
            "the whiteout over block 6 (the buffer's 4th)"
        );
        let e = s
            .read_layer_ranges(c.id, &[(0, 3)], &mut [0u8; 3])
            .unwrap_err();
        assert!(matches!(e, crate::error::Error::InvalidInput(_)), "{e}");
        // Block 9 of the base, the third range: the buffer's block 6.
        let p = match s.read().catalog.get(base.id).unwrap().map.get(VBlock(9)) {
            Some(Mapping::Data { pblock, .. }) => pblock,
            m => panic!("block 9 of the base is {m:?}"),
        };
        mem.write_at(&[0xee], p.0 * bs).unwrap();
        let e = s
            .read_layer_ranges(c.id, &ranges, &mut together)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, crate::error::Error::Corrupt(_)) && msg.contains(&(9 * bs).to_string()),
            "{msg}"
        );
    }
}
