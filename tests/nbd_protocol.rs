//! Reply shapes a conforming client depends on: structured reads split around holes (or not,
//! under DF), block status with and without REQ_ONE, device errors as error replies.

mod nbd_common;

use nbd_common::*;
use std::io::Read;
use std::sync::atomic::Ordering::SeqCst;
use thinlayer::nbd::proto::*;

fn chunks(c: &mut RawClient, handle: u64) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        match c.reply() {
            Reply::Chunk {
                flags,
                kind,
                handle: h,
                payload,
            } => {
                assert_eq!(h, handle);
                out.push((flags, kind, payload));
                if flags & REPLY_FLAG_DONE != 0 {
                    return out;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

#[test]
fn structured_reads_send_holes_as_hole_chunks_unless_df() {
    let server = TestServer::start();
    let mut c = RawClient::go(server.connect(), "ro", true);
    assert_ne!(c.flags & TF_SEND_DF, 0);
    // "ro" holds data in its first 2 MiB and nothing after.
    c.send(CMD_READ, 0, 1, 1 << 20, 2 << 20);
    let got = chunks(&mut c, 1);
    assert_eq!(got.len(), 2);
    let (flags, kind, payload) = &got[0];
    assert_eq!((*flags, *kind), (0, REPLY_TYPE_OFFSET_DATA));
    assert_eq!(be64(payload), 1 << 20);
    assert!(payload[8..] == pattern(1 << 20, 1 << 20)[..]);
    let (flags, kind, payload) = &got[1];
    assert_eq!((*flags, *kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE));
    assert_eq!((be64(payload), be32(&payload[8..])), (2 << 20, 1 << 20));

    c.send(CMD_READ, CMD_FLAG_DF, 2, 1 << 20, 2 << 20);
    let got = chunks(&mut c, 2);
    assert_eq!(got.len(), 1, "DF: one chunk");
    assert_eq!(got[0].1, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(got[0].2.len(), 8 + (2 << 20));
    assert!(got[0].2[8 + (1 << 20)..].iter().all(|&b| b == 0));
}

#[test]
fn block_status_describes_allocation_and_honours_req_one() {
    let server = TestServer::start();
    let disk = server.catalog.device("disk").clone();
    disk.fill(8192, &[1; 4096]);
    let mut c = RawClient::go(server.connect(), "disk", true);
    assert_eq!(
        c.command(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 16384, 8192, &[]),
        0
    );

    c.send(CMD_BLOCK_STATUS, 0, 3, 0, 32768);
    let got = chunks(&mut c, 3);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, REPLY_TYPE_BLOCK_STATUS);
    let p = &got[0].2;
    assert_eq!(be32(p), 1, "context id");
    let descriptors: Vec<(u32, u32)> = p[4..].chunks(8).map(|d| (be32(d), be32(&d[4..]))).collect();
    let hole = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        descriptors,
        [
            (8192, hole),
            (4096, 0),
            (4096, hole),
            (8192, STATE_ZERO),
            (8192, hole)
        ]
    );

    c.send(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 8192, 32768 - 8192);
    let got = chunks(&mut c, 4);
    assert_eq!(got[0].2[4..], [0, 0, 16, 0, 0, 0, 0, 0]);
}

#[test]
fn device_errors_become_error_replies_and_the_connection_goes_on() {
    let server = TestServer::start();
    server
        .catalog
        .device("disk")
        .fail_reads_from
        .store(1 << 20, SeqCst);

    let mut c = RawClient::go(server.connect(), "disk", false);
    assert_eq!(c.read((1 << 20) - 4096, 8192), Err(EIO));
    assert_eq!(c.read(0, 4096), Ok(vec![0; 4096]));

    let mut c = RawClient::go(server.connect(), "disk", true);
    c.send(CMD_READ, 0, 5, 1 << 20, 4096);
    let got = chunks(&mut c, 5);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, REPLY_TYPE_ERROR);
    assert_eq!(be32(&got[0].2), EIO);
    c.send(CMD_READ, 0, 6, 0, 16);
    let got = chunks(&mut c, 6);
    assert_eq!(got[0].2[8..], [0; 16]);
}

#[test]
fn export_name_option_and_the_default_export_work() {
    let server = TestServer::start_with(
        MemCatalog::of(vec![MemDevice::new("only", 1 << 20, false)]),
        Default::default(),
    );
    // NBD_OPT_EXPORT_NAME with "" picks the only export; no zeroes follow the reply.
    let mut s = RawClient::greet(server.connect());
    RawClient::send_option(&mut s, OPT_EXPORT_NAME, b"");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(be64(&reply), 1 << 20);
    let mut c = RawClient {
        s,
        structured: false,
        size: 1 << 20,
        flags: 0,
    };
    assert_eq!(c.write(0, b"hi"), 0);
    assert_eq!(c.read(0, 2), Ok(b"hi".to_vec()));
    c.send(CMD_DISC, 0, 0, 0, 0);
    assert!(c.is_closed());

    // An unknown name through EXPORT_NAME can only be refused by hanging up.
    let mut s = RawClient::greet(server.connect());
    RawClient::send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert!(RawClient {
        s,
        structured: false,
        size: 0,
        flags: 0
    }
    .is_closed());
}
