//! The edge, nbdkit style: a request's command, flags, size and range are checked here, before
//! its payload is read, and nothing behind this re-checks (the device trait only asserts). A
//! refusal is a value saying why, for the operator's log; the client gets only its errno.

use super::handshake::MAX_PAYLOAD;
use super::proto::*;
use std::fmt;

/// What the edge knows of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    pub size: u64,
    pub read_only: bool,
    /// Structured replies were negotiated (so READ may carry DF).
    pub structured: bool,
    /// `base:allocation` was selected (so BLOCK_STATUS has something to report).
    pub allocation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownCommand,
    /// Flags this command does not take on this connection.
    Flags {
        unsupported: u16,
    },
    ReadOnly,
    /// A READ or WRITE payload longer than we advertise.
    TooLarge,
    FlushWithRange,
    NoContext,
    Empty,
    PastEnd {
        size: u64,
    },
}

impl Edge {
    pub fn check(&self, req: &Request) -> Result<(), Refusal> {
        let allowed = match req.command {
            CMD_READ if self.structured => CMD_FLAG_DF,
            CMD_READ | CMD_FLUSH | CMD_CACHE => 0,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => return Err(Refusal::UnknownCommand),
        };
        if req.flags & !allowed != 0 {
            let unsupported = req.flags & !allowed;
            return Err(Refusal::Flags { unsupported });
        }
        let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.read_only {
            return Err(Refusal::ReadOnly);
        }
        if matches!(req.command, CMD_READ | CMD_WRITE) && req.len > MAX_PAYLOAD {
            return Err(Refusal::TooLarge);
        }
        match req.command {
            CMD_FLUSH if req.offset != 0 || req.len != 0 => return Err(Refusal::FlushWithRange),
            CMD_FLUSH => return Ok(()),
            CMD_BLOCK_STATUS if !self.allocation => return Err(Refusal::NoContext),
            // An empty range is meaningless, and an empty OFFSET_DATA chunk is not allowed.
            _ if req.len == 0 => return Err(Refusal::Empty),
            _ => {}
        }
        let in_range = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|end| end <= self.size);
        if !in_range {
            return Err(Refusal::PastEnd { size: self.size });
        }
        Ok(())
    }
}

impl Refusal {
    /// The error the client is sent for `req`.
    pub fn errno(&self, req: &Request) -> u32 {
        let writes = matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES);
        match self {
            Refusal::ReadOnly => EPERM,
            // Over the advertised maximum payload is EINVAL for a READ as for a WRITE (as
            // qemu-nbd answers): the protocol keeps EOVERFLOW for a read with the DF flag whose
            // reply cannot be sent in one chunk.
            Refusal::PastEnd { .. } if writes => ENOSPC,
            _ => EINVAL,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownCommand => f.write_str("unknown command"),
            Refusal::Flags { unsupported } => {
                write!(f, "flags {unsupported:#x} not supported for this command")
            }
            Refusal::ReadOnly => f.write_str("the export is read-only"),
            Refusal::TooLarge => write!(f, "over the {MAX_PAYLOAD}-byte maximum payload"),
            Refusal::FlushWithRange => f.write_str("FLUSH takes no offset or length"),
            Refusal::NoContext => f.write_str("base:allocation was not negotiated"),
            Refusal::Empty => f.write_str("zero length"),
            Refusal::PastEnd { size } => write!(f, "past the end of the export ({size} bytes)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: Edge = Edge {
        size: 1 << 20,
        read_only: false,
        structured: false,
        allocation: false,
    };

    fn req(command: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            handle: 0,
            offset,
            len,
        }
    }

    /// The refusal of `r` at `edge`, with the errno the client would get.
    fn refusal(edge: &Edge, r: Request) -> Option<(Refusal, u32)> {
        edge.check(&r).err().map(|why| (why, why.errno(&r)))
    }

    #[test]
    fn good_requests_pass() {
        assert_eq!(EDGE.check(&req(CMD_READ, 0, 0, 1 << 20)), Ok(()));
        assert_eq!(EDGE.check(&req(CMD_WRITE, CMD_FLAG_FUA, 4096, 1)), Ok(()));
        assert_eq!(EDGE.check(&req(CMD_FLUSH, 0, 0, 0)), Ok(()));
        // Payload-free commands may be longer than a payload, up to the end.
        let big = Edge {
            size: u64::MAX,
            ..EDGE
        };
        assert_eq!(big.check(&req(CMD_TRIM, 0, 0, u32::MAX)), Ok(()));
    }

    #[test]
    fn each_refusal_carries_the_errno_the_spec_asks_for() {
        let ro = Edge {
            read_only: true,
            ..EDGE
        };
        let cases = [
            (EDGE, req(99, 0, 0, 1), Refusal::UnknownCommand, EINVAL),
            (
                EDGE,
                req(CMD_READ, CMD_FLAG_DF, 0, 1),
                Refusal::Flags {
                    unsupported: CMD_FLAG_DF,
                },
                EINVAL,
            ),
            (ro, req(CMD_TRIM, 0, 0, 1), Refusal::ReadOnly, EPERM),
            (
                EDGE,
                req(CMD_READ, 0, 0, MAX_PAYLOAD + 1),
                Refusal::TooLarge,
                EINVAL,
            ),
            (
                EDGE,
                req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1),
                Refusal::TooLarge,
                EINVAL,
            ),
            (
                EDGE,
                req(CMD_FLUSH, 0, 1, 0),
                Refusal::FlushWithRange,
                EINVAL,
            ),
            (
                EDGE,
                req(CMD_BLOCK_STATUS, 0, 0, 1),
                Refusal::NoContext,
                EINVAL,
            ),
            (EDGE, req(CMD_READ, 0, 0, 0), Refusal::Empty, EINVAL),
            (
                EDGE,
                req(CMD_READ, 0, (1 << 20) - 1, 2),
                Refusal::PastEnd { size: 1 << 20 },
                EINVAL,
            ),
            (
                EDGE,
                req(CMD_WRITE_ZEROES, 0, u64::MAX, 1),
                Refusal::PastEnd { size: 1 << 20 },
                ENOSPC,
            ),
        ];
        for (edge, r, why, errno) in cases {
            assert_eq!(refusal(&edge, r), Some((why, errno)), "{r}");
        }
    }

    #[test]
    fn refusals_say_why_in_the_log() {
        let r = req(CMD_READ, 0, (1 << 20) - 10, 11);
        let why = EDGE.check(&r).unwrap_err();
        assert_eq!(
            format!("refused {r}: {why}"),
            "refused READ at offset 1048566, length 11: past the end of the export (1048576 bytes)"
        );
        let why = EDGE
            .check(&req(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 1))
            .unwrap_err();
        assert_eq!(why.to_string(), "flags 0x2 not supported for this command");
    }
}
