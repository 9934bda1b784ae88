//! Any bytes handed to the superblock decoder: an error or a superblock that re-encodes to the
//! same fields, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thinlayer::format::superblock::Superblock;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data, 0) {
        let again = Superblock::decode(&sb.encode(), 1).expect("a decoded superblock re-encodes");
        assert_eq!(again, sb);
    }
});
