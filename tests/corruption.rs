//! Damage on disk, structure by structure. A real pool file (several layers in a parent chain,
//! data, a checkpoint and log pages after it) is built once; each test copies it, flips bytes in
//! one kind of structure — a superblock slot, a checkpoint page, a log page, a data block — and
//! checks what the store and `check` make of it: never a panic; a damaged newer superblock slot
//! falls back to the older one and says so; a damaged metadata page is `Error::Corrupt` naming
//! its byte offset and page; a damaged data block is `Error::Corrupt` (EIO) naming the layer,
//! block and byte offset, and its bytes are never returned as data.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use thinlayer::format::checksum::{self, Kind};
use thinlayer::format::page::header;
use thinlayer::format::record::{map_run, Record, RecordReader, TAG_MAP_RUN_SUMS};
use thinlayer::format::superblock::{self, fields, Superblock};
use thinlayer::format::{LayerId, PAGE_SIZE};
use thinlayer::pool::{FileStorage, MemStorage, Storage};
use thinlayer::{CreateOptions, Error, Store};

const BS: u64 = 4096;
const LAYER_SIZE: u64 = 64 * BS;

/// The content written to block `vb` of layer `tag`: unique across the pool, so a data block
/// can be found in the file by its bytes.
fn block(tag: u8, vb: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BS)
        .map(|i| (i as u8).wrapping_mul(13) ^ tag.wrapping_mul(101) ^ vb as u8)
        .collect();
    b[..8].copy_from_slice(b"THINDATA");
    b[8] = tag;
    b[9..17].copy_from_slice(&vb.to_le_bytes());
    b
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Each layer's whole content after the last commit.
    layers: Vec<(String, Vec<u8>)>,
}

fn write_block(s: &Store, content: &mut [u8], layer: &str, tag: u8, vb: u64) {
    let id = s.layer(layer).unwrap().id;
    let b = block(tag, vb);
    s.write_layer(id, vb * BS, &b).unwrap();
    content[(vb * BS) as usize..((vb + 1) * BS) as usize].copy_from_slice(&b);
}

/// base (committed) <- mid (committed) <- top (writable), plus "scratch" that takes the many
/// small commits that push the log past the checkpoint threshold; then more commits, so the
/// newest state is a checkpoint followed by log pages.
fn build() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.pool");
    let s = Store::create(&path, &CreateOptions::default(), "corruption test").unwrap();
    let mut base = vec![0u8; LAYER_SIZE as usize];
    s.create_layer("base", None, Some(LAYER_SIZE)).unwrap();
    for vb in 0..12 {
        write_block(&s, &mut base, "base", 1, vb);
    }
    s.flush().unwrap();
    s.commit_layer("base").unwrap();
    let mut mid = base.clone();
    s.create_layer("mid", Some("base"), None).unwrap();
    write_block(&s, &mut mid, "mid", 2, 4);
    write_block(&s, &mut mid, "mid", 2, 20);
    let mid_id = s.layer("mid").unwrap().id;
    s.zero_layer(mid_id, 6 * BS, BS, false).unwrap();
    mid[(6 * BS) as usize..(7 * BS) as usize].fill(0);
    s.flush().unwrap();
    s.commit_layer("mid").unwrap();
    let mut top = mid.clone();
    s.create_layer("top", Some("mid"), None).unwrap();
    write_block(&s, &mut top, "top", 3, 5);
    s.flush().unwrap();

    let mut scratch = vec![0u8; LAYER_SIZE as usize];
    s.create_layer("scratch", None, Some(LAYER_SIZE)).unwrap();
    // Each commit appends at least one log page; past 1024 of them the commit checkpoints.
    for i in 0..1030u64 {
        write_block(&s, &mut scratch, "scratch", 4 + (i % 2) as u8, i % 3);
        s.flush().unwrap();
    }
    write_block(&s, &mut top, "top", 3, 8);
    s.flush().unwrap();
    write_block(&s, &mut top, "top", 3, 9);
    s.flush().unwrap();
    // The last commit: the state a fallback to the older slot loses.
    write_block(&s, &mut top, "top", 6, 9);
    s.flush().unwrap();
    drop(s);
    Fixture {
        _dir: dir,
        path,
        layers: vec![
            ("base".into(), base),
            ("mid".into(), mid),
            ("top".into(), top),
            ("scratch".into(), scratch),
        ],
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build)
}

/// A private copy of the pool file to damage.
fn copy_pool() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.pool");
    std::fs::copy(&fixture().path, &path).unwrap();
    (dir, path)
}

fn flip(path: &Path, offset: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[offset as usize] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

/// Both slots decoded (None where invalid).
fn slots(path: &Path) -> [Option<Superblock>; 2] {
    let b = std::fs::read(path).unwrap();
    [0, 1].map(|s| Superblock::decode(&b[s * PAGE_SIZE..(s + 1) * PAGE_SIZE], s).ok())
}

/// The slot holding the newest generation, and that superblock.
fn newest(path: &Path) -> (usize, Superblock) {
    let [a, b] = slots(path);
    let (a, b) = (a.unwrap(), b.unwrap());
    if a.generation > b.generation {
        (0, a)
    } else {
        (1, b)
    }
}

/// Page numbers of a stream, following each page's `next`.
fn stream_pages(path: &Path, head: u64, pages: u64) -> Vec<u64> {
    let b = std::fs::read(path).unwrap();
    let mut out = vec![];
    let mut p = head;
    for _ in 0..pages {
        out.push(p);
        let at = p as usize * PAGE_SIZE;
        p = header::NEXT.get(&b[at..]);
    }
    out
}

/// The byte offset in the pool file of the only block holding `content`.
fn find_block(path: &Path, content: &[u8]) -> u64 {
    let b = std::fs::read(path).unwrap();
    let hits: Vec<usize> = (0..b.len() / BS as usize)
        .filter(|&i| b[i * BS as usize..(i + 1) * BS as usize] == *content)
        .collect();
    assert_eq!(hits.len(), 1, "data block expected once in the pool file");
    hits[0] as u64 * BS
}

fn id(s: &Store, name: &str) -> LayerId {
    s.layer(name).unwrap().id
}

fn read_all(s: &Store, name: &str) -> thinlayer::Result<Vec<u8>> {
    let mut buf = vec![0u8; LAYER_SIZE as usize];
    s.read_layer(id(s, name), 0, &mut buf)?;
    Ok(buf)
}

fn assert_layers(s: &Store, layers: &[(String, Vec<u8>)]) {
    for (name, want) in layers {
        assert!(read_all(s, name).unwrap() == *want, "layer {name} differs");
    }
}

fn check(path: &Path, data: bool) -> thinlayer::check::CheckReport {
    let file = std::fs::File::open(path).unwrap();
    thinlayer::check::check(Arc::new(FileStorage::new(file)), data, &mut |_, _| {}).unwrap()
}

/// `check` lists a fault containing every one of `needles`.
fn assert_fault(r: &thinlayer::check::CheckReport, needles: &[&str]) {
    assert!(
        r.faults
            .iter()
            .any(|f| needles.iter().all(|n| f.message.contains(n))),
        "no fault with {needles:?} in {:?}",
        r.faults
    );
}

fn corrupt_message(r: thinlayer::Result<Store>) -> String {
    match r {
        Err(e @ Error::Corrupt(_)) => {
            assert_eq!(e.errno(), libc::EIO);
            e.to_string()
        }
        Err(e) => panic!("expected Error::Corrupt, got {e:?}"),
        Ok(_) => panic!("a pool with damaged metadata opened"),
    }
}

/// The checkpoint's record bytes, and where each byte of them is in the pool file.
fn checkpoint_bytes(path: &Path) -> (Vec<u8>, Vec<u64>) {
    let (_, sb) = newest(path);
    let b = std::fs::read(path).unwrap();
    let (mut bytes, mut at) = (vec![], vec![]);
    for p in stream_pages(path, sb.checkpoint.head, sb.checkpoint.pages) {
        let page = &b[p as usize * PAGE_SIZE..][..PAGE_SIZE];
        let len = header::PAYLOAD_LEN.get(page) as usize;
        let start = p * PAGE_SIZE as u64 + header::LEN as u64;
        bytes.extend_from_slice(&page[header::LEN..header::LEN + len]);
        at.extend((0..len as u64).map(|i| start + i));
    }
    (bytes, at)
}

/// The byte offset in the checkpoint of each map run (FORMAT.md §6.3.2: a checkpoint's runs
/// keep their crcs in checksum pages), with its layer, its blocks and where its crcs start in
/// the checksum stream.
fn map_runs(bytes: &[u8]) -> Vec<(usize, LayerId, usize, u64)> {
    let mut r = RecordReader::new(bytes, "checkpoint");
    let mut runs = vec![];
    loop {
        let (at, tag) = (r.position(), r.peek_tag());
        match r.next_record().unwrap() {
            Some(Record::MapRunSums {
                layer,
                count,
                sums_at,
                ..
            }) => {
                assert_eq!(tag, Some(TAG_MAP_RUN_SUMS));
                runs.push((at, layer, count as usize, sums_at))
            }
            Some(Record::MapRun { .. }) => panic!("a checkpoint's run carries its crcs"),
            Some(_) => {}
            None => return runs,
        }
    }
}

/// The checkpoint's checksum pages (FORMAT.md §5.6), as its leading records name them.
fn checksum_pages(path: &Path) -> Vec<u64> {
    let (bytes, _) = checkpoint_bytes(path);
    let mut r = RecordReader::new(&bytes, "checkpoint");
    let mut pages = vec![];
    while let Some(Record::ChecksumPages(p)) = r.next_record().unwrap() {
        pages.extend(p);
    }
    pages
}

/// The byte offset in the pool file of the crc at `pos` in the checksum stream.
fn crc_offset(path: &Path, pos: u64) -> u64 {
    let per_page = thinlayer::format::page::SUMS_PER_PAGE as u64;
    let page = checksum_pages(path)[(pos / per_page) as usize];
    page * PAGE_SIZE as u64 + header::LEN as u64 + 4 * (pos % per_page)
}

/// Rewrite the checkpoint's byte `i` (as `checkpoint_bytes` numbers them) and reseal its
/// page, so only the record's own checks can see the change.
fn rewrite_checkpoint_byte(path: &Path, at: &[u64], i: usize, value: u8) {
    let mut b = std::fs::read(path).unwrap();
    b[at[i] as usize] = value;
    let page = at[i] as usize / PAGE_SIZE * PAGE_SIZE;
    checksum::seal(Kind::CheckpointPage, &mut b[page..page + PAGE_SIZE]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn fixture_has_checkpoint_and_log_and_checks_clean() {
    let f = fixture();
    let (_, sb) = newest(&f.path);
    assert!(sb.checkpoint.pages > 0, "no checkpoint was written");
    assert!(sb.log.pages >= 3, "no log after the checkpoint");
    let s = Store::open_read_only(&f.path).unwrap();
    assert_layers(&s, &f.layers);
    let r = check(&f.path, true);
    assert!(r.is_clean(), "{:?}", r.faults);
    assert!(r.verified_blocks > 0);
    // "base" was written in order into contiguous blocks: its 12 blocks are one map run.
    let s = Store::open_read_only(&f.path).unwrap();
    let runs = map_runs(&checkpoint_bytes(&f.path).0);
    assert!(
        runs.iter()
            .any(|&(_, l, n, _)| l == id(&s, "base") && n == 12),
        "{runs:?}"
    );
    assert!(!checksum_pages(&f.path).is_empty());
}

/// A map run whose crc for one block is wrong (its checksum page resealed, so only the data
/// check can tell): `check --data` names the layer and the block, and reading it is EIO; a
/// run whose pool block is the "unmapped" sentinel is refused as damaged metadata.
#[test]
fn a_map_runs_crcs_and_blocks_are_checked() {
    let (_d, path) = copy_pool();
    let (bytes, at) = checkpoint_bytes(&path);
    let (run, _, _, sums_at) = map_runs(&bytes)[0];
    let crc = crc_offset(&path, sums_at + 5) as usize;
    let mut b = std::fs::read(&path).unwrap();
    b[crc] ^= 0x40;
    let page = crc / PAGE_SIZE * PAGE_SIZE;
    checksum::seal(Kind::ChecksumPage, &mut b[page..page + PAGE_SIZE]);
    std::fs::write(&path, b).unwrap();
    let r = check(&path, true);
    assert_fault(&r, &["layer \"base\"", "data block 5 (byte offset 20480)"]);
    let s = Store::open_read_only(&path).unwrap();
    let mut buf = vec![0u8; BS as usize];
    let e = s.read_layer(id(&s, "base"), 5 * BS, &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    s.read_layer(id(&s, "base"), 4 * BS, &mut buf).unwrap();
    drop(s);

    let (_d, path) = copy_pool();
    for i in 0..8 {
        rewrite_checkpoint_byte(&path, &at, run + map_run::PBLOCK.at + i, 0);
    }
    let m = corrupt_message(Store::open_read_only(&path));
    assert!(m.contains("map run of 12 blocks"), "{m}");
    let e = thinlayer::check::check(
        Arc::new(FileStorage::new(std::fs::File::open(&path).unwrap())),
        false,
        &mut |_, _| {},
    );
    let m = match e {
        Ok(r) => format!("{:?}", r.faults),
        Err(e) => e.to_string(),
    };
    assert!(m.contains("map run of 12 blocks"), "{m}");
}

/// A damaged newest slot: the older one (the last checkpoint's) names less of the log, but
/// the log's commits after it are found by reading forward (FORMAT.md §5.5), so nothing is
/// lost; `check` warns about the slot and a writable open rewrites it.
#[test]
fn damaged_newest_superblock_falls_back_to_older_slot_without_losing_commits() {
    let f = fixture();
    let (_d, path) = copy_pool();
    let (slot, sb) = newest(&path);
    let generation = fields::GENERATION.at as u64 + 4;
    flip(&path, slot as u64 * PAGE_SIZE as u64 + generation);
    let s = Store::open_read_only(&path).unwrap();
    assert_layers(&s, &f.layers);
    drop(s);
    let r = check(&path, true);
    assert_eq!(r.generation, sb.generation - 1);
    assert!(r.is_clean(), "{:?}", r.faults);
    // One bad slot beside a good one looks like a torn commit: `check` warns about it.
    assert!(
        r.notes
            .iter()
            .any(|m| m.message.contains(&format!("superblock slot {slot}"))
                && m.message.contains("checksum")),
        "{:?}",
        r.notes
    );
    // Opening for changes rewrites the damaged slot; the pool is then clean again.
    drop(Store::open(&path, "heal").unwrap());
    assert!(slots(&path).iter().all(Option::is_some));
    let r = check(&path, false);
    assert!(r.is_clean(), "{:?}", r.faults);
    let s = Store::open_read_only(&path).unwrap();
    assert_layers(&s, &f.layers);
}

#[test]
fn damaged_older_superblock_keeps_the_newest_state_and_is_noted() {
    let f = fixture();
    let (_d, path) = copy_pool();
    let (slot, sb) = newest(&path);
    let magic = fields::MAGIC.at as u64 + 1;
    flip(&path, (1 - slot) as u64 * PAGE_SIZE as u64 + magic);
    let s = Store::open_read_only(&path).unwrap();
    assert_layers(&s, &f.layers);
    drop(s);
    let r = check(&path, false);
    assert_eq!(r.generation, sb.generation);
    let slot_fault = format!("superblock slot {}", 1 - slot);
    assert!(r.is_clean(), "{:?}", r.faults);
    assert!(
        r.notes.iter().any(|m| m.message.contains(&slot_fault)),
        "{:?}",
        r.notes
    );
}

/// Damage behind a valid checksum: the newest slot names an impossible block size and is
/// re-sealed, so only the field check can refuse it; the older slot and the log's tail give
/// back the whole state.
#[test]
fn resealed_superblock_with_an_impossible_field_falls_back_and_is_noted() {
    let f = fixture();
    let (_d, path) = copy_pool();
    let (slot, sb) = newest(&path);
    let mut b = std::fs::read(&path).unwrap();
    let at = slot * PAGE_SIZE;
    fields::BLOCK_SIZE.put(&mut b[at..], 4096 + 512);
    checksum::seal(Kind::Superblock, &mut b[at..]);
    assert!(checksum::verify(Kind::Superblock, &b[at..]).is_ok());
    std::fs::write(&path, b).unwrap();
    let s = Store::open_read_only(&path).unwrap();
    assert_layers(&s, &f.layers);
    drop(s);
    let r = check(&path, false);
    assert_eq!(r.generation, sb.generation - 1);
    assert!(
        r.notes
            .iter()
            .any(|m| m.message.contains(&format!("superblock slot {slot}"))
                && m.message.contains("invalid block size 4608")),
        "{:?}",
        r.notes
    );
}

#[test]
fn both_superblocks_damaged_is_corrupt_naming_both_slots() {
    let (_d, path) = copy_pool();
    let head = fields::CHECKPOINT_HEAD.at as u64;
    flip(&path, head);
    flip(&path, PAGE_SIZE as u64 + head);
    let m = corrupt_message(Store::open_read_only(&path));
    assert!(m.contains("slot 0") && m.contains("slot 1"), "{m}");
    let m = corrupt_message(Store::open(&path, "test"));
    assert!(m.contains("slot 0") && m.contains("slot 1"), "{m}");
    let r = check(&path, false);
    assert!(
        r.faults.iter().any(|m| m.message.contains("slot 0")),
        "{:?}",
        r.faults
    );
}

#[test]
fn damaged_checkpoint_page_is_corrupt_naming_its_offset() {
    let (_d, path) = copy_pool();
    let (_, sb) = newest(&path);
    let page = sb.checkpoint.head;
    let offset = page * PAGE_SIZE as u64;
    flip(&path, offset + 100);
    // Both slots name this checkpoint: there is nothing to fall back to.
    let m = corrupt_message(Store::open_read_only(&path));
    assert!(m.contains("checkpoint page 0"), "{m}");
    assert!(
        m.contains(&format!("byte offset {offset} (page {page})")),
        "{m}"
    );
    let m = corrupt_message(Store::open(&path, "test"));
    assert!(m.contains(&format!("byte offset {offset}")), "{m}");
    assert_fault(&check(&path, false), &[&format!("byte offset {offset}")]);
}

/// A damaged checksum page (FORMAT.md §5.6) fails its own crc before any crc in it is used.
/// The pages are read on demand, with the data (the maps keep positions, not crcs): the pool
/// opens, a read of a block whose crc is in the page is `Error::Corrupt` (EIO) naming the
/// checksum page, its pool block and offset, never data checked against a wrong crc; blocks
/// whose crcs are elsewhere (log entries since the checkpoint, resident) still read; `check`
/// reports the page.
#[test]
fn damaged_checksum_page_is_corrupt_naming_its_offset() {
    let f = fixture();
    let (_d, path) = copy_pool();
    let page = checksum_pages(&path)[0];
    let offset = page * PAGE_SIZE as u64;
    flip(&path, offset + header::LEN as u64 + 8);
    let s = Store::open_read_only(&path).unwrap();
    let mut buf = vec![0u8; BS as usize];
    // "base" is one map run of 12 blocks: its crcs are in checksum page 0.
    let e = s.read_layer(id(&s, "base"), 3 * BS, &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let m = e.to_string();
    assert!(m.contains("checksum page 0"), "{m}");
    assert!(
        m.contains(&format!(
            "page {page}, pool block {}, byte offset {offset}",
            page
        )),
        "{m}"
    );
    // "top"'s block 9 was last written after the checkpoint: its crc is in the log, resident.
    s.read_layer(id(&s, "top"), 9 * BS, &mut buf).unwrap();
    let want = &f.layers.iter().find(|l| l.0 == "top").unwrap().1;
    assert_eq!(&buf[..], &want[(9 * BS) as usize..(10 * BS) as usize]);
    drop(s);
    assert_fault(
        &check(&path, false),
        &["checksum page 0", &format!("byte offset {offset}")],
    );
    // A checksum page in the place of another (stale, or written for another checkpoint)
    // fails the stream id or seq check even with a good crc.
    let (_d, path) = copy_pool();
    let mut b = std::fs::read(&path).unwrap();
    let at = offset as usize;
    header::SEQ.put(&mut b[at..], 1);
    checksum::seal(Kind::ChecksumPage, &mut b[at..at + PAGE_SIZE]);
    std::fs::write(&path, b).unwrap();
    let s = Store::open_read_only(&path).unwrap();
    let e = s.read_layer(id(&s, "base"), 0, &mut buf).unwrap_err();
    let m = e.to_string();
    assert!(m.contains("checksum page 0") && m.contains("page 1"), "{m}");
}

/// Scattered single blocks keep their crcs in the checkpoint's checksum pages too (map
/// singles, FORMAT.md §6.3.3): a damaged page fails the reads of exactly the blocks whose crcs
/// it holds (EIO naming the page), every other block reads back, and `check` reports it.
#[test]
fn damaged_checksum_page_of_singles_fails_exactly_the_blocks_it_covers() {
    const N: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("singles.pool");
    let s = Store::create(&path, &CreateOptions::default(), "corruption test").unwrap();
    let size = 2 * N * BS;
    let mut content = vec![0u8; size as usize];
    s.create_layer("s", None, Some(size)).unwrap();
    // One block in two: no two are contiguous in the layer and the pool, so all are singles.
    for i in 0..N {
        write_block(&s, &mut content, "s", 7, 2 * i);
    }
    s.flush().unwrap();
    s.checkpoint().unwrap();
    drop(s);
    let per_page = thinlayer::format::page::SUMS_PER_PAGE as u64;
    let (bytes, _) = checkpoint_bytes(&path);
    let mut r = RecordReader::new(&bytes, "checkpoint");
    let mut page_of = std::collections::BTreeMap::new();
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::MapSinglesSums {
                sums_at, entries, ..
            } => page_of.extend(
                entries
                    .iter()
                    .zip(sums_at..)
                    .map(|(e, at)| (e.0 .0, at / per_page)),
            ),
            Record::MapRunSums { .. } => panic!("a run among the singles"),
            _ => {}
        }
    }
    assert_eq!(page_of.len() as u64, N);
    let pages = checksum_pages(&path);
    assert_eq!(pages.len(), 3);
    let offset = pages[1] * PAGE_SIZE as u64;
    flip(&path, offset + header::LEN as u64 + 100);
    let s = Store::open_read_only(&path).unwrap();
    let l = id(&s, "s");
    let mut buf = vec![0u8; BS as usize];
    let mut failed = 0;
    for (&vb, &page) in &page_of {
        match s.read_layer(l, vb * BS, &mut buf) {
            Ok(()) => {
                assert_ne!(page, 1, "block {vb} read past its damaged crc page");
                assert!(buf == content[(vb * BS) as usize..((vb + 1) * BS) as usize]);
            }
            Err(e) => {
                assert_eq!(page, 1, "block {vb}: {e}");
                assert_eq!(e.errno(), libc::EIO, "{e}");
                let m = e.to_string();
                assert!(
                    m.contains("checksum page 1") && m.contains(&format!("byte offset {offset}")),
                    "{m}"
                );
                failed += 1;
            }
        }
    }
    assert_eq!(failed, per_page);
    drop(s);
    assert_fault(
        &check(&path, false),
        &["checksum page 1", &format!("byte offset {offset}")],
    );
}

/// The older slot (the checkpoint's) finds the log by reading forward from its start, and
/// stops at the damaged page; the newest slot names more pages of the same log, so this is
/// damage, not a crash: `check` names the page and the lost commits, a read-only open still
/// serves what is readable (the checkpoint's state), and a writable open refuses.
#[test]
fn damaged_early_log_page_is_corrupt_naming_its_offset() {
    let (_d, path) = copy_pool();
    let (_, sb) = newest(&path);
    let page = stream_pages(&path, sb.log.head, sb.log.pages)[0];
    let offset = page * PAGE_SIZE as u64;
    flip(&path, offset + 60);
    let r = check(&path, false);
    assert_fault(
        &r,
        &[&format!("log page 0 at byte offset {offset} (page {page})")],
    );
    let lost = format!("names {} log pages, but only 0 can be read", sb.log.pages);
    assert_fault(&r, &[&lost]);
    let m = corrupt_message(Store::open(&path, "test"));
    assert!(m.contains(&lost), "{m}");
    let s = Store::open_read_only(&path).unwrap();
    assert!(read_all(&s, "base").unwrap() == fixture().layers[0].1);
}

/// The last page of the log damaged: the older slot reads the log forward up to it. The last
/// commit it reads in full is the one before, whose data the damaged commit replaced (and the
/// pool punched): it fails the crc check that catches a crash cutting off a commit's data, so
/// the state read is from before both, and nothing unreadable is served as data.
#[test]
fn damaged_newest_log_page_falls_back_to_the_state_before_it() {
    let f = fixture();
    let (_d, path) = copy_pool();
    let (_, sb) = newest(&path);
    let pages = stream_pages(&path, sb.log.head, sb.log.pages);
    let page = *pages.last().unwrap();
    let offset = page * PAGE_SIZE as u64;
    flip(&path, offset + 2000);
    let r = check(&path, true);
    assert_eq!(r.generation, sb.generation - 1);
    let seq = sb.log.pages - 1;
    assert!(
        r.faults
            .iter()
            .any(|m| m.message.contains("using superblock generation")
                && m.message.contains(&format!(
                    "log page {seq} at byte offset {offset} (page {page})"
                ))),
        "{:?}",
        r.faults
    );
    // The lost commits are named, and a writable open refuses rather than build on less.
    let lost = format!(
        "names {} log pages, but only {} can be read",
        sb.log.pages,
        seq - 1
    );
    assert_fault(&r, &[&lost]);
    assert!(corrupt_message(Store::open(&path, "test")).contains(&lost));
    // What the older state reads: everything but "top", whose last two commits are gone.
    let s = Store::open_read_only(&path).unwrap();
    assert_layers(&s, &f.layers[..2]);
    assert_layers(&s, &f.layers[3..]);
    let top = read_all(&s, "top").unwrap();
    let mid = &f.layers[1].1;
    let at = |vb: u64| (vb * BS) as usize..((vb + 1) * BS) as usize;
    assert!(
        top[at(9)] == mid[at(9)],
        "top block 9 should read through to mid"
    );
    assert!(top[at(8)] == block(3, 8)[..]);
}

#[test]
fn damaged_data_block_is_eio_naming_layer_block_and_offset() {
    let f = fixture();
    let (_d, path) = copy_pool();
    // Block 3 of "base", read by "top" through the chain.
    let at = find_block(&path, &block(1, 3));
    flip(&path, at + 777);
    let s = Store::open_read_only(&path).unwrap();
    for reader in ["base", "mid", "top"] {
        let layer = id(&s, reader);
        for (offset, len) in [
            (3 * BS, BS),
            (0, LAYER_SIZE),
            (3 * BS + 10, 100),
            (2 * BS + 5, BS),
        ] {
            let mut buf = vec![0u8; len as usize];
            let e = s.read_layer(layer, offset, &mut buf).unwrap_err();
            assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
            assert_eq!(e.errno(), libc::EIO);
            let m = e.to_string();
            assert!(m.contains("layer \"base\""), "{m}");
            assert!(m.contains("data block 3 (byte offset 12288)"), "{m}");
            assert!(m.contains(&format!("pool block {}", at / BS)), "{m}");
        }
        // Blocks around it still read.
        let want = &f.layers.iter().find(|l| l.0 == reader).unwrap().1;
        let mut buf = vec![0u8; (3 * BS) as usize];
        s.read_layer(layer, 0, &mut buf).unwrap();
        assert!(buf[..] == want[..buf.len()]);
        s.read_layer(layer, 4 * BS, &mut buf).unwrap();
        assert!(buf[..] == want[(4 * BS) as usize..(7 * BS) as usize]);
    }
    // The writer fails the same way when copy-on-write needs the damaged block.
    drop(s);
    let s = Store::open(&path, "test").unwrap();
    let e = s.write_layer(id(&s, "top"), 3 * BS + 1, b"x").unwrap_err();
    assert!(
        matches!(e, Error::Corrupt(_)) && e.to_string().contains("data block 3"),
        "{e}"
    );
    drop(s);
    assert!(
        check(&path, false).is_clean(),
        "metadata-only check reads no data"
    );
    let r = check(&path, true);
    assert!(
        r.faults.iter().any(|m| m.message.contains("layer \"base\"")
            && m.message.contains("data block 3 (byte offset 12288)")),
        "{:?}",
        r.faults
    );
}

/// Every structure, many positions: open returns a store or an error, and a store that opened
/// reads each layer as its bytes or an error.
#[test]
fn flipped_bytes_anywhere_in_metadata_never_panic() {
    let image = std::fs::read(&fixture().path).unwrap();
    let sb = {
        let (_, sb) = newest(&fixture().path);
        sb
    };
    let mut targets: Vec<u64> = vec![];
    for slot in 0..2u64 {
        targets.extend((0..superblock::ENCODED_LEN as u64).map(|i| slot * PAGE_SIZE as u64 + i));
    }
    let mut pages = stream_pages(&fixture().path, sb.checkpoint.head, sb.checkpoint.pages);
    pages.extend(stream_pages(&fixture().path, sb.log.head, sb.log.pages));
    pages.extend(checksum_pages(&fixture().path));
    for p in pages {
        targets.extend(
            (0..PAGE_SIZE as u64)
                .step_by(61)
                .map(|i| p * PAGE_SIZE as u64 + i),
        );
    }
    for at in targets {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = image.clone();
            b[at as usize] ^= x;
            let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(b));
            if let Ok(s) = Store::open_in(storage, false) {
                for l in s.layers() {
                    let mut buf = vec![0u8; l.disk_size.min(1 << 20) as usize];
                    let _ = s.read_layer(l.id, 0, &mut buf);
                }
            }
        }
    }
}
