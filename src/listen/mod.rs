//! Serving sockets until told to stop, shared by every server in the crate (NBD, the control
//! socket; the containerd gRPC server waits on the same `Stop`): `stop` is the signal,
//! `accept` the loop, `hold` what keeps the loops from accepting while a restart hands the
//! listeners over.
mod accept;
mod hold;
mod stop;

pub use accept::{Accept, Acceptor, Conn, Connections, Listen};
pub use hold::Hold;
pub use stop::Stop;
