//! One conformance test for every implementation of `Layers`: the twin over a store
//! (`StoreLayers`), here, and the CLI's typed calls (`calls::Target`, on a pool it opens
//! itself), in calls.rs, which stands above this module. Each receives a stream made on another pool, lists and sends it back; the
//! bytes, digests and refusals must be the same.

use super::{pipe, Layers, StoreLayers};
use crate::error::Kind;
use crate::live::LivePool;
use crate::pool::MemStorage;
use crate::stream::ContentIds;
use crate::volume::{CreateOptions, Store};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// A base layer with some data, committed, and its send stream and digest.
fn a_stream() -> (Vec<u8>, String, u64) {
    let s = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
    s.create_layer("src", None, Some(1 << 20)).unwrap();
    let id = s.layer("src").unwrap().id;
    s.write_layer(id, 8192, &[0x5a; 8192]).unwrap();
    s.commit_layer("src").unwrap();
    let mut bytes = Vec::new();
    let st = crate::stream::send(&s, "src", None, &mut bytes, "a buffer", &mut |_, _| {}).unwrap();
    (bytes, st.digest, s.block_size() as u64)
}

/// Feed `bytes` into a pipe from a thread; the read end is returned.
fn feeding(bytes: Vec<u8>) -> (OwnedFd, std::thread::JoinHandle<()>) {
    let (r, w) = pipe().unwrap();
    let t = std::thread::spawn(move || {
        let _ = std::fs::File::from(w).write_all(&bytes);
    });
    (r, t)
}

/// Drain a pipe's read end from a thread.
fn draining(r: OwnedFd) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        std::fs::File::from(r).read_to_end(&mut v).unwrap();
        v
    })
}

pub(crate) fn conformance(pool: &dyn Layers) {
    let (bytes, digest, bs) = a_stream();
    assert_eq!(pool.block_size().unwrap() as u64, bs);
    assert!(pool.layers().unwrap().is_empty());

    // A stream whose digest is not the one asked for is refused and leaves nothing.
    let (r, t) = feeding(bytes.clone());
    let wrong = format!("sha256:{}", "0".repeat(64));
    let e = pool
        .receive("bad", None, &wrong, r, &mut |_, _| {})
        .unwrap_err();
    t.join().unwrap();
    assert_eq!(e.kind(), Kind::Corrupt, "{e}");
    assert!(pool.layers().unwrap().is_empty());

    // Received: listed with its content IDs, the stream's digest.
    let (r, t) = feeding(bytes.clone());
    let (layer, stats) = pool
        .receive("got", None, &digest, r, &mut |_, _| {})
        .unwrap();
    t.join().unwrap();
    assert_eq!(layer.name, "got");
    assert_eq!(stats.digest, digest);
    let listed = pool.layers().unwrap();
    assert_eq!(listed.len(), 1);
    let ids = ContentIds::of(&listed[0]).expect("content IDs listed");
    assert_eq!(ids.digest.to_string(), digest);
    assert_eq!(pool.history("got").unwrap().len(), 1);
    assert_eq!(pool.history("nope").unwrap_err().kind(), Kind::NotFound);

    // Sent back: the same bytes.
    let (r, w) = pipe().unwrap();
    let d = draining(r);
    let st = pool.send("got", w, &mut |_, _| {}).unwrap();
    assert_eq!(d.join().unwrap(), bytes);
    assert_eq!(st.digest, digest);

    // A name taken is refused as such.
    let (r, t) = feeding(bytes);
    let e = pool
        .receive("got", None, &digest, r, &mut |_, _| {})
        .unwrap_err();
    t.join().unwrap();
    assert_eq!(e.kind(), Kind::AlreadyExists, "{e}");
}

#[test]
fn the_store_twin_conforms() {
    let s = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
    conformance(&StoreLayers(LivePool::direct(&s)));
}
