//! What an unmounted ext4's clean journal leaves in a snapshot's layer that nothing needs,
//! taken back at Commit and at Usage of a stopped container (`shed`); and, with it, what the
//! mount and unmount wrote into the filesystem's superblock (counters, times).
//!
//! Every transaction of a mount goes through the journal's log, and the unmount rewrites the
//! journal's superblock. After a clean unmount the journal is empty (`s_start` 0): jbd2 reads
//! nothing of the log at the next mount (it replays only from `s_start`), so the log is dead and
//! is trimmed. What the unmount changed in the journal's superblock is then only where the
//! next mount continues: the next transaction's sequence number (`s_sequence`), the log's head
//! (`s_head`) and the block's checksum. Those are set back to the parent's, which makes the
//! block the parent's again and the layer drops it. That is safe because the whole log of the
//! layer now reads zeros, whatever its parents hold: a sequence number counts up so that recovery after
//! a crash never takes a stale block of an older transaction for one of the current run; with
//! no block of any older transaction left in the log there is nothing to mistake, and every
//! block the next mount's recovery could meet is one that mount wrote. (docs/DESIGN.md §11.1.)

use super::ext4::{self, Journal};
use crate::error::Result;
use crate::volume::{ExtentState, LayerInfo, Store};

/// Take back the dead journal of the unmounted ext4 in writable layer `l` (nothing may have it
/// mounted): trim the log and set the journal's superblock back to the parent's. Nothing to do
/// when the journal has something to replay.
pub fn shed(store: &Store, l: &LayerInfo, j: Journal) -> Result<()> {
    let mut jsb = vec![0u8; j.block as usize];
    store.read_layer(l.id, j.offset, &mut jsb)?;
    if !ext4::journal_is_empty(&jsb) {
        return Ok(());
    }
    zero_log(store, l, j)?;
    rewind(store, l, j)?;
    rewind_superblock(store, l)
}

/// Make the log read zeros: the whole blocks of it that read as data (the layer's or its
/// parents') are trimmed (a trim adds whiteouts only where the parent holds data); the rest
/// reads zeros already and is not walked block by block (a 64 MiB log is 16384 blocks, the
/// transactions of a short mount a few dozen). The pieces of the log sharing a block with
/// something else (with 1 KiB filesystem blocks the journal's superblock shares its block with
/// the log's start) are written with zeros, where not zeros.
fn zero_log(store: &Store, l: &LayerInfo, j: Journal) -> Result<()> {
    let (offset, len) = j.log();
    let b = u64::from(store.block_size());
    let (start, end) = (offset.next_multiple_of(b), (offset + len) / b * b);
    let pieces = if end > start {
        for e in store.extents_layer(l.id, start, end - start)? {
            if e.state == ExtentState::Data {
                store.zero_layer(l.id, e.offset, e.len, true)?;
            }
        }
        [(offset, start), (end, offset + len)]
    } else {
        [(offset, offset + len), (0, 0)]
    };
    for (from, to) in pieces {
        if to <= from {
            continue;
        }
        let mut buf = vec![0u8; (to - from) as usize];
        store.read_layer(l.id, from, &mut buf)?;
        if buf.iter().any(|&x| x != 0) {
            buf.fill(0);
            store.write_layer(l.id, from, &buf)?;
        }
    }
    Ok(())
}

/// Set the journal's superblock back to the parent's when it differs from it only where a clean
/// mount and unmount left it (`ext4::rewinds_to`) and the rest of its layer blocks equal the
/// parent's; the layer then drops those blocks.
fn rewind(store: &Store, l: &LayerInfo, j: Journal) -> Result<()> {
    let Some(parent) = &l.parent else {
        return Ok(());
    };
    let parent = store.layer(parent)?;
    let b = u64::from(store.block_size());
    let (from, to) = (j.offset / b * b, (j.offset + j.block).next_multiple_of(b));
    let (mut mine, mut theirs) = (
        vec![0u8; (to - from) as usize],
        vec![0u8; (to - from) as usize],
    );
    store.read_layer(l.id, from, &mut mine)?;
    store.read_layer(parent.id, from, &mut theirs)?;
    let (at, n) = ((j.offset - from) as usize, j.block as usize);
    let outside_equal = mine[..at] == theirs[..at] && mine[at + n..] == theirs[at + n..];
    if mine != theirs && outside_equal && ext4::rewinds_to(&mine[at..at + n], &theirs[at..at + n]) {
        store.write_layer(l.id, from, &theirs)?;
    }
    store.drop_unchanged(l.id, from, to - from)?;
    Ok(())
}

/// Set the filesystem's superblock back to the parent's when it differs from it only in what
/// a clean mount and unmount write (`ext4::superblock_rewinds_to`: free counts, times, the
/// mount count) and the rest of its layer block equals the parent's; the layer then drops the
/// block. Called for an empty journal only, so the unmount was clean. Without this, every
/// container that was ever mounted, and every image layer, held a block for its superblock.
fn rewind_superblock(store: &Store, l: &LayerInfo) -> Result<()> {
    let Some(parent) = &l.parent else {
        return Ok(());
    };
    let parent = store.layer(parent)?;
    let b = u64::from(store.block_size());
    let (at, n) = ext4::SUPERBLOCK;
    let to = (at + n as u64).next_multiple_of(b);
    let (mut mine, mut theirs) = (vec![0u8; to as usize], vec![0u8; to as usize]);
    store.read_layer(l.id, 0, &mut mine)?;
    store.read_layer(parent.id, 0, &mut theirs)?;
    let (at, end) = (at as usize, at as usize + n);
    let outside_equal = mine[..at] == theirs[..at] && mine[end..] == theirs[end..];
    if mine != theirs
        && outside_equal
        && ext4::superblock_rewinds_to(&mine[at..end], &theirs[at..end])
    {
        store.write_layer(l.id, 0, &theirs)?;
    }
    store.drop_unchanged(l.id, 0, to)?;
    Ok(())
}
