//! One error type for the whole crate. Each variant is a kind a caller can branch on, so the
//! frontends map it (NBD errno, gRPC code, CLI exit code) once each, without reading messages;
//! the message names the object (pool file, layer, snapshot, block, registry reference) as the
//! user needs it, and where a caller needs more than text (who holds a layer) a field says it.
//!
//! `InvalidInput` means the input was malformed and nothing else: a failure of the system
//! (a tool, a thread, a peer) has its own kind.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure, with what we were doing when it happened.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The caller asked for something malformed: bad name, bad size, a range past the end of a
    /// read, a request the protocol does not know.
    #[error("{0}")]
    InvalidInput(String),
    /// The named object (layer, snapshot, image, file) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name the request would give an object is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object exists and its state forbids the request (has children, being imported,
    /// not committed, a directory not empty).
    #[error("{0}")]
    Conflict(String),
    /// The layer is held by NBD connections or live files (`holders`: the connection names or
    /// file paths); they must let go first (or `--force` cuts them off).
    #[error("{message}")]
    InUse {
        message: String,
        holders: Vec<String>,
    },
    /// Another process holds the pool or the socket, or a server is at its limit: try later.
    #[error("{0}")]
    Busy(String),
    /// Out of space: the pool hit `--max-size`, or a write went past a layer's end.
    #[error("{0}")]
    NoSpace(String),
    /// A write to a read-only layer or a read-only opened pool.
    #[error("{0}")]
    ReadOnly(String),
    /// On-disk (or on-wire) damage: bad checksum, impossible structure, lost writes. Never
    /// returned as data.
    #[error("{0}")]
    Corrupt(String),
    /// The pool's loaded metadata breaks its rules (`faults`: what and where each is), found
    /// after the open (a range of a map that does not load, the audit at the load's
    /// completion): changes are refused, as a writable open refuses such a pool. Of kind
    /// `Corrupt`.
    #[error("{message}")]
    Faulty {
        message: String,
        faults: Vec<crate::fault::Fault>,
    },
    /// A service the request needs is not there or not answering: no server, a registry
    /// unreachable, a peer speaking another version.
    #[error("{0}")]
    Unavailable(String),
    /// A failure of ours or of a tool we run: a panicked thread, a failing mkfs, a reply
    /// that cannot be. Not the caller's fault.
    #[error("{0}")]
    Internal(String),
}

/// The kind of an `Error`, without its text: what mapping tables and tests match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Io,
    InvalidInput,
    NotFound,
    AlreadyExists,
    Conflict,
    InUse,
    Busy,
    NoSpace,
    ReadOnly,
    Corrupt,
    Unavailable,
    Internal,
}

impl Kind {
    /// Every kind, in the order of `Error`'s variants.
    pub const ALL: [Kind; 12] = [
        Kind::Io,
        Kind::InvalidInput,
        Kind::NotFound,
        Kind::AlreadyExists,
        Kind::Conflict,
        Kind::InUse,
        Kind::Busy,
        Kind::NoSpace,
        Kind::ReadOnly,
        Kind::Corrupt,
        Kind::Unavailable,
        Kind::Internal,
    ];
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An error of `kind` with `message` (`Io` becomes an error without an OS code, and
    /// `InUse` one without named holders).
    pub fn new(kind: Kind, message: String) -> Error {
        match kind {
            Kind::Io => Error::Io {
                context: message,
                source: io::Error::other("failed"),
            },
            Kind::InvalidInput => Error::InvalidInput(message),
            Kind::NotFound => Error::NotFound(message),
            Kind::AlreadyExists => Error::AlreadyExists(message),
            Kind::Conflict => Error::Conflict(message),
            Kind::InUse => Error::InUse {
                message,
                holders: Vec::new(),
            },
            Kind::Busy => Error::Busy(message),
            Kind::NoSpace => Error::NoSpace(message),
            Kind::ReadOnly => Error::ReadOnly(message),
            Kind::Corrupt => Error::Corrupt(message),
            Kind::Unavailable => Error::Unavailable(message),
            Kind::Internal => Error::Internal(message),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Error::Io { .. } => Kind::Io,
            Error::InvalidInput(_) => Kind::InvalidInput,
            Error::NotFound(_) => Kind::NotFound,
            Error::AlreadyExists(_) => Kind::AlreadyExists,
            Error::Conflict(_) => Kind::Conflict,
            Error::InUse { .. } => Kind::InUse,
            Error::Busy(_) => Kind::Busy,
            Error::NoSpace(_) => Kind::NoSpace,
            Error::ReadOnly(_) => Kind::ReadOnly,
            Error::Corrupt(_) | Error::Faulty { .. } => Kind::Corrupt,
            Error::Unavailable(_) => Kind::Unavailable,
            Error::Internal(_) => Kind::Internal,
        }
    }

    /// Whether the pool ran out of space, by kind or by the OS's code.
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::NoSpace(_) => true,
            Error::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }

    /// The errno a block-device frontend (NBD, live files) reports for this error: the one
    /// place kinds become errnos.
    pub fn errno(&self) -> i32 {
        if self.is_no_space() {
            return libc::ENOSPC;
        }
        match self.kind() {
            Kind::Io | Kind::Corrupt | Kind::Internal | Kind::Unavailable => libc::EIO,
            Kind::InvalidInput | Kind::Conflict => libc::EINVAL,
            Kind::NoSpace => libc::ENOSPC,
            Kind::ReadOnly => libc::EPERM,
            Kind::NotFound => libc::ENOENT,
            Kind::AlreadyExists => libc::EEXIST,
            Kind::InUse | Kind::Busy => libc::EBUSY,
        }
    }

    /// Prefix the message with more context, keeping the kind (and the holders).
    pub fn context(self, what: impl std::fmt::Display) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: format!("{what}: {context}"),
                source,
            },
            Error::InUse { message, holders } => Error::InUse {
                message: format!("{what}: {message}"),
                holders,
            },
            Error::Faulty { message, faults } => Error::Faulty {
                message: format!("{what}: {message}"),
                faults,
            },
            e => {
                let kind = e.kind();
                Error::new(kind, format!("{what}: {e}"))
            }
        }
    }

    /// A thread that panicked, as an error naming what it was doing.
    pub fn panicked(what: impl std::fmt::Display) -> Error {
        Error::Internal(format!("{what}: the thread panicked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_new_and_context_keeps_it() {
        for k in Kind::ALL {
            let e = Error::new(k, "layer \"web\": x".into());
            assert_eq!(e.kind(), k);
            let e = e.context("rm");
            assert_eq!(e.kind(), k);
            assert!(e.to_string().starts_with("rm: layer \"web\": x"), "{e}");
        }
    }

    #[test]
    fn context_keeps_the_holders_of_a_layer_in_use() {
        let e = Error::InUse {
            message: "layer \"a\" is in use".into(),
            holders: vec!["nbd client 1".into()],
        }
        .context("snapshot \"k\"");
        let Error::InUse { message, holders } = e else {
            panic!("kind lost")
        };
        assert_eq!(message, "snapshot \"k\": layer \"a\" is in use");
        assert_eq!(holders, ["nbd client 1"]);
    }

    #[test]
    fn errnos_follow_the_kind() {
        assert_eq!(Error::NotFound("x".into()).errno(), libc::ENOENT);
        assert_eq!(Error::new(Kind::InUse, "x".into()).errno(), libc::EBUSY);
        assert_eq!(Error::Internal("x".into()).errno(), libc::EIO);
        assert_eq!(
            Error::io("x", io::Error::from_raw_os_error(libc::EDQUOT)).errno(),
            libc::ENOSPC
        );
        assert_eq!(Error::InvalidInput("x".into()).errno(), libc::EINVAL);
    }
}
