//! The data options and option replies carry: what NBD_OPT_GO/INFO and the meta-context options
//! ask, and the NBD_REP_INFO, NBD_REP_SERVER and NBD_REP_META_CONTEXT answers. Decoding takes
//! the whole data of one option (already bounded by its header) and refuses short, long or
//! non-UTF-8 contents; strings longer than the protocol's 4096 bytes are refused on decode
//! and cut on encode.

use super::be::{Cursor, Put};
use super::{INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME};

/// NBD_OPT_GO and NBD_OPT_INFO: an export name and the information types the client wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub wanted: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    pub fn pack(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.wanted.len());
        b.put_str(self.name);
        b.put_u16(self.wanted.len() as u16);
        for &w in &self.wanted {
            b.put_u16(w);
        }
        b
    }

    pub fn unpack(data: &'a [u8]) -> Option<InfoRequest<'a>> {
        let mut c = Cursor::new(data);
        let name = c.str()?;
        let n = c.u16()?;
        let wanted = (0..n).map(|_| c.u16()).collect::<Option<_>>()?;
        c.end(InfoRequest { name, wanted })
    }
}

/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: an export name and queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub name: &'a str,
    pub queries: Vec<&'a str>,
}

impl<'a> MetaContextRequest<'a> {
    pub fn pack(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_str(self.name);
        b.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            b.put_str(q);
        }
        b
    }

    pub fn unpack(data: &'a [u8]) -> Option<MetaContextRequest<'a>> {
        let mut c = Cursor::new(data);
        let name = c.str()?;
        let n = c.u32()?;
        // Each query costs at least 4 bytes of option data, which bounds `n`.
        let queries = (0..n).map(|_| c.str()).collect::<Option<_>>()?;
        c.end(MetaContextRequest { name, queries })
    }
}

/// The data of one NBD_REP_INFO reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info<'a> {
    Export {
        size: u64,
        flags: u16,
    },
    Name(&'a str),
    Description(&'a str),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// A type this codec does not know; clients ignore these.
    Other {
        kind: u16,
        data: &'a [u8],
    },
}

impl<'a> Info<'a> {
    pub fn pack(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match *self {
            Info::Export { size, flags } => {
                b.put_u16(INFO_EXPORT);
                b.put_u64(size);
                b.put_u16(flags);
            }
            Info::Name(name) => {
                b.put_u16(INFO_NAME);
                b.put_bare_str(name);
            }
            Info::Description(text) => {
                b.put_u16(INFO_DESCRIPTION);
                b.put_bare_str(text);
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                b.put_u16(INFO_BLOCK_SIZE);
                b.put_u32(min);
                b.put_u32(preferred);
                b.put_u32(max);
            }
            Info::Other { kind, data } => {
                b.put_u16(kind);
                b.extend_from_slice(data);
            }
        }
        b
    }

    pub fn unpack(data: &'a [u8]) -> Option<Info<'a>> {
        let mut c = Cursor::new(data);
        let info = match c.u16()? {
            INFO_EXPORT => Info::Export {
                size: c.u64()?,
                flags: c.u16()?,
            },
            INFO_NAME => Info::Name(c.bare_str()?),
            INFO_DESCRIPTION => Info::Description(c.bare_str()?),
            INFO_BLOCK_SIZE => Info::BlockSize {
                min: c.u32()?,
                preferred: c.u32()?,
                max: c.u32()?,
            },
            kind => Info::Other {
                kind,
                data: c.take(c.remaining())?,
            },
        };
        c.end(info)
    }
}

/// The data of one NBD_REP_SERVER reply to NBD_OPT_LIST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerEntry<'a> {
    pub name: &'a str,
    pub description: &'a str,
}

impl<'a> ServerEntry<'a> {
    pub fn pack(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_str(self.name);
        b.put_bare_str(self.description);
        b
    }

    pub fn unpack(data: &'a [u8]) -> Option<ServerEntry<'a>> {
        let mut c = Cursor::new(data);
        let name = c.str()?;
        let description = c.bare_str()?;
        c.end(ServerEntry { name, description })
    }
}

/// The data of one NBD_REP_META_CONTEXT reply: a context's id and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContext<'a> {
    pub id: u32,
    pub name: &'a str,
}

impl<'a> MetaContext<'a> {
    pub fn pack(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(self.id);
        b.put_bare_str(self.name);
        b
    }

    pub fn unpack(data: &'a [u8]) -> Option<MetaContext<'a>> {
        let mut c = Cursor::new(data);
        let id = c.u32()?;
        let name = c.bare_str()?;
        c.end(MetaContext { id, name })
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn info_request_round_trips_and_has_the_spec_layout() {
        let r = InfoRequest {
            name: "web",
            wanted: vec![INFO_NAME, INFO_BLOCK_SIZE],
        };
        let b = r.pack();
        assert_eq!(b, [0, 0, 0, 3, b'w', b'e', b'b', 0, 2, 0, 1, 0, 3]);
        assert_eq!(InfoRequest::unpack(&b), Some(r));
    }

    #[test]
    fn info_request_refuses_short_long_and_overlong_data() {
        let b = InfoRequest {
            name: "a",
            wanted: vec![1],
        }
        .pack();
        assert_eq!(InfoRequest::unpack(&b[..b.len() - 1]), None);
        assert_eq!(InfoRequest::unpack(&[&b[..], &[0]].concat()), None);
        // A name length running past the data.
        assert_eq!(InfoRequest::unpack(&[0, 0, 1, 0, b'a']), None);
        let mut huge = ((MAX_STRING + 1) as u32).to_be_bytes().to_vec();
        huge.resize(4 + MAX_STRING + 1 + 2, b'a');
        assert_eq!(InfoRequest::unpack(&huge), None);
        let name = "n".repeat(MAX_STRING);
        let at_limit = InfoRequest {
            name: &name,
            wanted: vec![],
        };
        assert_eq!(InfoRequest::unpack(&at_limit.pack()), Some(at_limit));
    }

    #[test]
    fn meta_context_request_round_trips_and_refuses_a_lying_count() {
        let r = MetaContextRequest {
            name: "disk",
            queries: vec![BASE_ALLOCATION, "base:"],
        };
        let b = r.pack();
        assert_eq!(MetaContextRequest::unpack(&b), Some(r));
        let mut lying = b.clone();
        lying[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(MetaContextRequest::unpack(&lying), None);
        let none = MetaContextRequest {
            name: "",
            queries: vec![],
        };
        assert_eq!(none.pack(), [0; 8]);
        assert_eq!(MetaContextRequest::unpack(&none.pack()), Some(none));
    }

    #[test]
    fn every_info_round_trips() {
        let all = [
            Info::Export {
                size: 1 << 40,
                flags: TF_HAS_FLAGS | TF_SEND_FLUSH,
            },
            Info::Name("disk"),
            Info::Description("a disk"),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25,
            },
            Info::Other {
                kind: 77,
                data: b"xyz",
            },
        ];
        for info in all {
            assert_eq!(Info::unpack(&info.pack()), Some(info), "{info:?}");
        }
        let export = all[0].pack();
        assert_eq!(export.len(), 12);
        assert_eq!(export[..2], [0, 0]);
        assert_eq!(export[10..], [0, 5]);
        assert_eq!(Info::unpack(&export[..11]), None);
        assert_eq!(Info::unpack(&all[3].pack()[..13]), None);
    }

    #[test]
    fn server_entry_and_meta_context_round_trip() {
        let e = ServerEntry {
            name: "base",
            description: "read-only layer",
        };
        let b = e.pack();
        assert_eq!(b[..8], [0, 0, 0, 4, b'b', b'a', b's', b'e']);
        assert_eq!(ServerEntry::unpack(&b), Some(e));
        assert_eq!(ServerEntry::unpack(&b[..6]), None);

        let m = MetaContext {
            id: ALLOCATION_CONTEXT_ID_FOR_TEST,
            name: BASE_ALLOCATION,
        };
        let b = m.pack();
        assert_eq!(b.len(), 4 + BASE_ALLOCATION.len());
        assert_eq!(MetaContext::unpack(&b), Some(m));
        assert_eq!(MetaContext::unpack(&b[..3]), None);
    }

    const ALLOCATION_CONTEXT_ID_FOR_TEST: u32 = 0x0102_0304;
}
