//! Reply shapes a conforming client depends on: structured reads split around holes (or not,
//! under DF), block status with and without REQ_ONE, device errors as error replies.

mod nbd_common;

use nbd_common::*;
use std::io::Read;
use std::sync::atomic::Ordering::SeqCst;
use thinlayer::nbd::proto::*;

/// The chunks answering `handle`, up to the one flagged DONE.
fn chunks(c: &mut RawClient, handle: u64) -> Vec<Reply> {
    let mut out = Vec::new();
    loop {
        match c.reply() {
            reply @ Reply::Chunk {
                flags, handle: h, ..
            } => {
                assert_eq!(h, handle);
                out.push(reply);
                if flags & REPLY_FLAG_DONE != 0 {
                    return out;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn flags(reply: &Reply) -> u16 {
    match reply {
        Reply::Chunk { flags, .. } => *flags,
        other => panic!("not a chunk: {other:?}"),
    }
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
    assert_eq!(flags(&got[0]), 0);
    let Chunk::OffsetData { offset, data } = got[0].chunk() else {
        panic!("{:?}", got[0].chunk().kind())
    };
    assert_eq!(offset, 1 << 20);
    assert!(data == pattern(1 << 20, 1 << 20));
    assert_eq!(flags(&got[1]), REPLY_FLAG_DONE);
    let hole = Chunk::OffsetHole {
        offset: 2 << 20,
        len: 1 << 20,
    };
    assert_eq!(got[1].chunk(), hole);

    c.send(CMD_READ, CMD_FLAG_DF, 2, 1 << 20, 2 << 20);
    let got = chunks(&mut c, 2);
    assert_eq!(got.len(), 1, "DF: one chunk");
    let Chunk::OffsetData { data, .. } = got[0].chunk() else {
        panic!("{:?}", got[0].chunk().kind())
    };
    assert_eq!(data.len(), 2 << 20);
    assert!(data[1 << 20..].iter().all(|&b| b == 0));
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
    let Chunk::BlockStatus {
        context,
        descriptors,
    } = got[0].chunk()
    else {
        panic!("{:?}", got[0].chunk().kind())
    };
    assert_eq!(context, 1, "context id");
    let descriptors: Vec<(u32, u32)> = descriptors.iter().map(|d| (d.len, d.flags)).collect();
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
    let one_data_extent = Chunk::BlockStatus {
        context: 1,
        descriptors: vec![Descriptor {
            len: 4096,
            flags: 0,
        }],
    };
    assert_eq!(got[0].chunk(), one_data_extent);
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
    let Chunk::Error { error, .. } = got[0].chunk() else {
        panic!("{:?}", got[0].chunk().kind())
    };
    assert_eq!(error, EIO);
    c.send(CMD_READ, 0, 6, 0, 16);
    let got = chunks(&mut c, 6);
    let zeros = Chunk::OffsetData {
        offset: 0,
        data: &[0; 16],
    };
    assert_eq!(got[0].chunk(), zeros);
}

/// The store's message names pool paths and block numbers: the operator's business. The
/// client gets the errno and a generic text; the server's log gets the detail.
#[test]
fn an_error_reply_carries_the_errno_and_a_generic_text_and_the_log_the_detail() {
    let server = TestServer::start();
    let dev = server.catalog.device("disk");
    dev.fail_reads_from.store(1 << 20, SeqCst);
    let mut c = RawClient::go(server.connect(), "disk", true);
    c.send(CMD_READ, 0, 5, 1 << 20, 4096);
    let got = chunks(&mut c, 5);
    let Chunk::Error { error, message } = got[0].chunk() else {
        panic!("{:?}", got[0].chunk().kind())
    };
    assert_eq!(error, EIO);
    assert_eq!(message, "input/output error");
    server.log.wait_for(&[
        "READ at offset 1048576, length 4096 failed",
        "pool /srv/pools/secret.pool",
        "(pool block 256)",
        "sent EIO",
    ]);
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
    let mut reply = [0u8; ExportNameReply::LEN];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(ExportNameReply::unpack(&reply).unwrap().size, 1 << 20);
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
