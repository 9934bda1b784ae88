//! Many threads on one store, as a server's connections use it: writers on their own layers
//! (flushing now and then, so commits overlap with writes and reads), readers everywhere. No
//! read may fail or see bytes that were never written there, and after a reopen every layer
//! holds exactly what its writer last wrote.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use thinlayer::pool::FileStorage;
use thinlayer::{CreateOptions, Store};

const BLOCKS: u64 = 256;
const BS: usize = 4096;

fn block(writer: u8, seq: u32) -> Vec<u8> {
    let mut b = vec![writer; BS];
    b[..4].copy_from_slice(&seq.to_le_bytes());
    b
}

#[test]
fn writers_readers_and_overlapping_commits_keep_every_layer_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let store = Arc::new(Store::create(&path, &CreateOptions::default(), "test").unwrap());
    let ids: Vec<_> = (0..3u8)
        .map(|w| {
            store
                .create_layer(&format!("w{w}"), None, Some(BLOCKS * BS as u64))
                .unwrap()
                .id
        })
        .collect();
    store.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (store, stop, ids) = (store.clone(), stop.clone(), ids.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; BS * 8];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for (w, &id) in ids.iter().enumerate() {
                        let off = ((n * 7 + r) % (BLOCKS - 8)) * BS as u64;
                        store.read_layer(id, off, &mut buf).unwrap();
                        for b in buf.chunks(BS) {
                            // Never written yet (zeros) or a whole block by this layer's writer.
                            assert!(
                                b.iter().all(|&x| x == 0)
                                    || b[4..].iter().all(|&x| x == w as u8 + 1)
                            );
                        }
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let writers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(w, &id)| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut model = vec![vec![0u8; BS]; BLOCKS as usize];
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ w as u64;
                for seq in 0..3000u32 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let vb = (x % BLOCKS) as usize;
                    let data = block(w as u8 + 1, seq);
                    store.write_layer(id, (vb * BS) as u64, &data).unwrap();
                    model[vb] = data;
                    if x.is_multiple_of(16) {
                        store.flush().unwrap();
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<_> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(reads > 0);
    store.flush().unwrap();
    drop(store);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let store = Store::open_in(Arc::new(FileStorage::new(file)), false).unwrap();
    let mut buf = vec![0u8; BS];
    for (w, model) in models.iter().enumerate() {
        for (vb, want) in model.iter().enumerate() {
            store
                .read_layer(ids[w], (vb * BS) as u64, &mut buf)
                .unwrap();
            assert!(buf == *want, "layer w{w} block {vb} differs after reopen");
        }
    }
    let storage = Arc::new(FileStorage::new(std::fs::File::open(&path).unwrap()));
    let r = thinlayer::check::check(storage, true, &mut |_, _| {}).unwrap();
    assert!(r.is_clean(), "{:?}", r.faults);
}
