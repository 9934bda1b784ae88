//! Fixed newstyle negotiation: greet, haggle options, and either hand an opened device to the
//! transmission phase or end the connection. Option data is bounded before it is read, so a
//! client's claimed length never decides what the server allocates.

use super::proto::*;
use super::stream::{drain, Stream};
use crate::volume::{BlockDevice, ExportCatalog};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Larger option data than any well-formed option needs (names are at most 4 KiB).
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// An oversized option up to this length is skipped and refused; beyond it the client is
/// cut off, as reading gigabytes of junk would be a denial of service.
const MAX_OPTION_DRAIN: u32 = 16 * 1024 * 1024;
/// A missing export's name is echoed in the refusal only this far: a client may send names of
/// up to 4096 bytes, and the whole message must stay within the protocol's string limit
/// (libnbd refuses a longer one as "option error string too long").
const ECHOED_NAME: usize = 128;
/// The largest request payload (READ or WRITE) we accept, and advertise as maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The one metadata context we serve, under the id we give it.
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the transmission phase needs from a finished handshake.
pub struct Session {
    pub export: String,
    pub device: Arc<dyn BlockDevice>,
    pub structured: bool,
    /// Set when the client selected `base:allocation` for this export.
    pub allocation_context: Option<u32>,
}

pub enum Outcome {
    Transmission(Session),
    /// The client ended option haggling itself (NBD_OPT_ABORT), e.g. after listing exports.
    Aborted,
}

struct State<'a> {
    stream: &'a mut Stream,
    catalog: &'a dyn ExportCatalog,
    default_export: Option<&'a str>,
    client: &'a str,
    structured: bool,
    /// (resolved export name, context selected) from the last NBD_OPT_SET_META_CONTEXT.
    meta: Option<(String, bool)>,
}

fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// `client` names the connection to the catalogue (which may track who holds an export).
pub fn negotiate(
    stream: &mut Stream,
    catalog: &dyn ExportCatalog,
    default_export: Option<&str>,
    client: &str,
) -> io::Result<Outcome> {
    let greeting = Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    };
    stream.write_all(&greeting.pack())?;

    let mut b = [0u8; ClientFlags::LEN];
    stream.read_exact(&mut b)?;
    let Some(ClientFlags {
        flags: client_flags,
    }) = ClientFlags::unpack(&b)
    else {
        return Err(violation("unreadable client flags"));
    };
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

    let mut st = State {
        stream,
        catalog,
        default_export,
        client,
        structured: false,
        meta: None,
    };
    let mut data = Vec::new();
    loop {
        let mut h = [0u8; OptionHeader::LEN];
        st.stream.read_exact(&mut h)?;
        let Some(OptionHeader { option: opt, len }) = OptionHeader::unpack(&h) else {
            return Err(violation("bad option magic"));
        };
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME || len > MAX_OPTION_DRAIN {
                let _ = st.refuse(opt, REP_ERR_TOO_BIG, "option data too long");
                return Err(violation(format!("option {opt} claims {len} bytes")));
            }
            drain(st.stream, len as u64, &mut [0u8; 8192])?;
            st.refuse(opt, REP_ERR_TOO_BIG, "option data too long")?;
            continue;
        }
        data.clear();
        data.resize(len as usize, 0);
        st.stream.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => return st.export_name(&data, no_zeroes).map(Outcome::Transmission),
            OPT_ABORT => {
                // The client may already be gone; the acknowledgement is a courtesy.
                let _ = st.reply(opt, REP_ACK, &[]);
                return Ok(Outcome::Aborted);
            }
            OPT_GO | OPT_INFO => {
                if let Some(session) = st.info_or_go(opt, &data)? {
                    return Ok(Outcome::Transmission(session));
                }
            }
            OPT_LIST => st.list(&data)?,
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    st.structured = true;
                    st.reply(opt, REP_ACK, &[])?;
                } else {
                    st.refuse(opt, REP_ERR_INVALID, "option takes no data")?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => st.meta_context(opt, &data)?,
            _ => st.refuse(opt, REP_ERR_UNSUP, "option not supported")?,
        }
    }
}

impl State<'_> {
    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.stream
            .write_all(&OptionReplyHeader::message(opt, kind, data))
    }

    /// An error reply; its message is a protocol string, so at most 4096 bytes.
    fn refuse(&mut self, opt: u32, kind: u32, message: &str) -> io::Result<()> {
        self.reply(opt, kind, truncate(message, MAX_STRING).as_bytes())
    }

    /// Finds the export a name means; "" means the configured default, or the only export.
    fn resolve(&self, name: &str) -> Result<(String, Arc<dyn BlockDevice>), (u32, String)> {
        let name = if !name.is_empty() {
            name.to_string()
        } else if let Some(d) = self.default_export {
            d.to_string()
        } else {
            let exports = self
                .catalog
                .exports()
                .map_err(|e| (REP_ERR_PLATFORM, e.to_string()))?;
            match exports.as_slice() {
                [only] => only.name.clone(),
                _ => {
                    let msg = format!("no default export among {}; name one", exports.len());
                    return Err((REP_ERR_UNKNOWN, msg));
                }
            }
        };
        match self.catalog.open_for(&name, self.client) {
            Ok(dev) => Ok((name, dev)),
            Err(e) if e.errno() == libc::ENOENT => Err((REP_ERR_UNKNOWN, no_such_export(&name))),
            Err(e) => Err((REP_ERR_INVALID, e.to_string())),
        }
    }

    fn session(&self, export: String, device: Arc<dyn BlockDevice>) -> Session {
        let selected = matches!(&self.meta, Some((name, true)) if *name == export);
        Session {
            export,
            device,
            structured: self.structured,
            allocation_context: selected.then_some(ALLOCATION_CONTEXT_ID),
        }
    }

    fn export_name(&mut self, data: &[u8], no_zeroes: bool) -> io::Result<Session> {
        let name = std::str::from_utf8(data).map_err(|_| violation("export name not UTF-8"))?;
        // NBD_OPT_EXPORT_NAME has no error reply: refusing means hanging up.
        let (export, device) = self.resolve(name).map_err(|(_, msg)| violation(msg))?;
        let session = self.session(export, device);
        let reply = ExportNameReply {
            size: session.device.size(),
            flags: transmission_flags(&*session.device, session.structured),
        };
        self.stream.write_all(&reply.pack_padded(!no_zeroes))?;
        Ok(session)
    }

    /// NBD_OPT_INFO describes an export; NBD_OPT_GO does the same and then enters transmission.
    fn info_or_go(&mut self, opt: u32, data: &[u8]) -> io::Result<Option<Session>> {
        let Some(InfoRequest { name, wanted }) = InfoRequest::unpack(data) else {
            self.refuse(opt, REP_ERR_INVALID, "malformed request")?;
            return Ok(None);
        };
        let (export, device) = match self.resolve(name) {
            Ok(found) => found,
            Err((kind, msg)) => {
                self.refuse(opt, kind, &msg)?;
                return Ok(None);
            }
        };

        let export_info = Info::Export {
            size: device.size(),
            flags: transmission_flags(&*device, self.structured),
        };
        self.reply(opt, REP_INFO, &export_info.pack())?;
        let block_size = Info::BlockSize {
            min: 1,
            preferred: preferred_block_size(&*device),
            max: MAX_PAYLOAD,
        };
        self.reply(opt, REP_INFO, &block_size.pack())?;
        if wanted.contains(&INFO_NAME) {
            self.reply(opt, REP_INFO, &Info::Name(&export).pack())?;
        }
        if wanted.contains(&INFO_DESCRIPTION) {
            let description = self
                .catalog
                .exports()
                .ok()
                .and_then(|all| all.into_iter().find(|e| e.name == export))
                .map(|e| e.description)
                .unwrap_or_default();
            if !description.is_empty() {
                self.reply(opt, REP_INFO, &Info::Description(&description).pack())?;
            }
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok((opt == OPT_GO).then(|| self.session(export, device)))
    }

    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return self.refuse(OPT_LIST, REP_ERR_INVALID, "option takes no data");
        }
        let exports = match self.catalog.exports() {
            Ok(e) => e,
            Err(e) => return self.refuse(OPT_LIST, REP_ERR_PLATFORM, &e.to_string()),
        };
        for e in exports {
            let entry = ServerEntry {
                name: &e.name,
                description: &e.description,
            };
            self.reply(OPT_LIST, REP_SERVER, &entry.pack())?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let Some(MetaContextRequest { name, queries }) = MetaContextRequest::unpack(data) else {
            return self.refuse(opt, REP_ERR_INVALID, "malformed request");
        };
        if !self.structured {
            return self.refuse(opt, REP_ERR_INVALID, "structured replies not negotiated");
        }
        let export = match self.resolve(name) {
            Ok((export, _)) => export,
            Err((kind, msg)) => return self.refuse(opt, kind, &msg),
        };
        let listing = opt == OPT_LIST_META_CONTEXT;
        let selected = if listing {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == "base:" || *q == BASE_ALLOCATION)
        } else {
            queries.contains(&BASE_ALLOCATION)
        };
        if selected {
            let context = MetaContext {
                id: ALLOCATION_CONTEXT_ID,
                name: BASE_ALLOCATION,
            };
            self.reply(opt, REP_META_CONTEXT, &context.pack())?;
        }
        if !listing {
            self.meta = Some((export, selected));
        }
        self.reply(opt, REP_ACK, &[])
    }
}

/// The refusal for a name no export has. Only the start of a long name is echoed.
fn no_such_export(name: &str) -> String {
    let shown = truncate(name, ECHOED_NAME);
    if shown.len() == name.len() {
        format!("no export \"{name}\"")
    } else {
        format!("no export \"{shown}…\" (a {}-byte name)", name.len())
    }
}

fn preferred_block_size(device: &dyn BlockDevice) -> u32 {
    let b = device.block_size();
    if b.is_power_of_two() && b <= MAX_PAYLOAD {
        b
    } else {
        4096
    }
}

/// Every device supports every command; read-only devices advertise only what cannot write.
/// CAN_MULTI_CONN holds because a flush on any device commits the whole pool.
pub fn transmission_flags(device: &dyn BlockDevice, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    if device.is_read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_export_is_named_but_a_long_name_only_in_part() {
        assert_eq!(no_such_export("web"), "no export \"web\"");
        let long = "é".repeat(MAX_STRING / 2);
        let msg = no_such_export(&long);
        assert!(msg.len() < 256, "{} bytes", msg.len());
        assert!(msg.starts_with("no export \"éé"), "{msg}");
        assert!(msg.ends_with("(a 4096-byte name)"), "{msg}");
    }
}
