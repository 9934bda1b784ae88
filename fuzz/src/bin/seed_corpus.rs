//! Writes the seed corpora under fuzz/corpus/<target>/: valid structures taken from pools built
//! in-process, so each fuzzer starts from inputs that get past the first checks.
//! Run from fuzz/: `cargo run --bin seed-corpus`.

use fuzz_common::{checkpointed_pool, classify, handshake_bytes, small_pool, PageKind};
use std::path::Path;
use thinlayer::format::checksum::Kind;
use thinlayer::format::record::{IndexEntry, LayerCreate, MapEntry, MapTarget, RecordWriter};
use thinlayer::format::superblock::{self, fields};
use thinlayer::format::{page, LayerId, PBlock, VBlock, PAGE_SIZE};
use thinlayer::nbd::proto::*;
use thinlayer::pool::{meta, MemStorage};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn trim_zeros(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    &b[..end]
}

/// Deterministic filler for the targets whose input is decoded by `arbitrary`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn main() {
    let small = small_pool(4096);
    let big = small_pool(16384);
    let ckpt = checkpointed_pool();

    for (name, img) in [
        ("small", &small),
        ("big-blocks", &big),
        ("checkpointed", &ckpt),
    ] {
        for slot in 0..2 {
            let at = slot * PAGE_SIZE;
            put(
                "superblock_decode",
                &format!("{name}-slot{slot}"),
                &img[at..at + superblock::ENCODED_LEN],
            );
        }
        let mut seen_log = false;
        let mut seen_ckpt = false;
        for (page, kind) in classify(img) {
            let at = page as usize * PAGE_SIZE;
            let p = trim_zeros(&img[at..at + PAGE_SIZE]);
            let (ctl, seen, what) = match kind {
                PageKind::Meta(Kind::LogPage) => (0x08u8, &mut seen_log, "log"),
                PageKind::Meta(Kind::CheckpointPage) => (0x09u8, &mut seen_ckpt, "checkpoint"),
                _ => continue,
            };
            if !*seen {
                *seen = true;
                let mut b = vec![ctl];
                b.extend_from_slice(p);
                put("page_decode", &format!("{name}-{what}"), &b);
            }
        }

        let storage = MemStorage::from_bytes(img.clone());
        let (sbs, _) = meta::read_superblocks(&storage).unwrap();
        let rec = meta::load(&storage, &sbs[0]).unwrap();
        let mut stream = meta::checkpoint_bytes(&storage, &sbs[0]).unwrap();
        stream.extend_from_slice(&rec.log);
        put("record_stream", &format!("{name}-streams"), &stream);
    }
    let mut w = RecordWriter::new();
    w.layer_remove(thinlayer::format::LayerId(1));
    put("record_stream", "remove-unknown", &w.buf);
    // A layer, a map run of 20 blocks (FORMAT.md §6.3.1), then a whiteout inside the run.
    let mut w = RecordWriter::new();
    let layer = LayerId(1);
    w.layer_create(&LayerCreate {
        id: layer,
        parent: None,
        disk_size: 1 << 20,
        created_secs: 0,
        created_nanos: 0,
        writable: true,
        incomplete: false,
        remote: false,
        name: "a".into(),
    });
    for i in 0..20u64 {
        let target = MapTarget::Data {
            pblock: PBlock(100 + i),
            crc: i as u32,
        };
        w.map(layer, MapEntry { vblock: VBlock(i), target });
    }
    let target = MapTarget::Zero;
    w.map(layer, MapEntry { vblock: VBlock(5), target });
    put("record_stream", "map-runs", &w.buf);
    // A checkpoint's map singles (FORMAT.md §6.3.3): a layer and three scattered data blocks,
    // two groups of 1024 blocks, their crcs in the checksum stream.
    let mut w = RecordWriter::for_checkpoint();
    w.layer_create(&LayerCreate {
        id: layer,
        parent: None,
        disk_size: 1 << 20,
        created_secs: 0,
        created_nanos: 0,
        writable: true,
        incomplete: false,
        remote: false,
        name: "a".into(),
    });
    for i in [0u64, 2, 1030] {
        let target = MapTarget::Data {
            pblock: PBlock(200 + i),
            crc: i as u32,
        };
        w.map(layer, MapEntry { vblock: VBlock(i), target });
    }
    w.cut();
    put("record_stream", "map-singles", &w.buf);
    // A checkpoint's map index (FORMAT.md §6.3.4): two ranges of a layer. Refused by a replay
    // (it stands only after a checkpoint's checksum pages), so mutations explore its decoder.
    let mut w = RecordWriter::new();
    w.map_index(&[
        IndexEntry {
            layer,
            vblock: VBlock(0),
            page: 20,
            seq: 1,
            offset: 40,
        },
        IndexEntry {
            layer,
            vblock: VBlock(4096),
            page: 21,
            seq: 2,
            offset: 0,
        },
    ]);
    put("record_stream", "map-index", &w.buf);

    put("pool_open", "small", &[0]);
    put("pool_open", "big-blocks", &[1]);
    put("pool_open", "checkpointed", &[2]);
    put("pool_open", "small-writable", &[4]);
    // Page selector 0 (superblock slot 0), the generation's first byte xor 1, checksum resealed.
    let generation = fields::GENERATION.at as u8;
    put(
        "pool_open",
        "small-sb0-generation",
        &[8, 0, 0, generation, 0, 1],
    );
    // Page selector 2 (the first page after the superblocks), one byte of its payload.
    let payload = (page::HEADER_LEN + 8) as u8;
    put("pool_open", "small-page2", &[8, 2, 0, payload, 0, 0x80]);
    // Page selector 5, likely a data block: one byte damaged, checksum not resealed.
    put("pool_open", "small-data", &[0, 5, 0, 7, 0, 0x01]);

    for i in 0..4 {
        put("store_ops", &format!("noise-{i}"), &noise(i + 1, 64 << i));
        put(
            "nbd_requests",
            &format!("noise-{i}"),
            &noise(i + 100, 64 << i),
        );
    }

    put(
        "nbd_handshake",
        "go-app",
        &handshake_bytes("app", true, true),
    );
    put(
        "nbd_handshake",
        "go-base",
        &handshake_bytes("base", false, false),
    );
    let mut b = ClientFlags {
        flags: CLIENT_FIXED_NEWSTYLE,
    }
    .pack()
    .to_vec();
    let info_default = InfoRequest {
        name: "",
        wanted: vec![],
    };
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, info_default.pack()),
        (OPT_ABORT, Vec::new()),
    ] {
        b.extend_from_slice(&OptionHeader::message(opt, &data));
    }
    put("nbd_handshake", "list-info-abort", &b);
    let mut b = ClientFlags {
        flags: CLIENT_FIXED_NEWSTYLE,
    }
    .pack()
    .to_vec();
    b.extend_from_slice(&OptionHeader::message(OPT_EXPORT_NAME, b"app"));
    put("nbd_handshake", "export-name", &b);

    stream_seeds();
    control_seeds();
}

/// Canonical send streams made by the encoder over the `stream_receive` harness's parent (16
/// written blocks; the harness points the header at its chain ID): data blocks, whiteouts over
/// the parent's data, and data on both sides of a `RUN_CUT` boundary (where runs are cut).
fn stream_seeds() {
    use thinlayer::format::stream::{Header, RUN_CUT, VERSION, VERSION_1};
    use thinlayer::stream::encode::Encoder;
    let header = |disk_size: u64| Header {
        version: VERSION,
        flags: 0,
        block_size: 4096,
        disk_size,
        parent_chain_id: [0; 32],
    };
    let block = |seed: u8| vec![seed | 1; 4096];
    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out, &header(64 << 10)).unwrap();
    e.data(0, &block(2)).unwrap();
    e.data(8192, &[block(4), block(6)].concat()).unwrap();
    e.finish().unwrap();
    put("stream_receive", "data", &out);

    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out, &header(64 << 10)).unwrap();
    e.zero(0, 8192).unwrap();
    e.data(8192, &block(8)).unwrap();
    e.zero(32768, 4096).unwrap();
    e.finish().unwrap();
    put("stream_receive", "whiteouts", &out);

    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out, &header(2 * RUN_CUT)).unwrap();
    e.data(RUN_CUT - 4096, &block(10)).unwrap();
    e.data(RUN_CUT, &block(12)).unwrap();
    e.finish().unwrap();
    put("stream_receive", "run-cut", &out);

    // Version 1 (no index): still received, and sent back as version 1.
    let mut out = Vec::new();
    let h = Header {
        version: VERSION_1,
        ..header(64 << 10)
    };
    let mut e = Encoder::new(&mut out, &h).unwrap();
    e.data(0, &block(2)).unwrap();
    e.zero(8192, 4096).unwrap();
    e.finish().unwrap();
    put("stream_receive", "version-1", &out);
}

/// Control messages: a client's hello, then requests; another version's hello; a bad request
/// followed by a frame claiming more than the limit.
fn control_seeds() {
    use thinlayer::control::{wire, Hello, Request};
    let hello = |h: Hello| wire::encode(&serde_json::json!({ "hello": h })).unwrap();
    let mut b = hello(Hello::client());
    for req in [
        Request::Ls,
        Request::Create {
            name: "web".into(),
            parent: Some("base".into()),
            size: Some(1 << 30),
        },
        Request::Remove {
            name: "web".into(),
            force: true,
        },
        Request::Check { data: true },
    ] {
        b.extend_from_slice(&wire::encode(&req).unwrap());
    }
    put("control_frame", "hello-requests", &b);
    let mut newer = Hello::client();
    newer.version += 1;
    put("control_frame", "newer-hello", &hello(newer));
    let mut b = hello(Hello::client());
    b.extend_from_slice(&[5, 0, 0, 0, b'{', b'"', b'l', b's', b'"']);
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
    put("control_frame", "bad-request-then-over-limit", &b);
}
