//! Any bytes handed to the superblock decoder, as they are and again with their checksum
//! re-sealed (so the field checks behind it get tested too): an error or a superblock that
//! re-encodes to the same fields, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinlayer::format::checksum::{self, Kind};
use thinlayer::format::superblock::{Superblock, ENCODED_LEN};

fn decode_and_reencode(b: &[u8]) {
    if let Ok(sb) = Superblock::decode(b, 0) {
        let again = Superblock::decode(&sb.encode(), 1).expect("a decoded superblock re-encodes");
        assert_eq!(again, sb);
    }
}

fuzz_target!(|data: &[u8]| {
    decode_and_reencode(data);
    if data.len() >= ENCODED_LEN {
        let mut b = data.to_vec();
        checksum::seal(Kind::Superblock, &mut b);
        decode_and_reencode(&b);
    }
});
