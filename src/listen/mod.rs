//! Serving sockets until told to stop, shared by every server in the crate (NBD, the control
//! socket; the containerd gRPC server waits on the same `Stop`): `stop` is the signal,
//! `accept` the loop, `inherit` takes over a listening socket from a descriptor.
mod accept;
mod inherit;
mod stop;

pub use accept::{Accept, Conn, Connections, Listen};
pub use inherit::{inherit, Listening};
pub use stop::Stop;
