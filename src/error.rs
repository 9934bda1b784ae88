//! One error type for the whole crate. Each variant says what kind of failure it is, so the
//! frontends can map it (NBD errno, CLI exit code) without parsing messages; the message itself
//! names the object (pool file, layer, block, offset) as the user needs it.

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
    /// The caller asked for something malformed: bad name, bad size, range past the end of a read.
    #[error("{0}")]
    Invalid(String),
    /// Out of space: the pool hit `--max-size`, or a write went past a layer's end.
    #[error("{0}")]
    NoSpace(String),
    /// A write to a read-only layer or a read-only opened pool.
    #[error("{0}")]
    ReadOnly(String),
    /// On-disk damage: bad checksum, impossible structure. Never returned as data.
    #[error("{0}")]
    Corrupt(String),
    /// A named layer (or other object) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists and the request conflicts with its state (name taken, has children...).
    #[error("{0}")]
    Conflict(String),
    /// Another process holds the pool.
    #[error("{0}")]
    Busy(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a block-device frontend (NBD) reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
                _ => libc::EIO,
            },
            Error::Invalid(_) => libc::EINVAL,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::ReadOnly(_) => libc::EPERM,
            Error::Corrupt(_) => libc::EIO,
            Error::NotFound(_) => libc::ENOENT,
            Error::Conflict(_) => libc::EINVAL,
            Error::Busy(_) => libc::EBUSY,
        }
    }

    /// Prefix the message with more context, keeping the kind.
    pub fn context(self, what: impl std::fmt::Display) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: format!("{what}: {context}"),
                source,
            },
            Error::Invalid(m) => Error::Invalid(format!("{what}: {m}")),
            Error::NoSpace(m) => Error::NoSpace(format!("{what}: {m}")),
            Error::ReadOnly(m) => Error::ReadOnly(format!("{what}: {m}")),
            Error::Corrupt(m) => Error::Corrupt(format!("{what}: {m}")),
            Error::NotFound(m) => Error::NotFound(format!("{what}: {m}")),
            Error::Conflict(m) => Error::Conflict(format!("{what}: {m}")),
            Error::Busy(m) => Error::Busy(format!("{what}: {m}")),
        }
    }
}
