//! The control socket: how CLI commands reach the process that owns a pool while it serves.
//!
//! `wire` frames messages (a length, a JSON body, descriptors beside them); `hello` is the
//! version handshake every connection starts with; `proto` is the messages and how a
//! `crate::Error` crosses the socket unchanged; `socket` binds the owner-only socket and reads
//! the peer's credentials; `server` accepts connections and hands requests to a handler;
//! `client` is the CLI's side. The protocol is written down in docs/CONTROL.md.
//!
//! This is a frontend: it translates requests and replies and validates them at the edge
//! (frame size, descriptor count, peer uid). What a request does is the handler's business.
mod client;
/// Public so that the fuzz target of the control framing drives the server's own hello.
pub mod hello;
mod proto;
mod server;
mod socket;
/// Public so that tests' raw clients use the one codec the server and client use.
pub mod wire;

pub use client::Client;
pub use hello::{Hello, VERSION};
pub use proto::{
    ConnectionInfo, FillStatus, MapCacheStatus, MapsStatus, Pulled, Reply, Request, Status,
    WireError, KINDS,
};
pub use server::serve_control;
pub use socket::{default_path, ControlSocket, Peer};
pub use wire::{MAX_REPLY, MAX_REQUEST};
