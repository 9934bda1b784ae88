//! The NBD server (fixed newstyle handshake, simple and structured replies).
//!
//! `proto` is the wire format; `handshake` negotiates an export; `transmission` serves one
//! connection's requests, handing them to workers through `queue`; `server` accepts
//! connections and shuts down in order; `signals` turns SIGINT/SIGTERM into the stop flag.
mod handshake;
pub mod proto;
mod queue;
mod reply;
mod server;
mod signals;
mod stream;
mod transmission;

pub use handshake::MAX_PAYLOAD;
pub use server::{bind, serve, serve_bound, serve_tcp, serve_unix, Bound, Listener, ServerConfig};
pub use signals::install_signal_handlers;
