//! A valid pool image, mutated. Input: byte 0 steers (bits 0-1 the seed image, bit 2 open
//! writable, bit 3 reseal the checksums of mutated metadata so the fields behind them get
//! tested); then 5-byte patches: page selector (u16, indexes the image's non-zero pages),
//! offset in the page (low 12 bits; bit 15 = store the value instead of xor-ing it), value.
//!
//! Open must not panic or allocate without bound. When it opens, every layer reads either its
//! bytes or an error; and when only data blocks were damaged, in ways crc32 always detects, a
//! read returns the original bytes or `Error::Corrupt`, never the damage.
#![no_main]
use fuzz_common::{checkpointed_pool, classify, reseal, small_pool, PageKind};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use thinlayer::format::PAGE_SIZE;
use thinlayer::pool::{MemStorage, Storage};
use thinlayer::{Error, Store};

struct Seed {
    image: Vec<u8>,
    block_size: usize,
    pages: Vec<(u64, PageKind)>,
    /// Every layer's bytes (up to READ_CAP) as the undamaged pool reads them.
    layers: Vec<(String, Vec<u8>)>,
}

const READ_CAP: u64 = 1 << 20;
const CHUNK: usize = 16 * 1024;

/// Each layer's name and its first READ_CAP bytes, chunk by chunk, as read.
type Reads = Vec<(String, Vec<Result<Vec<u8>, Error>>)>;

fn read_all(s: &Store) -> Reads {
    s.layers()
        .into_iter()
        .map(|l| {
            let len = l.disk_size.min(READ_CAP);
            let mut chunks = Vec::new();
            let mut off = 0;
            while off < len {
                let n = (len - off).min(CHUNK as u64) as usize;
                let mut buf = vec![0u8; n];
                chunks.push(s.read_layer(l.id, off, &mut buf).map(|()| buf));
                off += n as u64;
            }
            (l.name, chunks)
        })
        .collect()
}

fn seeds() -> &'static [Seed] {
    static SEEDS: OnceLock<Vec<Seed>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        [
            (small_pool(4096), 4096),
            (small_pool(16384), 16384),
            (checkpointed_pool(), 4096),
        ]
        .into_iter()
        .map(|(image, block_size)| {
            let s = Store::open_in(Arc::new(MemStorage::from_bytes(image.clone())), false)
                .expect("seed pool opens");
            let layers = read_all(&s)
                .into_iter()
                .map(|(n, c)| (n, c.into_iter().flat_map(|c| c.unwrap()).collect()))
                .collect();
            Seed {
                block_size,
                pages: classify(&image),
                image,
                layers,
            }
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, patches)) = data.split_first() else {
        return;
    };
    let seeds = seeds();
    let seed = &seeds[(ctl & 3) as usize % seeds.len()];
    let mut image = seed.image.clone();
    // Changed pages, for resealing; and per damaged unit (a data block, or a metadata page) the
    // lowest and highest byte offset changed.
    let mut pages: BTreeMap<u64, PageKind> = BTreeMap::new();
    let mut units: BTreeMap<(bool, usize), (usize, usize)> = BTreeMap::new();
    for p in patches.chunks_exact(5) {
        let sel = u16::from_le_bytes([p[0], p[1]]) as usize;
        let off = u16::from_le_bytes([p[2], p[3]]);
        let (page, kind) = seed.pages[sel % seed.pages.len()];
        let at = (off & 0xfff) as usize;
        let i = page as usize * PAGE_SIZE + at;
        let before = image[i];
        image[i] = if off & 0x8000 != 0 {
            p[4]
        } else {
            before ^ p[4]
        };
        if image[i] != before {
            pages.insert(page, kind);
            let data = kind == PageKind::Data;
            let unit = if data {
                i / seed.block_size
            } else {
                page as usize
            };
            let e = units.entry((data, unit)).or_insert((i, i));
            e.0 = e.0.min(i);
            e.1 = e.1.max(i);
        }
    }
    if ctl & 8 != 0 {
        for (&page, &kind) in &pages {
            reseal(&mut image, page, kind);
        }
    }
    // Changes confined to 4 consecutive bytes of each data block are a burst crc32 always sees.
    let only_detectable_data_damage = units
        .iter()
        .all(|(&(data, _), &(lo, hi))| data && hi - lo < 4);
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
    let store = match Store::open_in(storage, ctl & 4 != 0) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !only_detectable_data_damage,
                "undamaged metadata failed to open: {e}"
            );
            return;
        }
    };
    let got = read_all(&store);
    if only_detectable_data_damage {
        assert_eq!(got.len(), seed.layers.len());
        for ((name, chunks), (seed_name, want)) in got.iter().zip(&seed.layers) {
            assert_eq!(name, seed_name);
            for (k, c) in chunks.iter().enumerate() {
                match c {
                    Ok(bytes) => assert!(
                        bytes[..] == want[k * CHUNK..k * CHUNK + bytes.len()],
                        "layer {name:?}: damaged bytes returned at chunk {k}"
                    ),
                    Err(e) => assert!(matches!(e, Error::Corrupt(_)), "{e}"),
                }
            }
        }
    }
    if store.is_writable() {
        // A store that opened writable must take a change and commit it.
        if let Some(l) = store.layers().into_iter().find(|l| l.writable) {
            if store.write_layer(l.id, 0, &[0xa5; 512]).is_ok() {
                let _ = store.flush();
            }
        }
    }
});
