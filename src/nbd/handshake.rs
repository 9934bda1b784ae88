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
/// Names and context queries are strings, which the protocol caps at 4 KiB.
const MAX_STRING: usize = 4096;
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
    structured: bool,
    /// (resolved export name, context selected) from the last NBD_OPT_SET_META_CONTEXT.
    meta: Option<(String, bool)>,
}

fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

pub fn negotiate(
    stream: &mut Stream,
    catalog: &dyn ExportCatalog,
    default_export: Option<&str>,
) -> io::Result<Outcome> {
    let mut greeting = Vec::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    stream.write_all(&greeting)?;

    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    let client_flags = u32::from_be_bytes(b);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

    let mut st = State {
        stream,
        catalog,
        default_export,
        structured: false,
        meta: None,
    };
    let mut data = Vec::new();
    loop {
        let mut h = [0u8; 16];
        st.stream.read_exact(&mut h)?;
        if u64::from_be_bytes(h[0..8].try_into().unwrap()) != IHAVEOPT {
            return Err(violation("bad option magic"));
        }
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME || len > MAX_OPTION_DRAIN {
                let _ = st.reply(opt, REP_ERR_TOO_BIG, b"option data too long");
                return Err(violation(format!("option {opt} claims {len} bytes")));
            }
            drain(st.stream, len as u64, &mut [0u8; 8192])?;
            st.reply(opt, REP_ERR_TOO_BIG, b"option data too long")?;
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
                    st.reply(opt, REP_ERR_INVALID, b"option takes no data")?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => st.meta_context(opt, &data)?,
            _ => st.reply(opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

impl State<'_> {
    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(20 + data.len());
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(opt);
        out.put_u32(kind);
        out.put_u32(data.len() as u32);
        out.extend_from_slice(data);
        self.stream.write_all(&out)
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
        match self.catalog.open(&name) {
            Ok(dev) => Ok((name, dev)),
            Err(e) if e.errno() == libc::ENOENT => Err((REP_ERR_UNKNOWN, e.to_string())),
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
        let mut out = Vec::with_capacity(134);
        out.put_u64(session.device.size());
        out.put_u16(transmission_flags(&*session.device, session.structured));
        if !no_zeroes {
            out.resize(out.len() + 124, 0);
        }
        self.stream.write_all(&out)?;
        Ok(session)
    }

    /// NBD_OPT_INFO describes an export; NBD_OPT_GO does the same and then enters transmission.
    fn info_or_go(&mut self, opt: u32, data: &[u8]) -> io::Result<Option<Session>> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string(MAX_STRING)?;
            let n = c.u16()? as usize;
            let wanted: Vec<u16> = (0..n).map(|_| c.u16()).collect::<Option<_>>()?;
            (c.remaining() == 0).then_some((name, wanted))
        })();
        let Some((name, wanted)) = parsed else {
            self.reply(opt, REP_ERR_INVALID, b"malformed request")?;
            return Ok(None);
        };
        let (export, device) = match self.resolve(name) {
            Ok(found) => found,
            Err((kind, msg)) => {
                self.reply(opt, kind, msg.as_bytes())?;
                return Ok(None);
            }
        };

        let mut info = Vec::new();
        info.put_u16(INFO_EXPORT);
        info.put_u64(device.size());
        info.put_u16(transmission_flags(&*device, self.structured));
        self.reply(opt, REP_INFO, &info)?;

        info.clear();
        info.put_u16(INFO_BLOCK_SIZE);
        info.put_u32(1);
        info.put_u32(preferred_block_size(&*device));
        info.put_u32(MAX_PAYLOAD);
        self.reply(opt, REP_INFO, &info)?;

        if wanted.contains(&INFO_NAME) {
            info.clear();
            info.put_u16(INFO_NAME);
            info.extend_from_slice(export.as_bytes());
            self.reply(opt, REP_INFO, &info)?;
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
                info.clear();
                info.put_u16(INFO_DESCRIPTION);
                info.extend_from_slice(truncate(&description, MAX_STRING).as_bytes());
                self.reply(opt, REP_INFO, &info)?;
            }
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok((opt == OPT_GO).then(|| self.session(export, device)))
    }

    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return self.reply(OPT_LIST, REP_ERR_INVALID, b"option takes no data");
        }
        let exports = match self.catalog.exports() {
            Ok(e) => e,
            Err(e) => return self.reply(OPT_LIST, REP_ERR_PLATFORM, e.to_string().as_bytes()),
        };
        let mut entry = Vec::new();
        for e in exports {
            entry.clear();
            entry.put_u32(e.name.len() as u32);
            entry.extend_from_slice(e.name.as_bytes());
            entry.extend_from_slice(truncate(&e.description, MAX_STRING).as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &entry)?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string(MAX_STRING)?;
            let n = c.u32()?;
            // Each query costs at least 4 bytes of option data, which bounds `n`.
            let queries: Vec<&str> = (0..n)
                .map(|_| c.string(MAX_STRING))
                .collect::<Option<_>>()?;
            (c.remaining() == 0).then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return self.reply(opt, REP_ERR_INVALID, b"malformed request");
        };
        if !self.structured {
            return self.reply(opt, REP_ERR_INVALID, b"structured replies not negotiated");
        }
        let export = match self.resolve(name) {
            Ok((export, _)) => export,
            Err((kind, msg)) => return self.reply(opt, kind, msg.as_bytes()),
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
            let mut reply = Vec::new();
            reply.put_u32(ALLOCATION_CONTEXT_ID);
            reply.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &reply)?;
        }
        if !listing {
            self.meta = Some((export, selected));
        }
        self.reply(opt, REP_ACK, &[])
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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
