//! Serving sockets until told to stop, shared by every server in the crate (NBD, the control
//! socket; the containerd gRPC server waits on the same `Stop`): `stop` is the signal,
//! `accept` the loop.
mod accept;
mod stop;

pub use accept::{Accept, Conn, Connections, Listen};
pub use stop::Stop;
