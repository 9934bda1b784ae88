//! The crash journal (docs/DESIGN.md §10.1): the open transaction's records, kept in a
//! shared-memory file (memfd) beside the pool so that a write acknowledged by a server that
//! is then killed is not lost. The data of such a write is already in the pool file's page
//! cache, which outlives the process; its map entry is only in the process's memory, and the
//! journal is a second copy of it that the keeper holds and the next server reads
//! (`Store::open_with_journal` replays it). The bytes are `format::journal`'s.
//!
//! Every append happens under the store's write lock (`store::WriteGuard`), before the
//! change it records is acknowledged, so writers never race here. A transaction's records
//! stay until its commit is durable; then the region is rewritten with only the open
//! transaction's records (`rebase`), into the other region, and the header flipped to it.

use super::store::Inner;
use crate::error::{Error, Result};
use crate::format::checksum;
use crate::format::journal::{self as fmt, Entry, Kind};
use crate::format::record::{MapTarget, Record, RecordReader};
use crate::format::{LayerId, PBlock, VBlock};
use crate::layer::map::CrcRef;
use crate::layer::{Change, Mapping};
use crate::pool::Storage;
use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub struct Journal {
    fd: OwnedFd,
    map: *mut u8,
    /// The region in use and its epoch, as the header says.
    region: usize,
    epoch: u64,
    /// Where the next entry goes in the region, and its sequence number.
    at: usize,
    seq: u64,
    /// Set when an append did not fit: the journal no longer covers every acknowledged write
    /// until the next rebase (after a commit).
    overflowed: bool,
}

// SAFETY: the mapping is owned by the Journal and only touched through `&mut self` (the store
// holds it under its write lock) or `&self` reads.
unsafe impl Send for Journal {}
unsafe impl Sync for Journal {}

/// One transaction as read back from a journal.
#[derive(Debug, Default)]
pub struct Txn {
    pub number: u64,
    pub records: Vec<u8>,
    /// Where it was committed (log id, commit number), if its commit had been written.
    pub staged: Option<(u64, u64)>,
}

impl Journal {
    /// A new, empty journal in a new memfd.
    pub fn create() -> Result<Journal> {
        // SAFETY: memfd_create with a NUL-terminated name; returns a new descriptor or -1.
        let raw = unsafe { libc::memfd_create(c"thinlayer-journal".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io(
                "creating the crash journal (memfd_create)",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a descriptor memfd_create just returned.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), fmt::FILE_LEN as libc::off_t) } < 0 {
            return Err(Error::io(
                "sizing the crash journal",
                std::io::Error::last_os_error(),
            ));
        }
        let mut j = Self::map(fd)?;
        j.header_put(fmt::header::MAGIC.at, fmt::MAGIC);
        j.epoch = 1;
        j.flip();
        Ok(j)
    }

    /// A journal another process made (handed over), positioned after its last entry.
    pub fn adopt(fd: OwnedFd) -> Result<Journal> {
        // SAFETY: fstat into a zeroed struct, on a descriptor we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0
            || (st.st_size as usize) < fmt::FILE_LEN
        {
            return Err(Error::Internal(
                "the crash journal handed over is not one (too small)".into(),
            ));
        }
        let mut j = Self::map(fd)?;
        if fmt::header::MAGIC.get(j.bytes(0, fmt::HEADER_LEN)) != fmt::MAGIC {
            return Err(Error::Internal(
                "the crash journal handed over is not one (bad magic)".into(),
            ));
        }
        j.resync();
        Ok(j)
    }

    /// Take the header's word for where the journal stands: another process (a restart's
    /// new server that then failed) may have moved it on.
    pub fn resync(&mut self) {
        let active = fmt::header::ACTIVE.get(self.bytes(0, fmt::HEADER_LEN));
        self.region = (active & 1) as usize;
        self.epoch = active >> 1;
        let (at, seq) = self.scan(|_| {});
        self.at = at;
        self.seq = seq;
    }

    fn map(fd: OwnedFd) -> Result<Journal> {
        // SAFETY: a shared mapping of the whole memfd, which is at least FILE_LEN long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                fmt::FILE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(
                "mapping the crash journal",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Journal {
            fd,
            map: p.cast(),
            region: 0,
            epoch: 0,
            at: 0,
            seq: 0,
            overflowed: false,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        debug_assert!(at + len <= fmt::FILE_LEN);
        // SAFETY: within the mapping, which lives as long as self.
        unsafe { std::slice::from_raw_parts(self.map.add(at), len) }
    }

    fn bytes_mut(&mut self, at: usize, len: usize) -> &mut [u8] {
        debug_assert!(at + len <= fmt::FILE_LEN);
        // SAFETY: within the mapping; &mut self is the only writer.
        unsafe { std::slice::from_raw_parts_mut(self.map.add(at), len) }
    }

    fn header_put(&mut self, at: usize, v: u64) {
        crate::format::field::Field::<u64>::at(0).put(self.bytes_mut(at, 8), v);
    }

    fn region_start(region: usize) -> usize {
        fmt::HEADER_LEN + region * fmt::REGION_LEN
    }

    /// Point the header at `self.region` under `self.epoch`; one aligned 8-byte store.
    fn flip(&mut self) {
        let word = self.epoch << 1 | self.region as u64;
        // SAFETY: the header's ACTIVE field is 8-byte aligned within the page-aligned mapping.
        let p =
            unsafe { self.map.add(fmt::header::ACTIVE.at) } as *const std::sync::atomic::AtomicU64;
        // SAFETY: as above; other processes read it only after this one is gone.
        unsafe { &*p }.store(word.to_le(), std::sync::atomic::Ordering::Release);
        self.at = 0;
        self.seq = 0;
    }

    /// Walk the active region's entries; returns where the next one goes and its seq.
    fn scan(&self, mut each: impl FnMut(&Entry)) -> (usize, u64) {
        let start = Self::region_start(self.region);
        let region = self.bytes(start, fmt::REGION_LEN);
        let (mut at, mut seq) = (0, 0);
        while let Some((e, n)) = fmt::decode(&region[at..], self.epoch, seq) {
            each(&e);
            at += n;
            seq += 1;
        }
        (at, seq)
    }

    /// The transactions the journal holds, oldest first.
    pub fn read(&self) -> Vec<Txn> {
        let mut txns: Vec<Txn> = Vec::new();
        self.scan(|e| {
            if txns.last().is_none_or(|t| t.number != e.txn) {
                txns.push(Txn {
                    number: e.txn,
                    ..Default::default()
                });
            }
            let t = txns.last_mut().expect("pushed above");
            match e.kind {
                Kind::Records => t.records.extend_from_slice(e.payload),
                Kind::Staged => t.staged = fmt::staged_position(e.payload),
            }
        });
        txns
    }

    fn append(&mut self, kind: Kind, txn: u64, payload: &[u8]) {
        let n = fmt::entry_len(payload.len());
        if self.overflowed || self.at + n > fmt::REGION_LEN {
            if !self.overflowed {
                crate::log::process(
                    crate::log::Level::Error,
                    format_args!(
                        "thinlayer: the crash journal is full ({} MiB of records since the last \
                         commit): until the next commit, a crash of this server loses \
                         acknowledged writes",
                        fmt::REGION_LEN >> 20
                    ),
                );
            }
            self.overflowed = true;
            return;
        }
        let e = Entry {
            kind,
            epoch: self.epoch,
            seq: self.seq,
            txn,
            payload,
        };
        let at = Self::region_start(self.region) + self.at;
        fmt::encode(&e, self.bytes_mut(at, n));
        self.at += n;
        self.seq += 1;
    }

    /// Records of transaction `txn`, whole records only, before they are acknowledged.
    pub fn records(&mut self, txn: u64, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.append(Kind::Records, txn, bytes);
        }
    }

    /// Transaction `txn` was written as commit `commit` of log `log_id`.
    pub fn staged(&mut self, txn: u64, log_id: u64, commit: u64) {
        self.append(Kind::Staged, txn, &fmt::staged_payload(log_id, commit));
    }

    /// Everything before `txn` is durable: start the other region with `txn`'s records only
    /// and switch to it. A kill before the switch leaves the old region, which says the same
    /// about the open transaction.
    pub fn rebase(&mut self, txn: u64, records: &[u8]) {
        let old = self.region;
        self.region = 1 - old;
        self.epoch += 1;
        self.at = 0;
        self.seq = 0;
        self.overflowed = false;
        self.records(txn, records);
        let (at, seq) = (self.at, self.seq);
        let overflowed = self.overflowed;
        self.flip();
        (self.at, self.seq, self.overflowed) = (at, seq, overflowed);
        // Give the old region's memory back (it is only read if this flip never happened).
        // SAFETY: fallocate on our memfd; failure only costs memory.
        unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                Self::region_start(old) as libc::off_t,
                fmt::REGION_LEN as libc::off_t,
            );
        }
    }
}

#[cfg(test)]
impl Journal {
    /// A copy of this journal as it stands, in a memfd of its own: what a killed server left
    /// the keeper, for a test to open more than one next server from (each rebases its own).
    pub(crate) fn picture(&self) -> Journal {
        let mut to = Journal::create().unwrap();
        to.bytes_mut(0, fmt::HEADER_LEN)
            .copy_from_slice(self.bytes(0, fmt::HEADER_LEN));
        let start = Journal::region_start(self.region);
        to.bytes_mut(start, self.at)
            .copy_from_slice(self.bytes(start, self.at));
        to.resync();
        to
    }
}

/// A store's journal and where it stands: the number of the open transaction and how many
/// bytes of its records (`Inner::pending`) the journal already holds.
pub(crate) struct Journaled {
    pub journal: Journal,
    pub txn: u64,
    pub mirrored: usize,
}

/// What a replay found: transactions and map entries it applied, and blocks whose content
/// did not match the journal's crc (a write the killed server had not acknowledged was
/// under way into a block of its open transaction; the block keeps what it holds).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub transactions: u64,
    pub blocks: u64,
    pub torn: u64,
}

impl Inner {
    /// Replay the journal's transactions that the loaded pool does not have, in order, into
    /// the open transaction, as if they were being made now: each block they map is claimed
    /// in the allocator (it is free in the durable state, and must be neither handed out nor
    /// punched), each block they stop referencing is freed by the usual rules (a committed one
    /// only at the next commit). Then the journal is this store's.
    pub(crate) fn replay(&mut self, storage: &dyn Storage, journal: Journal) -> Result<Replayed> {
        let txns = journal.read();
        let mut r = Replayed::default();
        let mut touched: Vec<(LayerId, VBlock)> = Vec::new();
        let lacking: Vec<&Txn> = txns.iter().filter(|t| self.lacks(t)).collect();
        let streams = self.streams_while_loading();
        for t in lacking {
            r.transactions += 1;
            let mut rd = RecordReader::new(&t.records, "crash journal");
            while let Some(rec) = rd.next_record()? {
                self.replay_record(storage, rec, &streams, &mut touched)
                    .map_err(|e| {
                        e.context(format!(
                            "replaying transaction {} of the crash journal",
                            t.number
                        ))
                    })?;
            }
        }
        // The data of every block the replay left mapped must be what its entry says.
        touched.sort_unstable();
        touched.dedup();
        let bs = self.block_size as usize;
        let mut buf = vec![0u8; bs];
        for (layer, vb) in touched {
            let Some(Mapping::Data { pblock, crc }) =
                self.catalog.get(layer).and_then(|l| l.map.get(vb))
            else {
                continue;
            };
            if !self.pool.alloc.is_fresh(pblock) {
                continue;
            }
            r.blocks += 1;
            storage
                .read_at(&mut buf, pblock.0 * bs as u64)
                .map_err(|e| {
                    Error::io(format!("reading {pblock} to replay the crash journal"), e)
                })?;
            let actual = checksum::data(&buf);
            if actual != self.crc(storage, crc)? {
                // Only a write the dead server had not answered can be under way into a
                // block its map already names (an overwrite in place, rule 2 of §3): the
                // kernel resends that write. The block keeps what reached it.
                r.torn += 1;
                let to = Some(Mapping::data(pblock, actual));
                self.catalog.change(
                    &mut self.pending,
                    Change::Map {
                        layer,
                        vblock: vb,
                        to,
                    },
                    |_| {},
                )?;
            }
        }
        self.keep_journal(journal, &txns);
        Ok(r)
    }

    /// Whether the loaded pool lacks transaction `t` of a journal: it was never staged, or
    /// staged as a commit past the last one the pool holds (the log is read forward, §5.5).
    pub(super) fn lacks(&self, t: &Txn) -> bool {
        let have = (self.pool.meta.sb.log.id, self.pool.meta.sb.log_commit);
        t.staged.is_none_or(|p| p > have)
    }

    /// The streams' blocks known so far while the maps load (the log's, and the checkpoint's
    /// met so far; the completion claims them all): a loading allocator counts them used
    /// as every block below its floor and has not claimed them, so a replay naming one is
    /// refused here, as a loaded allocator's `claim_fresh` refuses it. Empty once loaded.
    fn streams_while_loading(&self) -> HashSet<PBlock> {
        let Some(lazy) = &self.lazy else {
            return HashSet::new();
        };
        let m = &self.pool.meta;
        let known = m
            .log_blocks
            .iter()
            .chain(&m.ckpt_blocks)
            .chain(&lazy.blocks);
        known.copied().collect()
    }

    /// The journal is this store's from now on: rebased onto the open transaction (what a
    /// replay put there), numbered after every transaction it held.
    fn keep_journal(&mut self, journal: Journal, txns: &[Txn]) {
        self.pending.cut();
        let mut j = Journaled {
            journal,
            txn: txns.last().map_or(1, |t| t.number + 1),
            mirrored: 0,
        };
        j.journal.rebase(j.txn, &self.pending.buf);
        j.mirrored = self.pending.buf.len();
        self.journal = Some(j);
    }

    fn replay_record(
        &mut self,
        storage: &dyn Storage,
        rec: Record,
        streams: &HashSet<PBlock>,
        touched: &mut Vec<(LayerId, VBlock)>,
    ) -> Result<()> {
        let Inner {
            catalog,
            pending,
            pool,
            ..
        } = self;
        let alloc = &mut pool.alloc;
        // A run's blocks are claimed and changed one by one, as any map entry's.
        let rec = match rec {
            Record::MapRun { layer, run } => Record::Map {
                layer,
                entries: run.entries().collect(),
            },
            rec => rec,
        };
        match rec {
            Record::Map { layer, entries } => {
                for e in entries {
                    let to = match e.target {
                        MapTarget::Unmapped => None,
                        MapTarget::Zero => Some(Mapping::Zero),
                        MapTarget::Data { pblock, crc } => {
                            let to = Mapping::data(pblock, crc);
                            let now = catalog.get(layer).and_then(|l| l.map.get(e.vblock));
                            // A paged crc (the commit was checkpointed since) is read to compare.
                            let same = match now {
                                Some(Mapping::Data { pblock: p, crc: r }) if p == pblock => {
                                    let r = match r {
                                        CrcRef::Known(c) => c,
                                        CrcRef::Paged(at) => pool.meta.sums().crc(storage, at)?,
                                    };
                                    r == crc
                                }
                                _ => false,
                            };
                            if same {
                                // Already there, block and crc: applying it changes nothing,
                                // so it cannot map a block twice. A journal written before
                                // the Staged entry came ahead of the pages (issue 17) can
                                // hold a commit the pool has as unstaged (DESIGN §10.1).
                                continue;
                            }
                            if streams.contains(&pblock) || !alloc.claim_fresh(pblock) {
                                return Err(Error::Corrupt(format!(
                                    "the crash journal maps {pblock} of layer {layer}, block {}, but the pool uses it already",
                                    e.vblock.0
                                )));
                            }
                            touched.push((layer, e.vblock));
                            Some(to)
                        }
                    };
                    catalog.change(
                        pending,
                        Change::Map {
                            layer,
                            vblock: e.vblock,
                            to,
                        },
                        |p| alloc.free(p),
                    )?;
                }
            }
            Record::LayerCreate(c) => catalog.change(pending, Change::Create(&c), |_| {})?,
            Record::LayerCommit(id) => catalog.change(pending, Change::Commit(id), |_| {})?,
            Record::LayerRemove(id) => {
                catalog.change(pending, Change::Remove(id), |p| alloc.free(p))?
            }
            Record::LayerAttr { layer, key, value } => catalog.change(
                pending,
                Change::Attr {
                    layer,
                    key: &key,
                    value: value.as_deref(),
                },
                |_| {},
            )?,
            Record::LayerRename { layer, name } => {
                catalog.change(pending, Change::Rename { layer, name: &name }, |_| {})?
            }
            Record::LayerCounters { layer, .. } => {
                return Err(Error::Corrupt(format!(
                    "the crash journal holds a checkpoint's counters record (layer {layer})"
                )))
            }
            Record::ChecksumPages(_)
            | Record::MapRunSums { .. }
            | Record::MapSinglesSums { .. }
            | Record::MapIndex(_) => {
                return Err(Error::Corrupt(
                    "the crash journal holds a checkpoint's checksum or map index record".into(),
                ))
            }
            Record::MapRun { .. } => unreachable!("turned into a map record above"),
        }
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.map.cast(), fmt::FILE_LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::MemStorage;
    use crate::volume::store::{CreateOptions, Store};
    use std::sync::Arc;

    /// A pool in memory with one committed, empty layer, opened with a new journal.
    fn journaled() -> (Arc<MemStorage>, Store, LayerId) {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let a = s.create_layer("a", None, Some(1 << 20)).unwrap().id;
        s.flush().unwrap();
        drop(s);
        let j = Some(Journal::create().unwrap());
        let (s, _) = Store::open_in_with(mem.clone(), true, j).unwrap();
        (mem, s, a)
    }

    fn read(s: &Store, id: LayerId, at: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        s.read_layer(id, at, &mut b).unwrap();
        b
    }

    /// A live server with a journal acknowledges writes (some flushed, some not), creates a
    /// layer and rewrites a block in place, and is killed: what it wrote is in the pool file's
    /// page cache (here: the shared memory storage, copied as it is), its records in the
    /// journal. The next server finds every acknowledged write; without the journal it would
    /// find only what was committed.
    #[test]
    fn acknowledged_writes_outlive_a_killed_server_through_the_journal() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let a = s.create_layer("a", None, Some(1 << 20)).unwrap().id;
        s.write_layer(a, 0, &[1; 4096]).unwrap();
        s.flush().unwrap();
        drop(s);
        let (s, r) =
            Store::open_in_with(mem.clone(), true, Some(Journal::create().unwrap())).unwrap();
        assert_eq!(r, Replayed::default());
        s.write_layer(a, 0, &[2; 4096]).unwrap(); // redirect: block 0 was committed
        s.write_layer(a, 8192, &[3; 8192]).unwrap();
        s.flush().unwrap();
        s.write_layer(a, 8192, &[4; 4096]).unwrap(); // committed: redirected
        s.write_layer(a, 40960, &[5; 4096]).unwrap();
        s.write_layer(a, 40960, &[6; 4096]).unwrap(); // fresh: overwritten in place
        s.zero_layer(a, 0, 4096, true).unwrap();
        let b = s.create_layer("b", None, Some(1 << 20)).unwrap().id;
        s.write_layer(b, 4096, &[7; 4096]).unwrap();
        // A commit staged (its pages written) but not yet durable when the kill comes.
        let staged = s.write().unwrap().stage(&*mem).unwrap().unwrap();
        s.write_layer(b, 0, &[8; 4096]).unwrap();
        let kill = || {
            let image = Arc::new(MemStorage::from_bytes(mem.snapshot()));
            let j = Journal::adopt(s.journal_fd().unwrap()).unwrap();
            (image, j)
        };
        let (image, j) = kill();
        let without =
            Store::open_in(Arc::new(MemStorage::from_bytes(image.snapshot())), true).unwrap();
        assert!(
            without.layer("b").is_ok(),
            "the staged commit's pages are in the page cache"
        );
        let lost = read(&without, b, 0) != vec![8; 4096];
        assert!(
            lost,
            "without the journal the last write is lost: the test could not fail"
        );
        drop(without);
        let (n, r) = Store::open_in_with(image.clone(), true, Some(j)).unwrap();
        assert_eq!(
            r.transactions, 1,
            "the staged commit is in the pool; only the open one replays"
        );
        assert_eq!(r.torn, 0);
        let check = |n: &Store| {
            n.verify_consistency().unwrap();
            assert_eq!(read(n, a, 0), vec![0; 4096]);
            assert_eq!(read(n, a, 4096), vec![0; 4096]);
            assert_eq!(read(n, a, 8192), vec![4; 4096]);
            assert_eq!(read(n, a, 12288), vec![3; 4096]);
            assert_eq!(read(n, a, 40960), vec![6; 4096]);
            assert_eq!(read(n, b, 0), vec![8; 4096]);
            assert_eq!(read(n, b, 4096), vec![7; 4096]);
        };
        check(&n);
        // The replayed writes are the new server's open transaction: they commit with it,
        // and the journal now holds them for the next kill.
        let (again, r) = Store::open_in_with(
            Arc::new(MemStorage::from_bytes(image.snapshot())),
            true,
            Some(Journal::adopt(n.journal_fd().unwrap()).unwrap()),
        )
        .unwrap();
        assert_eq!(r.transactions, 1);
        check(&again);
        drop(again);
        n.flush().unwrap();
        check(&n);
        drop(n);
        let reopened = Store::open_in(image, true).unwrap();
        check(&reopened);
        drop(staged);
    }

    /// A kill while the commit's pages were being written: the pool does not have the
    /// commit, so the journal replays both transactions, the sealed one first.
    #[test]
    fn a_commit_cut_off_by_the_kill_is_replayed_from_the_journal() {
        let (mem, s, a) = journaled();
        s.write_layer(a, 0, &[1; 4096]).unwrap();
        let before = mem.snapshot();
        let staged = s.write().unwrap().stage(&*mem).unwrap().unwrap();
        s.write_layer(a, 0, &[2; 4096]).unwrap();
        s.write_layer(a, 4096, &[3; 4096]).unwrap();
        // The pages never reached the file: keep the data blocks, not the log pages.
        let mut image = mem.snapshot();
        let meta: Vec<u64> = s.read().pool.meta.log_blocks.iter().map(|b| b.0).collect();
        for b in meta {
            let r = (b * 4096) as usize..((b + 1) * 4096) as usize;
            image[r.clone()].copy_from_slice(&before[r]);
        }
        let j = Journal::adopt(s.journal_fd().unwrap()).unwrap();
        let (n, r) =
            Store::open_in_with(Arc::new(MemStorage::from_bytes(image)), true, Some(j)).unwrap();
        assert_eq!(r.transactions, 2);
        n.verify_consistency().unwrap();
        assert_eq!(read(&n, a, 0), vec![2; 4096]);
        assert_eq!(read(&n, a, 4096), vec![3; 4096]);
        drop(staged);
    }

    /// A kill in the middle of an overwrite in place (a fresh block, rule 2): the block holds
    /// neither what the journal's crc says nor anything acknowledged as a whole; it keeps
    /// what reached it, and reads without a checksum error (the kernel resends the write).
    #[test]
    fn a_block_torn_by_a_kill_mid_write_keeps_what_reached_it() {
        let (mem, s, a) = journaled();
        s.write_layer(a, 0, &[1; 4096]).unwrap();
        let Some(Mapping::Data { pblock, .. }) =
            s.read().catalog.get(a).unwrap().map.get(VBlock(0))
        else {
            panic!("block 0 is mapped");
        };
        let mut torn = vec![1u8; 4096];
        torn[..512].fill(9);
        mem.write_at(&torn, pblock.0 * 4096).unwrap();
        let j = Journal::adopt(s.journal_fd().unwrap()).unwrap();
        let image = Arc::new(MemStorage::from_bytes(mem.snapshot()));
        let (n, r) = Store::open_in_with(image, true, Some(j)).unwrap();
        assert_eq!((r.blocks, r.torn), (1, 1));
        assert_eq!(read(&n, a, 0), torn);
        n.verify_consistency().unwrap();
    }

    /// Storage that, once given the journal, takes a picture of the pool file and of the
    /// journal right after the next write: a server killed at that moment.
    struct KillAfterWrite {
        mem: Arc<MemStorage>,
        journal: std::sync::Mutex<Option<OwnedFd>>,
        picture: std::sync::Mutex<Option<(Vec<u8>, Journal)>>,
    }

    impl KillAfterWrite {
        fn new(mem: Arc<MemStorage>) -> Arc<KillAfterWrite> {
            Arc::new(KillAfterWrite {
                mem,
                journal: Default::default(),
                picture: Default::default(),
            })
        }
    }

    /// A copy of a journal as it stands (what the keeper would hand to the next server).
    fn copy(fd: OwnedFd) -> Journal {
        Journal::adopt(fd).unwrap().picture()
    }

    impl Storage for KillAfterWrite {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
            self.mem.write_at(data, offset)?;
            if let Some(fd) = self.journal.lock().unwrap().take() {
                *self.picture.lock().unwrap() = Some((self.mem.snapshot(), copy(fd)));
            }
            Ok(())
        }
        fn sync(&self) -> std::io::Result<()> {
            self.mem.sync()
        }
        fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.mem.punch_hole(offset, len)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.mem.len()
        }
        fn allocated(&self) -> std::io::Result<u64> {
            self.mem.allocated()
        }
    }

    /// Issue 17: a kill right after a commit wrote its log page, before any sync. The page is
    /// in the pool file (the next open reads the log forward, §5.5), so the pool has the
    /// commit; the journal must say so already. It used to learn it only after the pages
    /// were written, so it held the transaction as open, and every later server refused to
    /// open ("the crash journal maps pool block N ... but the pool uses it already"): the
    /// keeper's restarts failed in a loop.
    #[test]
    fn a_kill_right_after_a_commits_pages_does_not_replay_it() {
        let mem = Arc::new(MemStorage::new());
        let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
        let a = s.create_layer("a", None, Some(1 << 20)).unwrap().id;
        s.flush().unwrap();
        drop(s);
        let kill = KillAfterWrite::new(mem);
        let (s, _) =
            Store::open_in_with(kill.clone(), true, Some(Journal::create().unwrap())).unwrap();
        s.write_layer(a, 0, &[1; 4096]).unwrap();
        s.flush().unwrap();
        s.write_layer(a, 8192, &[2; 4096]).unwrap();
        // The flush's first write is its commit's only log page.
        *kill.journal.lock().unwrap() = s.journal_fd();
        s.flush().unwrap();
        let (image, j) = kill.picture.lock().unwrap().take().unwrap();
        let without = Store::open_in(Arc::new(MemStorage::from_bytes(image.clone())), false);
        assert_eq!(
            read(&without.unwrap(), a, 8192),
            vec![2; 4096],
            "the pool file alone has the commit: the kill came after its page"
        );
        let t = j.read();
        assert_eq!(t.len(), 1, "{t:?}");
        assert!(
            t[0].staged.is_some(),
            "the journal holds the committed transaction as open: {t:?}"
        );
        let (n, r) =
            Store::open_in_with(Arc::new(MemStorage::from_bytes(image)), true, Some(j)).unwrap();
        assert_eq!(r.transactions, 0);
        n.verify_consistency().unwrap();
        assert_eq!(read(&n, a, 0), vec![1; 4096]);
        assert_eq!(read(&n, a, 8192), vec![2; 4096]);
        drop(s);
    }

    /// What the killed server of issue 17 left (one transaction, no Staged entry, one map
    /// entry the pool has committed identically) opens: an entry
    /// the pool already holds block for block and crc for crc is a no-op, not a conflict. A
    /// block the pool uses for something else is still refused.
    #[test]
    fn a_map_entry_the_pool_already_holds_replays_as_a_no_op() {
        let (mem, s, a) = journaled();
        s.write_layer(a, 8192, &[2; 4096]).unwrap();
        let records = s.read().pending.buf.clone();
        s.flush().unwrap();
        let Some(Mapping::Data { pblock, .. }) =
            s.read().catalog.get(a).unwrap().map.get(VBlock(2))
        else {
            panic!("block 2 is mapped");
        };
        drop(s);
        let old = || {
            let mut j = Journal::create().unwrap();
            j.records(7, &records);
            j
        };
        let image = || Arc::new(MemStorage::from_bytes(mem.snapshot()));
        let (n, r) = Store::open_in_with(image(), true, Some(old())).unwrap();
        assert_eq!((r.transactions, r.blocks, r.torn), (1, 0, 0));
        n.verify_consistency().unwrap();
        assert_eq!(read(&n, a, 8192), vec![2; 4096]);
        assert!(!n.has_pending(), "nothing changed");
        drop(n);
        // The same block for another vblock (or with another crc) is a conflict.
        let mut w = crate::format::record::RecordWriter::new();
        w.map(
            a,
            crate::format::record::MapEntry {
                vblock: VBlock(3),
                target: MapTarget::Data { pblock, crc: 1 },
            },
        );
        let mut j = Journal::create().unwrap();
        j.records(7, &w.buf);
        let e = Store::open_in_with(image(), true, Some(j)).err().unwrap();
        assert!(e.to_string().contains("uses it already"), "{e}");
    }

    #[test]
    fn transactions_read_back_in_order_and_rebase_keeps_only_the_open_one() {
        let mut j = Journal::create().unwrap();
        j.records(1, b"aaaa");
        j.records(1, b"bb");
        j.staged(1, 3, 7);
        j.records(2, b"cc");
        let dup = j.fd().try_clone_to_owned().unwrap();
        let other = Journal::adopt(dup).unwrap();
        let t = other.read();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].number, &t[0].records[..], t[0].staged),
            (1, &b"aaaabb"[..], Some((3, 7)))
        );
        assert_eq!(
            (t[1].number, &t[1].records[..], t[1].staged),
            (2, &b"cc"[..], None)
        );
        j.rebase(2, b"cc");
        j.records(2, b"dd");
        let t = Journal::adopt(j.fd().try_clone_to_owned().unwrap())
            .unwrap()
            .read();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].number, &t[0].records[..]), (2, &b"ccdd"[..]));
    }

    /// A kill in the middle of an append leaves a torn last entry: it is not read, and the
    /// entries before it are.
    #[test]
    fn a_torn_append_is_not_read() {
        let mut j = Journal::create().unwrap();
        j.records(1, b"whole");
        let at = Journal::region_start(j.region) + j.at;
        j.records(1, b"torn!!!!");
        j.bytes_mut(at + fmt::ENTRY_LEN, 4).fill(0);
        let t = Journal::adopt(j.fd().try_clone_to_owned().unwrap())
            .unwrap()
            .read();
        assert_eq!(t.len(), 1);
        assert_eq!(&t[0].records[..], b"whole");
    }
}
