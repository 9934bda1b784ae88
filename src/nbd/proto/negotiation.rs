//! The fixed-size messages of the handshake: the greeting and the client's answer, option
//! headers, option reply headers, and the reply to NBD_OPT_EXPORT_NAME. The data an option or
//! an option reply carries is in `options`.

use super::be::fixed_message;
use super::{IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC};

fixed_message! {
    /// The server's first words: NBDMAGIC, IHAVEOPT, handshake flags (`FLAG_*`).
    pub struct Greeting {
        magic u64 = NBDMAGIC,
        magic u64 = IHAVEOPT,
        pub flags: u16,
    }
}

fixed_message! {
    /// The client's answer to the greeting: its flags (`CLIENT_*`).
    pub struct ClientFlags {
        pub flags: u32,
    }
}

fixed_message! {
    /// An option's header; `len` bytes of option data follow.
    pub struct OptionHeader {
        magic u64 = IHAVEOPT,
        /// `OPT_*`.
        pub option: u32,
        pub len: u32,
    }
}

impl OptionHeader {
    /// A whole option: its header and `data`.
    pub fn message(option: u32, data: &[u8]) -> Vec<u8> {
        let header = OptionHeader {
            option,
            len: data.len() as u32,
        };
        [&header.pack()[..], data].concat()
    }
}

fixed_message! {
    /// An option reply's header; `len` bytes of reply data follow.
    pub struct OptionReplyHeader {
        magic u64 = OPTION_REPLY_MAGIC,
        /// The option this answers.
        pub option: u32,
        /// `REP_*`.
        pub kind: u32,
        pub len: u32,
    }
}

impl OptionReplyHeader {
    /// A whole option reply: its header and `data`.
    pub fn message(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let header = OptionReplyHeader {
            option,
            kind,
            len: data.len() as u32,
        };
        [&header.pack()[..], data].concat()
    }
}

fixed_message! {
    /// The reply to NBD_OPT_EXPORT_NAME: the export's size and transmission flags (`TF_*`),
    /// then `ZEROES` zero bytes unless the client said NO_ZEROES.
    pub struct ExportNameReply {
        pub size: u64,
        pub flags: u16,
    }
}

impl ExportNameReply {
    pub const ZEROES: usize = 124;

    pub fn pack_padded(&self, zeroes: bool) -> Vec<u8> {
        let mut b = self.pack().to_vec();
        if zeroes {
            b.resize(Self::LEN + Self::ZEROES, 0);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn greeting_round_trips_and_has_the_spec_layout() {
        let g = Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        let b = g.pack();
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(b[16..], [0, 3]);
        assert_eq!(Greeting::unpack(&b), Some(g));
        let mut bad = b;
        bad[9] ^= 1;
        assert_eq!(Greeting::unpack(&bad), None);
    }

    #[test]
    fn client_flags_round_trip() {
        let f = ClientFlags {
            flags: CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
        };
        assert_eq!(f.pack(), [0, 0, 0, 3]);
        assert_eq!(ClientFlags::unpack(&f.pack()), Some(f));
    }

    #[test]
    fn option_header_round_trips_and_refuses_bad_magic() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 0x0102_0304,
        };
        let b = h.pack();
        assert_eq!(&b[..8], b"IHAVEOPT");
        assert_eq!(b[8..], [0, 0, 0, 7, 1, 2, 3, 4]);
        assert_eq!(OptionHeader::unpack(&b), Some(h));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(OptionHeader::unpack(&bad), None);
        assert_eq!(
            OptionHeader::message(OPT_LIST, b"ab"),
            [&OptionHeader { option: 3, len: 2 }.pack()[..], b"ab"].concat()
        );
    }

    #[test]
    fn option_reply_header_round_trips_and_refuses_bad_magic() {
        let h = OptionReplyHeader {
            option: OPT_INFO,
            kind: REP_ERR_UNKNOWN,
            len: 5,
        };
        let b = h.pack();
        assert_eq!(b[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
        assert_eq!(b[8..], [0, 0, 0, 6, 0x80, 0, 0, 6, 0, 0, 0, 5]);
        assert_eq!(OptionReplyHeader::unpack(&b), Some(h));
        let mut bad = b;
        bad[7] ^= 0x10;
        assert_eq!(OptionReplyHeader::unpack(&bad), None);
        let m = OptionReplyHeader::message(OPT_INFO, REP_ERR_UNKNOWN, b"nope!");
        assert_eq!((&m[..20], &m[20..]), (&b[..], &b"nope!"[..]));
    }

    #[test]
    fn export_name_reply_round_trips_with_and_without_zeroes() {
        let r = ExportNameReply {
            size: 1 << 33,
            flags: TF_HAS_FLAGS | TF_READ_ONLY,
        };
        let short = r.pack_padded(false);
        assert_eq!(short, [0, 0, 0, 2, 0, 0, 0, 0, 0, 3]);
        assert_eq!(ExportNameReply::unpack(&r.pack()), Some(r));
        let long = r.pack_padded(true);
        assert_eq!(long.len(), 134);
        assert_eq!(long[..10], short[..]);
        assert!(long[10..].iter().all(|&b| b == 0));
    }
}
