//! The NBD wire format, in one codec: the protocol's numbers here, and every message the server
//! and its test clients exchange, each encoded (`pack`) beside its decoding (`unpack`) with a
//! round-trip test. Nothing outside this folder lays out NBD bytes. Everything on the wire is
//! big-endian (`be`).
//!
//! - `negotiation`: greeting, client flags, option and option-reply headers, EXPORT_NAME reply
//! - `options`: what GO/INFO/LIST/META_CONTEXT options and their replies carry
//! - `request`: the transmission request header
//! - `reply`: simple replies, structured chunk headers and chunk payloads

mod be;
mod negotiation;
mod options;
mod reply;
mod request;

pub use be::truncate;
pub use negotiation::{ClientFlags, ExportNameReply, Greeting, OptionHeader, OptionReplyHeader};
pub use options::{Info, InfoRequest, MetaContext, MetaContextRequest, ServerEntry};
pub use reply::{begin_offset_data, Chunk, ChunkHeader, Descriptor, ReplyHeader, SimpleReply};
pub use request::{command_name, Request};

/// The longest string (export name, description, error message) the protocol allows.
pub const MAX_STRING: usize = 4096;

// Magic numbers.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// NBD_OPT_INFO / NBD_OPT_GO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation descriptor flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// NBD error numbers. They happen to equal Linux errnos, but the protocol fixes them, so they are
/// spelled out rather than borrowed from libc.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// An NBD error's name, for log lines.
pub fn errno_name(error: u32) -> &'static str {
    match error {
        0 => "no error",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "an unknown error",
    }
}

/// The text an error reply carries beside `error`: generic on purpose. What went wrong in the
/// store (pool paths, block numbers) is the operator's business and goes to the server's log;
/// the client gets the code and this.
pub fn errno_text(error: u32) -> &'static str {
    match error {
        EPERM => "operation not permitted",
        EIO => "input/output error",
        ENOMEM => "out of memory",
        EINVAL => "invalid request",
        ENOSPC => "no space left",
        EOVERFLOW => "value too large",
        ENOTSUP => "not supported",
        ESHUTDOWN => "server shutting down",
        _ => "error",
    }
}

/// The NBD error a store errno travels as; anything the protocol has no word for is an I/O error.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL | libc::ENOENT => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_map_onto_the_protocol_set() {
        assert_eq!(nbd_errno(libc::ENOENT), EINVAL);
        assert_eq!(nbd_errno(libc::EBUSY), EIO);
        assert_eq!(nbd_errno(libc::ENOSPC), ENOSPC);
        assert_eq!(nbd_errno(libc::EPERM), EPERM);
    }
}
