//! Metadata records: what the checkpoint and the log streams are made of. The checkpoint is the
//! whole catalogue as records; the log is the records of each committed transaction since.
//! Replaying checkpoint then log rebuilds the metadata exactly. Layout in docs/FORMAT.md.

use super::ids::{LayerId, PBlock, VBlock};
use super::MAX_NAME_LEN;
use crate::error::{Error, Result};
use byteorder::{ByteOrder, LittleEndian as LE};

const TAG_LAYER_CREATE: u8 = 1;
const TAG_LAYER_COMMIT: u8 = 2;
const TAG_LAYER_REMOVE: u8 = 3;
const TAG_MAP: u8 = 4;
const TAG_LAYER_COUNTERS: u8 = 5;

/// Size of one entry of a map record.
pub const MAP_ENTRY_LEN: usize = 20;
/// Map records hold at most this many entries, so a damaged count cannot claim gigabytes.
pub const MAP_RECORD_MAX: u32 = 1 << 16;
/// The pblock field of a map entry: 0 = unmapped in this layer, all ones = zero (whiteout).
const PBLOCK_UNMAPPED: u64 = 0;
const PBLOCK_ZERO: u64 = u64::MAX;

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

    pub fn clear(&mut self) {
        self.buf.clear();
        self.open_map = None;
    }

    pub fn layer_create(&mut self, c: &LayerCreate) {
        self.open_map = None;
        let b = &mut self.buf;
        b.push(TAG_LAYER_CREATE);
        put_u32(b, c.id.0);
        put_u32(b, c.parent.map_or(0, |p| p.0));
        put_u64(b, c.disk_size);
        put_u64(b, c.created_secs);
        put_u32(b, c.created_nanos);
        b.push(c.writable as u8);
        debug_assert!(c.name.len() <= MAX_NAME_LEN);
        put_u16(b, c.name.len() as u16);
        b.extend_from_slice(c.name.as_bytes());
    }

    pub fn layer_commit(&mut self, id: LayerId) {
        self.open_map = None;
        self.buf.push(TAG_LAYER_COMMIT);
        put_u32(&mut self.buf, id.0);
    }

    pub fn layer_remove(&mut self, id: LayerId) {
        self.open_map = None;
        self.buf.push(TAG_LAYER_REMOVE);
        put_u32(&mut self.buf, id.0);
    }

    pub fn layer_counters(&mut self, id: LayerId, data_blocks: u64, zero_blocks: u64) {
        self.open_map = None;
        self.buf.push(TAG_LAYER_COUNTERS);
        put_u32(&mut self.buf, id.0);
        put_u64(&mut self.buf, data_blocks);
        put_u64(&mut self.buf, zero_blocks);
    }

    pub fn map(&mut self, layer: LayerId, e: MapEntry) {
        match self.open_map {
            Some((at, l, n)) if l == layer && n < MAP_RECORD_MAX => {
                LE::write_u32(&mut self.buf[at + 5..at + 9], n + 1);
                self.open_map = Some((at, l, n + 1));
            }
            _ => {
                let at = self.buf.len();
                self.buf.push(TAG_MAP);
                put_u32(&mut self.buf, layer.0);
                put_u32(&mut self.buf, 1);
                self.open_map = Some((at, layer, 1));
            }
        }
        let (pblock, crc) = match e.target {
            MapTarget::Unmapped => (PBLOCK_UNMAPPED, 0),
            MapTarget::Zero => (PBLOCK_ZERO, 0),
            MapTarget::Data { pblock, crc } => (pblock.0, crc),
        };
        put_u64(&mut self.buf, e.vblock.0);
        put_u64(&mut self.buf, pblock);
        put_u32(&mut self.buf, crc);
    }
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
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

    fn take(&mut self, n: usize, start: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.bad(start, format!("{what} record truncated")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next record, or None at the end of the stream.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let start = self.pos;
        let tag = self.buf[self.pos];
        self.pos += 1;
        let rec = match tag {
            TAG_LAYER_CREATE => {
                let f = self.take(31, start, "layer")?;
                let id = LE::read_u32(&f[0..4]);
                let parent = LE::read_u32(&f[4..8]);
                let disk_size = LE::read_u64(&f[8..16]);
                let created_secs = LE::read_u64(&f[16..24]);
                let created_nanos = LE::read_u32(&f[24..28]);
                let writable = f[28];
                let name_len = LE::read_u16(&f[29..31]) as usize;
                if name_len == 0 || name_len > MAX_NAME_LEN {
                    return Err(self.bad(start, format!("layer name length {name_len}")));
                }
                let name = self.take(name_len, start, "layer")?;
                let name = std::str::from_utf8(name)
                    .map_err(|_| self.bad(start, "layer name is not UTF-8"))?;
                // Id 0 means "no parent"; u32::MAX leaves no id after it for the next layer.
                if id == 0 || id == u32::MAX || writable > 1 || created_nanos >= 1_000_000_000 {
                    return Err(self.bad(start, "impossible layer record"));
                }
                Record::LayerCreate(LayerCreate {
                    id: LayerId(id),
                    parent: (parent != 0).then_some(LayerId(parent)),
                    disk_size,
                    created_secs,
                    created_nanos,
                    writable: writable == 1,
                    name: name.to_string(),
                })
            }
            TAG_LAYER_COMMIT | TAG_LAYER_REMOVE => {
                let f = self.take(4, start, "layer state")?;
                let id = LayerId(LE::read_u32(f));
                if tag == TAG_LAYER_COMMIT {
                    Record::LayerCommit(id)
                } else {
                    Record::LayerRemove(id)
                }
            }
            TAG_LAYER_COUNTERS => {
                let f = self.take(20, start, "counters")?;
                Record::LayerCounters {
                    layer: LayerId(LE::read_u32(&f[0..4])),
                    data_blocks: LE::read_u64(&f[4..12]),
                    zero_blocks: LE::read_u64(&f[12..20]),
                }
            }
            TAG_MAP => {
                let f = self.take(8, start, "map")?;
                let layer = LayerId(LE::read_u32(&f[0..4]));
                let n = LE::read_u32(&f[4..8]);
                if n == 0 || n > MAP_RECORD_MAX {
                    return Err(self.bad(start, format!("map record with {n} entries")));
                }
                // Checked against the bytes present before anything is allocated.
                let raw = self.take(n as usize * MAP_ENTRY_LEN, start, "map")?;
                let mut entries = Vec::with_capacity(n as usize);
                for e in raw.chunks_exact(MAP_ENTRY_LEN) {
                    let vblock = VBlock(LE::read_u64(&e[0..8]));
                    let p = LE::read_u64(&e[8..16]);
                    let crc = LE::read_u32(&e[16..20]);
                    let target = match p {
                        PBLOCK_UNMAPPED => MapTarget::Unmapped,
                        PBLOCK_ZERO => MapTarget::Zero,
                        p => MapTarget::Data {
                            pblock: PBlock(p),
                            crc,
                        },
                    };
                    entries.push(MapEntry { vblock, target });
                }
                Record::Map { layer, entries }
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
            name: "acme/my-base-image:1.0".into(),
        }
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
        LE::write_u32(&mut b[5..9], u32::MAX);
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
}
