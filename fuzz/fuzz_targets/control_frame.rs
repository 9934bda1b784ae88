//! The control socket's framing and hello from arbitrary bytes, as a local client may send
//! them: the input goes down a socket pair and the server's side reads it message by message.
//! A model of the framing (a u32 little-endian length, that many bytes, at most MAX_REQUEST)
//! says what each read must return: that body, a clean end, or an error; never a panic or an
//! allocation by a claimed length over the limit. The first message goes to the server's
//! hello (`hello::answer`): a hello is answered with ours, anything else refused. Every later
//! body that parses as a request re-encodes to a message that parses to the same request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use thinlayer::control::hello::{answer, Greeting};
use thinlayer::control::{wire, Hello, Request, MAX_REQUEST};

/// What the framing model expects next from `rest`.
enum Next {
    Body(usize),
    End,
    Broken,
}

fn model(rest: &[u8]) -> Next {
    if rest.is_empty() {
        return Next::End;
    }
    if rest.len() < 4 {
        return Next::Broken;
    }
    let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    if len > MAX_REQUEST || rest.len() - 4 < len {
        return Next::Broken;
    }
    Next::Body(len)
}

fuzz_target!(|data: &[u8]| {
    // Fits the socket pair's buffer, so one thread can write it all and then read.
    if data.len() > 64 << 10 {
        return;
    }
    let (mut client, server) = UnixStream::pair().unwrap();
    client.write_all(data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mine = Hello::server("/fuzz/pool");
    let mut pos = 0;
    let mut first = true;
    loop {
        let got = wire::recv(&server, MAX_REQUEST);
        match model(&data[pos..]) {
            Next::End => {
                assert!(matches!(got, Ok(None)), "a clean end read as {got:?}");
                return;
            }
            Next::Broken => {
                assert!(got.is_err(), "a broken frame read as {got:?}");
                return;
            }
            Next::Body(len) => {
                let (body, fds) = got.expect("a whole frame").expect("a frame, not the end");
                assert_eq!(body, &data[pos + 4..pos + 4 + len]);
                assert!(fds.is_empty());
                pos += 4 + len;
                if first {
                    first = false;
                    if let Ok(g) = answer(&server, &body, &mine) {
                        // Answered with our hello, whatever the client's version.
                        let (reply, _) = wire::recv(&client, wire::MAX_REPLY).unwrap().unwrap();
                        let v: serde_json::Value = wire::decode(&reply).unwrap();
                        let theirs: Hello = serde_json::from_value(v["hello"].clone()).unwrap();
                        assert_eq!(theirs, mine);
                        if let Greeting::Mismatch(h) = g {
                            assert_ne!(h.version, mine.version);
                        }
                    }
                } else if let Ok(req) = wire::decode::<Request>(&body) {
                    let again = wire::encode(&req).unwrap();
                    assert_eq!(wire::body_len(&again) + 4, again.len());
                    let back: Request = wire::decode(&again[4..]).unwrap();
                    assert_eq!(back, req);
                    let _ = req.to_string();
                }
            }
        }
    }
});
