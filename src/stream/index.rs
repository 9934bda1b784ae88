//! The block index of a version-2 stream (docs/STREAM.md §5): what follows the end record, so
//! a reader holding only HTTP Range requests can find, fetch and verify any extent.
//!
//! Writing: `IndexBuilder` is fed the records as they are written (or read) and makes the
//! tail — padding to 64 bytes, the index, the footer. The encoder appends it; a whole-stream
//! reader rebuilds it from the records it read and refuses a stream whose tail is not exactly
//! that, so a received layer still sends back the same bytes.
//!
//! Reading by range (`RangedBlob`): the footer (the last bytes), then the index; the footer
//! holds the SHA-256 midstate of every byte before the index, so hashing on from it over the
//! index and the footer must give the blob's digest, the one the manifest names. Each extent
//! is then checked against its own sha256 in the index before it is returned.

use super::digest::Digest;
use crate::error::{Error, Result};
use crate::format::sha256::Sha256;
use crate::format::stream::{self as fmt, Entry, Footer, Header, INDEX_CUT, WHITEOUT};

#[derive(Default)]
pub struct IndexBuilder {
    entries: Vec<Entry>,
}

impl IndexBuilder {
    /// A data record's bytes, for disk offset `offset`, at `blob_offset` in the stream: one
    /// entry per piece between multiples of `INDEX_CUT`. The bytes are hashed into `stream`
    /// (the hash of the stream so far, which they continue) in the same pass as into their
    /// entries' sha256s: two chains at once cost about two thirds of one after the other, and
    /// these two hashes are most of the CPU an import or a receive spends.
    /// `offset + bytes.len()` must not pass 2^64: the decoder refuses such a record before it
    /// gets here.
    pub fn data(&mut self, offset: u64, blob_offset: u64, bytes: &[u8], stream: &mut Sha256) {
        debug_assert!(offset.checked_add(bytes.len() as u64).is_some());
        let mut at = 0usize;
        while at < bytes.len() {
            let off = offset + at as u64;
            let room = INDEX_CUT - off % INDEX_CUT;
            let n = room.min((bytes.len() - at) as u64) as usize;
            let mut extent = Sha256::new();
            Sha256::update_both(stream, &mut extent, &bytes[at..at + n]);
            self.entries.push(Entry {
                offset: off,
                length: n as u64,
                blob_offset: blob_offset + at as u64,
                sha256: extent.finalize(),
            });
            at += n;
        }
    }

    /// A zero record (a whiteout): one entry, not cut.
    pub fn zero(&mut self, offset: u64, len: u64) {
        self.entries.push(Entry {
            offset,
            length: len,
            blob_offset: WHITEOUT,
            sha256: [0; 32],
        });
    }

    /// The bytes after the end record: zeros up to a multiple of 64, the index, the footer.
    /// `hash` has hashed the stream up to and including the end record.
    pub fn tail(&self, header: &Header, hash: &Sha256) -> Vec<u8> {
        let pad = ((64 - hash.len() % 64) % 64) as usize;
        let mut out = vec![0u8; pad];
        let mut h = hash.clone();
        h.update(&out);
        let index: Vec<u8> = self.entries.iter().flat_map(|e| e.pack()).collect();
        let footer = Footer {
            header: header.pack(),
            index_offset: h.len(),
            index_len: index.len() as u64,
            entries: self.entries.len() as u64,
            prefix_midstate: h.midstate().expect("padded to a whole block"),
            index_sha256: Digest::sha256(&index).0,
        };
        out.extend_from_slice(&index);
        out.extend_from_slice(&footer.pack());
        out
    }
}

/// Reads `len` bytes at `offset` of a blob: an HTTP Range request, or a slice in tests.
pub type Fetch<'a> = &'a mut dyn FnMut(u64, u64) -> Result<Vec<u8>>;

/// A version-2 blob whose footer and index have been fetched and verified against its digest.
#[derive(Debug, Clone)]
pub struct RangedBlob {
    pub header: Header,
    pub footer: Footer,
    /// In disk order, as written.
    pub entries: Vec<Entry>,
    pub digest: Digest,
    pub len: u64,
    pub label: String,
}

impl RangedBlob {
    /// Fetch and verify the footer and the index of the `len`-byte blob `digest` (named
    /// `label` in errors): two ranged reads. A blob whose tail does not hash to `digest` is
    /// `Corrupt`; a version-1 blob (no footer) is `InvalidInput` (pull it whole).
    pub fn open(fetch: Fetch, digest: Digest, len: u64, label: &str) -> Result<RangedBlob> {
        let bad = |why: String| Error::InvalidInput(format!("{label}: {why}"));
        let flen = fmt::footer::LEN as u64;
        if len < flen + fmt::header::LEN as u64 {
            return Err(bad(format!(
                "{len} bytes are too short for a version-{} stream",
                fmt::VERSION
            )));
        }
        let fb = got(fetch(len - flen, flen)?, flen, label)?;
        let footer = Footer::unpack(fb.as_slice().try_into().unwrap(), len).map_err(bad)?;
        let index = got(
            fetch(footer.index_offset, footer.index_len)?,
            footer.index_len,
            label,
        )?;
        // The tail hashed on from the prefix's midstate: the blob's digest, or not this blob.
        let mut h = Sha256::resume(&footer.prefix_midstate, footer.index_offset)
            .expect("Footer::unpack checked the alignment");
        h.update(&index);
        h.update(&fb);
        let have = Digest(h.finalize());
        if have != digest {
            return Err(Error::Corrupt(format!(
                "{label}: the index and footer hash the blob to {have}, not {digest}"
            )));
        }
        if Digest::sha256(&index).0 != footer.index_sha256 {
            return Err(Error::Corrupt(format!(
                "{label}: the index does not match the footer's sha256"
            )));
        }
        let header = Header::unpack(&footer.header).map_err(bad)?;
        let entries = index
            .chunks_exact(fmt::entry::LEN)
            .map(|b| Entry::unpack(b.try_into().unwrap()))
            .collect();
        Ok(RangedBlob {
            header,
            footer,
            entries,
            digest,
            len,
            label: label.to_string(),
        })
    }

    /// The bytes of data entry `e` (one of `entries`), fetched and checked against its sha256.
    pub fn read(&self, fetch: Fetch, e: &Entry) -> Result<Vec<u8>> {
        debug_assert!(!e.is_whiteout());
        let inside = e
            .blob_offset
            .checked_add(e.length)
            .is_some_and(|end| end <= self.footer.index_offset);
        if !inside || e.length > INDEX_CUT {
            return Err(Error::InvalidInput(format!(
                "{}: index entry for disk byte {} ({} bytes at blob byte {}) lies outside the records",
                self.label, e.offset, e.length, e.blob_offset
            )));
        }
        let bytes = got(fetch(e.blob_offset, e.length)?, e.length, &self.label)?;
        self.verify(e, bytes)
    }

    /// Data extents `es` (in blob order, none overlapping the next) fetched with one ranged
    /// read from the first's start to the last's end, the bytes between them included (record
    /// headers); each verified on its own, so one wrong extent spoils only itself. The read
    /// failing fails them all.
    pub fn read_run(&self, fetch: Fetch, es: &[Entry]) -> Result<Vec<Result<Vec<u8>>>> {
        let (Some(first), Some(last)) = (es.first(), es.last()) else {
            return Ok(Vec::new());
        };
        if es.len() == 1 {
            return Ok(vec![self.read(fetch, first)]);
        }
        let bad = es
            .windows(2)
            .any(|w| w[1].blob_offset < w[0].blob_offset + w[0].length);
        let outside = es.iter().any(|e| {
            e.is_whiteout()
                || e.length > INDEX_CUT
                || e.blob_offset
                    .checked_add(e.length)
                    .is_none_or(|end| end > self.footer.index_offset)
        });
        if bad || outside {
            return Err(Error::InvalidInput(format!(
                "{}: index entries from disk byte {} to {} are no run of data extents inside the records",
                self.label,
                first.offset,
                last.offset + last.length
            )));
        }
        let span = last.blob_offset + last.length - first.blob_offset;
        let all = got(fetch(first.blob_offset, span)?, span, &self.label)?;
        Ok(es
            .iter()
            .map(|e| {
                let at = (e.blob_offset - first.blob_offset) as usize;
                self.verify(e, all[at..at + e.length as usize].to_vec())
            })
            .collect())
    }

    /// `bytes` if they are extent `e`'s (its sha256).
    fn verify(&self, e: &Entry, bytes: Vec<u8>) -> Result<Vec<u8>> {
        if Digest::sha256(&bytes).0 != e.sha256 {
            return Err(Error::Corrupt(format!(
                "{}: the extent at disk byte {} ({} bytes, blob byte {}) does not match its sha256",
                self.label, e.offset, e.length, e.blob_offset
            )));
        }
        Ok(bytes)
    }
}

/// `bytes` if it is the `want` bytes asked for.
fn got(bytes: Vec<u8>, want: u64, label: &str) -> Result<Vec<u8>> {
    if bytes.len() as u64 != want {
        return Err(Error::Corrupt(format!(
            "{label}: a ranged read of {want} bytes returned {}",
            bytes.len()
        )));
    }
    Ok(bytes)
}
