//! Reading a stream: records one at a time, hashing as they come, so the end record's digest
//! (of every byte before it) and the whole stream's digest are known when it arrives.
//! Unknown record kinds are skipped (a change a reader must understand bumps the version).
//! A version-2 stream's tail (index and footer) must be exactly what the records read make
//! (`index::IndexBuilder`), so a stream has one valid tail and sends back as it came.

use super::digest::Digest;
use super::index::IndexBuilder;
use crate::error::{Error, Result};
use crate::format::sha256::Sha256;
use crate::format::stream::{self as fmt, End, Header};
use std::io::Read;

pub enum Record {
    Data {
        offset: u64,
        bytes: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// The end record, checked against the digest of what came before it; then the stream's
    /// digest and that nothing follows.
    End {
        end: End,
        digest: Digest,
    },
}

pub struct Decoder<R: Read> {
    input: R,
    header: Option<Header>,
    hash: Sha256,
    index: IndexBuilder,
    pub label: String,
    /// Bytes read so far (for messages: where a stream broke).
    pub pos: u64,
    done: bool,
}

impl<R: Read> Decoder<R> {
    pub fn new(input: R, label: &str) -> Result<(Self, Header)> {
        let mut d = Decoder {
            input,
            header: None,
            hash: Sha256::new(),
            index: IndexBuilder::default(),
            label: label.to_string(),
            pos: 0,
            done: false,
        };
        let mut h = [0u8; fmt::header::LEN];
        d.take(&mut h, "the header")?;
        let header = Header::unpack(&h).map_err(|e| d.bad(&e))?;
        d.header = Some(header);
        Ok((d, header))
    }

    fn bad(&self, why: &str) -> Error {
        Error::InvalidInput(format!("{}: {why}", self.label))
    }

    /// Read `buf` full and hash it into the stream's hash.
    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.fill(buf, what)?;
        self.hash.update(buf);
        Ok(())
    }

    /// Read `buf` full, not hashing it yet (a data record's bytes: the index hashes them into
    /// the stream's hash with their extents').
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.input.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(self.bad(&format!(
                        "the stream ends at byte {} inside {what} (torn or truncated)",
                        self.pos + got as u64
                    )))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("reading {} at byte {}", self.label, self.pos + got as u64),
                        e,
                    ))
                }
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// A version-2 stream's padding, index and footer: exactly the bytes its records make.
    fn take_tail(&mut self, header: &Header) -> Result<()> {
        let want = self.index.tail(header, &self.hash);
        let at = self.pos;
        let mut have = vec![0u8; want.len()];
        self.take(&mut have, "the block index and footer")?;
        if let Some(i) = have.iter().zip(&want).position(|(a, b)| a != b) {
            return Err(self.bad(&format!(
                "the block index and footer (from byte {at}) differ from what the records make, at byte {}",
                at + i as u64
            )));
        }
        Ok(())
    }

    /// The next record, or an error naming the byte where the stream is wrong.
    pub fn next_record(&mut self) -> Result<Record> {
        assert!(!self.done, "read past the end record");
        loop {
            let at = self.pos;
            let before = self.hash.clone();
            let mut rh = [0u8; fmt::record::LEN];
            self.take(&mut rh, "a record header")?;
            let (tag, len) = fmt::unpack_record(&rh);
            match tag {
                fmt::TAG_DATA => {
                    if !(8..=8 + fmt::RUN_CUT).contains(&len) {
                        return Err(self.bad(&format!(
                            "data record at byte {at} has length {len}, outside 8..={}",
                            8 + fmt::RUN_CUT
                        )));
                    }
                    let mut off = [0u8; 8];
                    self.take(&mut off, "a data record")?;
                    let mut bytes = vec![0u8; (len - 8) as usize];
                    let blob_offset = self.pos;
                    self.fill(&mut bytes, "a data record")?;
                    let offset = fmt::run::OFFSET.get(&off);
                    // Malformed whatever the layer: no byte range ends past 2^64. Checked here,
                    // before the index (whose arithmetic relies on it) or the receiver sees it.
                    if offset.checked_add(bytes.len() as u64).is_none() {
                        return Err(self.bad(&format!(
                            "data record at byte {at} at disk offset {offset} with {} bytes ends past 2^64",
                            bytes.len()
                        )));
                    }
                    self.index.data(offset, blob_offset, &bytes, &mut self.hash);
                    return Ok(Record::Data { offset, bytes });
                }
                fmt::TAG_ZERO => {
                    if len != fmt::run::LEN as u64 {
                        return Err(self.bad(&format!(
                            "zero record at byte {at} has length {len}, not {}",
                            fmt::run::LEN
                        )));
                    }
                    let mut p = [0u8; fmt::run::LEN];
                    self.take(&mut p, "a zero record")?;
                    let (offset, len) = fmt::unpack_run(&p);
                    self.index.zero(offset, len);
                    return Ok(Record::Zero { offset, len });
                }
                fmt::TAG_END => {
                    if len != fmt::end::LEN as u64 {
                        return Err(self.bad(&format!(
                            "end record at byte {at} has length {len}, not {}",
                            fmt::end::LEN
                        )));
                    }
                    let mut p = [0u8; fmt::end::LEN];
                    self.take(&mut p, "the end record")?;
                    let end = End::unpack(&p);
                    let want: [u8; 32] = before.finalize();
                    if end.digest != want {
                        return Err(self.bad(&format!(
                            "digest mismatch: the end record says {}, the {at} bytes before it hash to {}",
                            Digest(end.digest),
                            Digest(want)
                        )));
                    }
                    let header = self.header.expect("read by new");
                    if header.version >= 2 {
                        self.take_tail(&header)?;
                    }
                    let mut extra = [0u8; 1];
                    loop {
                        match self.input.read(&mut extra) {
                            Ok(0) => break,
                            Ok(_) => {
                                return Err(self.bad(&format!(
                                    "bytes follow the end record at byte {}",
                                    self.pos
                                )))
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(Error::io(format!("reading {}", self.label), e)),
                        }
                    }
                    self.done = true;
                    let digest = Digest(self.hash.clone().finalize());
                    return Ok(Record::End { end, digest });
                }
                _ => {
                    // A kind this reader does not know: skip it, still hashing its bytes.
                    let mut left = len;
                    let mut buf = vec![0u8; 64 << 10];
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        self.take(&mut buf[..n], "a record of an unknown kind")?;
                        left -= n as u64;
                    }
                }
            }
        }
    }
}
