//! Metadata records: what the checkpoint and the log streams are made of. The checkpoint is the
//! whole catalogue as records; the log is the records of each committed transaction since.
//! Replaying checkpoint then log rebuilds the metadata exactly. Layout in docs/FORMAT.md.

use super::field::layout;
use super::ids::{LayerId, PBlock, VBlock};
use super::MAX_NAME_LEN;
use crate::error::{Error, Result};

const TAG_LAYER_CREATE: u8 = 1;
const TAG_LAYER_COMMIT: u8 = 2;
const TAG_LAYER_REMOVE: u8 = 3;
const TAG_MAP: u8 = 4;
const TAG_LAYER_COUNTERS: u8 = 5;
const TAG_LAYER_ATTR: u8 = 6;
const TAG_LAYER_RENAME: u8 = 7;

/// Attribute keys are 1 ..= 255 bytes of UTF-8; values at most 64 KiB of UTF-8, so a damaged
/// length cannot claim gigabytes.
pub const MAX_ATTR_KEY_LEN: usize = 255;
pub const MAX_ATTR_VALUE_LEN: usize = 1 << 16;

/// Why an attribute cannot be written, if it cannot.
pub fn attr_problem(key: &str, value: Option<&str>) -> Option<String> {
    if key.is_empty() || key.len() > MAX_ATTR_KEY_LEN {
        return Some(format!(
            "attribute key {key:?} must be 1 to {MAX_ATTR_KEY_LEN} bytes"
        ));
    }
    if value.is_some_and(|v| v.len() > MAX_ATTR_VALUE_LEN) {
        return Some(format!(
            "attribute {key:?} is longer than {MAX_ATTR_VALUE_LEN} bytes"
        ));
    }
    None
}

// Each record's fixed fields, in the order and with the names of docs/FORMAT.md §6. Offsets
// count from the record's tag byte.
layout! {
    /// §6.1; the name's bytes follow the fixed part.
    pub mod layer_create {
        TAG: u8 = "tag",
        ID: u32 = "id",
        PARENT: u32 = "parent",
        DISK_SIZE: u64 = "disk_size",
        CREATED_SECS: u64 = "created_secs",
        CREATED_NANOS: u32 = "created_nanos",
        MODE: u8 = "mode",
        NAME_LEN: u16 = "name_len",
    }
}
layout! {
    /// §6.2: layer commit and layer remove.
    pub mod layer_state {
        TAG: u8 = "tag",
        ID: u32 = "id",
    }
}
layout! {
    /// §6.3; `COUNT` entries follow the fixed part.
    pub mod map {
        TAG: u8 = "tag",
        LAYER: u32 = "layer",
        COUNT: u32 = "count",
    }
}
layout! {
    /// §6.3, one entry of a map record.
    pub mod map_entry {
        VBLOCK: u64 = "vblock",
        PBLOCK: u64 = "pblock",
        CRC: u32 = "crc",
    }
}
layout! {
    /// §6.4.
    pub mod layer_counters {
        TAG: u8 = "tag",
        LAYER: u32 = "layer",
        DATA_BLOCKS: u64 = "data_blocks",
        ZERO_BLOCKS: u64 = "zero_blocks",
    }
}
layout! {
    /// §6.5; the key's bytes, then the value's, follow the fixed part.
    pub mod layer_attr {
        TAG: u8 = "tag",
        LAYER: u32 = "layer",
        KEY_LEN: u8 = "key_len",
        VALUE_LEN: u32 = "value_len",
    }
}
layout! {
    /// §6.6; the new name's bytes follow the fixed part.
    pub mod layer_rename {
        TAG: u8 = "tag",
        LAYER: u32 = "layer",
        NAME_LEN: u16 = "name_len",
    }
}

/// Size of one entry of a map record.
pub const MAP_ENTRY_LEN: usize = map_entry::LEN;
/// Map records hold at most this many entries, so a damaged count cannot claim gigabytes.
pub const MAP_RECORD_MAX: u32 = 1 << 16;
/// The pblock field of a map entry: 0 = unmapped in this layer, all ones = zero (whiteout).
const PBLOCK_UNMAPPED: u64 = 0;
const PBLOCK_ZERO: u64 = u64::MAX;
/// The value_len of an attribute record that drops its key.
const ATTR_DROPPED: u32 = u32::MAX;

/// What a layer's map says about one of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapTarget {
    /// Not mapped in this layer: the parent chain decides.
    Unmapped,
    /// Reads as zeros, hiding whatever the parents hold (a whiteout).
    Zero,
    /// Stored in a pool block, with the crc32 of its content.
    Data { pblock: PBlock, crc: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub vblock: VBlock,
    pub target: MapTarget,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerCreate {
    pub id: LayerId,
    pub parent: Option<LayerId>,
    pub disk_size: u64,
    pub created_secs: u64,
    pub created_nanos: u32,
    pub writable: bool,
    /// Writable and still being filled by an import: a crash leaves it half-made, so a
    /// writable open removes it. Committing the layer clears it.
    pub incomplete: bool,
    /// Read-only, and its unmapped blocks that its registry blob lists are not local yet: they
    /// are fetched, never read through to the parent (FORMAT.md §6.1, mode 3). Committing the
    /// layer clears it.
    pub remote: bool,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    LayerCreate(LayerCreate),
    LayerCommit(LayerId),
    LayerRemove(LayerId),
    Map {
        layer: LayerId,
        entries: Vec<MapEntry>,
    },
    /// Checkpoint only: the counters the layer had, checked against its map on load.
    LayerCounters {
        layer: LayerId,
        data_blocks: u64,
        zero_blocks: u64,
    },
    /// Set (`Some`) or drop (`None`) one key of a layer's attributes: what frontends keep
    /// about a layer (a snapshotter's key and labels, a content digest), in the same
    /// transaction as the layer change they describe.
    LayerAttr {
        layer: LayerId,
        key: String,
        value: Option<String>,
    },
    /// The layer takes a new (unused) name.
    LayerRename {
        layer: LayerId,
        name: String,
    },
}

impl LayerCreate {
    /// The record's `mode` byte (FORMAT.md §6.1): 0 committed, 1 writable, 2 importing,
    /// 3 remote. The flags are exclusive that way; the debug asserts hold callers to it.
    pub fn mode(&self) -> u8 {
        debug_assert!(self.writable || !self.incomplete);
        debug_assert!(!(self.remote && self.writable));
        if self.remote {
            3
        } else {
            self.writable as u8 + self.incomplete as u8
        }
    }
}

/// Appends records to a buffer. Consecutive map entries of one layer share one record.
#[derive(Default)]
pub struct RecordWriter {
    pub buf: Vec<u8>,
    /// (byte offset of the open map record, its layer, its entry count)
    open_map: Option<(usize, LayerId, u32)>,
}

impl RecordWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// End the open map record, so the bytes appended so far are whole records that no
    /// later append changes (the crash journal copies them as they are).
    pub fn cut(&mut self) {
        self.open_map = None;
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.open_map = None;
    }

    /// Appends `len` zero bytes for the fixed part of a record or entry and returns them.
    fn grow(&mut self, len: usize) -> &mut [u8] {
        let at = self.buf.len();
        self.buf.resize(at + len, 0);
        &mut self.buf[at..]
    }

    pub fn layer_create(&mut self, c: &LayerCreate) {
        use layer_create as f;
        self.open_map = None;
        debug_assert!(c.name.len() <= MAX_NAME_LEN);
        let b = self.grow(f::LEN);
        f::TAG.put(b, TAG_LAYER_CREATE);
        f::ID.put(b, c.id.0);
        f::PARENT.put(b, c.parent.map_or(0, |p| p.0));
        f::DISK_SIZE.put(b, c.disk_size);
        f::CREATED_SECS.put(b, c.created_secs);
        f::CREATED_NANOS.put(b, c.created_nanos);
        f::MODE.put(b, c.mode());
        f::NAME_LEN.put(b, c.name.len() as u16);
        self.buf.extend_from_slice(c.name.as_bytes());
    }

    pub fn layer_commit(&mut self, id: LayerId) {
        self.layer_state(TAG_LAYER_COMMIT, id);
    }

    pub fn layer_remove(&mut self, id: LayerId) {
        self.layer_state(TAG_LAYER_REMOVE, id);
    }

    fn layer_state(&mut self, tag: u8, id: LayerId) {
        use layer_state as f;
        self.open_map = None;
        let b = self.grow(f::LEN);
        f::TAG.put(b, tag);
        f::ID.put(b, id.0);
    }

    pub fn layer_counters(&mut self, id: LayerId, data_blocks: u64, zero_blocks: u64) {
        use layer_counters as f;
        self.open_map = None;
        let b = self.grow(f::LEN);
        f::TAG.put(b, TAG_LAYER_COUNTERS);
        f::LAYER.put(b, id.0);
        f::DATA_BLOCKS.put(b, data_blocks);
        f::ZERO_BLOCKS.put(b, zero_blocks);
    }

    /// `value` None drops the key; a set value has at most `MAX_ATTR_VALUE_LEN` bytes.
    pub fn layer_attr(&mut self, layer: LayerId, key: &str, value: Option<&str>) {
        use layer_attr as f;
        self.open_map = None;
        debug_assert!(!key.is_empty() && key.len() <= MAX_ATTR_KEY_LEN);
        debug_assert!(value.is_none_or(|v| v.len() <= MAX_ATTR_VALUE_LEN));
        let b = self.grow(f::LEN);
        f::TAG.put(b, TAG_LAYER_ATTR);
        f::LAYER.put(b, layer.0);
        f::KEY_LEN.put(b, key.len() as u8);
        // u32::MAX marks a drop, so an empty value is still a value.
        f::VALUE_LEN.put(b, value.map_or(ATTR_DROPPED, |v| v.len() as u32));
        self.buf.extend_from_slice(key.as_bytes());
        if let Some(v) = value {
            self.buf.extend_from_slice(v.as_bytes());
        }
    }

    pub fn layer_rename(&mut self, layer: LayerId, name: &str) {
        use layer_rename as f;
        self.open_map = None;
        debug_assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
        let b = self.grow(f::LEN);
        f::TAG.put(b, TAG_LAYER_RENAME);
        f::LAYER.put(b, layer.0);
        f::NAME_LEN.put(b, name.len() as u16);
        self.buf.extend_from_slice(name.as_bytes());
    }

    pub fn map(&mut self, layer: LayerId, e: MapEntry) {
        match self.open_map {
            Some((at, l, n)) if l == layer && n < MAP_RECORD_MAX => {
                map::COUNT.put(&mut self.buf[at..], n + 1);
                self.open_map = Some((at, l, n + 1));
            }
            _ => {
                let at = self.buf.len();
                let b = self.grow(map::LEN);
                map::TAG.put(b, TAG_MAP);
                map::LAYER.put(b, layer.0);
                map::COUNT.put(b, 1);
                self.open_map = Some((at, layer, 1));
            }
        }
        let (pblock, crc) = match e.target {
            MapTarget::Unmapped => (PBLOCK_UNMAPPED, 0),
            MapTarget::Zero => (PBLOCK_ZERO, 0),
            MapTarget::Data { pblock, crc } => (pblock.0, crc),
        };
        let b = self.grow(map_entry::LEN);
        map_entry::VBLOCK.put(b, e.vblock.0);
        map_entry::PBLOCK.put(b, pblock);
        map_entry::CRC.put(b, crc);
    }
}

/// Decodes a stream's bytes record by record; every fault names the stream and byte position.
pub struct RecordReader<'a> {
    buf: &'a [u8],
    pos: usize,
    stream: &'a str,
}

impl<'a> RecordReader<'a> {
    pub fn new(buf: &'a [u8], stream: &'a str) -> Self {
        RecordReader {
            buf,
            pos: 0,
            stream,
        }
    }

    fn bad(&self, at: usize, m: impl std::fmt::Display) -> Error {
        Error::Corrupt(format!("{} stream, byte {at}: {m}", self.stream))
    }

    /// The next `n` bytes, which a `what` record starting at byte `start` needs.
    fn take(&mut self, n: usize, start: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.bad(start, format!("{what} record truncated")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next `n` bytes as UTF-8 text.
    fn utf8(&mut self, n: usize, start: usize, what: &str) -> Result<String> {
        let b = self.take(n, start, what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(self.bad(start, format!("{what} is not UTF-8"))),
        }
    }

    /// The next record, or None at the end of the stream.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        // Each record's fixed part, tag included, is taken whole; fields are read from it.
        let start = self.pos;
        let tag = self.buf[self.pos];
        let rec = match tag {
            TAG_LAYER_CREATE => {
                use layer_create as f;
                let b = self.take(f::LEN, start, "layer")?;
                let id = f::ID.get(b);
                let parent = f::PARENT.get(b);
                let created_nanos = f::CREATED_NANOS.get(b);
                let mode = f::MODE.get(b);
                let name_len = f::NAME_LEN.get(b) as usize;
                if name_len == 0 || name_len > MAX_NAME_LEN {
                    return Err(self.bad(start, format!("layer name length {name_len}")));
                }
                let name = self.take(name_len, start, "layer")?;
                let name = std::str::from_utf8(name)
                    .map_err(|_| self.bad(start, "layer name is not UTF-8"))?;
                // Id 0 means "no parent"; u32::MAX leaves no id after it for the next layer.
                if id == 0 || id == u32::MAX || mode > 3 || created_nanos >= 1_000_000_000 {
                    return Err(self.bad(start, "impossible layer record"));
                }
                Record::LayerCreate(LayerCreate {
                    id: LayerId(id),
                    parent: (parent != 0).then_some(LayerId(parent)),
                    disk_size: f::DISK_SIZE.get(b),
                    created_secs: f::CREATED_SECS.get(b),
                    created_nanos,
                    writable: mode == 1 || mode == 2,
                    incomplete: mode == 2,
                    remote: mode == 3,
                    name: name.to_string(),
                })
            }
            TAG_LAYER_COMMIT | TAG_LAYER_REMOVE => {
                let b = self.take(layer_state::LEN, start, "layer state")?;
                let id = LayerId(layer_state::ID.get(b));
                if tag == TAG_LAYER_COMMIT {
                    Record::LayerCommit(id)
                } else {
                    Record::LayerRemove(id)
                }
            }
            TAG_LAYER_COUNTERS => {
                use layer_counters as f;
                let b = self.take(f::LEN, start, "counters")?;
                Record::LayerCounters {
                    layer: LayerId(f::LAYER.get(b)),
                    data_blocks: f::DATA_BLOCKS.get(b),
                    zero_blocks: f::ZERO_BLOCKS.get(b),
                }
            }
            TAG_MAP => {
                let b = self.take(map::LEN, start, "map")?;
                let layer = LayerId(map::LAYER.get(b));
                let n = map::COUNT.get(b);
                if n == 0 || n > MAP_RECORD_MAX {
                    return Err(self.bad(start, format!("map record with {n} entries")));
                }
                // Checked against the bytes present before anything is allocated.
                let raw = self.take(n as usize * map_entry::LEN, start, "map")?;
                let mut entries = Vec::with_capacity(n as usize);
                for e in raw.chunks_exact(map_entry::LEN) {
                    let vblock = VBlock(map_entry::VBLOCK.get(e));
                    let target = match map_entry::PBLOCK.get(e) {
                        PBLOCK_UNMAPPED => MapTarget::Unmapped,
                        PBLOCK_ZERO => MapTarget::Zero,
                        p => MapTarget::Data {
                            pblock: PBlock(p),
                            crc: map_entry::CRC.get(e),
                        },
                    };
                    entries.push(MapEntry { vblock, target });
                }
                Record::Map { layer, entries }
            }
            TAG_LAYER_ATTR => {
                use layer_attr as f;
                let b = self.take(f::LEN, start, "attribute")?;
                let layer = LayerId(f::LAYER.get(b));
                let key_len = f::KEY_LEN.get(b) as usize;
                let value_len = f::VALUE_LEN.get(b);
                if key_len == 0 {
                    return Err(self.bad(start, "attribute with an empty key"));
                }
                if value_len != ATTR_DROPPED && value_len as usize > MAX_ATTR_VALUE_LEN {
                    return Err(self.bad(start, format!("attribute value of {value_len} bytes")));
                }
                let key = self.utf8(key_len, start, "attribute key")?;
                let value = match value_len {
                    ATTR_DROPPED => None,
                    n => Some(self.utf8(n as usize, start, "attribute value")?),
                };
                Record::LayerAttr { layer, key, value }
            }
            TAG_LAYER_RENAME => {
                use layer_rename as f;
                let b = self.take(f::LEN, start, "rename")?;
                let layer = LayerId(f::LAYER.get(b));
                let name_len = f::NAME_LEN.get(b) as usize;
                if name_len == 0 || name_len > MAX_NAME_LEN {
                    return Err(self.bad(start, format!("layer name length {name_len}")));
                }
                let name = self.utf8(name_len, start, "layer name")?;
                Record::LayerRename { layer, name }
            }
            t => return Err(self.bad(start, format!("unknown record tag {t}"))),
        };
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writable child layer with a typical image name.
    fn sample_create() -> LayerCreate {
        LayerCreate {
            id: LayerId(3),
            parent: Some(LayerId(1)),
            disk_size: 1 << 30,
            created_secs: 1_800_000_000,
            created_nanos: 5,
            writable: true,
            incomplete: false,
            remote: false,
            name: "acme/my-base-image:1.0".into(),
        }
    }

    #[test]
    fn a_remote_layer_is_mode_3_and_mode_4_is_refused() {
        let c = LayerCreate {
            writable: false,
            remote: true,
            ..sample_create()
        };
        let mut w = RecordWriter::new();
        w.layer_create(&c);
        assert_eq!(layer_create::MODE.get(&w.buf), 3);
        let rec = RecordReader::new(&w.buf, "log").next_record().unwrap();
        assert_eq!(rec, Some(Record::LayerCreate(c)));
        layer_create::MODE.put(&mut w.buf, 4);
        let e = RecordReader::new(&w.buf, "log").next_record().unwrap_err();
        assert!(e.to_string().contains("impossible layer record"), "{e}");
    }

    #[test]
    fn round_trip_all_records() {
        let create = sample_create();
        let mut w = RecordWriter::new();
        w.layer_create(&create);
        let e = |v, t| MapEntry {
            vblock: VBlock(v),
            target: t,
        };
        let d = MapTarget::Data {
            pblock: PBlock(9),
            crc: 0xabcd,
        };
        w.map(LayerId(3), e(1, d));
        w.map(LayerId(3), e(2, MapTarget::Zero));
        w.map(LayerId(4), e(2, MapTarget::Unmapped));
        w.layer_commit(LayerId(3));
        w.layer_counters(LayerId(3), 1, 1);
        w.layer_remove(LayerId(4));
        w.layer_attr(LayerId(3), "containerd.key", Some("default/7/c1"));
        w.layer_attr(LayerId(3), "empty", Some(""));
        w.layer_attr(LayerId(3), "containerd.key", None);
        w.layer_rename(LayerId(3), "sha256:abc");
        let mut r = RecordReader::new(&w.buf, "test");
        let mut got = vec![];
        while let Some(rec) = r.next_record().unwrap() {
            got.push(rec);
        }
        assert_eq!(
            got,
            vec![
                Record::LayerCreate(create),
                Record::Map {
                    layer: LayerId(3),
                    entries: vec![e(1, d), e(2, MapTarget::Zero)]
                },
                Record::Map {
                    layer: LayerId(4),
                    entries: vec![e(2, MapTarget::Unmapped)]
                },
                Record::LayerCommit(LayerId(3)),
                Record::LayerCounters {
                    layer: LayerId(3),
                    data_blocks: 1,
                    zero_blocks: 1
                },
                Record::LayerRemove(LayerId(4)),
                Record::LayerAttr {
                    layer: LayerId(3),
                    key: "containerd.key".into(),
                    value: Some("default/7/c1".into())
                },
                Record::LayerAttr {
                    layer: LayerId(3),
                    key: "empty".into(),
                    value: Some(String::new())
                },
                Record::LayerAttr {
                    layer: LayerId(3),
                    key: "containerd.key".into(),
                    value: None
                },
                Record::LayerRename {
                    layer: LayerId(3),
                    name: "sha256:abc".into()
                },
            ]
        );
    }

    #[test]
    fn layer_id_without_a_successor_is_rejected() {
        // Found by fuzzing: replaying id u32::MAX overflowed the catalogue's next id.
        let mut w = RecordWriter::new();
        w.layer_create(&LayerCreate {
            id: LayerId(u32::MAX),
            parent: None,
            disk_size: 4096,
            created_secs: 0,
            created_nanos: 0,
            writable: true,
            incomplete: false,
            remote: false,
            name: "x".into(),
        });
        let e = RecordReader::new(&w.buf, "log").next_record().unwrap_err();
        assert!(
            e.to_string()
                .contains("log stream, byte 0: impossible layer record"),
            "{e}"
        );
    }

    #[test]
    fn a_full_map_record_is_closed_and_the_next_entry_starts_another() {
        let mut w = RecordWriter::new();
        let n = MAP_RECORD_MAX as u64 + 1;
        for v in 0..n {
            let e = MapEntry {
                vblock: VBlock(v),
                target: MapTarget::Zero,
            };
            w.map(LayerId(7), e);
        }
        let second = map::LEN + MAP_RECORD_MAX as usize * MAP_ENTRY_LEN;
        assert_eq!(w.buf.len(), second + map::LEN + MAP_ENTRY_LEN);
        assert_eq!(map::COUNT.get(&w.buf), MAP_RECORD_MAX);
        assert_eq!(map::COUNT.get(&w.buf[second..]), 1);
        let mut r = RecordReader::new(&w.buf, "log");
        let mut seen = 0;
        while let Some(Record::Map { layer, entries }) = r.next_record().unwrap() {
            assert_eq!(layer, LayerId(7));
            for e in entries {
                assert_eq!(e.vblock, VBlock(seen));
                seen += 1;
            }
        }
        assert_eq!(seen, n);
    }

    #[test]
    fn truncation_and_lying_counts_are_errors() {
        let mut w = RecordWriter::new();
        w.map(
            LayerId(1),
            MapEntry {
                vblock: VBlock(0),
                target: MapTarget::Zero,
            },
        );
        for cut in 1..w.buf.len() {
            let mut r = RecordReader::new(&w.buf[..cut], "log");
            assert!(r.next_record().is_err(), "cut at {cut} accepted");
        }
        let mut b = w.buf.clone();
        map::COUNT.put(&mut b, u32::MAX);
        assert!(RecordReader::new(&b, "log").next_record().is_err());
    }

    /// One of each record, as the writer with literal offsets wrote them before the field
    /// tables existed; one row per record, one group of digits per field.
    #[test]
    fn writes_the_golden_bytes() {
        let mut w = RecordWriter::new();
        let creates = [
            sample_create(),
            LayerCreate {
                id: LayerId(u32::MAX - 1),
                parent: None,
                disk_size: 4096,
                created_secs: 0,
                created_nanos: 999_999_999,
                writable: false,
                incomplete: false,
                remote: false,
                name: "\u{e9}".into(),
            },
        ];
        creates.iter().for_each(|c| w.layer_create(c));
        let e = |v, t| MapEntry {
            vblock: VBlock(v),
            target: t,
        };
        let data = |p, crc| MapTarget::Data {
            pblock: PBlock(p),
            crc,
        };
        let maps = [
            (
                LayerId(3),
                vec![e(1, data(9, 0xabcd)), e(2, MapTarget::Zero)],
            ),
            (
                LayerId(4),
                vec![
                    e(2, MapTarget::Unmapped),
                    e(u64::MAX >> 16, data((1 << 48) - 2, 0xdead_beef)),
                ],
            ),
        ];
        for (layer, entries) in &maps {
            entries.iter().for_each(|&en| w.map(*layer, en));
        }
        w.layer_commit(LayerId(3));
        w.layer_counters(LayerId(3), 1, 1);
        w.layer_remove(LayerId(4));
        let golden = crate::format::unhex(concat!(
            "01 03000000 01000000 0000004000000000 00d2496b00000000 05000000 01 1600 ",
            "61636d652f6d792d626173652d696d6167653a312e30 ",
            "01 feffffff 00000000 0010000000000000 0000000000000000 ffc99a3b 00 0200 c3a9 ",
            "04 03000000 02000000 ",
            "0100000000000000 0900000000000000 cdab0000 ",
            "0200000000000000 ffffffffffffffff 00000000 ",
            "04 04000000 02000000 ",
            "0200000000000000 0000000000000000 00000000 ",
            "ffffffffffff0000 feffffffffff0000 efbeadde ",
            "02 03000000 ",
            "05 03000000 0100000000000000 0100000000000000 ",
            "03 04000000",
        ));
        assert_eq!(w.buf, golden);

        let mut r = RecordReader::new(&golden, "golden");
        let mut want: Vec<Record> = creates.into_iter().map(Record::LayerCreate).collect();
        want.extend(
            maps.into_iter()
                .map(|(layer, entries)| Record::Map { layer, entries }),
        );
        want.extend([
            Record::LayerCommit(LayerId(3)),
            Record::LayerCounters {
                layer: LayerId(3),
                data_blocks: 1,
                zero_blocks: 1,
            },
            Record::LayerRemove(LayerId(4)),
        ]);
        for rec in want {
            assert_eq!(r.next_record().unwrap(), Some(rec));
        }
        assert_eq!(r.next_record().unwrap(), None);
    }

    /// One call on the writer, as the property test generates them.
    #[derive(Clone, Debug)]
    enum Op {
        Create(LayerCreate),
        Commit(u32),
        Remove(u32),
        Counters(u32, u64, u64),
        Map(u32, MapEntry),
        Attr(u32, String, Option<String>),
        Rename(u32, String),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let id = 1u32..u32::MAX;
        let target = prop_oneof![
            Just(MapTarget::Unmapped),
            Just(MapTarget::Zero),
            (1u64..u64::MAX, any::<u32>()).prop_map(|(p, crc)| MapTarget::Data {
                pblock: PBlock(p),
                crc
            }),
        ];
        let create = (
            id.clone(),
            proptest::option::of(id.clone()),
            any::<u64>(),
            any::<u64>(),
            0u32..1_000_000_000,
            0u8..4,
            "[a-z0-9/:.\\-]{1,255}",
        )
            .prop_map(
                |(id, parent, disk_size, created_secs, created_nanos, mode, name)| {
                    Op::Create(LayerCreate {
                        id: LayerId(id),
                        parent: parent.map(LayerId),
                        disk_size,
                        created_secs,
                        created_nanos,
                        writable: mode == 1 || mode == 2,
                        incomplete: mode == 2,
                        remote: mode == 3,
                        name,
                    })
                },
            );
        prop_oneof![
            create,
            id.clone().prop_map(Op::Commit),
            id.clone().prop_map(Op::Remove),
            (id.clone(), any::<u64>(), any::<u64>()).prop_map(|(l, d, z)| Op::Counters(l, d, z)),
            (
                id.clone(),
                "\\PC{1,60}",
                proptest::option::of("\\PC{0,200}")
            )
                .prop_map(|(l, k, v)| Op::Attr(l, k, v)),
            (id.clone(), "[a-z0-9/:.\\-]{1,255}").prop_map(|(l, n)| Op::Rename(l, n)),
            // Few layers, so consecutive entries often share one.
            (1u32..4, any::<u64>(), target).prop_map(|(l, v, target)| Op::Map(
                l,
                MapEntry {
                    vblock: VBlock(v),
                    target
                }
            )),
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_record_sequence_round_trips(ops in proptest::collection::vec(op(), 0..40)) {
            let mut w = RecordWriter::new();
            // The records the reader must return: consecutive map entries of one layer merged.
            let mut want: Vec<Record> = Vec::new();
            for op in ops {
                match op {
                    Op::Create(c) => {
                        w.layer_create(&c);
                        want.push(Record::LayerCreate(c));
                    }
                    Op::Commit(id) => {
                        w.layer_commit(LayerId(id));
                        want.push(Record::LayerCommit(LayerId(id)));
                    }
                    Op::Remove(id) => {
                        w.layer_remove(LayerId(id));
                        want.push(Record::LayerRemove(LayerId(id)));
                    }
                    Op::Counters(l, data_blocks, zero_blocks) => {
                        w.layer_counters(LayerId(l), data_blocks, zero_blocks);
                        want.push(Record::LayerCounters {
                            layer: LayerId(l),
                            data_blocks,
                            zero_blocks,
                        });
                    }
                    Op::Attr(l, key, value) => {
                        w.layer_attr(LayerId(l), &key, value.as_deref());
                        want.push(Record::LayerAttr { layer: LayerId(l), key, value });
                    }
                    Op::Rename(l, name) => {
                        w.layer_rename(LayerId(l), &name);
                        want.push(Record::LayerRename { layer: LayerId(l), name });
                    }
                    Op::Map(l, e) => {
                        w.map(LayerId(l), e);
                        match want.last_mut() {
                            Some(Record::Map { layer, entries }) if *layer == LayerId(l) => {
                                entries.push(e)
                            }
                            _ => want.push(Record::Map {
                                layer: LayerId(l),
                                entries: vec![e],
                            }),
                        }
                    }
                }
            }
            let mut r = RecordReader::new(&w.buf, "prop");
            for rec in want {
                proptest::prop_assert_eq!(r.next_record().unwrap(), Some(rec));
            }
            proptest::prop_assert_eq!(r.next_record().unwrap(), None);
        }
    }
}
