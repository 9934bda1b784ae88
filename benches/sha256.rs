//! The two sha256 chains a send stream runs over every data byte (the stream's digest and the
//! extent's in the v2 index): one chain after the other (sha2's compress) against both in one
//! interleaved pass (`Sha256::update_both`, format/sha256_x2.rs). Throughput counts the bytes
//! of both chains. `cargo bench --bench sha256` takes about 10 seconds.

use criterion::{Criterion, Throughput};
use std::time::Duration;
use thinlayer::format::sha256::Sha256;

fn main() {
    let mut c = Criterion::default().configure_from_args();
    // An extent of the index (1 MiB), its bytes 24 bytes into a block of the stream's hash
    // (a record's header before them), as the encoder hashes them.
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let mut g = c.benchmark_group("sha256_two_chains_1MiB");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(2 * data.len() as u64));
    let fresh = || {
        let mut stream = Sha256::new();
        stream.update(&[0u8; 24]);
        (stream, Sha256::new())
    };
    g.bench_function("one_after_the_other", |b| {
        b.iter(|| {
            let (mut stream, mut extent) = fresh();
            stream.update(&data);
            extent.update(&data);
            (stream.finalize(), extent.finalize())
        })
    });
    g.bench_function("update_both", |b| {
        b.iter(|| {
            let (mut stream, mut extent) = fresh();
            Sha256::update_both(&mut stream, &mut extent, &data);
            (stream.finalize(), extent.finalize())
        })
    });
    g.finish();
    c.final_summary();
}
