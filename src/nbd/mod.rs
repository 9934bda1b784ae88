//! The NBD server (fixed newstyle handshake, simple and structured replies).
