//! The transmission-phase request header (a WRITE's payload follows it on the wire).

use super::be::fixed_message;
use super::*;
use std::fmt;

fixed_message! {
    pub struct Request {
        magic u32 = REQUEST_MAGIC,
        /// `CMD_FLAG_*`.
        pub flags: u16,
        /// `CMD_*`.
        pub command: u16,
        pub handle: u64,
        pub offset: u64,
        pub len: u32,
    }
}

/// The command's name as the protocol spells it (without `NBD_CMD_`).
pub fn command_name(command: u16) -> Option<&'static str> {
    Some(match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => return None,
    })
}

/// How a request reads in a log line: `WRITE at offset 4096, length 512, flags 0x1`.
impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match command_name(self.command) {
            Some(name) => f.write_str(name)?,
            None => write!(f, "command {}", self.command)?,
        }
        write!(f, " at offset {}, length {}", self.offset, self.len)?;
        if self.flags != 0 {
            write!(f, ", flags {:#x}", self.flags)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write() -> Request {
        Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        }
    }

    #[test]
    fn request_round_trips_and_has_the_spec_layout() {
        let r = write();
        let b = r.pack();
        assert_eq!(b[..4], [0x25, 0x60, 0x95, 0x13]);
        assert_eq!(b[4..8], [0, 1, 0, 1], "flags, then command");
        assert_eq!(b[8..16], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b[16..24], [0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(b[24..], [0, 0, 16, 0]);
        assert_eq!(Request::unpack(&b), Some(r));
    }

    #[test]
    fn request_with_bad_magic_is_rejected() {
        let mut b = write().pack();
        b[0] ^= 1;
        assert_eq!(Request::unpack(&b), None);
    }

    #[test]
    fn requests_read_well_in_logs() {
        assert_eq!(
            write().to_string(),
            "WRITE at offset 1099511627776, length 4096, flags 0x1"
        );
        let odd = Request {
            flags: 0,
            command: 99,
            handle: 0,
            offset: 0,
            len: 1,
        };
        assert_eq!(odd.to_string(), "command 99 at offset 0, length 1");
    }
}
