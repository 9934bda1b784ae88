//! A listening socket taken over from a descriptor (one passed by a previous server process
//! on restart, or by a service manager), so no client ever finds the address unbound.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

pub enum Listening {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Takes over `fd`, which must be a listening stream socket, Unix or TCP.
pub fn inherit(fd: OwnedFd) -> io::Result<Listening> {
    let raw = fd.as_raw_fd();
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {raw}: {why}"));
    if sockopt(raw, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(bad("not a stream socket"));
    }
    if sockopt(raw, libc::SO_ACCEPTCONN)? == 0 {
        return Err(bad("not listening"));
    }
    match sockopt(raw, libc::SO_DOMAIN)? {
        libc::AF_UNIX => Ok(Listening::Unix(UnixListener::from(fd))),
        libc::AF_INET | libc::AF_INET6 => Ok(Listening::Tcp(TcpListener::from(fd))),
        d => Err(bad(&format!("socket family {d}, neither Unix nor TCP"))),
    }
}

/// An integer SOL_SOCKET option of `fd`.
fn sockopt(fd: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, an int as these options expect.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_over_unix_and_tcp_listeners_and_refuses_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let u = UnixListener::bind(dir.path().join("s")).unwrap();
        assert!(matches!(inherit(u.into()).unwrap(), Listening::Unix(_)));
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(inherit(t.into()).unwrap(), Listening::Tcp(_)));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(inherit(f.into()).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = inherit(a.into()).err().unwrap();
        assert!(e.to_string().contains("not listening"), "{e}");
    }
}
