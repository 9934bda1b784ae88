//! Storage-engine benchmarks (criterion), each beside the baseline it is judged against; the
//! ratios are printed as a table at the end from criterion's own estimates. Real pool files in a
//! tempdir on the local disk (TMPDIR). One-shot targets (write amplification, 100 containers,
//! 5M-block map memory, open time, 1 GiB copy-up) are in `targets.rs`.
//!
//! `cargo bench --bench store` takes about 4 minutes.

mod common;
use common::*;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Target 1: random 4 KiB reads through chains of 1, 8, 32 and 64 layers of a 256 MiB volume.
fn chain_read(c: &mut Criterion, dir: &Path) {
    const VOL: u64 = 256 * MIB;
    let offs = random_offsets(1 << 16, VOL, 7);
    let mut g = c.benchmark_group("chain_read_4k");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    for depth in [1u64, 8, 32, 64] {
        let (store, top) = chain_fixture(dir, depth, VOL);
        let mut buf = vec![0u8; BS as usize];
        let mut i = 0;
        g.bench_function(BenchmarkId::from_parameter(depth), |b| {
            b.iter(|| {
                i = (i + 1) & (offs.len() - 1);
                store.read_layer(top, offs[i], &mut buf).unwrap();
            })
        });
        drop(store);
        std::fs::remove_file(dir.join(format!("chain{depth}.pool"))).ok();
    }
    g.finish();
}

/// Targets 2 and 5: sequential 1 GiB reads, 4K-block pool vs 64K-block pool vs raw `pread`,
/// and crc32 alone over the same bytes.
fn seq_read(c: &mut Criterion, dir: &Path) {
    let size = GIB;
    let (p4, p64, raw) = (
        dir.join("seq4k.pool"),
        dir.join("seq64k.pool"),
        dir.join("seq.raw"),
    );
    let (s4, id4) = base_fixture(&p4, 4096, size);
    let (s64, id64) = base_fixture(&p64, 64 * 1024, size);
    raw_file(&raw, size);
    let rawf = File::open(&raw).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut g = c.benchmark_group("seq_read_1g");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .throughput(Throughput::Bytes(size));
    g.bench_function("pool_4k", |b| {
        b.iter(|| seq_read_layer(&s4, id4, size, &mut buf))
    });
    g.bench_function("pool_64k", |b| {
        b.iter(|| seq_read_layer(&s64, id64, size, &mut buf))
    });
    g.bench_function("raw_pread", |b| b.iter(|| seq_pread(&rawf, size, &mut buf)));
    g.bench_function("crc32_only_4k", |b| {
        b.iter(|| crc_only(size, BS as usize, &buf))
    });
    g.finish();
    drop((s4, s64));
    for p in [p4, p64, raw] {
        std::fs::remove_file(p).ok();
    }
}

/// Target 6: the first 4 KiB write into a file: overlay2-style copy-up (copy the whole file from
/// lower to upper, then write) vs thinlayer's block CoW into a child over the same bytes.
fn first_write(c: &mut Criterion, dir: &Path) {
    let blk = [9u8; BS as usize];
    let mut g = c.benchmark_group("first_write_4k");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (label, size) in [("1MiB", MIB), ("64MiB", 64 * MIB)] {
        let ovl = overlay_fixture(dir, label, 1, "f", size);
        g.bench_function(BenchmarkId::new("overlay_copy_up", label), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    std::fs::remove_file(ovl.upper.join("f")).ok();
                    let s = Instant::now();
                    ovl.write("f", size / 2, &blk);
                    t += s.elapsed();
                }
                t
            })
        });
        std::fs::remove_dir_all(ovl.upper.parent().unwrap()).ok();

        let path = dir.join(format!("fw{label}.pool"));
        let (store, _) = layered_file_fixture(&path, 1, size);
        // Each iteration writes a block the child does not hold yet; a new child when all are.
        let (mut child, mut next, mut n) = (None, size / BS, 0);
        g.bench_function(BenchmarkId::new("thinlayer_cow", label), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    if next == size / BS {
                        let name = format!("c{n}");
                        store.create_layer(&name, Some("l0"), None).unwrap();
                        child = Some(store.layer(&name).unwrap().id);
                        (next, n) = (0, n + 1);
                    }
                    let s = Instant::now();
                    store.write_layer(child.unwrap(), next * BS, &blk).unwrap();
                    t += s.elapsed();
                    next += 1;
                }
                t
            })
        });
        drop(store);
        std::fs::remove_file(&path).ok();
    }
    g.finish();
}

/// Target 6: reading a 64 MiB file through 1, 8 and 64 layers.
fn file_read(c: &mut Criterion, dir: &Path) {
    let size = 64 * MIB;
    let mut buf = vec![0u8; MIB as usize];
    let mut g = c.benchmark_group("file_read_64m");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(size));
    for depth in [1usize, 8, 64] {
        let ovl = overlay_fixture(dir, &format!("r{depth}"), depth, "f", size);
        g.bench_function(BenchmarkId::new("overlay", depth), |b| {
            b.iter(|| ovl.read_file("f", &mut buf))
        });
        std::fs::remove_dir_all(ovl.upper.parent().unwrap()).ok();
        let path = dir.join(format!("r{depth}.pool"));
        let (store, top) = layered_file_fixture(&path, depth, size);
        g.bench_function(BenchmarkId::new("thinlayer", depth), |b| {
            b.iter(|| seq_read_layer(&store, top, size, &mut buf))
        });
        drop(store);
        std::fs::remove_file(&path).ok();
    }
    g.finish();
}

/// Criterion's mean time per iteration (ns) of `group/bench`, from this run's estimates.
fn mean_ns(root: &Path, group: &str, bench: &str) -> Option<f64> {
    let p: PathBuf = root.join(group).join(bench).join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn summary() {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or(PathBuf::from("target"), PathBuf::from);
    let root = std::env::var_os("CRITERION_HOME").map_or(target.join("criterion"), PathBuf::from);
    let m = |g: &str, b: &str| mean_ns(&root, g, b);
    println!("\n| benchmark | figure | baseline | speed ÷ baseline speed |\n|---|---|---|---|");
    let row = |what: &str, fig: String, base: String, ratio: String| {
        println!("| {what} | {fig} | {base} | {ratio} |")
    };
    if let Some(d1) = m("chain_read_4k", "1") {
        for d in [8, 32, 64] {
            if let Some(x) = m("chain_read_4k", &d.to_string()) {
                row(
                    &format!("random 4K read, depth {d} vs depth 1"),
                    format!("{:.0} k/s", 1e6 / x),
                    format!("{:.0} k/s", 1e6 / d1),
                    format!("{:.2}x (target >= 0.9)", d1 / x),
                );
            }
        }
    }
    let gbs = |ns: f64| GIB as f64 / ns;
    let s = |b| m("seq_read_1g", b);
    if let (Some(p4), Some(p64), Some(raw), Some(crc)) = (
        s("pool_4k"),
        s("pool_64k"),
        s("raw_pread"),
        s("crc32_only_4k"),
    ) {
        for (what, f, b) in [
            ("seq read 1 GiB, 4K pool vs 64K pool", p4, p64),
            ("seq read 1 GiB, 4K pool vs raw pread", p4, raw),
            ("seq read 1 GiB, 64K pool vs raw pread", p64, raw),
        ] {
            let r = format!("{:.2}x", b / f);
            row(
                what,
                format!("{:.2} GB/s", gbs(f)),
                format!("{:.2} GB/s", gbs(b)),
                r,
            );
        }
        row(
            "crc32 share of 4K-pool seq read",
            format!("{:.0} ms crc", crc / 1e6),
            format!("{:.0} ms read", p4 / 1e6),
            format!("{:.1}% (target < 10%)", 100.0 * crc / p4),
        );
    }
    // Overlay vs thinlayer pairs: (group, overlay bench, thinlayer bench, what, bytes moved).
    let pairs = [
        (
            "first_write_4k",
            "overlay_copy_up/1MiB",
            "thinlayer_cow/1MiB",
            "first 4K write, 1 MiB file",
            None,
        ),
        (
            "first_write_4k",
            "overlay_copy_up/64MiB",
            "thinlayer_cow/64MiB",
            "first 4K write, 64 MiB file",
            None,
        ),
        (
            "file_read_64m",
            "overlay/1",
            "thinlayer/1",
            "read 64 MiB file, 1 layer",
            Some(64 * MIB),
        ),
        (
            "file_read_64m",
            "overlay/8",
            "thinlayer/8",
            "read 64 MiB file, 8 layers",
            Some(64 * MIB),
        ),
        (
            "file_read_64m",
            "overlay/64",
            "thinlayer/64",
            "read 64 MiB file, 64 layers",
            Some(64 * MIB),
        ),
    ];
    for (group, ob, tb, what, bytes) in pairs {
        if let (Some(o), Some(t)) = (m(group, ob), m(group, tb)) {
            let fig = |ns: f64| match bytes {
                Some(b) => format!("{:.2} GB/s", b as f64 / ns),
                None => format!("{:.1} µs", ns / 1e3),
            };
            row(
                what,
                format!("thinlayer {}", fig(t)),
                format!("overlay {}", fig(o)),
                format!("{:.2}x", o / t),
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let tmp = tempfile::Builder::new()
        .prefix("thinlayer-bench")
        .tempdir()
        .unwrap();
    chain_read(&mut c, tmp.path());
    seq_read(&mut c, tmp.path());
    first_write(&mut c, tmp.path());
    file_read(&mut c, tmp.path());
    c.final_summary();
    summary();
}
