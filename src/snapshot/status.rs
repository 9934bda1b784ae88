//! Why a snapshot request failed, as containerd needs to hear it: the gRPC code decides what
//! containerd does (an `AlreadyExists` on Prepare during unpack means "another pull made this
//! layer, use it"; `NotFound` on Stat means "unpack it"), the message names the snapshot.

use crate::error::{Error, Kind};
use tonic::{Code, Status};

#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Failure>;

impl Failure {
    /// The store's error, with the code its kind calls for.
    pub fn from_error(e: Error) -> Failure {
        Failure {
            code: code(&e),
            message: e.to_string(),
        }
    }

    /// Prefix the message with what failed (`snapshot "ns/4/t1"`).
    pub fn context(self, what: impl std::fmt::Display) -> Failure {
        Failure {
            code: self.code,
            message: format!("{what}: {}", self.message),
        }
    }
}

/// The gRPC code of an error: the one place kinds become codes containerd acts on.
pub fn code(e: &Error) -> Code {
    if e.is_no_space() {
        return Code::ResourceExhausted;
    }
    match e.kind() {
        Kind::NotFound => Code::NotFound,
        Kind::AlreadyExists => Code::AlreadyExists,
        Kind::Conflict | Kind::InUse | Kind::ReadOnly => Code::FailedPrecondition,
        Kind::NoSpace => Code::ResourceExhausted,
        Kind::InvalidInput => Code::InvalidArgument,
        Kind::Busy | Kind::Unavailable => Code::Unavailable,
        Kind::Corrupt => Code::DataLoss,
        Kind::Io | Kind::Internal => Code::Internal,
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::from_error(e)
    }
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Status {
        Status::new(f.code, f.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_get_the_codes_containerd_acts_on() {
        let cases = [
            (Error::NotFound("x".into()), Code::NotFound),
            (Error::Conflict("x".into()), Code::FailedPrecondition),
            (Error::NoSpace("x".into()), Code::ResourceExhausted),
            (
                Error::io("x", std::io::Error::from_raw_os_error(libc::ENOSPC)),
                Code::ResourceExhausted,
            ),
            (Error::InvalidInput("x".into()), Code::InvalidArgument),
            (Error::Corrupt("x".into()), Code::DataLoss),
            (Error::Internal("x".into()), Code::Internal),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                Error::new(Kind::InUse, "x".into()),
                Code::FailedPrecondition,
            ),
            (Error::Unavailable("x".into()), Code::Unavailable),
        ];
        for (e, code) in cases {
            let s = Status::from(Failure::from(e).context("snapshot \"k\""));
            assert_eq!(s.code(), code);
            assert!(
                s.message().starts_with("snapshot \"k\": "),
                "{}",
                s.message()
            );
        }
    }
}
