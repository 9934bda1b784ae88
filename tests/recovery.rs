//! Reopening after trouble: what a writable open repairs, and what it must never throw away.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thinlayer::pool::{MemStorage, Storage};
use thinlayer::{CreateOptions, Store};

/// Storage whose reads fail with EIO while `fail_reads` is above zero (counting down).
struct FlakyReads {
    inner: MemStorage,
    fail_reads_at_or_after: AtomicU64,
    fail_reads: AtomicU64,
}

impl Storage for FlakyReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset >= self.fail_reads_at_or_after.load(Ordering::SeqCst)
            && self
                .fail_reads
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(data, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn allocated(&self) -> io::Result<u64> {
        self.inner.allocated()
    }
}

#[test]
fn a_read_error_while_opening_never_costs_committed_transactions() {
    let flaky = Arc::new(FlakyReads {
        inner: MemStorage::new(),
        fail_reads_at_or_after: AtomicU64::new(u64::MAX),
        fail_reads: AtomicU64::new(0),
    });
    let s = Store::create_in(flaky.clone(), &CreateOptions::default()).unwrap();
    s.create_layer("a", None, Some(1 << 20)).unwrap();
    s.flush().unwrap();
    s.create_layer("b", None, Some(1 << 20)).unwrap();
    s.flush().unwrap();
    drop(s);
    // One EIO on any metadata page read (past the superblocks) during the next open.
    flaky.fail_reads_at_or_after.store(8192, Ordering::SeqCst);
    flaky.fail_reads.store(1, Ordering::SeqCst);
    let err = Store::open_in(flaky.clone(), true)
        .err()
        .expect("open should report the EIO");
    assert_eq!(err.errno(), libc::EIO, "{err}");
    let s = Store::open_in(flaky, true).unwrap();
    let names: Vec<String> = s.layers().into_iter().map(|l| l.name).collect();
    assert_eq!(
        names,
        ["a", "b"],
        "a passing read error lost a committed layer"
    );
}

#[test]
fn a_torn_superblock_slot_is_a_warning_and_the_next_writable_open_rewrites_it() {
    let mem = Arc::new(MemStorage::new());
    let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
    s.create_layer("a", None, Some(1 << 20)).unwrap();
    s.flush().unwrap();
    drop(s);
    // Generation 2 is current (slot 0); tear slot 1 as a crash mid-write would.
    mem.write_at(&[0x5a; 100], 4096 + 20).unwrap();
    let r = thinlayer::check::check(mem.clone(), true, &mut |_, _| {}).unwrap();
    assert!(r.is_clean(), "{:?}", r.faults);
    assert!(
        r.notes.iter().any(|n| n.message.contains("slot 1")),
        "{:?}",
        r.notes
    );
    drop(Store::open_in(mem.clone(), true).unwrap());
    let r = thinlayer::check::check(mem.clone(), true, &mut |_, _| {}).unwrap();
    assert!(
        r.is_clean() && r.notes.is_empty(),
        "{:?} {:?}",
        r.faults,
        r.notes
    );
    // Both slots damaged: nothing to open, and check says so.
    mem.write_at(&[0x5a; 100], 20).unwrap();
    mem.write_at(&[0x5a; 100], 4096 + 20).unwrap();
    assert!(Store::open_in(mem.clone(), false).is_err());
    let r = thinlayer::check::check(mem, false, &mut |_, _| {}).unwrap();
    assert!(!r.is_clean());
}

#[test]
fn space_written_by_a_lost_transaction_is_given_back_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let s = Store::create(&path, &CreateOptions::default(), "test").unwrap();
    let l = s.create_layer("a", None, Some(64 << 20)).unwrap();
    s.flush().unwrap();
    let data: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 251 + 1) as u8).collect();
    s.write_layer(l.id, 0, &data).unwrap();
    // Crash: the process dies without committing.
    std::mem::forget(s);
    let du = || std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(du() >= 16 << 20);
    // The dead process's lock went with it; simulate by removing the lock file's holder note.
    let s = Store::open_in(
        Arc::new(thinlayer::pool::FileStorage::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
        )),
        true,
    )
    .unwrap();
    assert_eq!(s.layer("a").unwrap().size, 0);
    assert!(du() < 1 << 20, "{} bytes still occupied", du());
}

#[test]
fn block_numbers_past_the_pool_file_are_faults_not_giant_allocations() {
    use thinlayer::format::record::{MapEntry, MapTarget, RecordWriter};
    use thinlayer::format::{PBlock, VBlock};
    use thinlayer::pool::alloc::Claimed;
    use thinlayer::pool::{meta, Allocator, MetaStreams, Pool};
    let mem = Arc::new(MemStorage::new());
    let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
    let id = s.create_layer("a", None, Some(1 << 30)).unwrap().id;
    s.flush().unwrap();
    drop(s);
    // Append a commit whose map entry points 2^40 blocks into a pool of a few blocks.
    let (sbs, _) = meta::read_superblocks(&*mem).unwrap();
    let mut rec = meta::load(&*mem, &sbs[0]).unwrap();
    rec.replay_checkpoint(|_, _| Ok(())).unwrap();
    // As an open rebuilds it: everything below the file's end used, then the claims.
    let mut alloc = Allocator::loading(2, 0, mem.len().unwrap().div_ceil(4096));
    let mut claims = Claimed::default();
    for &b in rec.log_blocks.iter().chain(&rec.ckpt_blocks) {
        claims.claim(b);
    }
    alloc.finish_loading(claims);
    let mut pool = Pool::new(MetaStreams::from_recovered(&rec), alloc, rec.sb.block_size);
    let mut w = RecordWriter::new();
    let target = MapTarget::Data {
        pblock: PBlock(1 << 40),
        crc: 0,
    };
    w.map(
        id,
        MapEntry {
            vblock: VBlock(3),
            target,
        },
    );
    // A virtual block whose byte offset does not fit in 64 bits (fuzz pool_open).
    w.map(
        id,
        MapEntry {
            vblock: VBlock(u64::MAX / 2),
            target,
        },
    );
    // Through the one commit path the store uses (no checkpoint is due in so small a pool).
    let commit = pool
        .stage(
            &*mem,
            &mut w,
            Some(|_: &mut thinlayer::format::record::RecordWriter| Ok(())),
            |_| {},
        )
        .unwrap()
        .unwrap();
    let durable = commit.make_durable(&*mem);
    pool.finish(&*mem, commit, durable).unwrap();
    // Named by a superblock, as at close: otherwise this last commit of the log's tail would be
    // read as one whose data a crash cut off (its block is past the end of the file), and
    // left out (tests of that are in pool/meta.rs and tests/power_loss.rs).
    pool.meta.name_tail(&*mem).unwrap();

    let r = thinlayer::check::check(mem.clone(), false, &mut |_, _| {}).unwrap();
    assert!(
        r.faults
            .iter()
            .any(|f| f.message.contains("outside the pool")),
        "{:?}",
        r.faults
    );
    let err = Store::open_in(mem, true)
        .err()
        .expect("writable open must refuse");
    assert!(err.to_string().contains("outside the pool"), "{err}");
}

/// An import whose first blocks a shared transaction's commit made durable, cut off by a
/// crash, leaves no half-made layer: a read-only open shows it as importing (and not an
/// export), the next writable open removes it in one commit, and it says so.
#[test]
fn a_crash_during_an_import_leaves_no_half_made_layer() {
    let mem = Arc::new(MemStorage::new());
    let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
    s.create_layer("kept", None, Some(1 << 20)).unwrap();
    let l = s.begin_import("half", None, 1 << 20).unwrap();
    s.write_layer(l.id, 0, &[7u8; 8192]).unwrap();
    s.flush().unwrap(); // e.g. a background commit, or another client's FLUSH
    drop(s); // the crash: finish_import never ran
    let ro = Store::open_in(mem.clone(), false).unwrap();
    assert!(ro.layer("half").unwrap().importing);
    drop(ro);
    let s = Store::open_in(mem.clone(), true).unwrap();
    assert_eq!(s.discarded(), vec!["half".to_string()]);
    assert!(s.layer("half").is_err());
    assert!(s.layer("kept").is_ok());
    s.verify_consistency().unwrap();
    drop(s);
    // Removed durably: a second open finds nothing to discard.
    let s = Store::open_in(mem.clone(), true).unwrap();
    assert!(s.discarded().is_empty());
    let r = thinlayer::check::check(mem, true, &mut |_, _| {}).unwrap();
    assert!(r.is_clean(), "{:?}", r.faults);
}

/// A one-sync commit whose log pages reached the disk but whose data did not (power lost
/// during its sync): the open leaves it out, says so, and serves the state before it.
#[test]
fn a_commit_whose_data_did_not_reach_the_disk_is_left_out_and_noted() {
    let mem = Arc::new(MemStorage::new());
    let s = Store::create_in(mem.clone(), &CreateOptions::default()).unwrap();
    let id = s.create_layer("a", None, Some(1 << 20)).unwrap().id;
    s.write_layer(id, 0, &[0x11; 4096]).unwrap();
    s.flush().unwrap();
    s.write_layer(id, 4096, &[0x22; 4096]).unwrap();
    s.flush().unwrap();
    // The image as power loss might leave it: every page written, the last data block not.
    let mut img = mem.snapshot();
    let at = img
        .chunks(4096)
        .position(|b| b.iter().all(|&x| x == 0x22))
        .expect("the second block is in the file");
    img[at * 4096..(at + 1) * 4096].fill(0);
    drop(s);
    let lost = Arc::new(MemStorage::from_bytes(img));
    let r = thinlayer::check::check(lost.clone(), true, &mut |_, _| {}).unwrap();
    assert!(r.is_clean(), "{:?}", r.faults);
    assert!(
        r.notes.iter().any(|n| n.message.contains("was left out")),
        "{:?}",
        r.notes
    );
    let s = Store::open_in(lost, true).unwrap();
    let mut buf = vec![0u8; 8192];
    s.read_layer(id, 0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x11));
    assert!(
        buf[4096..].iter().all(|&b| b == 0),
        "the cut-off write is not served"
    );
    s.verify_consistency().unwrap();
}
