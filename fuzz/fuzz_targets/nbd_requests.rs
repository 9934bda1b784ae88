//! The transmission phase: a valid handshake (export, structured replies and the allocation
//! context chosen by the input) followed by a stream of requests built from the input, with
//! well-formed headers or raw bytes, payloads as long as the header claims or not.
#![no_main]
use arbitrary::Arbitrary;
use fuzz_common::{exchange, handshake_bytes, nbd_server};
use libfuzzer_sys::fuzz_target;
use thinlayer::nbd::proto::{Request, CMD_DISC};

#[derive(Arbitrary, Debug)]
enum Len {
    Small(u16),
    Blocks(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Offset {
    Near(u32),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Request {
        flags: u16,
        command: u8,
        handle: u16,
        offset: Offset,
        len: Len,
        /// Send `len` payload bytes (capped) after the header, as a WRITE needs.
        payload: bool,
    },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only_export: bool,
    structured: bool,
    allocation: bool,
    pieces: Vec<Piece>,
}

fuzz_target!(|input: Input| {
    let server = nbd_server();
    let export = if input.read_only_export {
        "base"
    } else {
        "app"
    };
    let mut bytes = handshake_bytes(export, input.structured, input.allocation);
    for p in input.pieces.iter().take(32) {
        match p {
            Piece::Request {
                flags,
                command,
                handle,
                offset,
                len,
                payload,
            } => {
                let len = match *len {
                    Len::Small(n) => n as u32,
                    Len::Blocks(n) => n as u32 * 4096,
                    Len::Raw(n) => n,
                };
                let offset = match *offset {
                    Offset::Near(o) => o as u64 % (300 * 1024),
                    Offset::Raw(o) => o,
                };
                let r = Request {
                    flags: *flags,
                    command: (*command % 10) as u16,
                    handle: *handle as u64,
                    offset,
                    len,
                };
                bytes.extend_from_slice(&r.pack());
                if *payload {
                    let n = (len as usize).min(1 << 20);
                    bytes.extend((0..n).map(|i| (i as u8) ^ 0x5a));
                }
            }
            Piece::Raw(b) => bytes.extend_from_slice(b),
        }
    }
    // Sometimes end politely with NBD_CMD_DISC.
    if input.pieces.len().is_multiple_of(2) {
        let disc = Request {
            flags: 0,
            command: CMD_DISC,
            handle: 0,
            offset: 0,
            len: 0,
        };
        bytes.extend_from_slice(&disc.pack());
    }
    let _ = exchange(server, bytes);
    let _ = server.store.flush();
});
