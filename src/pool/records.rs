//! Reading a metadata stream forward, page by page: each page verified (FORMAT.md §4, §5.4:
//! salted crc, kind, stream id, seq, page number in range) before its payload is used.
//!
//! `StreamRecords` decodes a stream's records from a window of its payload that always holds
//! a whole record (`RECORD_MAX_LEN` bytes, or the rest of the stream), refilled a few MiB at a
//! time. An open replays a checkpoint through it instead of copying the whole stream into one
//! buffer first: the checkpoint is 20 bytes a scattered block (200 MB at 10M blocks, 2 GB at
//! 100M), and that copy cost a fifth of a 10M-block open (the page faults of the fresh buffer,
//! perf in docs/BENCHMARKS.md "Open time") and the stream's size again in the server's peak
//! memory. Reading from a given page and seq is also what loading part of a checkpoint on
//! demand needs (DESIGN.md §12).

use super::storage::Storage;
use crate::error::{Error, Result};
use crate::format::checksum::Kind;
use crate::format::page::{self, PAYLOAD_MAX};
use crate::format::record::{Record, RecordReader, RECORD_MAX_LEN};
use crate::format::superblock::StreamRef;
use crate::format::{PBlock, PAGE_SIZE};

/// Reads a stream's pages, several at a time while they follow each other in the file (a
/// checkpoint's mostly do: it is written in runs of blocks): the read doubles with each page
/// that follows the last one read, up to `READ_AHEAD` pages, and starts again at one page after
/// a jump. Opening a 10M-block pool read its 200 MB checkpoint in 50K reads of one page.
/// Through the page cache, not `read_bulk_at`'s O_DIRECT: a direct read waits for the disk each
/// time, where the kernel's readahead keeps reading while the pages are verified; the direct
/// variant opened no faster (docs/BENCHMARKS.md, "Open time").
pub(super) struct PageReader<'a> {
    storage: &'a dyn Storage,
    buf: Vec<u8>,
    /// Where the aligned part of `buf` starts.
    at: usize,
    /// The pages in the buffer: `first..first + len`.
    first: u64,
    len: u64,
}

/// Most pages `PageReader` reads at once (256 KiB).
const READ_AHEAD: u64 = 64;

impl<'a> PageReader<'a> {
    pub(super) fn new(storage: &'a dyn Storage) -> Self {
        use super::storage::DIRECT_ALIGN;
        let buf = vec![0u8; READ_AHEAD as usize * PAGE_SIZE + DIRECT_ALIGN];
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        PageReader {
            storage,
            buf,
            at,
            first: 0,
            len: 0,
        }
    }

    /// Page `page_no`, of which the stream has `left` pages still to read (this one included):
    /// nothing past those is read ahead.
    pub(super) fn page(&mut self, page_no: u64, left: u64) -> std::io::Result<&[u8; PAGE_SIZE]> {
        if !(self.first..self.first + self.len).contains(&page_no) {
            let follows = self.len > 0 && page_no == self.first + self.len;
            let n = if follows { self.len * 2 } else { 1 };
            let n = n.min(READ_AHEAD).min(left.max(1));
            let buf = &mut self.buf[self.at..self.at + n as usize * PAGE_SIZE];
            self.storage.read_at(buf, page_no * PAGE_SIZE as u64)?;
            (self.first, self.len) = (page_no, n);
        }
        let i = self.at + (page_no - self.first) as usize * PAGE_SIZE;
        Ok(self.buf[i..i + PAGE_SIZE].try_into().expect("a page"))
    }
}

pub(super) fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::CheckpointPage => "checkpoint",
        Kind::LogPage => "log",
        Kind::ChecksumPage => "checksum",
        Kind::Superblock => "superblock",
    }
}

/// A stream's pages in `seq` order, each verified before its payload is given out, and the
/// blocks they lie in.
pub struct StreamPages<'a> {
    pages: PageReader<'a>,
    kind: Kind,
    id: u64,
    /// Pages in the stream, and the `seq` of the next one to read.
    total: u64,
    seq: u64,
    /// The next page to read; after the last, the last page's `next`.
    page_no: u64,
    pages_per_block: u64,
    blocks: Vec<PBlock>,
}

impl<'a> StreamPages<'a> {
    pub fn new(storage: &'a dyn Storage, kind: Kind, r: &StreamRef, pages_per_block: u64) -> Self {
        StreamPages {
            pages: PageReader::new(storage),
            kind,
            id: r.id,
            total: r.pages,
            seq: 0,
            page_no: r.head,
            pages_per_block,
            blocks: Vec::new(),
        }
    }

    /// Pages `seq..pages` of the stream `r` names, from page number `page_no`, which must
    /// verify as page `seq`: part of a checkpoint read from a map index entry (FORMAT.md
    /// §6.3.4), each page verified as the whole stream's are.
    pub fn from_page(
        storage: &'a dyn Storage,
        kind: Kind,
        r: &StreamRef,
        pages_per_block: u64,
        (page_no, seq, pages): (u64, u64, u64),
    ) -> Self {
        StreamPages {
            total: pages.min(r.pages),
            seq,
            page_no,
            ..Self::new(storage, kind, r, pages_per_block)
        }
    }

    /// Pages not read yet.
    pub fn left(&self) -> u64 {
        self.total - self.seq
    }

    /// The next page's payload, verified; None after the last page. Damage is
    /// `Error::Corrupt` naming the stream, the page's seq and where it is.
    pub fn next_payload(&mut self) -> Result<Option<&[u8]>> {
        if self.seq == self.total {
            return Ok(None);
        }
        let (seq, page_no) = (self.seq, self.page_no);
        let first_page = crate::format::RESERVED_BYTES / PAGE_SIZE as u64;
        if page_no < first_page || page_no >= (1u64 << 52) {
            return Err(Error::Corrupt(format!(
                "{} stream {}: page {seq} points at impossible page number {page_no}",
                kind_name(self.kind),
                self.id
            )));
        }
        let buf = self
            .pages
            .page(page_no, self.total - seq)
            .map_err(|e| Error::io("reading metadata page", e))?;
        let h = page::decode(buf, page_no, self.kind, self.id, seq as u32)?;
        // A checkpoint's pages are full but the last (FORMAT.md §5.1), so a position in its
        // record bytes is a page and an offset (§6.3.4).
        let last = seq + 1 == self.total;
        if self.kind == Kind::CheckpointPage && !last && h.payload_len as usize != PAYLOAD_MAX {
            return Err(Error::Corrupt(format!(
                "checkpoint stream {}: page {seq} (page {page_no}) holds {} bytes, not a full page",
                self.id, h.payload_len
            )));
        }
        let block = PBlock(page_no / self.pages_per_block);
        if self.blocks.last() != Some(&block) {
            self.blocks.push(block);
        }
        self.seq += 1;
        self.page_no = h.next;
        Ok(Some(page::payload(buf, &h)))
    }

    /// After the last page: its `next` (the page a log reserves after itself).
    pub fn next_page(&self) -> u64 {
        self.page_no
    }

    /// The blocks of the pages read so far, in the order first read.
    pub fn take_blocks(&mut self) -> Vec<PBlock> {
        std::mem::take(&mut self.blocks)
    }
}

/// Payload bytes read per refill of the window, past the whole record it always holds.
const REFILL: usize = 4 << 20;

/// A stream's records, decoded from a bounded window of its pages' payloads.
pub struct StreamRecords<'a> {
    pages: StreamPages<'a>,
    window: Vec<u8>,
    /// The next record's start in `window`.
    pos: usize,
    /// Where `window` starts in the stream.
    base: u64,
    /// Where the records read end in the stream (a range of the map index), if not at its end.
    end: u64,
    name: &'static str,
}

impl<'a> StreamRecords<'a> {
    pub fn new(pages: StreamPages<'a>) -> Self {
        let name = kind_name(pages.kind);
        StreamRecords {
            pages,
            window: Vec::new(),
            pos: 0,
            base: 0,
            end: u64::MAX,
            name,
        }
    }

    /// The records of a checkpoint from byte `offset` of the payload of `pages`' first page
    /// (`StreamPages::from_page`) up to stream position `end`: a range of its map index. A
    /// record that does not end by `end` is damage (cut short), as at a stream's end.
    pub fn range(pages: StreamPages<'a>, offset: usize, end: u64) -> Result<Self> {
        let base = pages.seq * PAYLOAD_MAX as u64;
        let mut r = StreamRecords {
            base,
            end,
            ..Self::new(pages)
        };
        r.fill()?;
        if r.window.len() < offset {
            return Err(Error::Corrupt(format!(
                "checkpoint, byte {}: a map index entry points past its page's payload",
                base + offset as u64
            )));
        }
        r.pos = offset;
        Ok(r)
    }

    /// Makes the window hold a whole record from `pos` on: `RECORD_MAX_LEN` bytes or all the
    /// stream has left. What was decoded is dropped first, so the window stays
    /// `RECORD_MAX_LEN + REFILL` plus a page, whatever the stream's length.
    fn fill(&mut self) -> Result<()> {
        let ended = self.base + self.window.len() as u64 >= self.end;
        if self.window.len() - self.pos >= RECORD_MAX_LEN || self.pages.left() == 0 || ended {
            return Ok(());
        }
        if self.window.capacity() == 0 {
            let want = (self.pages.left() as usize).saturating_mul(PAYLOAD_MAX);
            self.window
                .reserve_exact(want.min(RECORD_MAX_LEN + REFILL + PAYLOAD_MAX));
        }
        self.window.drain(..self.pos);
        self.base += self.pos as u64;
        self.pos = 0;
        while self.window.len() < RECORD_MAX_LEN + REFILL
            && self.base + (self.window.len() as u64) < self.end
        {
            match self.pages.next_payload()? {
                Some(p) => self.window.extend_from_slice(p),
                None => break,
            }
        }
        Ok(())
    }

    /// The tag of the next record, or None at the end of the stream.
    pub fn peek_tag(&mut self) -> Result<Option<u8>> {
        self.fill()?;
        Ok(self.window.get(self.pos).copied())
    }

    /// The next record, or None at the end of the stream (every page read and verified).
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        self.fill()?;
        if self.position() >= self.end {
            return Ok(None);
        }
        // Not past `end`: a record must end by it.
        let stop = (self.end - self.base).min(self.window.len() as u64) as usize;
        let mut r = RecordReader::in_window(&self.window[..stop], self.pos, self.base, self.name);
        let rec = r.next_record()?;
        self.pos = r.position();
        Ok(rec)
    }

    /// Read no record that starts at or past stream position `end` (the records before a
    /// checkpoint's maps, `Recovered::replay_head`); pages already read stay read.
    pub fn set_end(&mut self, end: u64) {
        self.end = end;
    }

    /// Where the next record starts in the stream's record bytes.
    pub fn position(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// The blocks of the pages read so far (all of the stream's once `next_record` gave None).
    pub fn take_blocks(&mut self) -> Vec<PBlock> {
        self.pages.take_blocks()
    }

    #[cfg(test)]
    fn window_capacity(&self) -> usize {
        self.window.capacity()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::record::{MapEntry, MapTarget, RecordWriter};
    use crate::format::{LayerId, VBlock};
    use crate::pool::MemStorage;

    const ID: u64 = 7;

    /// Writes `payloads` as the pages of stream `id` of `kind`, page `i` at `at[i]`, each
    /// naming the next (0 after the last), as a checkpoint commit writes them.
    pub(crate) fn put_pages(mem: &MemStorage, kind: Kind, id: u64, payloads: &[&[u8]], at: &[u64]) {
        crate::pool::meta::write_pages(mem, kind, id, 1, at, payloads).unwrap();
    }

    /// Writes `bytes` as checkpoint pages from page `first` on, every other page (so the
    /// reader follows `next` across gaps); returns the stream.
    fn put_stream(mem: &MemStorage, bytes: &[u8], first: u64) -> StreamRef {
        let chunks: Vec<&[u8]> = bytes.chunks(PAYLOAD_MAX).collect();
        let at: Vec<u64> = (0..chunks.len() as u64).map(|i| first + 2 * i).collect();
        put_pages(mem, Kind::CheckpointPage, ID, &chunks, &at);
        StreamRef {
            head: first,
            pages: chunks.len() as u64,
            id: ID,
        }
    }

    /// Map records of every size up to a full one, so records straddle pages and refills.
    fn records() -> Vec<u8> {
        let mut w = RecordWriter::new();
        let mut v = 0;
        for (layer, n) in [(1, 1), (2, 300), (3, 65536), (1, 300_000), (4, 5)] {
            for _ in 0..n {
                // Every other block, so entries never continue each other into runs.
                v += 2;
                let target = MapTarget::Data {
                    pblock: crate::format::PBlock(1000 + v),
                    crc: v as u32,
                };
                let vblock = VBlock(v);
                w.map(LayerId(layer), MapEntry { vblock, target });
            }
            w.cut();
        }
        w.buf.clone()
    }

    fn all(mut r: StreamRecords) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn records_read_through_the_window_are_the_streams_records() {
        let bytes = records();
        assert!(bytes.len() > RECORD_MAX_LEN + REFILL, "the window refills");
        let mem = MemStorage::new();
        let s = put_stream(&mem, &bytes, 4);
        let pages = StreamPages::new(&mem, Kind::CheckpointPage, &s, 1);
        let got = all(StreamRecords::new(pages)).unwrap();
        let mut want = Vec::new();
        let mut r = RecordReader::new(&bytes, "checkpoint");
        while let Some(rec) = r.next_record().unwrap() {
            want.push(rec);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn the_window_stays_bounded_whatever_the_streams_length() {
        let mut bytes = Vec::new();
        while bytes.len() < 4 * (RECORD_MAX_LEN + REFILL) {
            bytes.extend_from_slice(&records());
        }
        let mem = MemStorage::new();
        let s = put_stream(&mem, &bytes, 4);
        let mut r = StreamRecords::new(StreamPages::new(&mem, Kind::CheckpointPage, &s, 1));
        let mut most = 0;
        while r.next_record().unwrap().is_some() {
            most = most.max(r.window_capacity());
        }
        assert!(
            most <= RECORD_MAX_LEN + REFILL + PAYLOAD_MAX,
            "window of {most} bytes for a stream of {}",
            bytes.len()
        );
        assert_eq!(
            r.take_blocks().len() as u64,
            s.pages,
            "a block per page read"
        );
    }

    #[test]
    fn a_damaged_page_is_an_error_naming_it_after_the_records_before_it() {
        let bytes = records();
        let mem = MemStorage::new();
        let s = put_stream(&mem, &bytes, 4);
        // Damage the last page's payload.
        let last = 4 + 2 * (s.pages - 1);
        mem.write_at(&[0xAB], last * PAGE_SIZE as u64 + 100)
            .unwrap();
        let mut r = StreamRecords::new(StreamPages::new(&mem, Kind::CheckpointPage, &s, 1));
        let mut before = 0;
        let e = loop {
            match r.next_record() {
                Ok(Some(_)) => before += 1,
                Ok(None) => panic!("a damaged page read as records"),
                Err(e) => break e,
            }
        };
        assert!(before > 0, "records in whole pages before it are given");
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        let m = e.to_string();
        assert!(m.contains(&format!("(page {last})")), "{m}");
    }

    #[test]
    fn a_record_cut_short_by_the_streams_end_names_its_stream_position() {
        let mut bytes = records();
        let cut = bytes.len() - 7;
        bytes.truncate(cut);
        let mem = MemStorage::new();
        let s = put_stream(&mem, &bytes, 4);
        let pages = StreamPages::new(&mem, Kind::CheckpointPage, &s, 1);
        let e = all(StreamRecords::new(pages)).unwrap_err();
        let m = e.to_string();
        // The last record (5 entries) starts 9 + 5 * 20 bytes before the stream's true end.
        let start = cut + 7 - (9 + 5 * 20);
        assert!(m.contains(&format!("byte {start}:")), "{m}");
    }

    proptest::proptest! {
        /// Whatever pages a stream visits, in whatever order (runs that follow each other,
        /// jumps back and forth, past the end of the file), the reader hands out the bytes a
        /// read of that one page gives, and a read starts at the page asked for and never
        /// goes past the pages the stream has left.
        #[test]
        fn page_reader_gives_each_page_as_read_alone(
            visits in proptest::collection::vec((0u64..300, 1u64..80), 1..60)
        ) {
            let pages = 200usize;
            let bytes: Vec<u8> = (0..pages * PAGE_SIZE).map(|i| (i * 31 / 7) as u8).collect();
            let mem = MemStorage::from_bytes(bytes);
            let mut r = PageReader::new(&mem);
            for (start, n) in visits {
                for (i, page_no) in (start..start + n).enumerate() {
                    let left = n - i as u64;
                    let mut want = [0u8; PAGE_SIZE];
                    mem.read_at(&mut want, page_no * PAGE_SIZE as u64).unwrap();
                    let before = (r.first, r.len);
                    let got = r.page(page_no, left).unwrap();
                    proptest::prop_assert!(got[..] == want[..], "page {}", page_no);
                    if (r.first, r.len) != before {
                        proptest::prop_assert!(r.first == page_no && r.len <= left);
                    }
                }
            }
        }
    }
}
