//! `SimStorage`: a fault-injecting twin of `MemStorage` for crash and error tests.
//!
//! It keeps two images apart, as a disk with a volatile write cache does: the *durable* image
//! (what the last `sync` made safe) and the writes completed since, in order. Reads see every
//! completed write. At a simulated power loss (`crash`) the durable image plus some of the
//! unsynced writes becomes the post-crash image: none, all, an ordered prefix, or any subset,
//! and a surviving write may be torn at a sector boundary (512 or 4096 bytes). It can also
//! fail I/O after N operations (EIO, ENOSPC, any errno), and refuse to grow the file past a
//! byte limit (a full filesystem). Everything random comes from a seed, so a failing case
//! replays exactly.

use super::storage::{MemStorage, Storage};
use std::io;
use std::sync::Mutex;

/// SplitMix64: tiny, fast, good enough to pick faults, and deterministic from its seed.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// A change completed since the last sync, not yet durable.
#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write { offset, data } => (*offset, *offset + data.len() as u64),
            Op::Punch { offset, len } => (*offset, *offset + *len),
        }
    }
    /// Apply the part of the op inside `[lo, hi)` to `img`.
    fn apply_part(&self, img: &mut Vec<u8>, lo: u64, hi: u64) {
        let (start, end) = self.range();
        let (lo, hi) = (lo.max(start), hi.min(end));
        if lo >= hi {
            return;
        }
        match self {
            Op::Write { offset, data } => {
                if img.len() < hi as usize {
                    img.resize(hi as usize, 0);
                }
                let src = &data[(lo - offset) as usize..(hi - offset) as usize];
                img[lo as usize..hi as usize].copy_from_slice(src);
            }
            // A hole reads as zeros; it does not grow the file.
            Op::Punch { .. } => {
                let hi = (hi as usize).min(img.len());
                let lo = (lo as usize).min(hi);
                img[lo..hi].fill(0);
            }
        }
    }
    fn apply(&self, img: &mut Vec<u8>) {
        let (s, e) = self.range();
        self.apply_part(img, s, e);
    }
    /// Apply only the `sector`-aligned pieces of the op that `keep` picks (a torn write).
    fn apply_torn(&self, img: &mut Vec<u8>, sector: u64, mut keep: impl FnMut(u64) -> bool) {
        let (s, e) = self.range();
        let mut lo = s;
        while lo < e {
            let hi = ((lo / sector + 1) * sector).min(e);
            if keep(lo / sector) {
                self.apply_part(img, lo, hi);
            }
            lo = hi;
        }
    }
}

/// What survives a simulated power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// Only what was synced: every write since the last sync is lost.
    LoseUnsynced,
    /// Every completed write (a process crash, not a power loss).
    KeepAll,
    /// The writes since the last sync up to a random point, in order; the write at that point
    /// is torn: a random prefix of its sectors reached the disk.
    Prefix { seed: u64, sector: u64 },
    /// Any subset of the writes since the last sync, each possibly torn (a random subset of
    /// its sectors), as a disk that reorders its cache may leave them.
    Subset { seed: u64, sector: u64 },
}

/// An injected failure: once `after` more operations have completed, operations fail with
/// `errno` (every later one if `sticky`, else just the next one).
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub after: u64,
    pub errno: i32,
    /// Count and fail only writes, punches and syncs; reads keep working.
    pub writes_only: bool,
    pub sticky: bool,
    /// A failing write first puts a prefix of its 512-byte sectors (maybe none) in place, as
    /// a device that fails halfway may.
    pub torn: bool,
}

#[derive(Default)]
struct State {
    durable: Vec<u8>,
    /// Every completed write: what reads see.
    current: Vec<u8>,
    unsynced: Vec<Op>,
    /// Operations counted towards `fault` so far.
    ops: u64,
    fault: Option<Fault>,
    /// Writes that would make the file longer than this fail with ENOSPC.
    space_limit: Option<u64>,
    /// Failures injected so far.
    failures: u64,
    /// While set, operations are neither counted nor failed (a test looking at the state).
    suspended: bool,
}

impl State {
    /// Count one operation and decide whether it fails.
    fn tick(&mut self, is_write: bool) -> io::Result<()> {
        let Some(f) = self.fault.filter(|_| !self.suspended) else {
            return Ok(());
        };
        if f.writes_only && !is_write {
            return Ok(());
        }
        self.ops += 1;
        if self.ops > f.after {
            if !f.sticky {
                self.fault = None;
            }
            self.failures += 1;
            return Err(io::Error::from_raw_os_error(f.errno));
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct SimStorage {
    state: Mutex<State>,
}

impl SimStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage whose durable (and current) image is `bytes`, e.g. a post-crash image.
    pub fn from_image(bytes: Vec<u8>) -> Self {
        SimStorage {
            state: Mutex::new(State {
                durable: bytes.clone(),
                current: bytes,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inject `f`, counting operations from now. Replaces any earlier fault.
    pub fn set_fault(&self, f: Option<Fault>) {
        let mut s = self.lock();
        s.ops = 0;
        s.fault = f;
    }

    /// Every operation after the next `n` fails with `errno`.
    pub fn fail_after(&self, n: u64, errno: i32) {
        self.set_fault(Some(Fault {
            after: n,
            errno,
            writes_only: false,
            sticky: true,
            torn: false,
        }));
    }

    /// Make the file unable to grow past `bytes` (None: no limit), like a full filesystem.
    pub fn set_space_limit(&self, bytes: Option<u64>) {
        self.lock().space_limit = bytes;
    }

    /// Suspend (or resume) the fault: while suspended, operations neither count nor fail, so
    /// a test can inspect the store between injected failures.
    pub fn set_suspended(&self, on: bool) {
        self.lock().suspended = on;
    }

    /// Failures injected so far.
    pub fn failures(&self) -> u64 {
        self.lock().failures
    }

    /// Operations counted towards the fault since it was set.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Writes and punches completed since the last sync.
    pub fn unsynced_ops(&self) -> usize {
        self.lock().unsynced.len()
    }

    /// What every completed write adds up to.
    pub fn current_image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The image a power loss now would leave, per `how`. The storage itself is unchanged.
    pub fn crash_image(&self, how: Crash) -> Vec<u8> {
        let s = self.lock();
        let mut img = s.durable.clone();
        match how {
            Crash::LoseUnsynced => {}
            Crash::KeepAll => img = s.current.clone(),
            Crash::Prefix { seed, sector } => {
                let mut rng = SplitMix::new(seed);
                let n = s.unsynced.len() as u64;
                let keep = rng.below(n + 1) as usize;
                for op in &s.unsynced[..keep] {
                    op.apply(&mut img);
                }
                if let Some(op) = s.unsynced.get(keep) {
                    let (a, b) = op.range();
                    let sectors = b.div_ceil(sector) - a / sector;
                    let cut = a / sector + rng.below(sectors + 1);
                    op.apply_torn(&mut img, sector, |sec| sec < cut);
                }
            }
            Crash::Subset { seed, sector } => {
                let mut rng = SplitMix::new(seed);
                for op in &s.unsynced {
                    match rng.below(4) {
                        0 => {}
                        1 => op.apply_torn(&mut img, sector, |_| rng.coin()),
                        _ => op.apply(&mut img),
                    }
                }
            }
        }
        img
    }

    /// What a killed process leaves of the file (its page cache outlives it): a copy of this
    /// storage as it stands, the writes since the last sync still there and still not
    /// durable, for the next process to open while this one is let go. No fault carries over.
    pub fn killed(&self) -> SimStorage {
        let s = self.lock();
        SimStorage {
            state: Mutex::new(State {
                durable: s.durable.clone(),
                current: s.current.clone(),
                unsynced: s.unsynced.clone(),
                space_limit: s.space_limit,
                ..State::default()
            }),
        }
    }

    /// Power loss: the post-crash image, as a `MemStorage` to reopen the pool from.
    pub fn crash(&self, how: Crash) -> MemStorage {
        MemStorage::from_bytes(self.crash_image(how))
    }

    /// Power loss in place: this storage now holds the post-crash image, durable, with no
    /// fault set, ready for the pool to be reopened on it.
    pub fn crash_in_place(&self, how: Crash) {
        let img = self.crash_image(how);
        let mut s = self.lock();
        *s = State {
            durable: img.clone(),
            current: img,
            space_limit: s.space_limit,
            ..State::default()
        };
    }
}

impl Storage for SimStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        s.tick(false)?;
        let b = &s.current;
        let start = (offset as usize).min(b.len());
        let end = (offset as usize).saturating_add(buf.len()).min(b.len());
        let n = end - start;
        buf[..n].copy_from_slice(&b[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        let torn = s.fault.is_some_and(|f| f.torn);
        if let Err(e) = s.tick(true) {
            if torn {
                let cut = SplitMix::new(s.ops ^ offset).below(data.len() as u64 / 512 + 1) * 512;
                let op = Op::Write {
                    offset,
                    data: data[..cut as usize].to_vec(),
                };
                op.apply(&mut s.current);
                s.unsynced.push(op);
            }
            return Err(e);
        }
        let end = offset + data.len() as u64;
        if let Some(limit) = s.space_limit {
            if end > limit && end > s.current.len() as u64 {
                s.failures += 1;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let op = Op::Write {
            offset,
            data: data.to_vec(),
        };
        op.apply(&mut s.current);
        s.unsynced.push(op);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        s.tick(true)?;
        let ops = std::mem::take(&mut s.unsynced);
        for op in &ops {
            op.apply(&mut s.durable);
        }
        debug_assert!(s.durable == s.current);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        s.tick(true)?;
        let op = Op::Punch { offset, len };
        op.apply(&mut s.current);
        s.unsynced.push(op);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn allocated(&self) -> io::Result<u64> {
        let s = self.lock();
        Ok(s.current
            .chunks(4096)
            .filter(|c| c.iter().any(|&x| x != 0))
            .count() as u64
            * 4096)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(s: &dyn Storage, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        s.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn reads_see_writes_but_only_synced_ones_are_durable() {
        let s = SimStorage::new();
        s.write_at(&[1; 100], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2; 50], 25).unwrap();
        assert_eq!(read(&s, 20, 10), [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        assert_eq!(s.unsynced_ops(), 1);
        let lost = s.crash(Crash::LoseUnsynced);
        assert_eq!(read(&lost, 0, 100), vec![1; 100]);
        let kept = s.crash(Crash::KeepAll);
        assert_eq!(read(&kept, 0, 100), read(&s, 0, 100));
        // Reads past the end are zeros, as in MemStorage.
        assert_eq!(read(&s, 90, 20)[10..], [0; 10]);
    }

    #[test]
    fn punched_range_reads_zero_and_is_undone_by_crash() {
        let s = SimStorage::new();
        s.write_at(&[7; 8192], 0).unwrap();
        s.sync().unwrap();
        s.punch_hole(4096, 4096).unwrap();
        assert_eq!(read(&s, 4096, 4096), vec![0; 4096]);
        assert_eq!(s.allocated().unwrap(), 4096);
        let img = s.crash_image(Crash::LoseUnsynced);
        assert_eq!(img, vec![7; 8192]);
    }

    /// Each sector of a post-crash image holds the durable bytes or one write's bytes.
    #[test]
    fn torn_writes_keep_whole_sectors_only() {
        for seed in 0..200 {
            for sector in [512u64, 4096] {
                let s = SimStorage::new();
                s.write_at(&vec![0xAA; 16384], 0).unwrap();
                s.sync().unwrap();
                s.write_at(&vec![0xBB; 16384], 0).unwrap();
                for how in [
                    Crash::Prefix { seed, sector },
                    Crash::Subset { seed, sector },
                ] {
                    let img = s.crash_image(how);
                    assert_eq!(img.len(), 16384);
                    for c in img.chunks(sector as usize) {
                        assert!(
                            c.iter().all(|&b| b == 0xAA) || c.iter().all(|&b| b == 0xBB),
                            "{how:?} mixed bytes inside a sector"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn prefix_crash_keeps_writes_in_order() {
        // Three writes to three places: a later one never survives without the earlier ones
        // (except the one torn at the cut, which may be partly there).
        for seed in 0..300 {
            let s = SimStorage::new();
            for i in 0..3u64 {
                s.write_at(&[i as u8 + 1; 512], i * 512).unwrap();
            }
            let img = s.crash_image(Crash::Prefix { seed, sector: 512 });
            let there: Vec<bool> = (0..3)
                .map(|i| img.get(i * 512).is_some_and(|&b| b != 0))
                .collect();
            let first_missing = there.iter().position(|&t| !t).unwrap_or(3);
            assert!(
                there[first_missing..].iter().all(|&t| !t),
                "seed {seed}: {there:?}"
            );
        }
    }

    #[test]
    fn subset_crash_is_deterministic_and_varied() {
        let s = SimStorage::new();
        for i in 0..8u64 {
            s.write_at(&[i as u8 + 1; 4096], i * 4096).unwrap();
        }
        let how = |seed| Crash::Subset { seed, sector: 4096 };
        assert_eq!(s.crash_image(how(5)), s.crash_image(how(5)));
        let distinct: std::collections::HashSet<Vec<u8>> =
            (0..50).map(|seed| s.crash_image(how(seed))).collect();
        assert!(
            distinct.len() > 10,
            "only {} distinct images",
            distinct.len()
        );
    }

    #[test]
    fn fails_after_n_operations() {
        let s = SimStorage::new();
        s.fail_after(2, libc::EIO);
        s.write_at(&[1], 0).unwrap();
        s.sync().unwrap();
        let e = s.write_at(&[2], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(s.sync().is_err());
        assert_eq!(s.failures(), 2);
        // The failed write changed nothing.
        s.set_fault(None);
        assert_eq!(read(&s, 0, 1), [1]);
        assert_eq!(s.durable_image(), vec![1]);
    }

    #[test]
    fn transient_fault_fails_once_and_writes_only_spares_reads() {
        let s = SimStorage::new();
        s.set_fault(Some(Fault {
            after: 1,
            errno: libc::ENOSPC,
            writes_only: true,
            sticky: false,
            torn: false,
        }));
        s.write_at(&[1], 0).unwrap();
        read(&s, 0, 1);
        let e = s.write_at(&[2], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        s.write_at(&[3], 0).unwrap();
        assert_eq!(read(&s, 0, 1), [3]);
    }

    #[test]
    fn suspended_fault_neither_counts_nor_fails() {
        let s = SimStorage::new();
        s.fail_after(1, libc::EIO);
        s.set_suspended(true);
        for _ in 0..5 {
            s.write_at(&[1], 0).unwrap();
        }
        s.set_suspended(false);
        s.write_at(&[2], 0).unwrap();
        assert!(s.write_at(&[3], 0).is_err());
    }

    #[test]
    fn space_limit_refuses_growth_only() {
        let s = SimStorage::new();
        s.set_space_limit(Some(8192));
        s.write_at(&[1; 8192], 0).unwrap();
        s.write_at(&[2; 100], 100).unwrap();
        let e = s.write_at(&[3; 10], 8190).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(s.len().unwrap(), 8192);
    }

    #[test]
    fn crash_in_place_resets_to_the_image() {
        let s = SimStorage::new();
        s.write_at(&[1; 10], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[2; 10], 0).unwrap();
        s.fail_after(0, libc::EIO);
        s.crash_in_place(Crash::LoseUnsynced);
        assert_eq!(read(&s, 0, 10), vec![1; 10]);
        assert_eq!(s.unsynced_ops(), 0);
        s.write_at(&[3; 1], 0).unwrap();
    }
}
