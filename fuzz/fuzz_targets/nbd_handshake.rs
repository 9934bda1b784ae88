//! The option-haggling phase from arbitrary client bytes, against an in-process server over a
//! Unix socket (the handshake code is private and takes a socket, so the server's public entry
//! point is driven). The server must not panic, must not allocate by a claimed length, and
//! must close the connection once the client has sent everything and shut its write side.
#![no_main]
use fuzz_common::{exchange, nbd_server};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let server = nbd_server();
    let _ = exchange(server, data.to_vec());
    // Keep the store's open transaction from growing across runs.
    let _ = server.store.flush();
});
