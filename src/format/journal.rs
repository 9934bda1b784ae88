//! The crash journal's bytes (docs/FORMAT.md §10): not on disk, but in a shared-memory file
//! (a memfd) that outlives a killed server because the keeper holds it, and that the next
//! server reads. It is a second copy of the open transaction's records, so it is encoded
//! with the records' own encoding (§6), framed in entries that say which transaction they
//! belong to and that a kill in the middle of an append cannot make readable.
//!
//! Layout: a 4 KiB header, then two regions of `REGION_LEN` bytes. The header's `active`
//! word names the region in use and its epoch (`epoch << 1 | region`); a region holds
//! entries one after another, each `ENTRY_LEN` bytes of header then its payload, padded to 8.
//! A reader takes entries while each has the magic, the region's epoch, the next `seq` and a
//! good crc; the first that fails ends the region (a torn or stale entry).

use super::field::{layout, Field};

pub const MAGIC: u64 = u64::from_le_bytes(*b"TLJRNL01");
pub const HEADER_LEN: usize = 4096;
/// Each region's size. The memfd is sparse: only what is written takes memory. A live server
/// commits once its open transaction holds 16 MiB of records, far below this.
pub const REGION_LEN: usize = 1 << 30;
pub const FILE_LEN: usize = HEADER_LEN + 2 * REGION_LEN;

pub mod header {
    use super::Field;
    pub const MAGIC: Field<u64> = Field::at(0);
    /// `epoch << 1 | region`, stored last when a region is rewritten.
    pub const ACTIVE: Field<u64> = Field::at(8);
}

layout! {
    /// An entry's header, in the order and with the names of docs/FORMAT.md §10. `crc` is
    /// the crc32 (salted) of the rest of the header and of the payload; `txn` the transaction
    /// (a number the journal's writers count up) the entry belongs to.
    pub mod entry {
        CRC: u32 = "crc",
        KIND: u32 = "kind",
        PAYLOAD_LEN: u32 = "len",
        MAGIC: u32 = "magic",
        EPOCH: u64 = "epoch",
        SEQ: u64 = "seq",
        TXN: u64 = "txn",
    }
}
pub const ENTRY_LEN: usize = entry::LEN;
const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"TLJE");
const SALT: u32 = 0x4a52_4e4c;

/// What an entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Payload: records (§6) of the transaction, whole records only.
    Records = 1,
    /// Payload: the position the transaction was committed at, `log id` and `commit number`
    /// (16 bytes): once the pool's durable state reaches it, the transaction is on disk.
    Staged = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub kind: Kind,
    pub epoch: u64,
    pub seq: u64,
    pub txn: u64,
    pub payload: &'a [u8],
}

/// Bytes an entry with `payload_len` bytes of payload takes.
pub fn entry_len(payload_len: usize) -> usize {
    (ENTRY_LEN + payload_len).next_multiple_of(8)
}

fn crc(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&SALT.to_le_bytes());
    h.update(&head[entry::KIND.at..ENTRY_LEN]);
    h.update(payload);
    h.finalize()
}

/// Encode `e` at the start of `out` (at least `entry_len` bytes); returns the bytes used.
pub fn encode(e: &Entry, out: &mut [u8]) -> usize {
    let n = entry_len(e.payload.len());
    let (head, rest) = out.split_at_mut(ENTRY_LEN);
    entry::KIND.put(head, e.kind as u32);
    entry::PAYLOAD_LEN.put(head, e.payload.len() as u32);
    entry::MAGIC.put(head, ENTRY_MAGIC);
    entry::EPOCH.put(head, e.epoch);
    entry::SEQ.put(head, e.seq);
    entry::TXN.put(head, e.txn);
    rest[..e.payload.len()].copy_from_slice(e.payload);
    rest[e.payload.len()..n - ENTRY_LEN].fill(0);
    let c = crc(head, &rest[..e.payload.len()]);
    entry::CRC.put(head, c);
    n
}

/// Decode the entry at the start of `buf` if it is whole and is the `seq`th of region epoch
/// `epoch`; returns it and its length. `None` ends the region.
pub fn decode(buf: &[u8], epoch: u64, seq: u64) -> Option<(Entry<'_>, usize)> {
    if buf.len() < ENTRY_LEN {
        return None;
    }
    let head = &buf[..ENTRY_LEN];
    if entry::MAGIC.get(head) != ENTRY_MAGIC
        || entry::EPOCH.get(head) != epoch
        || entry::SEQ.get(head) != seq
    {
        return None;
    }
    let len = entry::PAYLOAD_LEN.get(head) as usize;
    let n = entry_len(len);
    if n > buf.len() {
        return None;
    }
    let payload = &buf[ENTRY_LEN..ENTRY_LEN + len];
    if crc(head, payload) != entry::CRC.get(head) {
        return None;
    }
    let kind = match entry::KIND.get(head) {
        1 => Kind::Records,
        2 => Kind::Staged,
        _ => return None,
    };
    let e = Entry {
        kind,
        epoch,
        seq,
        txn: entry::TXN.get(head),
        payload,
    };
    Some((e, n))
}

/// The payload of a `Staged` entry.
pub fn staged_payload(log_id: u64, commit: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    Field::<u64>::at(0).put(&mut b, log_id);
    Field::<u64>::at(8).put(&mut b, commit);
    b
}

pub fn staged_position(payload: &[u8]) -> Option<(u64, u64)> {
    (payload.len() == 16).then(|| {
        (
            Field::<u64>::at(0).get(payload),
            Field::<u64>::at(8).get(payload),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_a_torn_or_stale_one_ends_the_region() {
        let mut buf = vec![0u8; 256];
        let e = Entry {
            kind: Kind::Records,
            epoch: 7,
            seq: 3,
            txn: 9,
            payload: b"records",
        };
        let n = encode(&e, &mut buf);
        assert_eq!(n, 48);
        assert_eq!(decode(&buf, 7, 3), Some((e, n)));
        assert_eq!(decode(&buf, 6, 3), None, "another epoch's entry is stale");
        assert_eq!(decode(&buf, 7, 4), None, "out of sequence");
        for cut in [ENTRY_LEN - 1, ENTRY_LEN + 3] {
            let mut torn = buf.clone();
            torn[cut..].fill(0);
            assert_eq!(decode(&torn, 7, 3), None, "torn at {cut}");
        }
        let p = staged_payload(5, 11);
        assert_eq!(staged_position(&p), Some((5, 11)));
    }
}
