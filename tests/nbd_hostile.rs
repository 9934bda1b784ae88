//! Clients that lie, stall, vanish or break the protocol: each may lose its own connection,
//! nothing else. A bystander client keeps verifying data on another connection throughout.

mod nbd_common;
mod support;

use nbd_common::*;
use std::io::{Read, Write};
use std::time::Duration;
use thinlayer::nbd::proto::*;

/// The data of NBD_OPT_GO / NBD_OPT_INFO for `name`, asking for no extra information.
fn info_request(name: &str) -> Vec<u8> {
    InfoRequest {
        name,
        wanted: vec![],
    }
    .pack()
}

#[test]
fn bad_magic_and_bad_client_flags_close_only_that_connection() {
    let server = TestServer::start();
    let bystander = Bystander::start(&server);

    let mut s = RawClient::greet(server.connect());
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(RawClient {
        s,
        structured: false,
        size: 0,
        flags: 0
    }
    .is_closed());

    let mut s = server.connect();
    let mut g = [0u8; Greeting::LEN];
    s.read_exact(&mut g).unwrap();
    s.write_all(&ClientFlags { flags: 0x8000_0000 }.pack())
        .unwrap();
    assert!(RawClient {
        s,
        structured: false,
        size: 0,
        flags: 0
    }
    .is_closed());

    let mut c = RawClient::go(server.connect(), "disk", false);
    c.send(CMD_READ, 0, 1, 0, 512);
    c.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    c.s.write_all(&[0; 24]).unwrap();
    assert!(matches!(
        c.reply(),
        Reply::Simple {
            error: 0,
            handle: 1
        }
    ));
    let mut data = [0u8; 512];
    c.s.read_exact(&mut data).unwrap();
    assert!(
        c.is_closed(),
        "a request with bad magic must end the connection"
    );

    assert!(bystander.finish() > 0);
}

#[test]
fn unknown_options_are_refused_and_the_handshake_continues() {
    let server = TestServer::start();
    let mut s = RawClient::greet(server.connect());
    for opt in [0u32, 4, 5, 99, 0xffff_ffff] {
        RawClient::send_option(&mut s, opt, b"junk");
        let (echo, kind, _) = RawClient::option_reply(&mut s);
        assert_eq!((echo, kind), (opt, REP_ERR_UNSUP));
    }
    // Options that take no data refuse some.
    RawClient::send_option(&mut s, OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_INVALID);
    RawClient::send_option(&mut s, OPT_LIST, b"x");
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_INVALID);
    // Malformed GO: name length past the data.
    RawClient::send_option(&mut s, OPT_GO, &[0, 0, 1, 0, b'a']);
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    let no_queries = MetaContextRequest {
        name: "disk",
        queries: vec![],
    };
    RawClient::send_option(&mut s, OPT_SET_META_CONTEXT, &no_queries.pack());
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_INVALID);
    // Unknown export; then the default "" is ambiguous with three exports.
    RawClient::send_option(&mut s, OPT_GO, &info_request("nope"));
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_UNKNOWN);
    RawClient::send_option(&mut s, OPT_INFO, &info_request(""));
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_UNKNOWN);
    // Still alive: GO works on the same connection.
    RawClient::send_option(&mut s, OPT_GO, &info_request("ro"));
    let (_, kind, data) = RawClient::option_reply(&mut s);
    assert_eq!(kind, REP_INFO);
    let Some(Info::Export { flags, .. }) = Info::unpack(&data) else {
        panic!("first info is not NBD_INFO_EXPORT: {data:?}")
    };
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_ne!(flags & TF_CAN_MULTI_CONN, 0);
}

#[test]
fn a_long_missing_export_name_is_refused_within_the_string_limit() {
    let server = TestServer::start();
    let mut s = RawClient::greet(server.connect());
    // The longest name a client may send.
    let name = "n".repeat(MAX_STRING);
    for opt in [OPT_GO, OPT_INFO] {
        RawClient::send_option(&mut s, opt, &info_request(&name));
        let (echo, kind, data) = RawClient::option_reply(&mut s);
        assert_eq!((echo, kind), (opt, REP_ERR_UNKNOWN));
        let message = String::from_utf8(data).expect("the message is a UTF-8 string");
        assert!(message.len() <= 256, "{} bytes", message.len());
        assert!(message.starts_with("no export \"nnn"), "{message}");
        assert!(message.contains("4096-byte name"), "{message}");
    }
    // Longer than a string may be: malformed. Built by hand, as the codec would cut it.
    let longer = "n".repeat(MAX_STRING + 1);
    let mut data = (longer.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(longer.as_bytes());
    data.extend_from_slice(&[0, 0]);
    RawClient::send_option(&mut s, OPT_GO, &data);
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_INVALID);
    // The haggling goes on.
    RawClient::send_option(&mut s, OPT_GO, &info_request("disk"));
    assert_eq!(RawClient::option_reply(&mut s).1, REP_INFO);
}

#[test]
fn oversized_options_are_refused_without_allocating_them() {
    let server = TestServer::start();
    let bystander = Bystander::start(&server);

    // Modestly too big: skipped, refused, and the handshake goes on.
    let mut s = RawClient::greet(server.connect());
    RawClient::send_option(&mut s, 99, &vec![7u8; 100 * 1024]);
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_TOO_BIG);
    RawClient::send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ACK);

    // Claims 4 GiB and sends a little: refused and cut off at once.
    let mut s = RawClient::greet(server.connect());
    let header = OptionHeader {
        option: OPT_GO,
        len: u32::MAX,
    };
    // One write: the server refuses on the header and closes, so a second write could race
    // its close (EPIPE under load, seen in CI).
    let mut claim = header.pack().to_vec();
    claim.extend_from_slice(&[1; 1000]);
    s.write_all(&claim).unwrap();
    assert_eq!(RawClient::option_reply(&mut s).1, REP_ERR_TOO_BIG);
    assert!(RawClient {
        s,
        structured: false,
        size: 0,
        flags: 0
    }
    .is_closed());

    // EXPORT_NAME has no error reply: a huge one just ends the connection.
    let mut s = RawClient::greet(server.connect());
    let header = OptionHeader {
        option: OPT_EXPORT_NAME,
        len: 1 << 30,
    };
    s.write_all(&header.pack()).unwrap();
    let _ = RawClient::option_reply(&mut s);
    assert!(RawClient {
        s,
        structured: false,
        size: 0,
        flags: 0
    }
    .is_closed());

    assert!(bystander.finish() > 0);
}

#[test]
fn unknown_commands_and_flags_get_einval_and_the_connection_stays_usable() {
    let server = TestServer::start();
    for structured in [false, true] {
        let mut c = RawClient::go(server.connect(), "disk", structured);
        assert_eq!(c.command(99, 0, 0, 512, &[]), EINVAL);
        assert_eq!(c.command(CMD_RESIZE_FOR_TEST, 0, 0, 0, &[]), EINVAL);
        assert_eq!(c.command(CMD_FLUSH, CMD_FLAG_FUA, 0, 0, &[]), EINVAL);
        assert_eq!(c.command(CMD_FLUSH, 0, 1, 0, &[]), EINVAL);
        assert_eq!(c.command(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 4096, &[]), EINVAL);
        assert_eq!(c.command(CMD_WRITE, 0x8000, 0, 4, b"abcd"), EINVAL);
        // Without structured replies there is no DF and no block status.
        if structured {
            c.send(CMD_BLOCK_STATUS, 0, 4, 0, 4096);
            let hole = Descriptor {
                len: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            };
            let status = Chunk::BlockStatus {
                context: 1,
                descriptors: vec![hole],
            };
            assert_eq!(c.reply().chunk(), status);
        } else {
            assert_eq!(c.command(CMD_BLOCK_STATUS, 0, 0, 4096, &[]), EINVAL);
            assert_eq!(c.command(CMD_READ, CMD_FLAG_DF, 0, 512, &[]), EINVAL);
        }
        // The bad write's payload was drained: this write and read line up.
        assert_eq!(c.write(8192, b"good"), 0);
        c.send(CMD_READ, 0, 5, 8192, 4);
        let data = read_data(&mut c, 5, 8192, 4);
        assert_eq!(data, b"good");
    }
}

/// NBD_CMD_RESIZE (8) is an extension we do not offer.
const CMD_RESIZE_FOR_TEST: u16 = 8;

/// Reads the reply to READ `handle` in whichever reply style is in use.
fn read_data(c: &mut RawClient, handle: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xaa; len];
    loop {
        match c.reply() {
            Reply::Simple {
                error: 0,
                handle: h,
            } if h == handle => {
                c.s.read_exact(&mut out).unwrap();
                return out;
            }
            reply @ Reply::Chunk {
                flags, handle: h, ..
            } if h == handle => {
                let at = |o: u64| (o - offset) as usize;
                match reply.chunk() {
                    Chunk::OffsetData { offset: o, data } => {
                        out[at(o)..at(o) + data.len()].copy_from_slice(data)
                    }
                    Chunk::OffsetHole { offset: o, len } => {
                        out[at(o)..at(o) + len as usize].fill(0)
                    }
                    Chunk::None => {}
                    other => panic!("unexpected chunk {other:?}"),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    return out;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn four_gib_lengths_are_refused_without_allocating() {
    let server = TestServer::start();
    let bystander = Bystander::start(&server);

    let mut c = RawClient::go(server.connect(), "disk", false);
    // A read far over the cap: refused, no payload follows, the connection goes on.
    assert_eq!(c.read(0, u32::MAX), Err(EINVAL));
    assert_eq!(c.read(0, MAX_PAYLOAD_FOR_TEST + 1), Err(EINVAL));
    // Trim and zero carry no payload; 4 GiB is only a range problem (past the 64 MiB end).
    assert_eq!(c.command(CMD_TRIM, 0, 0, u32::MAX, &[]), EINVAL);
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, 0, u32::MAX, &[]), ENOSPC);
    // A write just over the cap is drained and refused; the stream stays in step.
    let big = vec![1u8; MAX_PAYLOAD_FOR_TEST as usize + 4096];
    assert_eq!(c.write(0, &big), EINVAL);
    assert_eq!(c.read(0, 4), Ok(vec![0; 4]));
    // A write claiming 4 GiB: refused and the connection closed, not 4 GiB read or held. The
    // refusal comes from the header alone, before any payload: the reply is read first. (This
    // test wrote 64 KiB of payload before reading it and failed now and then with EPIPE: the
    // server may refuse and close before the client's write, as it is meant to.)
    c.send(CMD_WRITE, 0, 3, 0, u32::MAX);
    assert!(matches!(
        c.reply(),
        Reply::Simple {
            error: EINVAL,
            handle: 3
        }
    ));
    assert!(c.is_closed());
    // Closed for good: what the client goes on sending is refused, not read.
    let e = c.s.write_all(&[2u8; 65536]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");

    assert!(bystander.finish() > 0);
}

const MAX_PAYLOAD_FOR_TEST: u32 = thinlayer::nbd::MAX_PAYLOAD;

#[test]
fn a_write_over_the_maximum_payload_is_einval_and_the_connection_stays_in_step() {
    let server = TestServer::start();
    let big = pattern(0, MAX_PAYLOAD_FOR_TEST as usize + 1);
    for structured in [false, true] {
        let mut c = RawClient::go(server.connect(), "disk", structured);
        assert_eq!(c.write(4096, &big), EINVAL);
        // Nothing of it was written, and the next requests line up with their replies.
        assert_eq!(c.write(0, b"after"), 0);
        c.send(CMD_READ, 0, 5, 0, 8192);
        let data = read_data(&mut c, 5, 0, 8192);
        assert_eq!(&data[..5], b"after");
        assert!(
            data[5..].iter().all(|&b| b == 0),
            "the refused write landed"
        );
        c.send(CMD_FLUSH, 0, 6, 0, 0);
        assert!(matches!(
            c.reply(),
            Reply::Simple {
                error: 0,
                handle: 6
            }
        ));
    }
    server.log.wait_for(&[
        "refused WRITE at offset 4096, length 33554433",
        "over the 33554432-byte maximum payload; sent EINVAL",
    ]);
}

/// A plain READ over the maximum payload once got EOVERFLOW, which the protocol keeps for a
/// read with the DF flag (nbd-tester-client's integrityhuge stopped on it). 42 MiB, as that
/// trace sends: EINVAL for a READ and a WRITE alike, the WRITE's payload drained, and the next
/// request on the same connection answered in step, with simple and structured replies.
#[test]
fn requests_of_42_mib_are_einval_and_the_connection_stays_in_step() {
    let server = TestServer::start();
    const BIG: u32 = 42 << 20;
    let big = pattern(0, BIG as usize);
    for structured in [false, true] {
        let mut c = RawClient::go(server.connect(), "disk", structured);
        c.send(CMD_READ, 0, 1, 0, BIG);
        let reply = c.reply();
        let error = match &reply {
            Reply::Simple { error, handle: 1 } if !structured => *error,
            Reply::Chunk { handle: 1, .. } if structured => match reply.chunk() {
                Chunk::Error { error, .. } => error,
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(error, EINVAL, "a 42 MiB READ");
        assert_eq!(c.write(4096, b"next"), 0, "the request after the big read");
        assert_eq!(c.write(0, &big), EINVAL);
        c.send(CMD_READ, 0, 7, 0, 8192);
        let data = read_data(&mut c, 7, 0, 8192);
        assert!(
            data[..4096].iter().all(|&b| b == 0),
            "the refused write landed"
        );
        assert_eq!(&data[4096..4100], b"next");
    }
    server
        .log
        .wait_for(&["refused READ at offset 0, length 44040192", "sent EINVAL"]);
}

#[test]
fn out_of_range_requests_get_the_right_errors() {
    let server = TestServer::start();
    let mut c = RawClient::go(server.connect(), "odd", false);
    let size = c.size;
    assert_eq!(size, (1 << 20) + 123);
    assert_eq!(c.read(size - 10, 10), Ok(vec![0; 10]));
    assert_eq!(c.read(size - 10, 11), Err(EINVAL));
    assert_eq!(c.read(size, 1), Err(EINVAL));
    assert_eq!(c.read(u64::MAX - 1, 4), Err(EINVAL));
    assert_eq!(c.write(size - 2, b"abc"), ENOSPC);
    assert_eq!(c.write(u64::MAX, b"abc"), ENOSPC);
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, size, 1, &[]), ENOSPC);
    assert_eq!(c.command(CMD_TRIM, 0, size - 1, 2, &[]), EINVAL);
    assert_eq!(c.command(CMD_CACHE, 0, size - 1, 2, &[]), EINVAL);
    assert_eq!(c.command(CMD_CACHE, 0, 0, 4096, &[]), 0);
    assert_eq!(c.read(0, 0), Err(EINVAL));
    assert_eq!(c.write(0, b""), EINVAL);
    assert_eq!(c.command(CMD_TRIM, 0, 0, 0, &[]), EINVAL);
    // The last partial block works.
    assert_eq!(c.write(size - 3, b"end"), 0);
    assert_eq!(c.read(size - 3, 3), Ok(b"end".to_vec()));

    let mut ro = RawClient::go(server.connect(), "ro", false);
    assert_eq!(ro.write(0, b"x"), EPERM);
    assert_eq!(ro.command(CMD_TRIM, 0, 0, 4096, &[]), EPERM);
    assert_eq!(ro.command(CMD_WRITE_ZEROES, 0, 0, 4096, &[]), EPERM);
    assert_eq!(ro.read(0, 16), Ok(pattern(0, 16)));
    assert_eq!(ro.command(CMD_FLUSH, 0, 0, 0, &[]), 0);
}

#[test]
fn half_written_requests_and_vanishing_clients_hurt_no_one() {
    let server = TestServer::start();
    let bystander = Bystander::start(&server);
    for cut in [1usize, 10, 27, 28 + 100] {
        let mut c = RawClient::go(server.connect(), "disk", false);
        let mut req = Request {
            flags: 0,
            command: CMD_WRITE,
            handle: 1,
            offset: 0,
            len: 4096,
        }
        .pack()
        .to_vec();
        req.extend_from_slice(&[9u8; 4096]);
        c.s.write_all(&req[..cut]).unwrap();
        drop(c);
    }
    // Many reads in flight, then gone without reading a single reply.
    for _ in 0..5 {
        let mut c = RawClient::go(server.connect(), "disk", true);
        for h in 0..40 {
            c.send(CMD_READ, 0, h, h * (1 << 20), 1 << 20);
        }
        drop(c);
    }
    // Writes in flight, then gone.
    let mut c = RawClient::go(server.connect(), "disk", false);
    for h in 0..20u64 {
        c.send(CMD_WRITE, 0, h, h * 65536, 65536);
        c.s.write_all(&pattern(h, 65536)).unwrap();
    }
    drop(c);
    // Mid-handshake, mid-option.
    let mut s = RawClient::greet(server.connect());
    let header = OptionHeader {
        option: OPT_GO,
        len: 0,
    };
    s.write_all(&header.pack()[..OptionHeader::LEN / 2])
        .unwrap();
    drop(s);
    drop(server.connect());

    std::thread::sleep(Duration::from_millis(200));
    assert!(bystander.finish() > 0);
    // The server still accepts and serves.
    let mut c = RawClient::go(server.connect(), "ro", false);
    assert_eq!(c.read(4096, 8), Ok(pattern(4096, 8)));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn a_thousand_idle_connections_do_not_starve_a_busy_one() {
    let server = TestServer::start();
    let bystander = Bystander::start(&server);
    let mut idle = Vec::new();
    for i in 0..1000 {
        let s = server.connect();
        // A third never speak, a third stop after the greeting, a third sit in transmission.
        match i % 3 {
            0 => idle.push(s),
            1 => idle.push(RawClient::greet(s)),
            _ => idle.push(RawClient::go(s, "ro", false).s),
        }
    }
    let mut c = RawClient::go(server.connect(), "ro", false);
    assert_eq!(c.read(12345, 100), Ok(pattern(12345, 100)));
    assert!(bystander.finish() > 0);
    // Shutdown wakes every idle connection and still returns cleanly, with a commit.
    let catalog = server.catalog.clone();
    server.shutdown().expect("clean shutdown");
    assert_eq!(
        catalog.flush_alls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    drop(idle);
}

#[test]
fn shutdown_finishes_in_flight_requests_and_commits() {
    let server = TestServer::start();
    let mut c = RawClient::go(server.connect(), "disk", false);
    for h in 0..16u64 {
        c.send(CMD_WRITE, CMD_FLAG_FUA, h, h * 65536, 65536);
        c.s.write_all(&pattern(h, 65536)).unwrap();
    }
    let catalog = server.catalog.clone();
    let stopper = std::thread::spawn(move || server.shutdown());
    let mut seen = Vec::new();
    for _ in 0..16 {
        match c.reply() {
            Reply::Simple { error: 0, handle } => seen.push(handle),
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, (0..16).collect::<Vec<_>>());
    stopper.join().unwrap().expect("clean shutdown");
    assert_eq!(
        catalog.flush_alls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    for h in 0..16u64 {
        assert_eq!(
            catalog.device("disk").contents(h * 65536, 65536),
            pattern(h, 65536)
        );
    }
    assert!(c.is_closed());
}

#[test]
fn a_client_that_never_reads_replies_cannot_hold_shutdown() {
    let config = thinlayer::nbd::ServerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..Default::default()
    };
    let server = TestServer::start_with(MemCatalog::standard(), config);
    let mut c = RawClient::go(server.connect(), "disk", false);
    // 32 MiB reads until the socket buffers and the in-flight bound are full.
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    for h in 0..200u64 {
        let r = Request {
            flags: 0,
            command: CMD_READ,
            handle: h,
            offset: 0,
            len: 32 << 20,
        };
        if c.s.write_all(&r.pack()).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    server.shutdown().expect("clean shutdown");
    // It did have to wait out the grace period (the client really was stuck)...
    assert!(started.elapsed() >= Duration::from_millis(300));
    // ...and no longer.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited on a stalled client"
    );
}

#[test]
fn a_silent_client_is_logged_as_a_handshake_timeout() {
    let config = thinlayer::nbd::ServerConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let server = TestServer::start_with(MemCatalog::standard(), config);
    // Reads the greeting, then says nothing.
    let s = RawClient::greet_only(server.connect());
    let line = server
        .log
        .wait_for(&["unix client #1: handshake timed out (nothing received for 0.2 s)"]);
    assert!(!line.contains("os error"), "{line}");
    assert!(RawClient {
        s,
        structured: false,
        size: 0,
        flags: 0
    }
    .is_closed());
}

#[test]
fn refused_requests_are_logged_with_their_reason_and_the_client_gets_only_the_errno() {
    let server = TestServer::start();
    let mut c = RawClient::go(server.connect(), "odd", true);
    let size = c.size;
    assert_eq!(c.command(CMD_READ, 0, size - 10, 11, &[]), EINVAL);
    let line = server.log.wait_for(&["refused READ"]);
    assert_eq!(
        line,
        format!(
            "nbd: unix client #1 export \"odd\": refused READ at offset {}, length 11: \
             past the end of the export ({size} bytes); sent EINVAL",
            size - 10
        )
    );
    // The error chunk carries no reason: that is for the operator.
    c.send(CMD_TRIM, CMD_FLAG_NO_HOLE, 2, 0, 4096);
    let reply = c.reply();
    let Chunk::Error { error, message } = reply.chunk() else {
        panic!("{reply:?}")
    };
    assert_eq!((error, message), (EINVAL, "invalid request"));
    server
        .log
        .wait_for(&["refused TRIM at offset 0, length 4096, flags 0x2: flags 0x2 not supported"]);

    let mut ro = RawClient::go(server.connect(), "ro", false);
    assert_eq!(ro.write(0, b"x"), EPERM);
    server.log.wait_for(&[
        "unix client #2 export \"ro\": refused WRITE at offset 0, length 1",
        "the export is read-only; sent EPERM",
    ]);

    // A client cannot flood the log: after five, errors are only counted.
    for _ in 0..20 {
        assert_eq!(ro.write(0, b"x"), EPERM);
    }
    server
        .log
        .wait_for(&["client #2", "further errors are counted"]);
    let logged = |s: &TestServer| {
        s.log
            .all()
            .iter()
            .filter(|l| l.contains("client #2") && l.contains("refused"))
            .count()
    };
    assert_eq!(logged(&server), 5);
    ro.send(CMD_DISC, 0, 0, 0, 0);
    server.log.wait_for(&[
        "client #2",
        "disconnected",
        "after 22 requests",
        "21 errors",
    ]);
}

#[test]
fn the_serve_command_logs_a_refused_request_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    support::tl(&pool, &["init"]);
    support::tl(&pool, &["create", "disk", "--size", "1M"]);
    let sock = dir.path().join("nbd.sock");
    let stderr = dir.path().join("serve.err");
    let mut serve = std::process::Command::new(support::bin())
        .arg("--pool")
        .arg(&pool)
        .args(["serve", "--no-keeper", "--socket"])
        .arg(&sock)
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    support::wait_for(&sock);
    let mut c = RawClient::go(
        std::os::unix::net::UnixStream::connect(&sock).unwrap(),
        "disk",
        false,
    );
    assert_eq!(c.read(c.size - 1, 2), Err(EINVAL));
    c.send(CMD_DISC, 0, 0, 0, 0);
    assert!(c.is_closed());
    // SAFETY: signalling our own child, by its pid.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    assert!(serve.wait().unwrap().success());
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        log.contains(
            "nbd: unix client #1 export \"disk\": refused READ at offset 1048575, length 2: \
             past the end of the export (1048576 bytes); sent EINVAL"
        ),
        "{log}"
    );
}
