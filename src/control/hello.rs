//! The version handshake. The client's first message is `{"hello": {...}}`, the server answers
//! with its own. Versions must be equal: the CLI and the server are the same program, so a
//! mismatch means a thinlayer was upgraded while an older server kept running, and the right
//! advice is to use the binary that started it, not to guess at a common subset.
//!
//! The framing and this hello are frozen across versions (a `version` number in a
//! `{"hello": ...}` object, unknown fields ignored), so any two versions can at least tell each
//! other apart; everything after the hello belongs to the version.

use super::proto::ServerFrame;
use super::wire;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::net::UnixStream;

/// The control protocol this build speaks.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// The client's software, e.g. "thinlayer 0.1.0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The server's software.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The pool the server owns, so a client's messages can name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct HelloFrame {
    pub hello: Hello,
}

pub fn software() -> String {
    format!("thinlayer {}", env!("CARGO_PKG_VERSION"))
}

impl Hello {
    pub fn client() -> Hello {
        Hello {
            version: VERSION,
            client: Some(software()),
            server: None,
            pool: None,
            pid: None,
        }
    }

    pub fn server(pool: &str) -> Hello {
        Hello {
            version: VERSION,
            client: None,
            server: Some(software()),
            pool: Some(pool.to_string()),
            pid: Some(std::process::id()),
        }
    }
}

/// What the client is told when the versions differ (docs/CONTROL.md quotes it).
pub fn mismatch(pool: &str, theirs: u32, ours: u32) -> Error {
    Error::Unavailable(format!(
        "the server of pool {pool} speaks control protocol version {theirs}; this thinlayer speaks {ours} — use the thinlayer that started the server"
    ))
}

/// The client's side: send `mine`, read the server's answer. `socket` names the socket in
/// errors until the server has said which pool it serves.
pub(super) fn greet(sock: &UnixStream, mine: &Hello, socket: &str) -> Result<Hello> {
    let ctx = |what: &str| format!("control socket {socket}: {what}");
    let frame = wire::encode(&HelloFrame {
        hello: mine.clone(),
    })
    .map_err(|e| Error::io(ctx("encoding the hello"), e))?;
    // A server that refuses us (wrong uid, too many clients) writes its error and closes
    // without reading, so our hello may fail with EPIPE while the error waits to be read.
    let sent = wire::send(sock, &frame, &[]);
    let answer = match wire::recv(sock, wire::MAX_REPLY) {
        Ok(Some((body, _fds))) => body,
        Ok(None) => {
            let e = sent
                .err()
                .unwrap_or_else(|| io::ErrorKind::UnexpectedEof.into());
            return Err(Error::io(
                ctx("the server closed the connection at once"),
                e,
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            return Err(Error::io(ctx("the server did not answer the hello"), e));
        }
        Err(e) => return Err(Error::io(ctx("reading the server's hello"), e)),
    };
    // Try the frozen hello shape first, so even a server of another version is understood.
    if let Ok(HelloFrame { hello }) = wire::decode::<HelloFrame>(&answer) {
        if hello.version != mine.version {
            let pool = hello.pool.as_deref().unwrap_or(socket);
            return Err(mismatch(pool, hello.version, mine.version));
        }
        return Ok(hello);
    }
    match wire::decode::<ServerFrame>(&answer) {
        Ok(ServerFrame::Error(e)) => Err(e.into_error()),
        _ => Err(Error::Unavailable(ctx(&format!(
            "the server did not answer with a hello but {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        )))),
    }
}

/// What the server made of a client's hello.
pub enum Greeting {
    /// Same version: go on to requests.
    Agreed,
    /// Answered with our hello; the client reports the mismatch, we close.
    Mismatch(Hello),
}

/// The server's side: `body` is the client's first message. Always answers with our hello
/// when the message is one, whatever its version, so the client can explain a mismatch.
pub fn answer(sock: &UnixStream, body: &[u8], mine: &Hello) -> Result<Greeting> {
    let theirs = match wire::decode::<HelloFrame>(body) {
        Ok(f) => f.hello,
        Err(e) => return Err(Error::InvalidInput(format!("expected a hello, got: {e}"))),
    };
    let frame = wire::encode(&HelloFrame {
        hello: mine.clone(),
    })
    .map_err(|e| Error::io("encoding the hello", e))?;
    wire::send(sock, &frame, &[]).map_err(|e| Error::io("sending the hello", e))?;
    Ok(if theirs.version == mine.version {
        Greeting::Agreed
    } else {
        Greeting::Mismatch(theirs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(client: Hello, server: Hello) -> (Result<Hello>, Result<Greeting>) {
        let (a, b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            let (body, _) = wire::recv(&b, wire::MAX_REQUEST).unwrap().unwrap();
            answer(&b, &body, &server)
        });
        let c = greet(&a, &client, "/tmp/p.ctl");
        (c, srv.join().unwrap())
    }

    #[test]
    fn equal_versions_agree() {
        let (c, s) = exchange(Hello::client(), Hello::server("/pool"));
        let h = c.unwrap();
        assert_eq!(h.pool.as_deref(), Some("/pool"));
        assert_eq!(h.pid, Some(std::process::id()));
        assert!(matches!(s.unwrap(), Greeting::Agreed));
    }

    #[test]
    fn a_version_mismatch_gives_the_documented_error_on_both_sides() {
        let mut newer = Hello::server("/var/lib/thinlayer/pool");
        newer.version = VERSION + 1;
        let (c, s) = exchange(Hello::client(), newer);
        let e = c.unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)));
        assert_eq!(
            e.to_string(),
            format!("the server of pool /var/lib/thinlayer/pool speaks control protocol version {}; this thinlayer speaks {VERSION} — use the thinlayer that started the server", VERSION + 1)
        );
        assert!(matches!(s.unwrap(), Greeting::Mismatch(h) if h.version == VERSION));
    }

    #[test]
    fn the_hello_shape_is_the_documented_one() {
        let v = serde_json::to_value(HelloFrame {
            hello: Hello::client(),
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"hello": {"version": VERSION, "client": software()}})
        );
        // A future hello with more fields is still read.
        let f: HelloFrame = wire::decode(br#"{"hello":{"version":7,"features":["x"]}}"#).unwrap();
        assert_eq!(f.hello.version, 7);
    }

    #[test]
    fn a_server_error_instead_of_a_hello_reaches_the_client() {
        let (a, b) = UnixStream::pair().unwrap();
        let refusal = ServerFrame::Error(crate::control::WireError::from(&Error::Busy(
            "too many".into(),
        )));
        wire::send(&b, &wire::encode(&refusal).unwrap(), &[]).unwrap();
        drop(b);
        let e = greet(&a, &Hello::client(), "/tmp/p.ctl").unwrap_err();
        assert!(matches!(e, Error::Busy(m) if m == "too many"));
    }

    #[test]
    fn something_that_is_not_a_hello_is_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(answer(&a, br#"{"ls":null}"#, &Hello::server("/p")).is_err());
    }
}
