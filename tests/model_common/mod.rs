//! Shared by the model and power-loss tests: a random workload of layer operations, a simple
//! model of what every layer must read (a `Vec<u8>` per layer, a child starting as a copy of its
//! parent padded with zeros), and the checks that compare a store with the model.
#![allow(dead_code)]

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use thinlayer::volume::{BlockDevice, ExtentState};
use thinlayer::{Error, Store, Volume};

pub const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

/// A byte range chosen relative to the layer it lands on, so shrinking keeps it meaningful.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub a: u32,
    pub b: u32,
    /// 0..=6 inside the layer, 7 block-aligned inside, 8..=9 anywhere (often past the end).
    pub kind: u8,
}

impl Range {
    pub fn resolve(&self, size: u64, bs: u64) -> (u64, u64) {
        let (a, b) = (self.a as u64, self.b as u64);
        match self.kind {
            0..=6 => {
                let off = a % (size + 1);
                // Mostly a few blocks, sometimes to the end of the layer.
                let room = size - off;
                let len = if self.kind == 6 {
                    room
                } else {
                    b % (room.min(3 * bs) + 1)
                };
                (off, len)
            }
            7 => {
                let blocks = size / bs;
                let off = (a % (blocks + 1)) * bs;
                let len = (b % (blocks - off / bs + 1)) * bs;
                (off, len)
            }
            _ => (a % (size + 2 * bs), b % (3 * bs) + 1),
        }
    }
}

pub fn range() -> impl Strategy<Value = Range> {
    (any::<u32>(), any::<u32>(), 0u8..10).prop_map(|(a, b, kind)| Range { a, b, kind })
}

#[derive(Clone, Copy, Debug)]
pub enum Fill {
    Zeros,
    /// Bytes from a seed; `holes` makes every other 512-byte piece zero.
    Pattern {
        seed: u8,
        holes: bool,
    },
}

impl Fill {
    pub fn bytes(&self, len: usize) -> Vec<u8> {
        match *self {
            Fill::Zeros => vec![0; len],
            Fill::Pattern { seed, holes } => (0..len)
                .map(|i| {
                    if holes && (i / 512) % 2 == 1 {
                        0
                    } else {
                        // Never zero, so a block with data never looks like a hole.
                        (seed as usize + i * 7 + i / 251) as u8 | 1
                    }
                })
                .collect(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Op {
    CreateBase {
        name: u8,
        size: u32,
    },
    CreateChild {
        name: u8,
        parent: u8,
        grow: Option<i32>,
    },
    Commit {
        name: u8,
    },
    Remove {
        name: u8,
    },
    Write {
        layer: u8,
        range: Range,
        fill: Fill,
    },
    Zero {
        layer: u8,
        range: Range,
        may_unmap: bool,
    },
    Trim {
        layer: u8,
        range: Range,
    },
    Read {
        layer: u8,
        range: Range,
    },
    Flush,
    Reopen {
        flush_first: bool,
    },
}

pub fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        1 => Just(Fill::Zeros),
        6 => (any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(seed, holes)| Fill::Pattern { seed, holes }),
    ]
}

/// Sizes up to about 64 KiB, often unaligned, sometimes tiny; sometimes up to 256 KiB, so that
/// whole-layer writes of 4 KiB blocks make runs of 16 or more blocks, which the maps keep as
/// extents with their crcs apart (src/layer/map.rs).
pub fn layer_size() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 1u32..=65536,
        2 => (1u32..=16).prop_map(|k| k * 4096),
        1 => (17u32..=64).prop_map(|k| k * 4096),
        1 => 1u32..=600,
    ]
}

pub fn op(with_reopen: bool) -> impl Strategy<Value = Op> {
    let name = 0u8..NAMES.len() as u8;
    let layer = any::<u8>();
    prop_oneof![
        3 => (name.clone(), layer_size()).prop_map(|(name, size)| Op::CreateBase { name, size }),
        5 => (name.clone(), any::<u8>(), prop::option::weighted(0.4, -3000i32..40000))
            .prop_map(|(name, parent, grow)| Op::CreateChild { name, parent, grow }),
        3 => any::<u8>().prop_map(|name| Op::Commit { name }),
        1 => name.prop_map(|name| Op::Remove { name }),
        12 => (layer, range(), fill()).prop_map(|(layer, range, fill)| Op::Write { layer, range, fill }),
        3 => (layer, range(), any::<bool>())
            .prop_map(|(layer, range, may_unmap)| Op::Zero { layer, range, may_unmap }),
        2 => (layer, range()).prop_map(|(layer, range)| Op::Trim { layer, range }),
        2 => (layer, range()).prop_map(|(layer, range)| Op::Read { layer, range }),
        2 => Just(Op::Flush),
        (if with_reopen { 1 } else { 0 }) => any::<bool>().prop_map(|flush_first| Op::Reopen { flush_first }),
    ]
}

pub fn block_size() -> impl Strategy<Value = u32> {
    prop_oneof![6 => Just(4096u32), 1 => Just(8192u32), 1 => Just(65536u32)]
}

#[derive(Clone, Debug, PartialEq)]
pub struct MLayer {
    pub parent: Option<String>,
    pub writable: bool,
    pub data: Vec<u8>,
    /// Blocks this layer's own map holds data for (what its `size` counts).
    pub own: BTreeSet<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub bs: u64,
    pub layers: BTreeMap<String, MLayer>,
}

/// What the store must answer to an operation, by error kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Ok,
    Invalid,
    NoSpace,
    ReadOnly,
    NotFound,
    AlreadyExists,
    Conflict,
}

pub fn kind(e: &Error) -> Expect {
    match e {
        Error::InvalidInput(_) => Expect::Invalid,
        Error::NoSpace(_) => Expect::NoSpace,
        Error::ReadOnly(_) => Expect::ReadOnly,
        Error::NotFound(_) => Expect::NotFound,
        Error::AlreadyExists(_) => Expect::AlreadyExists,
        Error::Conflict(_) => Expect::Conflict,
        other => panic!("unexpected error kind: {other}"),
    }
}

impl Model {
    pub fn new(bs: u32) -> Model {
        Model {
            bs: bs as u64,
            layers: BTreeMap::new(),
        }
    }

    /// The layer an I/O op picks: one of the existing layers, by index.
    pub fn pick(&self, i: u8) -> Option<String> {
        if self.layers.is_empty() {
            return None;
        }
        self.layers
            .keys()
            .nth(i as usize % self.layers.len())
            .cloned()
    }

    /// The parent a create-child op names: mostly a committed layer, sometimes any layer (a
    /// writable one is refused), rarely one that does not exist.
    pub fn pick_parent(&self, i: u8) -> String {
        let committed: Vec<&String> = self
            .layers
            .iter()
            .filter(|(_, l)| !l.writable)
            .map(|(n, _)| n)
            .collect();
        if i >= 250 {
            return "missing".into();
        }
        if i < 200 && !committed.is_empty() {
            return committed[i as usize % committed.len()].clone();
        }
        self.pick(i).unwrap_or_else(|| "missing".into())
    }

    fn has_children(&self, name: &str) -> bool {
        self.layers
            .values()
            .any(|l| l.parent.as_deref() == Some(name))
    }

    pub fn chain_size(&self, name: &str) -> u64 {
        let mut total = 0;
        let mut cur = Some(name.to_string());
        while let Some(n) = cur {
            let l = &self.layers[&n];
            total += l.own.len() as u64 * self.bs;
            cur = l.parent.clone();
        }
        total
    }

    /// After bytes of blocks `first..=last` changed: a block holds data of its own exactly
    /// when it was rewritten and does not read as all zeros.
    fn retouch(&mut self, name: &str, first: u64, last: u64) {
        let bs = self.bs as usize;
        let l = self.layers.get_mut(name).unwrap();
        for vb in first..=last {
            let s = vb as usize * bs;
            let e = (s + bs).min(l.data.len());
            if l.data[s..e].iter().any(|&b| b != 0) {
                l.own.insert(vb);
            } else {
                l.own.remove(&vb);
            }
        }
    }

    pub fn create_base(&mut self, name: &str, size: u64) -> Expect {
        if self.layers.contains_key(name) {
            return Expect::AlreadyExists;
        }
        if size == 0 {
            return Expect::Invalid;
        }
        self.layers.insert(
            name.into(),
            MLayer {
                parent: None,
                writable: true,
                data: vec![0; size as usize],
                own: BTreeSet::new(),
            },
        );
        Expect::Ok
    }

    pub fn create_child(&mut self, name: &str, parent: &str, size: Option<u64>) -> Expect {
        if self.layers.contains_key(name) {
            return Expect::AlreadyExists;
        }
        let Some(p) = self.layers.get(parent) else {
            return Expect::NotFound;
        };
        if p.writable {
            return Expect::Conflict;
        }
        let size = size.unwrap_or(p.data.len() as u64);
        if size < p.data.len() as u64 {
            return Expect::Invalid;
        }
        let mut data = p.data.clone();
        data.resize(size as usize, 0);
        self.layers.insert(
            name.into(),
            MLayer {
                parent: Some(parent.into()),
                writable: true,
                data,
                own: BTreeSet::new(),
            },
        );
        Expect::Ok
    }

    pub fn commit(&mut self, name: &str) -> Expect {
        match self.layers.get_mut(name) {
            None => Expect::NotFound,
            Some(l) if !l.writable => Expect::Conflict,
            Some(l) => {
                l.writable = false;
                Expect::Ok
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Expect {
        if !self.layers.contains_key(name) {
            return Expect::NotFound;
        }
        if self.has_children(name) {
            return Expect::Conflict;
        }
        self.layers.remove(name);
        Expect::Ok
    }

    fn check_write(&self, name: &str, off: u64, len: u64) -> Expect {
        let l = &self.layers[name];
        if !l.writable {
            return Expect::ReadOnly;
        }
        if off + len > l.data.len() as u64 {
            return Expect::NoSpace;
        }
        Expect::Ok
    }

    pub fn write(&mut self, name: &str, off: u64, data: &[u8]) -> Expect {
        let e = self.check_write(name, off, data.len() as u64);
        if e != Expect::Ok || data.is_empty() {
            return e;
        }
        let l = self.layers.get_mut(name).unwrap();
        l.data[off as usize..off as usize + data.len()].copy_from_slice(data);
        let end = off + data.len() as u64;
        self.retouch(name, off / self.bs, (end - 1) / self.bs);
        Expect::Ok
    }

    /// Zero (and trim, which is zero with `may_unmap`): whole blocks lose their own data,
    /// partial blocks are rewritten.
    pub fn zero(&mut self, name: &str, off: u64, len: u64) -> Expect {
        let e = self.check_write(name, off, len);
        if e != Expect::Ok || len == 0 {
            return e;
        }
        let bs = self.bs;
        let l = self.layers.get_mut(name).unwrap();
        l.data[off as usize..(off + len) as usize].fill(0);
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let vb = pos / bs;
            let n = (bs - pos % bs).min(end - pos);
            if n == bs {
                self.layers.get_mut(name).unwrap().own.remove(&vb);
            } else {
                self.retouch(name, vb, vb);
            }
            pos += n;
        }
        Expect::Ok
    }

    pub fn read(&self, name: &str, off: u64, len: u64) -> Result<&[u8], Expect> {
        let l = &self.layers[name];
        if off + len > l.data.len() as u64 {
            return Err(Expect::Invalid);
        }
        Ok(&l.data[off as usize..(off + len) as usize])
    }
}

pub fn id_of(store: &Store, name: &str) -> thinlayer::format::LayerId {
    store.layer(name).unwrap().id
}

pub fn result_kind<T>(r: &thinlayer::Result<T>) -> Expect {
    match r {
        Ok(_) => Expect::Ok,
        Err(e) => kind(e),
    }
}

/// Run one op on both; panics (with the op) when the store's answer differs from the model's.
/// Returns the store's error, if any, for callers that inject faults.
pub fn apply(store: &Arc<Store>, m: &mut Model, op: &Op) -> thinlayer::Result<()> {
    apply_faulty(store, m, op, false)
}

/// `apply`, where with `faults` a store error the model did not expect (the pool filled up,
/// injected I/O errors) is returned instead of failing the test; `m` is then not to be trusted.
pub fn apply_faulty(
    store: &Arc<Store>,
    m: &mut Model,
    op: &Op,
    faults: bool,
) -> thinlayer::Result<()> {
    let bs = m.bs;
    let r: thinlayer::Result<()>;
    let want: Expect;
    match op {
        Op::CreateBase { name, size } => {
            let name = NAMES[*name as usize];
            r = store
                .create_layer(name, None, Some(*size as u64))
                .map(|_| ());
            want = m.create_base(name, *size as u64);
        }
        Op::CreateChild { name, parent, grow } => {
            let name = NAMES[*name as usize];
            let parent = m.pick_parent(*parent);
            let parent = parent.as_str();
            // Larger than the parent, the same size given explicitly, or (refused) smaller.
            let size = grow.map(|g| {
                let p = m.layers.get(parent).map_or(4096, |p| p.data.len() as i64);
                (p + g as i64).max(0) as u64
            });
            r = store.create_layer(name, Some(parent), size).map(|_| ());
            want = m.create_child(name, parent, size);
        }
        Op::Commit { name } => {
            // Mostly an existing layer; sometimes any name, which may be missing.
            let name = if *name >= 200 {
                NAMES[*name as usize % NAMES.len()].to_string()
            } else {
                m.pick(*name).unwrap_or_else(|| NAMES[0].to_string())
            };
            let name = name.as_str();
            r = store.commit_layer(name);
            want = m.commit(name);
        }
        Op::Remove { name } => {
            let name = NAMES[*name as usize];
            r = store.remove_layer(name);
            want = m.remove(name);
        }
        Op::Write { layer, range, fill } => {
            let Some(name) = m.pick(*layer) else {
                return Ok(());
            };
            let (off, len) = range.resolve(m.layers[&name].data.len() as u64, bs);
            let data = fill.bytes(len as usize);
            r = store.write_layer(id_of(store, &name), off, &data);
            want = m.write(&name, off, &data);
        }
        Op::Zero {
            layer,
            range,
            may_unmap,
        } => {
            let Some(name) = m.pick(*layer) else {
                return Ok(());
            };
            let (off, len) = range.resolve(m.layers[&name].data.len() as u64, bs);
            r = store.zero_layer(id_of(store, &name), off, len, *may_unmap);
            want = m.zero(&name, off, len);
        }
        Op::Trim { layer, range } => {
            let Some(name) = m.pick(*layer) else {
                return Ok(());
            };
            let (off, len) = range.resolve(m.layers[&name].data.len() as u64, bs);
            // Through the block-device seam, as the NBD server calls it.
            let v = Volume::open(store, &name).unwrap();
            r = v.trim(off, len);
            want = m.zero(&name, off, len);
        }
        Op::Read { layer, range } => {
            let Some(name) = m.pick(*layer) else {
                return Ok(());
            };
            let (off, len) = range.resolve(m.layers[&name].data.len() as u64, bs);
            let mut buf = vec![0xEE; len as usize];
            let got = store.read_layer(id_of(store, &name), off, &mut buf);
            if faults && matches!(got, Err(Error::Io { .. })) {
                return got;
            }
            match m.read(&name, off, len) {
                Ok(exp) => {
                    got.as_ref()
                        .unwrap_or_else(|e| panic!("{op:?}: read failed: {e}"));
                    assert!(buf == exp, "{op:?}: read of {name} at {off}+{len} differs");
                }
                Err(k) => assert_eq!(result_kind(&got), k, "{op:?}: {got:?}"),
            }
            return got;
        }
        Op::Flush => {
            return store.flush();
        }
        Op::Reopen { .. } => unreachable!("the caller reopens"),
    }
    if faults && want == Expect::Ok && matches!(r, Err(Error::Io { .. } | Error::NoSpace(_))) {
        return r;
    }
    assert_eq!(result_kind(&r), want, "{op:?}: store said {r:?}");
    r
}

/// Compare everything the store shows with the model: catalogue, accounting, every byte of
/// every layer, extents, and the live consistency of maps and allocator.
pub fn check_all(store: &Store, m: &Model) {
    if let Some(why) = mismatch(store, m) {
        panic!("store differs from the model: {why}");
    }
    let infos = store.layers();
    let names: Vec<&str> = infos.iter().map(|l| l.name.as_str()).collect();
    let mut data_total = 0;
    let mut virtual_total = 0;
    for info in &infos {
        let l = &m.layers[&info.name];
        // Parents come before children in `layers()`.
        if let Some(p) = &info.parent {
            let pi = names.iter().position(|n| n == p).unwrap();
            let ci = names.iter().position(|n| *n == info.name).unwrap();
            assert!(pi < ci, "{p} listed after its child {}", info.name);
        }
        data_total += info.size;
        virtual_total += info.virtual_size;
        // Extents tile the layer; only data extents may hold non-zero bytes.
        let ext = store
            .extents_layer(info.id, 0, l.data.len() as u64)
            .unwrap();
        let mut pos = 0;
        for x in &ext {
            assert_eq!(x.offset, pos, "extents of {} leave a gap", info.name);
            if x.state != ExtentState::Data {
                let s = &l.data[x.offset as usize..(x.offset + x.len) as usize];
                assert!(s.iter().all(|&b| b == 0), "{}: {x:?} reads data", info.name);
            }
            pos += x.len;
        }
        assert_eq!(
            pos,
            l.data.len() as u64,
            "extents of {} end early",
            info.name
        );
    }
    let u = store.usage().unwrap();
    assert_eq!(u.layers, m.layers.len());
    assert_eq!(u.data_bytes, data_total, "usage data_bytes");
    assert_eq!(u.virtual_total, virtual_total, "usage virtual_total");
    assert!(u.allocated >= u.data_bytes + u.metadata_bytes, "{u:?}");
    store
        .verify_consistency()
        .unwrap_or_else(|e| panic!("inconsistent store: {e}"));
}

/// The first difference between what the store shows (catalogue, accounting, bytes) and the
/// model, or None.
pub fn mismatch(store: &Store, m: &Model) -> Option<String> {
    let bs = m.bs;
    let infos = store.layers();
    let mut names: Vec<&str> = infos.iter().map(|l| l.name.as_str()).collect();
    names.sort();
    let want: Vec<&str> = m.layers.keys().map(|s| s.as_str()).collect();
    if names != want {
        return Some(format!("layers {names:?}, model {want:?}"));
    }
    for info in &infos {
        let l = &m.layers[&info.name];
        let got = (
            &info.parent,
            info.writable,
            info.disk_size,
            info.size,
            info.virtual_size,
        );
        let exp = (
            &l.parent,
            l.writable,
            l.data.len() as u64,
            l.own.len() as u64 * bs,
            m.chain_size(&info.name),
        );
        if got != exp {
            return Some(format!(
                "layer {}: (parent, writable, disk size, size, virtual size) {got:?}, model {exp:?}",
                info.name
            ));
        }
        let mut buf = vec![0xEE; l.data.len()];
        if let Err(e) = store.read_layer(info.id, 0, &mut buf) {
            return Some(format!("reading {}: {e}", info.name));
        }
        if buf != l.data {
            let at = buf.iter().zip(&l.data).position(|(a, b)| a != b).unwrap();
            return Some(format!(
                "layer {} differs at byte {at} (block {}): store {:#04x} model {:#04x}",
                info.name,
                at as u64 / bs,
                buf[at],
                l.data[at]
            ));
        }
    }
    None
}

/// Right after opening: nothing is pending, so the allocator's used blocks are exactly the
/// data blocks the maps reference plus the metadata blocks, and the fsck finds nothing.
pub fn check_after_open(store: &Store, storage: Arc<dyn thinlayer::pool::Storage>) {
    let u = store.usage().unwrap();
    let bs = u.block_size as u64;
    assert_eq!(
        store.used_blocks() * bs,
        u.data_bytes + u.metadata_bytes,
        "blocks leaked or lost across reopen: {u:?}"
    );
    let report = thinlayer::check::check(storage, true, &mut |_, _| {}).unwrap();
    assert!(report.is_clean(), "check after reopen: {:?}", report.faults);
}

/// `PROPTEST_CASES` overrides a suite's default number of cases (for long bug hunts).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
