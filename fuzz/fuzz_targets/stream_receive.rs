//! A send stream from arbitrary bytes, received as a registry's blob is: over a committed
//! parent whose every block holds data, into an in-memory pool. The encoder is the model:
//! `receive` accepts only canonical streams, so sending the received layer over the same
//! parent must give back exactly the bytes received; a refused stream leaves no layer and a
//! pool that still passes its invariants.
//! Before receiving, the header is pointed at the parent's chain ID and the end record's digest
//! is resealed (`fuzz_common::reseal_stream`), so inputs reach the rules behind the hash.
#![no_main]
use fuzz_common::reseal_stream;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use thinlayer::pool::MemStorage;
use thinlayer::stream::content;
use thinlayer::{CreateOptions, Store};

/// The parent: 16 blocks of 4 KiB, every one written, so a zero run anywhere is a whiteout.
const PARENT_SIZE: u64 = 16 * 4096;

fuzz_target!(|data: &[u8]| {
    if data.len() > 1 << 20 {
        return;
    }
    let store = Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap();
    let base = store.create_layer("base", None, Some(PARENT_SIZE)).unwrap();
    let fill: Vec<u8> = (0..PARENT_SIZE).map(|i| (i % 251) as u8 | 1).collect();
    store.write_layer(base.id, 0, &fill).unwrap();
    store.commit_layer("base").unwrap();
    let chain = content::ids(&store, "base").unwrap().chain_id;

    // Layers of up to 64 MiB: sending a layer back walks every chunk of its virtual size
    // (`Store::diff_extents`), so a header claiming 256 TiB makes one input run for minutes. A
    // known cost of send on huge sparse layers, not a decoding rule; kept out of this target.
    let claimed = data
        .get(..thinlayer::format::stream::header::LEN)
        .and_then(|h| thinlayer::format::stream::Header::unpack(h.try_into().unwrap()).ok())
        .map_or(0, |h| h.disk_size);
    if claimed > 64 << 20 {
        return;
    }
    let mut input = data.to_vec();
    fuzz_common::reparent_stream(&mut input, chain.0);
    reseal_stream(&mut input);
    let got = thinlayer::stream::receive(
        &store,
        "got",
        Some("base"),
        &mut &input[..],
        "fuzz stream",
        &mut |_, _| {},
    );
    match got {
        // A record of an unknown kind is skipped by design (docs/STREAM.md), so such a
        // stream is accepted without being canonical: only the others must send back as is.
        Ok(_) if fuzz_common::has_unknown_record(&input) => {}
        Ok(_) => {
            let mut again = Vec::new();
            thinlayer::stream::send(
                &store,
                "got",
                Some("base"),
                &mut again,
                "fuzz resend",
                &mut |_, _| {},
            )
            .unwrap();
            assert!(
                again == input,
                "an accepted stream ({} bytes) sends back as other bytes ({} bytes)",
                input.len(),
                again.len()
            );
        }
        Err(_) => {
            assert!(
                store.layer("got").is_err(),
                "a refused stream left its layer"
            );
        }
    }
    store.flush().unwrap();
    store.verify_consistency().unwrap();
});
