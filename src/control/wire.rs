//! Framing on the control socket: one message is a u32 little-endian length and that many
//! bytes of JSON. File descriptors travel beside a message as SCM_RIGHTS ancillary data.
//!
//! Each side reads exactly one message at a time, never past its end: ancillary data is tied
//! to the bytes it was sent with, so reading exactly keeps a message's descriptors with it.

use serde::{de::DeserializeOwned, Serialize};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Largest message a server reads: requests are a name or two, so anything bigger is a
/// confused or hostile peer, and the server (often root) should not buffer it.
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest message a client reads: `ls` of a pool with many thousand layers, or `check` of a
/// badly damaged one, is far above MAX_REQUEST yet must still come through.
pub const MAX_REPLY: usize = 64 << 20;
/// Descriptors one message may carry. Requests need at most one; a restart's hand-over up to
/// six (NBD, control, FUSE, containerd, crash journal, keeper link); the rest leave room to
/// tell "too many" apart from the kernel truncating them.
const MAX_FDS: usize = 8;

const HEADER: usize = 4;

/// A whole message, length first, ready for `send`.
pub fn encode(msg: &impl Serialize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; HEADER];
    serde_json::to_writer(&mut buf, msg).map_err(io::Error::other)?;
    let len = u32::try_from(buf.len() - HEADER)
        .map_err(|_| invalid(format!("a message of {} bytes", buf.len() - HEADER)))?;
    buf[..HEADER].copy_from_slice(&len.to_le_bytes());
    Ok(buf)
}

/// The body's length, from a message made by `encode`.
pub fn body_len(frame: &[u8]) -> usize {
    frame.len() - HEADER
}

/// Parse a message body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> serde_json::Result<T> {
    serde_json::from_slice(body)
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Sends a message made by `encode`, with `fds` attached to its first byte.
pub fn send(sock: &UnixStream, frame: &[u8], fds: &[BorrowedFd]) -> io::Result<()> {
    assert!(
        fds.len() <= MAX_FDS,
        "{} descriptors in one message",
        fds.len()
    );
    let mut sent = 0;
    while sent < frame.len() {
        // Descriptors go with the first chunk only; a short send leaves them delivered.
        let attach = if sent == 0 { fds } else { &[] };
        match send_some(sock.as_raw_fd(), &frame[sent..], attach) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Aligned room for the control message of up to MAX_FDS descriptors.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let n = unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) } as usize;
    assert!(n <= size_of::<CmsgBuf>());
    n
}

fn send_some(fd: RawFd, buf: &[u8], fds: &[BorrowedFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: a zeroed msghdr is empty; every pointer set below outlives the sendmsg call,
    // and the control message is written inside `cmsg`, which CMSG_SPACE said is big enough.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cmsg.0.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, f) in fds.iter().enumerate() {
                data.add(i).write_unaligned(f.as_raw_fd());
            }
        }
        // MSG_NOSIGNAL: a vanished peer is an EPIPE error here, not a SIGPIPE for the process.
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads one message of at most `limit` bytes: its body and the descriptors that came with
/// it. `None` is a clean end of stream between messages.
pub fn recv(sock: &UnixStream, limit: usize) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER];
    if !recv_exact(sock.as_raw_fd(), &mut header, &mut fds, true)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > limit {
        // `fds` is dropped here, which closes whatever came along.
        return Err(invalid(format!(
            "a control message of {len} bytes is over the limit of {limit} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    recv_exact(sock.as_raw_fd(), &mut body, &mut fds, false)?;
    Ok(Some((body, fds)))
}

/// Fills `buf`, collecting descriptors into `fds`. Returns false if the stream ended before
/// the first byte and `eof_ok`; an end anywhere else is an error.
fn recv_exact(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>, eof_ok: bool) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match recv_some(fd, &mut buf[got..], fds) {
            Ok(0) if got == 0 && eof_ok => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed in the middle of a message",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn recv_some(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: as in send_some; the kernel writes at most msg_controllen bytes into `cmsg`.
    let (n, flags) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cmsg_space(MAX_FDS) as _;
        // MSG_CMSG_CLOEXEC: a descriptor received here must not leak into a child the
        // server starts on another thread before we wrap it.
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n >= 0 {
            take_fds(&msg, fds);
        }
        (n, msg.msg_flags)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::MSG_CTRUNC != 0 {
        // The kernel closed those that did not fit; the ones we got close with `fds`.
        return Err(invalid(format!(
            "a control message came with more than {MAX_FDS} file descriptors"
        )));
    }
    Ok(n as usize)
}

/// Takes ownership of every descriptor in `msg`'s control data, first thing, so that every
/// later path (including errors) closes them.
///
/// # Safety
/// `msg` must be a msghdr just filled in by a successful recvmsg.
unsafe fn take_fds(msg: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    let mut c = libc::CMSG_FIRSTHDR(msg);
    while !c.is_null() {
        if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
            let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
            let data = libc::CMSG_DATA(c) as *const RawFd;
            for i in 0..bytes / size_of::<RawFd>() {
                fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
            }
        }
        c = libc::CMSG_NXTHDR(msg, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn a_message_arrives_whole_with_its_length() {
        let (a, b) = pair();
        let frame = encode(&serde_json::json!({"ls": null})).unwrap();
        assert_eq!(frame[..4], (body_len(&frame) as u32).to_le_bytes());
        send(&a, &frame, &[]).unwrap();
        let (body, fds) = recv(&b, MAX_REQUEST).unwrap().unwrap();
        assert_eq!(body, &frame[4..]);
        assert!(fds.is_empty());
        drop(a);
        assert!(
            recv(&b, MAX_REQUEST).unwrap().is_none(),
            "clean end of stream"
        );
    }

    #[test]
    fn descriptors_stay_with_their_message_and_are_usable() {
        let (a, b) = pair();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"image bytes").unwrap();
        let first = encode(&"with a file").unwrap();
        let second = encode(&"without").unwrap();
        send(&a, &first, &[file.as_fd()]).unwrap();
        send(&a, &second, &[]).unwrap();
        drop(file);

        let (body, fds) = recv(&b, MAX_REQUEST).unwrap().unwrap();
        assert_eq!(decode::<String>(&body).unwrap(), "with a file");
        assert_eq!(fds.len(), 1);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "image bytes");
        // SAFETY: fcntl on a descriptor we own.
        let fl = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            fl & libc::FD_CLOEXEC,
            0,
            "received descriptors are close-on-exec"
        );

        let (body, fds) = recv(&b, MAX_REQUEST).unwrap().unwrap();
        assert_eq!(decode::<String>(&body).unwrap(), "without");
        assert!(fds.is_empty(), "the next message carries nothing");
    }

    #[test]
    fn too_many_descriptors_is_an_error() {
        let (a, b) = pair();
        let f = tempfile::tempfile().unwrap();
        // Past MAX_FDS through the raw call, as a hostile peer would send them.
        let many: Vec<BorrowedFd> = (0..MAX_FDS + 4).map(|_| f.as_fd()).collect();
        let frame = encode(&"x").unwrap();
        let mut cmsg = vec![0u64; 16];
        // SAFETY: as in send_some, with a control buffer sized for `many`.
        unsafe {
            let mut iov = libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
            let len = many.len() * size_of::<RawFd>();
            msg.msg_controllen = libc::CMSG_SPACE(len as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
            let data = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in many.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
            assert!(libc::sendmsg(a.as_raw_fd(), &msg, 0) > 0);
        }
        let e = recv(&b, MAX_REQUEST).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("more than {MAX_FDS} file descriptors")),
            "{e}"
        );
    }

    #[test]
    fn an_oversize_message_is_refused_without_reading_it() {
        let (mut a, b) = pair();
        a.write_all(&((MAX_REQUEST + 1) as u32).to_le_bytes())
            .unwrap();
        let e = recv(&b, MAX_REQUEST).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            format!(
                "a control message of {} bytes is over the limit of {MAX_REQUEST} bytes",
                MAX_REQUEST + 1
            )
        );
    }

    #[test]
    fn a_message_cut_short_is_an_error_not_an_end() {
        let (mut a, b) = pair();
        a.write_all(&10u32.to_le_bytes()).unwrap();
        a.write_all(b"{\"l").unwrap();
        drop(a);
        let e = recv(&b, MAX_REQUEST).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_large_message_crosses_in_pieces() {
        // Bigger than a socket buffer: send and receive both loop over short transfers.
        let (a, b) = pair();
        let big = "x".repeat(4 << 20);
        let frame = encode(&big).unwrap();
        let t = std::thread::spawn(move || send(&a, &frame, &[]).unwrap());
        let (body, _) = recv(&b, MAX_REPLY).unwrap().unwrap();
        t.join().unwrap();
        assert_eq!(decode::<String>(&body).unwrap(), big);
    }
}
