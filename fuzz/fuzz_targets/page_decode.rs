//! A metadata page from arbitrary bytes. The first byte steers: bits 0-1 choose the kind the
//! reader expects, bit 2 reseals the checksum (so the header fields themselves get tested),
//! bit 3 expects the stream id and sequence the page claims. The rest is the page.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinlayer::format::checksum::{self, Kind};
use thinlayer::format::page::{self, header};
use thinlayer::format::PAGE_SIZE;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let kind = match ctl & 3 {
        0 => Kind::LogPage,
        1 => Kind::CheckpointPage,
        _ => Kind::Superblock,
    };
    let mut p = [0u8; PAGE_SIZE];
    let n = rest.len().min(PAGE_SIZE);
    p[..n].copy_from_slice(&rest[..n]);
    if ctl & 4 != 0 {
        checksum::seal(kind, &mut p);
    }
    let (stream_id, seq) = if ctl & 8 != 0 {
        (header::STREAM_ID.get(&p), header::SEQ.get(&p))
    } else {
        (1, 0)
    };
    let page_no = u64::from(ctl >> 4) * 1_000_003;
    if let Ok(h) = page::decode(&p, page_no, kind, stream_id, seq) {
        let payload = page::payload(&p, &h).to_vec();
        let mut again = [0u8; PAGE_SIZE];
        page::encode(&h, &payload, &mut again);
        let h2 = page::decode(&again, page_no, kind, stream_id, seq).expect("re-encoded page");
        assert_eq!(h2, h);
        assert_eq!(page::payload(&again, &h2), &payload[..]);
    }
});
