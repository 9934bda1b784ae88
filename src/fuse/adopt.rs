//! Serving a FUSE connection this process did not open: the `/dev/fuse` descriptor of a
//! mount another `thinlayer serve` made, handed over by `thinlayer restart` or kept by the
//! keeper after a crash. The kernel ended the connection's INIT exchange long ago with the
//! first process, but the FUSE crate only builds a session through that exchange. So the
//! session is built on one end of a socket pair that carries a made-up INIT (whose answer
//! nobody reads), and then the handed-over descriptor is put in that end's place, under the
//! same number; from then on the session reads the kernel's requests. What INIT settles
//! (maximum write size, capabilities) the kernel keeps from the first exchange; the session
//! keeps nothing from it that later requests depend on.
//!
//! Requests the previous process read but did not answer (it was killed, or held them at
//! its gate) are still the kernel's: `resend` (FUSE_NOTIFY_RESEND, Linux 6.9) queues them
//! again for this process. On older kernels they wait until their caller gives up.

use std::io;
#[cfg(feature = "fuse")]
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const FUSE_INIT: u32 = 26;
const FUSE_NOTIFY_RESEND: i32 = 7;
/// struct fuse_in_header (40 bytes) + struct fuse_init_in (64 bytes).
const INIT_LEN: usize = 104;

#[cfg(feature = "fuse")]
/// A session over `fd`, an initialised `/dev/fuse` connection. `fs` gets the made-up INIT
/// (its `init` settings go nowhere); `config.clone_fd` must be off (the clone ioctl is made
/// before the descriptor is in place).
pub fn session<FS: fuser::Filesystem>(
    fs: FS,
    fd: OwnedFd,
    config: &fuser::Config,
) -> io::Result<fuser::Session<FS>> {
    debug_assert!(!config.clone_fd);
    let (ours, theirs) = socket_pair()?;
    let init = made_up_init();
    // SAFETY: writing a buffer we own to a socket we own.
    let n = unsafe { libc::write(ours.as_raw_fd(), init.as_ptr().cast(), init.len()) };
    if n != init.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let session = fuser::Session::from_fd(fs, theirs, config.acl, config.clone())?;
    // The session's descriptor number now becomes the kernel connection.
    let slot = session.as_fd().as_raw_fd();
    // SAFETY: dup3 onto a descriptor the session owns; the old socket end closes atomically.
    if unsafe { libc::dup3(fd.as_raw_fd(), slot, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(session)
}

/// Ask the kernel to queue again the requests read from this connection and not answered.
/// `Ok(false)`: the kernel is too old to know how (before Linux 6.9).
#[allow(clippy::host_endian_bytes)] // The FUSE ABI is the host's byte order.
pub fn resend(fd: BorrowedFd) -> io::Result<bool> {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16u32.to_ne_bytes());
    out[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // unique 0: a notification.
    // SAFETY: writing a buffer we own to a descriptor we borrow.
    let n = unsafe { libc::write(fd.as_raw_fd(), out.as_ptr().cast(), out.len()) };
    if n == out.len() as isize {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) {
        return Ok(false);
    }
    Err(e)
}

fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just returned by socketpair.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// An INIT request as the kernel sends it: protocol 7.31, no capabilities offered.
#[allow(clippy::host_endian_bytes)] // The FUSE ABI is the host's byte order.
fn made_up_init() -> [u8; INIT_LEN] {
    let mut b = [0u8; INIT_LEN];
    let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    // fuse_in_header: len, opcode, unique (u64 at 8: 1), nodeid, uid, gid, pid, padding.
    put(0, INIT_LEN as u32);
    put(4, FUSE_INIT);
    put(8, 1);
    // fuse_init_in: major, minor, max_readahead, flags.
    put(40, 7);
    put(44, 31);
    put(48, 128 * 1024);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::host_endian_bytes)]
    fn the_made_up_init_has_the_length_its_header_says() {
        let b = made_up_init();
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), FUSE_INIT);
    }
}
