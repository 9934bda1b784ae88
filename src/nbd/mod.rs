//! The NBD server (fixed newstyle handshake, simple and structured replies).
//!
//! `proto` is the wire format, the one codec the server and the tests' clients share;
//! `handshake` negotiates an export; `transmission` serves one connection's requests, checked
//! at the edge by `validate`, answered through `reply` and handed to workers through `queue`;
//! `server` accepts connections (through `crate::listen`) and shuts down in order.
mod handshake;
pub mod proto;
mod queue;
mod reply;
mod server;
mod stream;
mod transmission;
mod validate;

pub use handshake::MAX_PAYLOAD;
pub use server::{bind, serve, serve_bound, serve_tcp, serve_unix, Bound, Listener, ServerConfig};
