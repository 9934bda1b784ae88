//! The optional frontends this build has: Cargo features, all on by default. Without them the
//! core still builds (`cargo build --no-default-features`): pool, layers, NBD, import/export,
//! send/receive, check, the CLI and the live server. A command or option whose feature is off
//! stays in the CLI and fails with `missing`, so the user learns why instead of "unknown
//! subcommand".
//!
//! | feature      | modules                              | gives                                  |
//! |--------------|--------------------------------------|----------------------------------------|
//! | `fuse`       | the FUSE session of `fuse/`          | `serve --files`, `attach`, `detach`    |
//! | `registry`   | `registry/`                          | `push`, `pull`                         |
//! | `containerd` | `snapshot/` (needs `fuse`)           | `serve --containerd-socket`            |

use crate::error::Error;

/// The error for `what` (a command or option) when this build lacks `feature`.
pub fn missing(feature: &str, what: &str) -> Error {
    Error::Unavailable(format!(
        "{what}: thinlayer was built without the `{feature}` feature \
         (build it with `cargo build --release --features {feature}`, or with the default features)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn a_missing_feature_is_named_with_the_command() {
        let e = missing("registry", "push");
        assert_eq!(e.kind(), Kind::Unavailable);
        let msg = e.to_string();
        assert!(
            msg.starts_with("push: thinlayer was built without the `registry` feature"),
            "{msg}"
        );
    }
}
