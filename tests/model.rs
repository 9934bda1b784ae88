//! Model test: random sequences of layer operations (create, commit, rm, write, zero, trim,
//! read, flush, reopen) on an in-memory pool, compared after every step with a `Vec<u8>` per
//! layer. Error cases must return the right `Error` kind and change nothing; accounting
//! (`size`, `virtual_size`, `usage`) must match the blocks the model says each layer holds;
//! after every reopen no block may be leaked.

mod model_common;

use model_common::*;
use proptest::prelude::*;
use std::sync::Arc;
use thinlayer::pool::{MemStorage, Storage};
use thinlayer::{CreateOptions, Store};

fn run(bs: u32, threshold: Option<u64>, ops: &[Op]) -> Arc<MemStorage> {
    let storage = Arc::new(MemStorage::new());
    let dynstorage: Arc<dyn Storage> = storage.clone();
    let opts = CreateOptions {
        block_size: bs,
        max_size: None,
    };
    let open = |s: Store| {
        if let Some(t) = threshold {
            s.set_checkpoint_threshold(t);
        }
        Arc::new(s)
    };
    let mut store = open(Store::create_in(dynstorage.clone(), &opts).unwrap());
    let mut model = Model::new(bs);
    let mut flushed = model.clone();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Reopen { flush_first } => {
                if *flush_first {
                    store.flush().unwrap();
                    flushed = model.clone();
                }
                drop(store);
                store = open(Store::open_in(dynstorage.clone(), true).unwrap());
                // Whatever was not flushed is gone.
                model = flushed.clone();
                check_after_open(&store, dynstorage.clone());
            }
            Op::Flush => {
                store.flush().unwrap();
                flushed = model.clone();
            }
            op => {
                if let Err(e) = apply(&store, &mut model, op) {
                    // Refused operations must not have changed anything; check_all proves it.
                    let _ = (step, e);
                }
            }
        }
        check_all(&store, &model);
    }
    // Finally, everything flushed survives a reopen.
    store.flush().unwrap();
    drop(store);
    let store = open(Store::open_in(dynstorage.clone(), true).unwrap());
    check_after_open(&store, dynstorage);
    check_all(&store, &model);
    storage
}

/// Map runs (FORMAT.md §6.3.1, §6.3.2) in the newest state's checkpoint and log, the
/// checkpoint's checksum pages (§5.6) and its map singles records (§6.3.3).
fn map_runs(storage: &MemStorage) -> (usize, u64, usize) {
    use thinlayer::format::record::{
        RecordReader, TAG_MAP_RUN, TAG_MAP_RUN_SUMS, TAG_MAP_SINGLES_SUMS,
    };
    let (slots, _) = thinlayer::pool::meta::read_superblocks(storage).unwrap();
    let rec = thinlayer::pool::meta::load(storage, &slots[0]).unwrap();
    let (mut runs, mut singles) = (0, 0);
    let checkpoint = thinlayer::pool::meta::checkpoint_bytes(storage, &slots[0]).unwrap();
    for bytes in [&checkpoint, &rec.log] {
        let mut r = RecordReader::new(bytes, "test");
        while r.peek_tag().is_some() {
            let tag = r.peek_tag();
            runs += (tag == Some(TAG_MAP_RUN) || tag == Some(TAG_MAP_RUN_SUMS)) as usize;
            singles += (tag == Some(TAG_MAP_SINGLES_SUMS)) as usize;
            r.next_record().unwrap();
        }
    }
    (runs, rec.sums_pages.len() as u64, singles)
}

/// The workload writes map runs, and checkpoints whose runs and single blocks keep their crcs
/// in checksum pages, so `store_matches_model`'s reopens replay them against the model: most
/// multi-block writes into fresh blocks are runs.
#[test]
fn the_workload_writes_map_runs_and_checksum_pages() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strat = (
        block_size(),
        prop_oneof![2 => Just(None), 1 => (0u64..4).prop_map(Some)],
        prop::collection::vec(op(true), 1..60),
    );
    let cases = 40;
    let found: Vec<(usize, u64, usize)> = (0..cases)
        .map(|_| {
            let (bs, threshold, ops) = strat.new_tree(&mut runner).unwrap().current();
            map_runs(&run(bs, threshold, &ops))
        })
        .collect();
    let with_runs = found.iter().filter(|f| f.0 > 0).count();
    assert!(
        with_runs >= cases / 4,
        "{with_runs} of {cases} cases hold map runs"
    );
    let with_sums = found.iter().filter(|f| f.1 > 0).count();
    assert!(
        with_sums >= cases / 20,
        "{with_sums} of {cases} cases end on a checkpoint with checksum pages"
    );
    let with_singles = found.iter().filter(|f| f.2 > 0).count();
    assert!(
        with_singles >= cases / 20,
        "{with_singles} of {cases} cases end on a checkpoint with map singles"
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(3000),
        max_shrink_iters: 4000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(
        bs in block_size(),
        threshold in prop_oneof![2 => Just(None), 1 => (0u64..4).prop_map(Some)],
        ops in prop::collection::vec(op(true), 1..60),
    ) {
        run(bs, threshold, &ops);
    }
}

/// How often each kind of op succeeds, to see that the workload reaches the interesting paths.
#[test]
#[ignore]
fn workload_statistics() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut counts = std::collections::BTreeMap::<String, (u32, u32)>::new();
    for _ in 0..300 {
        let ops = prop::collection::vec(op(true), 1..60)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let store = Arc::new(Store::create_in(storage, &CreateOptions::default()).unwrap());
        let mut model = Model::new(4096);
        for op in &ops {
            if matches!(op, Op::Reopen { .. } | Op::Flush) {
                continue;
            }
            let k = format!("{op:?}")
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_string();
            let r = apply(&store, &mut model, op);
            let e = counts.entry(k).or_default();
            e.0 += 1;
            e.1 += r.is_ok() as u32;
        }
    }
    eprintln!("{counts:#?}");
}
