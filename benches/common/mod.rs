//! Fixtures and timed routines shared by the criterion bench (`store.rs`) and the target table
//! (`targets.rs`). Everything works on real files in a tempdir on the local disk.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thinlayer::format::LayerId;
use thinlayer::pool::{FileStorage, Storage};
use thinlayer::{CreateOptions, Store};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const BS: u64 = 4096;

/// Deterministic, cheap pseudo-random numbers (xorshift64*).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Non-zero bytes (zero blocks would be stored as holes, not data).
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut r = Rng::new(seed);
    for c in buf.chunks_mut(8) {
        let v = r.next() | 1;
        c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
    }
}

pub fn opts(block_size: u32) -> CreateOptions {
    CreateOptions {
        block_size,
        max_size: None,
    }
}

/// Bytes a file occupies on disk (st_blocks, what `du` shows).
pub fn du(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Resident set size of this process, in bytes.
pub fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Run each of `fs` once per round, `rounds` times, interleaved so that noise from other
/// processes falls on all of them alike; the first round only warms up. Medians, in order.
pub fn interleaved(rounds: usize, fs: &mut [Box<dyn FnMut() + '_>]) -> Vec<Duration> {
    let mut runs = vec![Vec::new(); fs.len()];
    for round in 0..=rounds {
        for (f, r) in fs.iter_mut().zip(&mut runs) {
            let (d, _) = time(&mut **f);
            if round > 0 {
                r.push(d);
            }
        }
    }
    runs.into_iter().map(median).collect()
}

pub fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

/// Which of `depth` layers owns block `b` of the chain fixture: a hash, so each layer holds a
/// scattered 1/depth of the volume.
fn owner(b: u64, depth: u64) -> u64 {
    let h = (b ^ (b >> 17)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (h >> 32) % depth
}

/// A pool whose volume of `vol` bytes is spread over `depth` committed layers (layer k writes
/// the blocks `owner(b, 64) % depth == k`), topped by an empty writable child "top".
/// Blocks are always written in the same order (grouped by their owner among 64), so the pool
/// layout is the same at every depth and only the chain differs.
pub fn chain_fixture(dir: &Path, depth: u64, vol: u64) -> (Store, LayerId) {
    let path = dir.join(format!("chain{depth}.pool"));
    let store = Store::create(&path, &opts(BS as u32), "bench").unwrap();
    let top = fill_chain(&store, depth, vol);
    (store, top)
}

fn fill_chain(store: &Store, depth: u64, vol: u64) -> LayerId {
    let blocks = vol / BS;
    let mut blk = vec![0u8; BS as usize];
    let mut parent: Option<String> = None;
    for k in 0..depth {
        let name = format!("l{k}");
        store
            .create_layer(&name, parent.as_deref(), Some(vol))
            .unwrap();
        let id = store.layer(&name).unwrap().id;
        for g in 0..64 {
            if g % depth != k {
                continue;
            }
            for b in (0..blocks).filter(|&b| owner(b, 64) == g) {
                fill(&mut blk, b);
                store.write_layer(id, b * BS, &blk).unwrap();
            }
        }
        store.commit_layer(&name).unwrap();
        store.flush().unwrap();
        parent = Some(name);
    }
    store.create_layer("top", parent.as_deref(), None).unwrap();
    store.flush().unwrap();
    store.layer("top").unwrap().id
}

/// Random block-aligned offsets within `vol`.
pub fn random_offsets(n: usize, vol: u64, seed: u64) -> Vec<u64> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(vol / BS) * BS).collect()
}

/// A pool with a committed base layer "base" of `size` bytes written sequentially, 1 MiB at a
/// time, and flushed. Returns the store and the base's id.
pub fn base_fixture(path: &Path, block_size: u32, size: u64) -> (Store, LayerId) {
    let store = Store::create(path, &opts(block_size), "bench").unwrap();
    let id = write_base(&store, "base", size, size);
    store.flush().unwrap();
    (store, id)
}

/// Create and commit base layer `name` of `vol` bytes holding `size` bytes written
/// sequentially, 1 MiB at a time (the same bytes `raw_file` writes).
fn write_base(store: &Store, name: &str, vol: u64, size: u64) -> LayerId {
    store.create_layer(name, None, Some(vol)).unwrap();
    let id = store.layer(name).unwrap().id;
    let mut buf = vec![0u8; MIB as usize];
    for (i, off) in (0..size).step_by(MIB as usize).enumerate() {
        fill(&mut buf, i as u64);
        let n = (size - off).min(MIB) as usize;
        store.write_layer(id, off, &buf[..n]).unwrap();
    }
    store.commit_layer(name).unwrap();
    id
}

/// A raw file of `size` bytes with the same kind of content, for the `pread` ceiling and as the
/// overlay lower file.
pub fn raw_file(path: &Path, size: u64) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for (i, off) in (0..size).step_by(MIB as usize).enumerate() {
        fill(&mut buf, i as u64);
        f.write_all(&buf[..(size - off).min(MIB) as usize]).unwrap();
    }
    f.sync_all().unwrap();
}

/// Read `size` bytes of a layer sequentially in 1 MiB requests.
pub fn seq_read_layer(store: &Store, id: LayerId, size: u64, buf: &mut [u8]) {
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        store.read_layer(id, off, &mut buf[..n]).unwrap();
        off += n as u64;
    }
}

/// Read a file sequentially with `pread` in requests of `buf.len()`.
pub fn seq_pread(f: &File, size: u64, buf: &mut [u8]) {
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off).unwrap();
        off += n as u64;
    }
}

/// What verifying the data checksums alone costs: crc32 of `size` bytes in `bs`-byte blocks,
/// over a buffer of `buf.len()` bytes reused (so it is the crc, not memory traffic).
pub fn crc_only(size: u64, bs: usize, buf: &[u8]) -> u32 {
    let mut acc = 0u32;
    let mut done = 0u64;
    while done < size {
        for blk in buf.chunks_exact(bs) {
            acc ^= crc32fast::hash(blk);
        }
        done += buf.len() as u64;
    }
    acc
}

// ---- overlay2-style file-level copy-on-write, done in this process on real files ----

/// An overlay2-style layered directory: `lowers[0]` is the top-most lower dir.
pub struct Overlay {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl Overlay {
    /// Find `name` like overlayfs lookup: upper first, then each lower, top-most first.
    pub fn lookup(&self, name: &str) -> PathBuf {
        std::iter::once(&self.upper)
            .chain(&self.lowers)
            .map(|d| d.join(name))
            .find(|p| p.symlink_metadata().is_ok())
            .expect("file in some layer")
    }

    /// Write `data` at `off` of `name`, copying the whole file up into the upper dir first when it
    /// only exists below (overlay2's copy-up), as a temp file in work/ renamed into upper/.
    pub fn write(&self, name: &str, off: u64, data: &[u8]) {
        let up = self.upper.join(name);
        if up.symlink_metadata().is_err() {
            let src = self.lookup(name);
            let tmp = self.work.join(name);
            std::fs::copy(&src, &tmp).unwrap();
            std::fs::rename(&tmp, &up).unwrap();
        }
        let f = std::fs::OpenOptions::new().write(true).open(&up).unwrap();
        f.write_all_at(data, off).unwrap();
    }

    /// Read a whole file through the layers in 1 MiB requests.
    pub fn read_file(&self, name: &str, buf: &mut [u8]) -> u64 {
        let p = self.lookup(name);
        let f = File::open(p).unwrap();
        let size = f.metadata().unwrap().len();
        seq_pread(&f, size, buf);
        size
    }
}

/// Overlay of `depth` lower dirs with `file` (of `size` bytes) in the bottom one and a small
/// unrelated file in each of the others.
pub fn overlay_fixture(dir: &Path, tag: &str, depth: usize, file: &str, size: u64) -> Overlay {
    let root = dir.join(format!("ovl-{tag}"));
    let lowers: Vec<PathBuf> = (0..depth).map(|i| root.join(format!("lower{i}"))).collect();
    for (i, l) in lowers.iter().enumerate() {
        std::fs::create_dir_all(l).unwrap();
        if i + 1 == depth {
            raw_file(&l.join(file), size);
        } else {
            std::fs::write(l.join(format!("other{i}")), [1u8; 4096]).unwrap();
        }
    }
    let (upper, work) = (root.join("upper"), root.join("work"));
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    Overlay {
        lowers,
        upper,
        work,
    }
}

/// The thinlayer twin of `overlay_fixture`: the file's bytes at offset 0 of a committed base,
/// `depth - 1` committed layers above it each changing one unrelated block, then a writable top.
pub fn layered_file_fixture(path: &Path, depth: usize, size: u64) -> (Store, LayerId) {
    let store = Store::create(path, &opts(BS as u32), "bench").unwrap();
    write_base(&store, "l0", size + MIB, size);
    let blk = [7u8; BS as usize];
    for k in 1..depth {
        let name = format!("l{k}");
        store
            .create_layer(&name, Some(&format!("l{}", k - 1)), None)
            .unwrap();
        let id = store.layer(&name).unwrap().id;
        store
            .write_layer(id, size + (k as u64 % 256) * BS, &blk)
            .unwrap();
        store.commit_layer(&name).unwrap();
    }
    store
        .create_layer("top", Some(&format!("l{}", depth - 1)), None)
        .unwrap();
    store.flush().unwrap();
    let id = store.layer("top").unwrap().id;
    (store, id)
}

/// Storage that drops data-block writes while `discard` is set and passes everything else to a
/// real pool file. The metadata-memory fixture sets it while writing 5 million data blocks and
/// clears it around `flush`, so the pool's metadata (checkpoint + log) is real and `open` reads
/// it, without putting 20 GiB of data on the disk. (Data reads would fail their checksums; the
/// fixture never reads data.)
pub struct DiscardData {
    pub file: FileStorage,
    pub discard: AtomicBool,
}

impl Storage for DiscardData {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.discard.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.file.write_at(data, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.file.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.file.punch_hole(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn allocated(&self) -> std::io::Result<u64> {
        self.file.allocated()
    }
}

pub fn discard_store(path: &Path) -> (Store, Arc<DiscardData>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    let s = Arc::new(DiscardData {
        file: FileStorage::new(f),
        discard: AtomicBool::new(false),
    });
    let store = Store::create_in(s.clone(), &opts(BS as u32)).unwrap();
    (store, s)
}
