//! Arbitrary operation sequences against a store in memory, compared after every step with a
//! model that is a `Vec<u8>` per layer. The model also predicts which operations must fail and
//! with which kind of error. `Reopen` drops the store and opens the pool again: the store must
//! then hold exactly what was committed by the last flush.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use thinlayer::pool::{MemStorage, Storage};
use thinlayer::volume::ExtentState;
use thinlayer::{CreateOptions, Error, Store};

#[derive(Arbitrary, Debug)]
enum Op {
    CreateBase {
        name: u8,
        size: u16,
    },
    CreateChild {
        name: u8,
        parent: u8,
        grow: Option<u16>,
    },
    Commit {
        layer: u8,
    },
    Remove {
        layer: u8,
    },
    Write {
        layer: u8,
        offset: u32,
        len: u16,
        fill: u8,
        varied: bool,
    },
    Zero {
        layer: u8,
        offset: u32,
        len: u32,
        may_unmap: bool,
    },
    Read {
        layer: u8,
        offset: u32,
        len: u16,
    },
    Extents {
        layer: u8,
        offset: u32,
        len: u32,
    },
    Flush,
    Reopen,
}

#[derive(Arbitrary, Debug)]
struct Input {
    big_blocks: bool,
    ops: Vec<Op>,
}

#[derive(Clone, Debug)]
struct MLayer {
    name: String,
    parent: Option<String>,
    writable: bool,
    data: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    layers: Vec<MLayer>,
}

impl Model {
    fn find(&self, name: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.name == name)
    }
    /// The `i`-th layer (modulo), or a name no layer has.
    fn pick(&self, i: u8) -> String {
        if self.layers.is_empty() {
            return "nothing".into();
        }
        self.layers[i as usize % self.layers.len()].name.clone()
    }
    fn has_children(&self, name: &str) -> bool {
        self.layers
            .iter()
            .any(|l| l.parent.as_deref() == Some(name))
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::InvalidInput(_) => "invalid",
        Error::NoSpace(_) => "nospace",
        Error::ReadOnly(_) => "readonly",
        Error::NotFound(_) => "notfound",
        Error::AlreadyExists(_) => "exists",
        Error::Conflict(_) => "conflict",
        _ => "other",
    }
}

/// The store's result against the model's prediction (None = must succeed).
fn expect<T: std::fmt::Debug>(got: &Result<T, Error>, want: Option<&str>, op: &Op) {
    match (got, want) {
        (Ok(_), None) => {}
        (Err(e), Some(k)) if kind(e) == k => {}
        _ => panic!("{op:?}: store gave {got:?}, model expected {want:?}"),
    }
}

fn check_layer(s: &Store, m: &MLayer) {
    let info = s.layer(&m.name).expect("model layer exists in the store");
    assert_eq!(info.disk_size, m.data.len() as u64, "{}", m.name);
    assert_eq!(info.writable, m.writable, "{}", m.name);
    assert_eq!(info.parent, m.parent, "{}", m.name);
    let mut buf = vec![0u8; m.data.len()];
    s.read_layer(info.id, 0, &mut buf).unwrap();
    assert!(buf == m.data, "layer {} differs from the model", m.name);
}

fn check_all(s: &Store, m: &Model) {
    let mut names: Vec<String> = s.layers().into_iter().map(|l| l.name).collect();
    let mut want: Vec<String> = m.layers.iter().map(|l| l.name.clone()).collect();
    names.sort();
    want.sort();
    assert_eq!(names, want);
    for l in &m.layers {
        check_layer(s, l);
    }
}

/// Why a write or zero of `len` bytes at `off` must fail, if it must.
fn change_refused(l: &MLayer, off: u64, len: u64) -> Option<&'static str> {
    if !l.writable {
        Some("readonly")
    } else if off + len > l.data.len() as u64 {
        Some("nospace")
    } else {
        None
    }
}

/// A range of a layer of `size` bytes: mostly inside, sometimes past the end.
fn range(offset: u32, len: u64, size: usize) -> (u64, u64) {
    let off = offset as u64 % (size as u64 + 8192);
    (off, len)
}

fn run(input: Input) {
    let block_size = if input.big_blocks { 16384 } else { 4096 };
    let storage = Arc::new(MemStorage::new());
    let mut store = Some(
        Store::create_in(
            storage.clone(),
            &CreateOptions {
                block_size,
                max_size: None,
            },
        )
        .unwrap(),
    );
    let mut model = Model::default();
    let mut durable = Model::default();
    for op in input.ops.iter().take(64) {
        let s = store.as_ref().unwrap();
        let mut touched = None;
        match *op {
            Op::CreateBase { name, size } => {
                let name = format!("l{}", name % 6);
                let size = (size as usize % (24 * 4096)) + 1;
                let want = model.find(&name).map(|_| "exists");
                let got = s.create_layer(&name, None, Some(size as u64));
                expect(&got, want, op);
                if got.is_ok() {
                    model.layers.push(MLayer {
                        name: name.clone(),
                        parent: None,
                        writable: true,
                        data: vec![0; size],
                    });
                    touched = Some(name);
                }
            }
            Op::CreateChild { name, parent, grow } => {
                let name = format!("l{}", name % 6);
                let parent = model.pick(parent);
                let p = model.find(&parent);
                let size = grow.map(|g| g as usize % (8 * 4096));
                let want = if model.find(&name).is_some() {
                    Some("exists")
                } else if p.is_none() {
                    Some("notfound")
                } else if model.layers[p.unwrap()].writable {
                    Some("conflict")
                } else {
                    None
                };
                let psize = p.map_or(0, |p| model.layers[p].data.len());
                let want = match (want, size) {
                    (None, Some(sz)) if sz < psize => Some("invalid"),
                    (w, _) => w,
                };
                let got = s.create_layer(&name, Some(&parent), size.map(|x| x as u64));
                expect(&got, want, op);
                if got.is_ok() {
                    let mut data = model.layers[p.unwrap()].data.clone();
                    data.resize(size.unwrap_or(psize), 0);
                    model.layers.push(MLayer {
                        name: name.clone(),
                        parent: Some(parent),
                        writable: true,
                        data,
                    });
                    touched = Some(name);
                }
            }
            Op::Commit { layer } => {
                let name = model.pick(layer);
                let i = model.find(&name);
                let want = match i {
                    None => Some("notfound"),
                    Some(i) if !model.layers[i].writable => Some("conflict"),
                    Some(_) => None,
                };
                let got = s.commit_layer(&name);
                expect(&got, want, op);
                if got.is_ok() {
                    model.layers[i.unwrap()].writable = false;
                }
            }
            Op::Remove { layer } => {
                let name = model.pick(layer);
                let i = model.find(&name);
                let want = match i {
                    None => Some("notfound"),
                    Some(_) if model.has_children(&name) => Some("conflict"),
                    Some(_) => None,
                };
                let got = s.remove_layer(&name);
                expect(&got, want, op);
                if got.is_ok() {
                    model.layers.remove(i.unwrap());
                }
            }
            Op::Write {
                layer,
                offset,
                len,
                fill,
                varied,
            } => {
                let name = model.pick(layer);
                let Some(i) = model.find(&name) else { continue };
                let l = &model.layers[i];
                let (off, len) = range(offset, len as u64 % 40000, l.data.len());
                let data: Vec<u8> = (0..len)
                    .map(|k| {
                        if varied {
                            fill.wrapping_add(k as u8)
                        } else {
                            fill
                        }
                    })
                    .collect();
                let want = change_refused(l, off, len);
                let id = s.layer(&name).unwrap().id;
                let got = s.write_layer(id, off, &data);
                expect(&got, want, op);
                if got.is_ok() {
                    model.layers[i].data[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                touched = Some(name);
            }
            Op::Zero {
                layer,
                offset,
                len,
                may_unmap,
            } => {
                let name = model.pick(layer);
                let Some(i) = model.find(&name) else { continue };
                let l = &model.layers[i];
                let (off, len) = range(offset, len as u64 % 100_000, l.data.len());
                let want = change_refused(l, off, len);
                let id = s.layer(&name).unwrap().id;
                let got = s.zero_layer(id, off, len, may_unmap);
                expect(&got, want, op);
                if got.is_ok() {
                    model.layers[i].data[off as usize..(off + len) as usize].fill(0);
                }
                touched = Some(name);
            }
            Op::Read { layer, offset, len } => {
                let name = model.pick(layer);
                let Some(i) = model.find(&name) else { continue };
                let l = &model.layers[i];
                let (off, len) = range(offset, len as u64 % 40000, l.data.len());
                let want = (off + len > l.data.len() as u64).then_some("invalid");
                let id = s.layer(&name).unwrap().id;
                let mut buf = vec![0u8; len as usize];
                let got = s.read_layer(id, off, &mut buf);
                expect(&got, want, op);
                if got.is_ok() {
                    assert!(
                        buf[..] == l.data[off as usize..(off + len) as usize],
                        "{op:?}"
                    );
                }
            }
            Op::Extents { layer, offset, len } => {
                let name = model.pick(layer);
                let Some(i) = model.find(&name) else { continue };
                let l = &model.layers[i];
                let (off, len) = range(offset, len as u64 % 200_000, l.data.len());
                let want = (off + len > l.data.len() as u64).then_some("invalid");
                let id = s.layer(&name).unwrap().id;
                let got = s.extents_layer(id, off, len);
                expect(&got, want, op);
                if let Ok(ext) = got {
                    let mut pos = off;
                    for e in &ext {
                        assert_eq!(e.offset, pos, "extents leave a gap: {ext:?}");
                        assert!(e.len > 0);
                        if e.state != ExtentState::Data {
                            let r = e.offset as usize..(e.offset + e.len) as usize;
                            assert!(
                                l.data[r].iter().all(|&b| b == 0),
                                "{:?} extent {e:?} holds data in the model",
                                e.state
                            );
                        }
                        pos += e.len;
                    }
                    assert_eq!(pos, off + len, "extents do not cover the range: {ext:?}");
                }
            }
            Op::Flush => {
                s.flush().unwrap();
                durable = model.clone();
            }
            Op::Reopen => {
                drop(store.take());
                let s = Store::open_in(storage.clone() as Arc<dyn Storage>, true)
                    .expect("a pool written by the store reopens");
                model = durable.clone();
                check_all(&s, &model);
                store = Some(s);
            }
        }
        if let Some(name) = touched {
            let s = store.as_ref().unwrap();
            check_layer(s, &model.layers[model.find(&name).unwrap()]);
        }
    }
    let s = store.take().unwrap();
    check_all(&s, &model);
    s.flush().unwrap();
    drop(s);
    let s = Store::open_in(storage as Arc<dyn Storage>, true).unwrap();
    check_all(&s, &model);
}

fuzz_target!(|input: Input| run(input));
