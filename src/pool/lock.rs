//! One process owns a pool at a time. The lock is an flock on a sidecar file `POOL.lock`, which
//! also records who holds it so a second process can name the holder in its error.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct PoolLock {
    file: File,
    path: PathBuf,
}

pub fn lock_path(pool: &Path) -> PathBuf {
    let mut p = pool.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl PoolLock {
    /// Take the lock for `pool`, recording `purpose` (e.g. the command line) for others to see.
    pub fn acquire(pool: &Path, purpose: &str) -> Result<PoolLock> {
        let path = lock_path(pool);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening lock file {}", path.display()), e))?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    holder.to_string()
                };
                return Err(Error::Busy(format!(
                    "pool {} is in use by {holder}; stop it first (ls, history, df and export still work while it runs)",
                    pool.display()
                )));
            }
            return Err(Error::io(format!("locking {}", path.display()), e));
        }
        file.set_len(0).ok();
        file.rewind().ok();
        let _ = write!(file, "pid {} ({})", std::process::id(), purpose);
        let _ = file.flush();
        Ok(PoolLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PoolLock {
    fn drop(&mut self) {
        // Clear the holder note; the flock itself goes with the descriptor.
        let _ = self.file.set_len(0);
    }
}
