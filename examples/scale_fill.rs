//! Builds a pool for `tools/bench-scale`: one committed layer with BLOCKS mapped blocks whose
//! data is never written (see `Store::fill_for_bench`), laid out as
//!   contiguous  an imported image: virtual blocks 0..BLOCKS in one run of pool blocks;
//!   scattered   a container's random writes: one block in each group of 16 at a random place
//!               in it, written in random order (so pool order is unrelated to block order).
//! Usage: scale_fill POOL contiguous|scattered BLOCKS [checkpoint]
//! With `checkpoint` the pool ends on a checkpoint commit (its whole catalogue in the
//! checkpoint, an empty log), as a long-running pool mostly is, so an open replays the
//! checkpoint's records rather than the fill's log.

use thinlayer::volume::{CreateOptions, Store};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let checkpoint = match args.get(4).map(String::as_str) {
        None => false,
        Some("checkpoint") => true,
        Some(_) => {
            eprintln!("usage: scale_fill POOL contiguous|scattered BLOCKS [checkpoint]");
            std::process::exit(2);
        }
    };
    if args.len() < 4 || args.len() > 5 {
        eprintln!("usage: scale_fill POOL contiguous|scattered BLOCKS [checkpoint]");
        std::process::exit(2);
    }
    let n: u64 = args[3].parse().expect("BLOCKS is a number");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (vblocks, disk_blocks): (Vec<u64>, u64) = match args[2].as_str() {
        "contiguous" => ((0..n).collect(), n),
        "scattered" => {
            let mut v: Vec<u64> = (0..n).map(|i| i * 16 + next() % 16).collect();
            for i in (1..v.len()).rev() {
                v.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            (v, n * 16)
        }
        other => panic!("unknown layout {other:?}"),
    };
    let store = Store::create(
        std::path::Path::new(&args[1]),
        &CreateOptions::default(),
        "bench-scale fill",
    )
    .expect("create the pool");
    let bs = store.block_size() as u64;
    let id = store
        .create_layer("img", None, Some(disk_blocks * bs))
        .expect("create the layer")
        .id;
    for batch in vblocks.chunks(1 << 20) {
        store.fill_for_bench(id, batch).expect("fill");
        store.flush().expect("flush");
    }
    store.commit_layer("img").expect("commit");
    store.flush().expect("flush");
    if checkpoint {
        store.checkpoint().expect("checkpoint");
    }
}
