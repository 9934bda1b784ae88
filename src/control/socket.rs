//! The control socket file. It is owner-only from its first moment and appears at its path
//! only once it accepts: it is bound inside a private directory, made 0600, and then
//! hard-linked into place. A service manager (or the CLI) that sees the path can connect.
//!
//! Hard-linking rather than renaming makes "exactly one server publishes here" atomic: link
//! fails if the name exists, where rename would silently replace a server that won a race.

use crate::error::{Error, Result};
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Bytes of a Unix socket path, without the terminating NUL (`sockaddr_un.sun_path`).
const SUN_PATH_MAX: usize = 107;

/// Where a pool's control socket lives unless `serve --control` says: `POOL.ctl`.
pub fn default_path(pool: &Path) -> PathBuf {
    let mut p = pool.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Who is on the other end of a connection, as the kernel recorded it at connect().
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} uid {}", self.pid, self.uid)
    }
}

/// SO_PEERCRED of a connected Unix socket.
pub fn peer_of(sock: &UnixStream) -> io::Result<Peer> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `c`, a ucred as SO_PEERCRED expects.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut c as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}

/// The server's euid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A file's identity, to tell our socket file from one that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64);

impl FileId {
    fn of(path: &Path) -> io::Result<FileId> {
        let m = fs::symlink_metadata(path)?;
        Ok(FileId(m.dev(), m.ino()))
    }
}

/// A bound, listening, published control socket. Dropping it removes the file, if the file
/// at the path is still this socket.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    pool: String,
    /// The file we put at `path`, until it is removed.
    published: Mutex<Option<FileId>>,
}

impl ControlSocket {
    /// Binds the control socket of `pool` at `path`. A live socket there (one that accepts)
    /// is `Busy`; a stale one (connection refused: its server died) is replaced; anything
    /// else at the path is left alone and refused.
    pub fn bind(path: &Path, pool: &Path) -> Result<ControlSocket> {
        let ctx = |what: &str| format!("control socket {}: {what}", path.display());
        let stale = probe(path)?;
        let tmp = PrivateDir::beside(path)?;
        let listener =
            UnixListener::bind(&tmp.socket).map_err(|e| Error::io(ctx("binding it"), e))?;
        // Within the private directory nobody else could connect while the mode was wider.
        fs::set_permissions(&tmp.socket, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(ctx("making it owner-only"), e))?;
        publish(&tmp.socket, path, stale)?;
        let id = FileId::of(path).map_err(|e| Error::io(ctx("after publishing it"), e))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            pool: pool.display().to_string(),
            published: Mutex::new(Some(id)),
        })
    }

    /// A control socket another process bound and published at `path`, handed over by
    /// `thinlayer restart` as its listening descriptor. The file at `path` must still be
    /// that socket; it is removed when this is dropped, like one bound here.
    pub fn adopt(listener: UnixListener, path: &Path, pool: &Path) -> Result<ControlSocket> {
        let id = FileId::of(path)
            .map_err(|e| Error::io(format!("control socket {}: handed over", path.display()), e))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            pool: pool.display().to_string(),
            published: Mutex::new(Some(id)),
        })
    }

    /// The listening descriptor, to hand to the next server process.
    pub fn listener_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pool this socket controls, as messages name it.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// A second handle on the listening socket, for a server that accepts on its own (the
    /// containerd snapshotter's runtime); the file stays published until this is dropped.
    pub fn listener_clone(&self) -> Result<UnixListener> {
        self.listener
            .try_clone()
            .map_err(|e| Error::io(format!("socket {}: duplicating it", self.path.display()), e))
    }

    pub(super) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Removes the socket file so new clients stop coming (they open the pool themselves, and
    /// find it busy until the server exits). Leaves a file that is no longer ours.
    pub(super) fn unpublish(&self) {
        if let Some(id) = self.published.lock().unwrap().take() {
            let _ = remove_if_same(&self.path, id);
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.unpublish();
    }
}

/// What is at `path` now: nothing (`None`), a stale socket (`Some`), or an error for a live
/// socket or a file that is not a socket.
fn probe(path: &Path) -> Result<Option<FileId>> {
    let shown = path.display();
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("control socket {shown}"), e)),
    };
    if !m.file_type().is_socket() {
        return Err(Error::Conflict(format!(
            "control socket {shown}: the path exists and is not a socket; not replacing it"
        )));
    }
    match UnixStream::connect(path) {
        Ok(s) => {
            let by = peer_of(&s).map_or(String::new(), |p| format!(" by pid {}", p.pid));
            Err(Error::Busy(format!(
                "control socket {shown} is in use{by}: another server is running there"
            )))
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            Ok(Some(FileId(m.dev(), m.ino())))
        }
        Err(e) => Err(Error::io(format!("control socket {shown}: probing it"), e)),
    }
}

/// Links `tmp` to `path`. A stale socket is removed first (only the very file we probed).
/// If another server publishes between our probe and our link, the link fails and the new
/// probe says Busy.
fn publish(tmp: &Path, path: &Path, mut stale: Option<FileId>) -> Result<()> {
    let ctx = || format!("control socket {}: publishing it", path.display());
    for _ in 0..3 {
        if let Some(id) = stale {
            remove_if_same(path, id).map_err(|e| Error::io(ctx(), e))?;
        }
        match fs::hard_link(tmp, path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => stale = probe(path)?,
            Err(e) => return Err(Error::io(ctx(), e)),
        }
    }
    Err(Error::Busy(format!(
        "control socket {}: the path keeps changing under us (other servers starting?)",
        path.display()
    )))
}

fn remove_if_same(path: &Path, id: FileId) -> io::Result<()> {
    match FileId::of(path) {
        Ok(now) if now == id => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// A 0700 directory beside the socket's path, holding the socket until it is published;
/// removed (with the temporary name) when dropped.
struct PrivateDir {
    dir: PathBuf,
    socket: PathBuf,
}

impl PrivateDir {
    fn beside(path: &Path) -> Result<PrivateDir> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let parent = path.parent().unwrap_or(Path::new(""));
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".ctl.{}.{n}", std::process::id()));
        let socket = dir.join("s");
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(Error::InvalidInput(format!(
                "control socket {}: the path is too long; binding needs {} bytes for a name beside it and a Unix socket path holds {SUN_PATH_MAX}: choose a shorter --control path",
                path.display(),
                socket.as_os_str().len()
            )));
        }
        // A leftover from a crashed process that had our pid: it holds nothing of value.
        let _ = fs::remove_file(&socket);
        let _ = fs::remove_dir(&dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                Error::io(
                    format!(
                        "control socket {}: creating {}",
                        path.display(),
                        dir.display()
                    ),
                    e,
                )
            })?;
        Ok(PrivateDir { dir, socket })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_path_is_beside_the_pool() {
        assert_eq!(
            default_path(Path::new("/var/lib/thinlayer/pool")),
            Path::new("/var/lib/thinlayer/pool.ctl")
        );
    }

    #[test]
    fn bind_publishes_owner_only_and_drop_removes_only_our_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.ctl");
        let s = ControlSocket::bind(&path, Path::new("/p")).unwrap();
        let m = fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o777, 0o600);
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["p.ctl"], "no temporary names left behind");
        drop(s);
        assert!(!path.exists());

        // A file that replaced ours survives our exit.
        let s = ControlSocket::bind(&path, Path::new("/p")).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"someone else's").unwrap();
        drop(s);
        assert_eq!(fs::read(&path).unwrap(), b"someone else's");
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.ctl");
        fs::write(&path, b"data").unwrap();
        let e = ControlSocket::bind(&path, Path::new("/p")).err().unwrap();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn a_too_long_path_is_refused_clearly() {
        let long = format!("/tmp/{}/p.ctl", "d".repeat(110));
        let e = ControlSocket::bind(Path::new(&long), Path::new("/p"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("the path is too long"), "{e}");
    }
}
