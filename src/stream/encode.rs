//! Writing a stream: the header, records in block order, the end record, and from version 2
//! the block index and footer (`index`); hashing every byte on the way (the digest of the
//! whole stream is the layer's content digest).

use super::digest::Digest;
use super::index::IndexBuilder;
use crate::format::sha256::Sha256;
use crate::format::stream::{self as fmt, End, Header};
use std::io::{self, Write};

pub struct Encoder<W: Write> {
    out: W,
    header: Header,
    hash: Sha256,
    index: IndexBuilder,
    end: End,
    /// A zero run waiting to be extended by the next one (zero runs are maximal).
    zero: Option<(u64, u64)>,
    bytes: u64,
}

impl<W: Write> Encoder<W> {
    pub fn new(out: W, header: &Header) -> io::Result<Self> {
        let mut e = Encoder {
            out,
            header: *header,
            hash: Sha256::new(),
            index: IndexBuilder::default(),
            end: End::default(),
            zero: None,
            bytes: 0,
        };
        e.put(&header.pack())?;
        Ok(e)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b)
    }

    /// One data record: the caller cuts runs canonically (send.rs).
    pub fn data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.flush_zero()?;
        self.put(&fmt::pack_record(fmt::TAG_DATA, 8 + bytes.len() as u64))?;
        self.put(&fmt::pack_run(offset, 0)[..8])?;
        // The stream's hash and the index's hash of each extent, in one pass.
        self.index.data(offset, self.bytes, bytes, &mut self.hash);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes)?;
        self.end.data_records += 1;
        self.end.data_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Whiteouts: joined with the run before when they meet.
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match &mut self.zero {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.flush_zero()?;
                self.zero = Some((offset, len));
            }
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> io::Result<()> {
        if let Some((o, l)) = self.zero.take() {
            self.put(&fmt::pack_record(fmt::TAG_ZERO, 16))?;
            self.put(&fmt::pack_run(o, l))?;
            self.index.zero(o, l);
            self.end.zero_records += 1;
            self.end.zero_bytes += l;
        }
        Ok(())
    }

    /// The end record (and a version-2 stream's index and footer); returns the digest of the
    /// whole stream, its end record and its length.
    pub fn finish(mut self) -> io::Result<(Digest, End, u64)> {
        self.flush_zero()?;
        let mut end = self.end;
        end.digest = self.hash.clone().finalize();
        self.put(&fmt::pack_record(fmt::TAG_END, fmt::end::LEN as u64))?;
        self.put(&end.pack())?;
        if self.header.version >= 2 {
            let tail = self.index.tail(&self.header, &self.hash);
            self.put(&tail)?;
        }
        self.out.flush()?;
        let n = self.bytes;
        Ok((Digest(self.hash.finalize()), end, n))
    }
}
