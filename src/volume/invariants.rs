//! The rules every pool obeys, checked in one place. Loading runs them over what it replayed
//! (a writable open refuses a pool that breaks any; `check` reports them), and the live
//! self-check runs them over the in-memory state and then holds the allocator against them.
//!
//! The rules: every pool block that the metadata streams or a layer's map names lies in the
//! data area and is named once; a layer maps nothing past its end; its counters match its map;
//! its parent exists, is read-only, is no larger than it, and lists it as a child; every child
//! it lists names it as parent; its id is below the catalogue's next id.

use crate::fault::{Fault, What, Where};
use crate::format::{first_data_block, PBlock, VBlock};
use crate::layer::lazy::Applied;
use crate::layer::{Catalog, Layer};
use crate::pool::alloc::Claimed;
use crate::pool::{Allocator, MetaStreams};
use std::collections::HashMap;

/// Marks pool blocks as referenced while the rules are checked.
pub(crate) trait Claims {
    /// Note that `at()` references `b`. If something already did, return who, if known.
    /// `at` is only called when needed: making a `Where` for each of a pool's blocks at open
    /// (a layer name copied and freed per block) cost more than claiming them.
    fn claim(&mut self, b: PBlock, at: &dyn Fn() -> Where) -> Option<String>;

    /// Claim blocks `first..first + n` (`at(i)`: who references the i-th); returns the ones
    /// something referenced already, with who, as `claim` would one by one.
    fn claim_run(
        &mut self,
        first: PBlock,
        n: u64,
        at: &dyn Fn(u64) -> Where,
    ) -> Vec<(u64, String)> {
        (0..n)
            .filter_map(|i| self.claim(PBlock(first.0 + i), &|| at(i)).map(|o| (i, o)))
            .collect()
    }
}

/// Map blocks claimed at a time. A scattered pool's claims each miss the cache (the
/// allocator's bitmap is 12 MB at 100M blocks); made in a tight loop, independent of each
/// other, their misses overlap, where between the steps of the map's iteration they did not.
const CLAIM_BATCH: usize = 256;

/// Check every rule over `catalog` and `meta`; blocks at or past `file_blocks` lie outside the
/// pool file. Blocks within bounds are passed to `claims` (which loading uses to rebuild its
/// allocator), never blocks outside them, so damaged numbers cannot make anyone allocate for them.
pub(crate) fn audit(
    catalog: &Catalog,
    meta: &MetaStreams,
    block_size: u32,
    file_blocks: u64,
    claims: &mut dyn Claims,
) -> Vec<Fault> {
    let mut faults = Vec::new();
    stream_rules(meta, block_size, file_blocks, claims, &mut faults);
    for l in catalog.layers() {
        layer_rules(catalog, l, &mut faults);
        map_rules(l, block_size, file_blocks, claims, &mut faults);
    }
    faults
}

/// The rules over the maps loaded so far (a lazy open, after replaying its log over the
/// ranges the log touches): each layer's map as `audit` checks it, its blocks claimed into
/// `claims` (the loading allocator's, `Allocator::load_claims`). The ranges loaded later
/// are checked one by one (`claim_range`); the rest at the completion (`rebuild`).
pub(crate) fn claim_loaded(
    catalog: &Catalog,
    block_size: u32,
    file_blocks: u64,
    claims: &mut dyn Claims,
) -> Vec<Fault> {
    let mut faults = Vec::new();
    for l in catalog.layers() {
        map_rules(l, block_size, file_blocks, claims, &mut faults);
    }
    faults
}

/// The rules over one range of a layer's map just loaded (`Applied`: its chunks, and what it
/// added to the map's counters), its blocks claimed into `claims`: what `audit` checks of the
/// map, a range at a time, so the completion need not go over every map (DESIGN §5.3).
/// Every entry in the range's chunks came from it (whatever changes a block loads its range
/// first), so the entries counted there must be what it added.
pub(crate) fn claim_range(
    l: &Layer,
    range: Applied,
    block_size: u32,
    file_blocks: u64,
    claims: &mut dyn Claims,
) -> Vec<Fault> {
    let mut faults = Vec::new();
    let (c0, c1) = range.chunks;
    let runs = l
        .map
        .chunks_in(c0, c1)
        .into_iter()
        .flat_map(|c| l.map.chunk_runs(c));
    let counted = entries_rules(l, runs, block_size, file_blocks, claims, &mut faults);
    counters_match(l, counted, (range.data, range.zero), &mut faults);
    faults
}

/// The streams' blocks lie in the data area and are named once.
fn stream_rules(
    meta: &MetaStreams,
    block_size: u32,
    file_blocks: u64,
    claims: &mut dyn Claims,
    faults: &mut Vec<Fault>,
) {
    let first = first_data_block(block_size);
    let holders = [
        ("the checkpoint", &meta.ckpt_blocks),
        ("the log", &meta.log_blocks),
    ];
    for (holder, blocks) in holders {
        for &b in blocks.iter() {
            let at = || Where::holder(b, holder);
            // The log's reserved next page may lie just past the end: reserved, never written.
            if b.0 < first || b.0 > file_blocks + 1 {
                let what = What::OutsideDataArea { first, file_blocks };
                faults.push(Fault::new(what, at()));
            } else if let Some(other) = claims.claim(b, &at) {
                faults.push(Fault::new(What::UsedTwice { other }, at()));
            }
        }
    }
}

/// A layer's whole map: its entries' rules, and its counters matching them.
fn map_rules(
    l: &Layer,
    block_size: u32,
    file_blocks: u64,
    claims: &mut dyn Claims,
    faults: &mut Vec<Fault>,
) {
    let counted = entries_rules(l, l.map.runs(), block_size, file_blocks, claims, faults);
    let stored = (l.map.data_blocks(), l.map.zero_blocks());
    counters_match(l, counted, stored, faults);
}

/// `runs` of `l`'s map (`BlockMap::runs`): none past the layer's end, every data block in
/// the data area and named once. Returns the data and zero blocks counted.
fn entries_rules(
    l: &Layer,
    runs: impl Iterator<Item = (VBlock, u64, Option<PBlock>)>,
    block_size: u32,
    file_blocks: u64,
    claims: &mut dyn Claims,
    faults: &mut Vec<Fault>,
) -> (u64, u64) {
    let first = first_data_block(block_size);
    let mut batch = Vec::with_capacity(CLAIM_BATCH);
    let (mut data, mut zero) = (0, 0);
    let blocks = l.disk_size.div_ceil(block_size as u64);
    let at = |vb: u64| Where::layer(l.id, &l.name).block(VBlock(vb), block_size);
    let mut claim_all = |batch: &mut Vec<(u64, PBlock, u64)>, faults: &mut Vec<Fault>| {
        for &(vb, p, n) in batch.iter() {
            let at = |i: u64| at(vb + i).pblock(PBlock(p.0 + i));
            for (i, other) in claims.claim_run(p, n, &at) {
                faults.push(Fault::new(What::UsedTwice { other }, at(i)));
            }
        }
        batch.clear();
    };
    for (vb, n, p) in runs {
        for v in vb.0.max(blocks)..vb.0 + n {
            let what = What::MappedPastEnd {
                disk_size: l.disk_size,
            };
            faults.push(Fault::new(what, at(v)));
        }
        let Some(p) = p else {
            zero += n;
            continue;
        };
        data += n;
        // The blocks inside the data area, claimed as one run; each outside it is a fault.
        let (lo, hi) = (p.0.max(first), (p.0 + n).min(file_blocks));
        for i in (0..n).filter(|&i| p.0 + i < lo || p.0 + i >= hi) {
            let what = What::OutsideDataArea { first, file_blocks };
            faults.push(Fault::new(what, at(vb.0 + i).pblock(PBlock(p.0 + i))));
        }
        if lo < hi {
            batch.push((vb.0 + (lo - p.0), PBlock(lo), hi - lo));
            if batch.len() == CLAIM_BATCH {
                claim_all(&mut batch, faults);
            }
        }
    }
    claim_all(&mut batch, faults);
    (data, zero)
}

/// The entries counted in a map (or a range of it) are what its counters say.
fn counters_match(l: &Layer, counted: (u64, u64), stored: (u64, u64), faults: &mut Vec<Fault>) {
    if let Some(what) = What::counters(stored, counted) {
        faults.push(Fault::new(what, Where::layer(l.id, &l.name)));
    }
}

/// The rules about a layer's place in the tree.
fn layer_rules(catalog: &Catalog, l: &Layer, faults: &mut Vec<Fault>) {
    let here = || Where::layer(l.id, &l.name);
    if let Some(p) = l.parent {
        match catalog.get(p) {
            None => faults.push(Fault::new(What::MissingParent { parent: p }, here())),
            Some(p) => {
                let parent = p.describe();
                if !p.children.contains(&l.id) {
                    let what = What::ChildNotListed {
                        parent: parent.clone(),
                    };
                    faults.push(Fault::new(what, here()));
                }
                if p.writable {
                    let what = What::WritableParent {
                        parent: parent.clone(),
                    };
                    faults.push(Fault::new(what, here()));
                }
                if p.disk_size > l.disk_size {
                    faults.push(Fault::new(What::SmallerThanParent { parent }, here()));
                }
            }
        }
    }
    for &c in &l.children {
        if catalog.get(c).and_then(|c| c.parent) != Some(l.id) {
            faults.push(Fault::new(What::NotAChild { child: c }, here()));
        }
    }
    if l.id >= catalog.next_id() {
        let what = What::IdNotBelowNext {
            next: catalog.next_id(),
        };
        faults.push(Fault::new(what, here()));
    }
}

/// Loading rebuilds its allocator from the claims: a block marked twice is named twice.
impl Claims for Claimed {
    fn claim(&mut self, b: PBlock, _: &dyn Fn() -> Where) -> Option<String> {
        (!Claimed::claim(self, b)).then(|| "another reference".to_string())
    }

    /// A run at once, a word of the bitmap at a time; one by one only if some block of it
    /// was referenced already.
    fn claim_run(&mut self, first: PBlock, n: u64, _: &dyn Fn(u64) -> Where) -> Vec<(u64, String)> {
        if Claimed::claim_run(self, first, n) {
            return Vec::new();
        }
        (0..n)
            .filter(|&i| !Claimed::claim(self, PBlock(first.0 + i)))
            .map(|i| (i, "another reference".to_string()))
            .collect()
    }
}

/// The one home of the allocator's rebuild (DESIGN §5.3): check every rule over the loaded
/// state, claiming what the maps and streams reference, and hand the claims to `alloc` (made
/// by `Allocator::loading`), which frees every block below its floor that nothing holds and
/// goes on as a normal allocator. The eager open calls it right after replaying; an open that
/// loads its maps later, once they all are (`Inner::complete_load`), over the live state then
/// (writes made meanwhile included). `file_blocks`: blocks at or past it lie outside the pool
/// file (the eager open: the file's length; later: the allocator's extent, which includes
/// what was written since).
///
/// A lazy open claimed the maps range by range as they loaded (`claim_loaded`,
/// `claim_range`, into `Allocator::load_claims`): then only the rules of the layer tree and
/// the streams are left, over the claims less what was released since
/// (`Allocator::take_load_claims`), so the completion's write-lock hold does not grow with
/// the mapped data.
pub(crate) fn rebuild(
    catalog: &Catalog,
    meta: &MetaStreams,
    block_size: u32,
    file_blocks: u64,
    alloc: &mut Allocator,
) -> Vec<Fault> {
    let (claims, mut faults) = match alloc.take_load_claims() {
        Some(mut claims) => {
            let mut faults = Vec::new();
            stream_rules(meta, block_size, file_blocks, &mut claims, &mut faults);
            for l in catalog.layers() {
                layer_rules(catalog, l, &mut faults);
            }
            (claims, faults)
        }
        None => {
            let mut claims = Claimed::with_capacity(file_blocks + 2);
            let faults = audit(catalog, meta, block_size, file_blocks, &mut claims);
            (claims, faults)
        }
    };
    let found = alloc.finish_loading(claims);
    for b in found.freed_but_claimed {
        let other = "a free waiting for commit".to_string();
        let at = Where::default().pblock(b);
        faults.push(Fault::new(What::UsedTwice { other }, at));
    }
    for b in found.free_but_claimed {
        let what = What::FreeButReferenced {
            by: "the loaded maps (past the file's end at open)".to_string(),
        };
        faults.push(Fault::new(what, Where::default().pblock(b)));
    }
    faults
}

/// Claims that remember who holds each block (the self-check).
#[derive(Default)]
struct Owners(HashMap<PBlock, String>);

impl Claims for Owners {
    fn claim(&mut self, b: PBlock, at: &dyn Fn() -> Where) -> Option<String> {
        self.0.insert(b, at().who())
    }
}

/// The rules over a live state, and its allocator held against them: it must count as used
/// exactly what the streams and maps reference, plus the frees waiting for the open
/// transaction to commit (the self-check); while its maps load, at least that, and every
/// block below the floor.
pub(crate) fn live(
    catalog: &Catalog,
    meta: &MetaStreams,
    alloc: &Allocator,
    block_size: u32,
) -> Vec<Fault> {
    let mut owners = Owners::default();
    let file_blocks = alloc.extent() + 1;
    let mut faults = audit(catalog, meta, block_size, file_blocks, &mut owners);
    for b in alloc.punching() {
        let at = || Where::holder(b, "a free block being punched");
        if let Some(other) = owners.claim(b, &at) {
            faults.push(Fault::new(What::UsedTwice { other }, at()));
        }
    }
    for b in alloc.pending_frees() {
        let at = || Where::holder(b, "a free waiting for commit");
        if let Some(other) = owners.claim(b, &at) {
            faults.push(Fault::new(What::UsedTwice { other }, at()));
        }
    }
    let mut used = 0u64;
    // While the maps load, every block below the floor counts as used (§5.3): not a leak.
    let floor = alloc.loading_floor().unwrap_or(0);
    for b in alloc.used_blocks() {
        used += 1;
        if b.0 >= floor && !owners.0.contains_key(&b) {
            faults.push(Fault::new(What::Leaked, Where::default().pblock(b)));
        }
    }
    for (&b, by) in &owners.0 {
        if !alloc.is_used(b) {
            let what = What::FreeButReferenced { by: by.clone() };
            faults.push(Fault::new(what, Where::default().pblock(b)));
        }
    }
    for b in alloc.fresh_blocks() {
        if !alloc.is_used(b) {
            faults.push(Fault::new(What::FreshButFree, Where::default().pblock(b)));
        }
    }
    if used != alloc.used_count() {
        let what = What::UsedCount {
            counted: alloc.used_count(),
            bitmap: used,
        };
        faults.push(Fault::new(what, Where::default()));
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::{MapEntry, MapTarget, Record};
    use crate::format::LayerId;
    use crate::layer::catalog::tests::create;
    use crate::pool::MemStorage;

    fn maps(layer: u32, blocks: impl Iterator<Item = (u64, u64)>) -> Record {
        let entries = blocks
            .map(|(v, p)| MapEntry {
                vblock: VBlock(v),
                target: MapTarget::Data {
                    pblock: PBlock(p),
                    crc: 0,
                },
            })
            .collect();
        Record::Map {
            layer: LayerId(layer),
            entries,
        }
    }

    /// Claims are made in batches (`CLAIM_BATCH`): a block named twice is still found, once,
    /// naming the second holder's layer, virtual block and pool block, whether the claims meet
    /// in one batch or in two, and no block of a batch is left unclaimed.
    #[test]
    fn a_block_mapped_twice_is_found_in_whichever_claim_batch_it_falls() {
        let mut catalog = Catalog::new();
        catalog.apply(create(1, None)).unwrap();
        catalog.apply(create(2, None)).unwrap();
        // Layer 1: 1000 blocks, every other virtual block, pool blocks 1000.. (several batches).
        catalog
            .apply(maps(1, (0..1000).map(|i| (2 * i, 1000 + i))))
            .unwrap();
        // Layer 2: 300 blocks of its own, then one pool block layer 1 holds.
        let own = (0..300).map(|i| (i, 5000 + i));
        catalog
            .apply(maps(2, own.chain([(7000, 1000 + 777)])))
            .unwrap();
        let mem = MemStorage::new();
        let mut alloc = Allocator::new(first_data_block(4096), 0);
        let meta = MetaStreams::init(&mem, &mut alloc, 4096, 0, 1, 0).unwrap();
        // As a load does: an allocator rebuilt from the claims.
        let mut alloc = Allocator::loading(first_data_block(4096), 0, 100_000);
        let faults = rebuild(&catalog, &meta, 4096, 100_000, &mut alloc);
        let twice: Vec<&Fault> = faults
            .iter()
            .filter(|f| matches!(f.what, What::UsedTwice { .. }))
            .collect();
        assert_eq!(twice.len(), 1, "{faults:?}");
        let at = &twice[0].at;
        assert_eq!(at.vblock, Some(VBlock(7000)));
        assert_eq!(at.pblock, Some(PBlock(1777)));
        assert_eq!(faults.len(), 1, "{faults:?}");
        for p in (1000..2000).chain(5000..5300) {
            assert!(alloc.is_used(PBlock(p)), "block {p} claimed");
        }
    }

    /// Claims one block at a time (the trait's own `claim_run`), as the self-check's do.
    struct OneByOne(Claimed);

    impl Claims for OneByOne {
        fn claim(&mut self, b: PBlock, at: &dyn Fn() -> Where) -> Option<String> {
            Claims::claim(&mut self.0, b, at)
        }
    }

    /// Runs are claimed a bitmap word at a time (`Claimed::claim_run`): the faults are the
    /// ones claiming block by block finds, each naming its block (a run that overlaps another
    /// in part, a run partly past the file's end, one partly past the layer's end), and every
    /// block inside the data area is claimed.
    #[test]
    fn runs_claimed_at_once_find_what_claims_one_by_one_find() {
        let mut catalog = Catalog::new();
        for id in 1..=3 {
            catalog.apply(create(id, None)).unwrap();
        }
        // Layer 1: a run of 100 (pool blocks 1000..1100), singles every other block after.
        let singles = (0..300).map(|i| (200 + 2 * i, 3000 + 3 * i));
        catalog
            .apply(maps(1, (0..100).map(|i| (i, 1000 + i)).chain(singles)))
            .unwrap();
        // Layer 2: a run of its own, then one over 1090..1110 (10 named twice), and a single
        // on one of layer 1's singles.
        let own = (0..50).map(|i| (i, 5000 + i));
        let over = (0..20).map(|i| (100 + i, 1090 + i));
        catalog
            .apply(maps(2, own.chain(over).chain([(500, 3000 + 3 * 7)])))
            .unwrap();
        // Layer 3: a run crossing the file's end (9995..10005), one crossing the layer's.
        let end = (1u64 << 30) / 4096;
        let file = (0..10).map(|i| (i, 9995 + i));
        let past = (0..10).map(|i| (end - 4 + i, 7000 + i));
        catalog.apply(maps(3, file.chain(past))).unwrap();
        let l1 = catalog.get(LayerId(1)).unwrap();
        assert!(
            l1.map.runs().any(|(_, n, _)| n == 100),
            "a run, not 100 singles"
        );
        let mem = MemStorage::new();
        let mut alloc = Allocator::new(first_data_block(4096), 0);
        let meta = MetaStreams::init(&mem, &mut alloc, 4096, 0, 1, 0).unwrap();
        let key = |f: &Fault| format!("{:?} {:?} {:?}", f.what, f.at.vblock, f.at.pblock);
        let mut runs = Claimed::default();
        let mut fast: Vec<String> = audit(&catalog, &meta, 4096, 10_000, &mut runs)
            .iter()
            .map(key)
            .collect();
        let mut one = OneByOne(Claimed::default());
        let mut slow: Vec<String> = audit(&catalog, &meta, 4096, 10_000, &mut one)
            .iter()
            .map(key)
            .collect();
        fast.sort();
        slow.sort();
        assert_eq!(fast, slow);
        // 10 + 1 named twice, 5 outside the file, 6 past the layer's end.
        assert_eq!(fast.len(), 22, "{fast:#?}");
        assert_eq!(fast.iter().filter(|f| f.contains("UsedTwice")).count(), 11);
        assert_eq!(
            fast.iter()
                .filter(|f| f.contains("OutsideDataArea"))
                .count(),
            5
        );
        assert_eq!(
            fast.iter().filter(|f| f.contains("MappedPastEnd")).count(),
            6
        );
        for p in (1000..1110)
            .chain(5000..5050)
            .chain(9995..10_000)
            .chain(7000..7010)
        {
            assert!(runs.is_claimed(PBlock(p)), "block {p} claimed");
        }
        assert!(!runs.is_claimed(PBlock(10_000)));
    }
}
