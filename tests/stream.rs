//! Send/receive (docs/STREAM.md) through the library: round trips, refusals that leave
//! nothing behind, and a proptest of random layer histories against a model.

use proptest::prelude::*;
use std::sync::Arc;
use thinlayer::error::Kind;
use thinlayer::format::stream::{Entry, Header, INDEX_CUT, VERSION, VERSION_1};
use thinlayer::pool::MemStorage;
use thinlayer::stream::content::{self, ContentIds};
use thinlayer::stream::encode::Encoder;
use thinlayer::stream::index::RangedBlob;
use thinlayer::stream::{receive, send, Digest};
use thinlayer::{CreateOptions, Store};

fn pool() -> Store {
    Store::create_in(Arc::new(MemStorage::new()), &CreateOptions::default()).unwrap()
}

fn image(s: &Store, name: &str) -> Vec<u8> {
    let l = s.layer(name).unwrap();
    let mut buf = vec![0u8; l.disk_size as usize];
    s.read_layer(l.id, 0, &mut buf).unwrap();
    buf
}

fn stream_of(s: &Store, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    send(s, name, None, &mut out, "test", &mut |_, _| {}).unwrap();
    out
}

fn recv(s: &Store, name: &str, bytes: &[u8]) -> thinlayer::Result<thinlayer::LayerInfo> {
    let mut r: &[u8] = bytes;
    receive(s, name, None, &mut r, "the test stream", &mut |_, _| {}).map(|(l, _)| l)
}

/// base: data; child (twice as large): a whiteout over base data, new data in the base's
/// range and past its end.
fn two_layers() -> Store {
    let s = pool();
    let b = s.create_layer("base", None, Some(1 << 20)).unwrap().id;
    s.write_layer(b, 0, &vec![0xb1; 64 << 10]).unwrap();
    s.write_layer(b, 512 << 10, &[0xb2; 4096]).unwrap();
    s.commit_layer("base").unwrap();
    content::record(&s, "base").unwrap();
    let c = s
        .create_layer("child", Some("base"), Some(2 << 20))
        .unwrap()
        .id;
    s.zero_layer(c, 8192, 16384, true).unwrap();
    s.write_layer(c, 100, b"hello").unwrap();
    s.write_layer(c, (1 << 20) + 4096, &vec![0xc1; 8192])
        .unwrap();
    s.commit_layer("child").unwrap();
    content::record(&s, "child").unwrap();
    s.flush().unwrap();
    s
}

#[test]
fn a_chain_sent_and_received_reads_the_same_and_sends_the_same_bytes() {
    let a = two_layers();
    let (sb, sc) = (stream_of(&a, "base"), stream_of(&a, "child"));
    let b = pool();
    recv(&b, "base", &sb).unwrap();
    let got = recv(&b, "child", &sc).unwrap();
    assert_eq!(
        got.parent.as_deref(),
        Some("base"),
        "parent found by chain ID"
    );
    for n in ["base", "child"] {
        assert_eq!(image(&a, n), image(&b, n), "{n} reads differently");
        assert_eq!(
            content::ids(&a, n).unwrap(),
            content::ids(&b, n).unwrap(),
            "{n}: content IDs differ"
        );
    }
    // Canonical: the received child sends the very same bytes, and the digest is the stream's.
    assert_eq!(stream_of(&b, "child"), sc);
    let ids = ContentIds::of(&b.layer("child").unwrap()).unwrap();
    assert_eq!(ids.digest, thinlayer::stream::Digest::sha256(&sc));
    // The whiteout came across as a whiteout (the stream says so in its end record).
    let mut sink = Vec::new();
    let st = send(&b, "child", None, &mut sink, "t", &mut |_, _| {}).unwrap();
    assert_eq!(st.zero_bytes, 16384);
    b.verify_consistency().unwrap();
}

#[test]
fn a_squashed_send_over_an_older_ancestor_makes_one_layer_with_both_changes() {
    let a = two_layers();
    let c2 = a.create_layer("c2", Some("child"), None).unwrap().id;
    a.write_layer(c2, 0, &[7; 4096]).unwrap();
    a.commit_layer("c2").unwrap();
    let mut s = Vec::new();
    send(&a, "c2", Some("base"), &mut s, "t", &mut |_, _| {}).unwrap();
    let b = pool();
    recv(&b, "base", &stream_of(&a, "base")).unwrap();
    let l = recv(&b, "flat", &s).unwrap();
    assert_eq!(l.parent.as_deref(), Some("base"));
    assert_eq!(image(&a, "c2"), image(&b, "flat"));
}

/// Nothing of a refused stream survives: no layer, no blocks, a consistent pool.
fn refused_leaves_nothing(b: &Store, bytes: &[u8]) -> String {
    // Data blocks: the metadata log grows by the records of the attempt, as any change does.
    let used = b.usage().unwrap().data_bytes;
    let e = recv(b, "child", bytes).unwrap_err().to_string();
    assert!(b.layer("child").is_err(), "a half-made layer survived: {e}");
    b.flush().unwrap();
    assert_eq!(
        b.usage().unwrap().data_bytes,
        used,
        "blocks leaked by a refused stream: {e}"
    );
    b.verify_consistency().unwrap();
    e
}

#[test]
fn torn_and_damaged_streams_are_refused_and_leave_nothing() {
    let a = two_layers();
    let sc = stream_of(&a, "child");
    let b = pool();
    recv(&b, "base", &stream_of(&a, "base")).unwrap();
    for cut in [10, 64, 200, sc.len() / 2, sc.len() - 1] {
        let e = refused_leaves_nothing(&b, &sc[..cut]);
        assert!(e.contains("truncated") || e.contains("ends at byte"), "{e}");
    }
    // One flipped byte anywhere: the header's fields, a record, the data, the end record.
    for at in [
        9,
        20,
        40,
        70,
        200,
        sc.len() / 2,
        sc.len() - 40,
        sc.len() - 1,
    ] {
        let mut bad = sc.clone();
        bad[at] ^= 0x20;
        refused_leaves_nothing(&b, &bad);
    }
    // Bytes after the end record.
    let mut long = sc.clone();
    long.push(0);
    let e = refused_leaves_nothing(&b, &long);
    assert!(e.contains("follow the end record"), "{e}");
    recv(&b, "child", &sc).unwrap();
}

/// A data record whose offset and length pass the end of the 64-bit byte range is refused by
/// the reader as malformed, with its place in the stream; it used to overflow while the block
/// index was rebuilt (a panic where overflow is checked: found by fuzz/stream_receive).
#[test]
fn a_data_record_past_the_end_of_u64_is_refused_not_a_panic() {
    use thinlayer::format::stream::{self as fmt, header, record, TAG_DATA};
    let a = two_layers();
    let sb = stream_of(&a, "base");
    let b = pool();
    let (tag, len) = fmt::unpack_record(
        sb[header::LEN..header::LEN + record::LEN]
            .try_into()
            .unwrap(),
    );
    assert_eq!(tag, TAG_DATA, "the base's stream starts with its data");
    assert!(len > 8 + 100);
    let mut bad = sb.clone();
    let at = header::LEN + record::LEN;
    bad[at..at + 8].copy_from_slice(&(u64::MAX - 100).to_le_bytes());
    let e = recv(&b, "base", &bad).unwrap_err().to_string();
    assert!(e.contains(&format!("byte {}", header::LEN)), "{e}");
    assert!(b.layer("base").is_err());
    b.verify_consistency().unwrap();
}

#[test]
fn a_stream_whose_parent_is_missing_or_different_is_refused_naming_the_chain_id() {
    let a = two_layers();
    let sc = stream_of(&a, "child");
    let need = content::ids(&a, "base").unwrap().chain_id.to_string();
    let b = pool();
    let e = refused_leaves_nothing(&b, &sc);
    assert!(e.contains(&need) && e.contains("needs a parent"), "{e}");
    // A different layer given as the parent.
    let o = b.create_layer("other", None, Some(1 << 20)).unwrap().id;
    b.write_layer(o, 0, &[1; 4096]).unwrap();
    b.commit_layer("other").unwrap();
    let mut r: &[u8] = &sc;
    let e = receive(&b, "child", Some("other"), &mut r, "s", &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains(&need), "{e}");
    assert!(b.layer("child").is_err());
}

#[test]
fn a_writable_layer_is_not_sent() {
    let s = pool();
    s.create_layer("w", None, Some(1 << 20)).unwrap();
    let e = send(&s, "w", None, &mut Vec::new(), "t", &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("commit it first"), "{e}");
}

#[test]
fn content_ids_do_not_depend_on_names_times_or_pool_addresses() {
    // The same content built twice, in pools laid out differently, under other names.
    let a = two_layers();
    let b = pool();
    let junk = b.create_layer("junk", None, Some(4 << 20)).unwrap().id;
    b.write_layer(junk, 0, &vec![9; 1 << 20]).unwrap();
    let x = b.create_layer("x", None, Some(1 << 20)).unwrap().id;
    b.write_layer(x, 512 << 10, &[0xb2; 4096]).unwrap();
    b.write_layer(x, 0, &vec![0xb1; 64 << 10]).unwrap();
    b.commit_layer("x").unwrap();
    assert_eq!(
        content::ids(&a, "base").unwrap(),
        content::ids(&b, "x").unwrap()
    );
    // One byte changes the ID.
    let y = b.create_layer("y", None, Some(1 << 20)).unwrap().id;
    b.write_layer(y, 0, &vec![0xb1; 64 << 10]).unwrap();
    b.write_layer(y, 512 << 10, &[0xb3; 4096]).unwrap();
    b.commit_layer("y").unwrap();
    assert_ne!(
        content::ids(&a, "base").unwrap().digest,
        content::ids(&b, "y").unwrap().digest
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write { at: u32, len: u16, byte: u8 },
    Zero { at: u32, len: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..(3 << 20), 1u16..20000, 1u8..255).prop_map(|(at, len, byte)| Op::Write {
            at,
            len,
            byte
        }),
        (0u32..(3 << 20), 1u16..30000).prop_map(|(at, len)| Op::Zero { at, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Random histories of up to four layers, each possibly larger than its parent, sent layer
    /// by layer into a second pool: every layer reads as the model says, in both pools.
    #[test]
    fn random_histories_travel_byte_for_byte(
        layers in proptest::collection::vec(
            (0u32..3, proptest::collection::vec(op(), 0..12)), 1..5)
    ) {
        let a = pool();
        let b = pool();
        let mut model: Vec<u8> = Vec::new();
        let mut parent: Option<String> = None;
        for (i, (grow, ops)) in layers.iter().enumerate() {
            let name = format!("l{i}");
            let size = model.len() as u64 + (*grow as u64 + u64::from(i == 0)) * (1 << 20);
            let id = a.create_layer(&name, parent.as_deref(), Some(size)).unwrap().id;
            model.resize(size as usize, 0);
            for o in ops {
                match *o {
                    Op::Write { at, len, byte } => {
                        let at = (at as u64).min(size - 1);
                        let len = (len as u64).min(size - at);
                        a.write_layer(id, at, &vec![byte; len as usize]).unwrap();
                        model[at as usize..(at + len) as usize].fill(byte);
                    }
                    Op::Zero { at, len } => {
                        let at = (at as u64).min(size - 1);
                        let len = (len as u64).min(size - at);
                        a.zero_layer(id, at, len, true).unwrap();
                        model[at as usize..(at + len) as usize].fill(0);
                    }
                }
            }
            a.commit_layer(&name).unwrap();
            let s = stream_of(&a, &name);
            recv(&b, &name, &s).unwrap();
            prop_assert_eq!(&image(&a, &name), &model);
            prop_assert_eq!(&image(&b, &name), &model);
            prop_assert_eq!(content::ids(&a, &name).unwrap(), content::ids(&b, &name).unwrap());
            prop_assert_eq!(stream_of(&b, &name), s);
            parent = Some(name);
        }
        b.verify_consistency().unwrap();
    }
}

/// A blob read by ranges out of `bytes`, counting the bytes fetched.
fn ranged(bytes: &[u8], digest: Digest) -> thinlayer::Result<RangedBlob> {
    let mut fetch = |o: u64, n: u64| Ok(bytes[o as usize..(o + n) as usize].to_vec());
    RangedBlob::open(&mut fetch, digest, bytes.len() as u64, "the test blob")
}

fn read_entry(bytes: &[u8], blob: &RangedBlob, e: &Entry) -> thinlayer::Result<Vec<u8>> {
    let mut fetch = |o: u64, n: u64| Ok(bytes[o as usize..(o + n) as usize].to_vec());
    blob.read(&mut fetch, e)
}

/// The layer `blob` holds, applied extent by extent (each read by range and verified) over
/// its parent's image.
fn over(bytes: &[u8], blob: &RangedBlob, mut parent: Vec<u8>) -> Vec<u8> {
    parent.resize(blob.header.disk_size as usize, 0);
    for e in &blob.entries {
        let r = e.offset as usize..(e.offset + e.length) as usize;
        if e.is_whiteout() {
            parent[r].fill(0);
        } else {
            assert!(e.length <= INDEX_CUT, "{e:?}");
            parent[r].copy_from_slice(&read_entry(bytes, blob, e).unwrap());
        }
    }
    parent
}

#[test]
fn a_version_2_stream_is_read_by_range_and_every_flipped_byte_of_its_index_or_extents_is_caught() {
    let a = two_layers();
    let sc = stream_of(&a, "child");
    let digest = Digest::sha256(&sc);
    assert_eq!(
        content::ids(&a, "child").unwrap().digest,
        digest,
        "the whole blob's sha256 is the content ID"
    );
    let blob = ranged(&sc, digest).unwrap();
    assert_eq!(blob.header.version, VERSION);
    assert_eq!(blob.header.disk_size, 2 << 20);
    // The child's extents over the base's image give the child's image.
    assert_eq!(over(&sc, &blob, image(&a, "base")), image(&a, "child"));
    // Every byte of the index and the footer: the tail no longer hashes to the digest.
    for at in blob.footer.index_offset as usize..sc.len() {
        let mut bad = sc.clone();
        bad[at] ^= 0x01;
        let e = ranged(&bad, digest).unwrap_err();
        assert!(
            matches!(e.kind(), Kind::Corrupt | Kind::InvalidInput),
            "byte {at}: {e}"
        );
    }
    // Every byte of every extent: that extent's read fails, and no other's.
    for e in blob.entries.iter().filter(|e| !e.is_whiteout()) {
        for at in e.blob_offset..e.blob_offset + e.length {
            let mut bad = sc.clone();
            bad[at as usize] ^= 0x80;
            let err = read_entry(&bad, &blob, e).unwrap_err();
            assert_eq!(err.kind(), Kind::Corrupt, "{err}");
        }
    }
    // A whole-stream receive refuses a stream whose index differs from its records'.
    let b = pool();
    recv(&b, "base", &stream_of(&a, "base")).unwrap();
    let mut bad = sc.clone();
    let i = blob.footer.index_offset as usize + 3;
    bad[i] ^= 1;
    let e = refused_leaves_nothing(&b, &bad);
    assert!(e.contains("block index and footer"), "{e}");
}

#[test]
fn a_version_1_stream_still_receives_and_sends_back_as_version_1() {
    let a = pool();
    a.create_layer("x", None, Some(1 << 20)).unwrap();
    let header = Header {
        version: VERSION_1,
        flags: 0,
        block_size: 4096,
        disk_size: 1 << 20,
        parent_chain_id: [0; 32],
    };
    let mut v1 = Vec::new();
    let mut e = Encoder::new(&mut v1, &header).unwrap();
    e.data(8192, &[7u8; 8192]).unwrap();
    e.finish().unwrap();
    let b = pool();
    recv(&b, "old", &v1).unwrap();
    let ids = content::ids(&b, "old").unwrap();
    assert_eq!((ids.version, ids.digest), (VERSION_1, Digest::sha256(&v1)));
    assert_eq!(stream_of(&b, "old"), v1, "sent back in its own version");
    // Not readable by range: no footer.
    let e = ranged(&v1, Digest::sha256(&v1)).unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidInput, "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Random layers over a random parent: read by range, every extent verifies and the
    /// extents over the parent's image give the layer's image.
    #[test]
    fn random_layers_read_by_range_equal_their_image(
        base_ops in proptest::collection::vec(op(), 0..8),
        ops in proptest::collection::vec(op(), 0..12),
        grow in 0u64..3,
    ) {
        let a = pool();
        let apply = |id, size: u64, ops: &[Op]| for o in ops {
            match *o {
                Op::Write { at, len, byte } => {
                    let at = (at as u64).min(size - 1);
                    let len = (len as u64).min(size - at);
                    a.write_layer(id, at, &vec![byte; len as usize]).unwrap();
                }
                Op::Zero { at, len } => {
                    let at = (at as u64).min(size - 1);
                    let len = (len as u64).min(size - at);
                    a.zero_layer(id, at, len, true).unwrap();
                }
            }
        };
        let id = a.create_layer("p", None, Some(3 << 20)).unwrap().id;
        apply(id, 3 << 20, &base_ops);
        a.commit_layer("p").unwrap();
        let size = (3 + grow) << 20;
        let id = a.create_layer("l", Some("p"), Some(size)).unwrap().id;
        apply(id, size, &ops);
        a.commit_layer("l").unwrap();
        let s = stream_of(&a, "l");
        let blob = ranged(&s, Digest::sha256(&s)).unwrap();
        prop_assert_eq!(&over(&s, &blob, image(&a, "p")), &image(&a, "l"));
    }
}
