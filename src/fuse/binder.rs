//! The binder: a child process, started once, that makes the calls which wait on the server's
//! own FUSE session, on the server's request: binding a loop device to a live file (one
//! `LOOP_CONFIGURE`) and syncing a filesystem mounted over one (`syncfs`).
//!
//! Why a process and why a lasting one. Binding opens the live file and `LOOP_CONFIGURE`
//! syncs it; `syncfs` of an ext4 on a loop device over a live file waits for the loop
//! device's writes: all are requests to this server's own FUSE session. A server killed while
//! one of its threads waits in such a call cannot finish dying (the thread waits
//! uninterruptibly for requests no one will answer, and holds the FUSE descriptor open
//! meanwhile), so the keeper, which waits for it, never starts the next server that would
//! answer: a deadlock, seen in tests/containerd.rs's kills when the ioctl ran in the server,
//! and in tests/docker.rs's (`a_kill_during_a_usage_sync_...`) for `syncfs`. Another process
//! waits instead, and the next server answers it. `losetup` as that process cost 1.5 ms a
//! device, most of it starting the program, and a `docker build` pair binds seven
//! (docs/BENCHMARKS.md); the binder is started once and asked over a pipe.
//!
//! The child closes every descriptor it inherited but the pipe (the pool file's lock and
//! `/dev/fuse` among them must die with the server), serves one request at a time, and exits
//! at the end of its input: when the server stops or dies. A request the server gave up on
//! (it died meanwhile) may leave a device bound nobody recorded; the next start clears those
//! (`loops::clear_unmounted_under`), as for `losetup`.
//!
//! The protocol, all integers little-endian. Request: the operation (u8: `BIND` or `SYNCFS`),
//! flags (u8: 1 read-only, 2 direct I/O, for `BIND`), the path's length (u32), the path's
//! bytes. Answer: errno (i32, 0 for success), then a value (u32: the loop device's number for
//! `BIND`, 0 for `SYNCFS`) on success or a message's length (u32) and bytes on failure. The
//! child first writes `HELLO`, so a program that is not a binder is noticed at once.

use super::loops::LoopDevice;
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The hidden subcommand the child runs (`thinlayer loop-binder`).
pub const SUBCOMMAND: &str = "loop-binder";
const HELLO: &[u8; 8] = b"tlbind2\n";
const BIND: u8 = 1;
const SYNCFS: u8 = 2;
const READ_ONLY: u8 = 1;
const DIRECT_IO: u8 = 2;

const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` from linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` from linux/loop.h.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Bind a new loop device to `file` with one `LOOP_CONFIGURE` (read-only if asked, in
/// direct-I/O mode if asked, never autoclear: see `loops`). Runs in the child only.
fn configure(file: &Path, read_only: bool, direct_io: bool) -> std::io::Result<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(file)?;
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // SAFETY: a plain C struct of integers and byte arrays; all zeros is its empty value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    info.flags = if read_only { LO_FLAGS_READ_ONLY } else { 0 }
        | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 };
    // What `losetup -l` shows of an old-style binding; the kernel keeps the real path.
    let name = file.as_os_str().as_bytes();
    let n = name.len().min(info.file_name.len() - 1);
    info.file_name[..n].copy_from_slice(&name[..n]);
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // Another process may take the free device between the two calls: then ask again.
    let mut last = None;
    for _ in 0..64 {
        // SAFETY: an ioctl without an argument on a descriptor we own.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if number < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/dev/loop{number}"))
        {
            Ok(d) => d,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) } == 0 {
            return Ok(number as u32);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)))
}

/// `syncfs` of the filesystem mounted at `point`. In the child, or in a process with no
/// binder (`LiveFiles::syncfs`).
pub fn syncfs_at(point: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(point)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// The child's life (`thinlayer loop-binder`): answer requests on stdin until it ends.
/// Returns the process's exit code.
pub fn serve_child() -> i32 {
    // Nothing the server had open may live on here: not the pool's lock, not /dev/fuse.
    // SAFETY: closes descriptors only; 0-2 are the pipes and stderr.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = std::io::stdout().lock();
    if output
        .write_all(HELLO)
        .and_then(|_| output.flush())
        .is_err()
    {
        return 1;
    }
    loop {
        let mut head = [0u8; 2];
        match input.read_exact(&mut head) {
            Ok(()) => {}
            // The server stopped or died.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return 0,
            Err(_) => return 1,
        }
        let [op, flags] = head;
        let Ok(len) = read_u32(&mut input) else {
            return 1;
        };
        let mut path = vec![0; len as usize];
        if input.read_exact(&mut path).is_err() {
            return 1;
        }
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(&path));
        let done = match op {
            BIND => configure(&path, flags & READ_ONLY != 0, flags & DIRECT_IO != 0),
            SYNCFS => syncfs_at(&path).map(|()| 0),
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let mut answer = Vec::new();
        match done {
            Ok(value) => {
                answer.extend_from_slice(&0i32.to_le_bytes());
                answer.extend_from_slice(&value.to_le_bytes());
            }
            Err(e) => {
                let message = e.to_string();
                answer.extend_from_slice(&e.raw_os_error().unwrap_or(libc::EIO).to_le_bytes());
                answer.extend_from_slice(&(message.len() as u32).to_le_bytes());
                answer.extend_from_slice(message.as_bytes());
            }
        }
        if output
            .write_all(&answer)
            .and_then(|_| output.flush())
            .is_err()
        {
            return 1;
        }
    }
}

static PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Name the program that runs `loop-binder`: the thinlayer binary's `main` names itself. A
/// process that does not (a test embedding the library) binds with `losetup`.
pub fn set_program(program: PathBuf) {
    let _ = PROGRAM.set(program);
}

/// The server's side: the child, started on first use.
#[derive(Default)]
pub struct Binder {
    child: Option<(Child, ChildStdin, BufReader<ChildStdout>)>,
    /// Starting it failed once: not tried again.
    unavailable: bool,
}

impl Binder {
    fn start(&mut self) -> std::io::Result<()> {
        let program = match PROGRAM.get() {
            Some(p) if !self.unavailable => p,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "no loop binder",
                ))
            }
        };
        let started = self.spawn(program);
        if started.is_err() {
            self.unavailable = true;
        }
        started.map_err(|e| std::io::Error::new(std::io::ErrorKind::Unsupported, e))
    }

    fn spawn(&mut self, program: &Path) -> std::io::Result<()> {
        let mut child = Command::new(program)
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut hello = [0u8; HELLO.len()];
        if let Err(e) = stdout.read_exact(&mut hello).and_then(|_| {
            if &hello == HELLO {
                Ok(())
            } else {
                Err(std::io::Error::other("it did not introduce itself"))
            }
        }) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "{} {SUBCOMMAND} is not a loop binder: {e}",
                program.display()
            )));
        }
        self.child = Some((child, stdin, stdout));
        Ok(())
    }

    fn ask(&mut self, request: &[u8]) -> std::io::Result<Result<u32, (i32, String)>> {
        let (_, stdin, stdout) = self.child.as_mut().expect("started");
        stdin.write_all(request)?;
        stdin.flush()?;
        let mut errno = [0u8; 4];
        stdout.read_exact(&mut errno)?;
        let errno = i32::from_le_bytes(errno);
        let value = read_u32(stdout)?;
        if errno == 0 {
            return Ok(Ok(value));
        }
        let mut message = vec![0; value as usize];
        stdout.read_exact(&mut message)?;
        Ok(Err((errno, String::from_utf8_lossy(&message).into_owned())))
    }

    /// Ask the child for `op` on `path`, starting it if it is not running (or died: once
    /// more). `ErrorKind::Unsupported` if there is no binder to ask.
    fn request(&mut self, op: u8, flags: u8, path: &Path) -> std::io::Result<u32> {
        let bytes = path.as_os_str().as_bytes();
        let mut request = Vec::with_capacity(6 + bytes.len());
        request.extend_from_slice(&[op, flags]);
        request.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        request.extend_from_slice(bytes);
        let mut tries = 0;
        let answer = loop {
            if self.child.is_none() {
                self.start()?;
            }
            match self.ask(&request) {
                Ok(a) => break a,
                // The child is gone (killed by someone): a new one, once.
                Err(_) if tries == 0 => {
                    tries += 1;
                    self.stop();
                }
                Err(e) => {
                    self.stop();
                    return Err(e);
                }
            }
        };
        answer.map_err(|(errno, message)| {
            std::io::Error::new(std::io::Error::from_raw_os_error(errno).kind(), message)
        })
    }

    /// Bind a new loop device to `file` (see `configure`).
    pub fn bind(
        &mut self,
        file: &Path,
        read_only: bool,
        direct_io: bool,
    ) -> std::io::Result<LoopDevice> {
        let flags = if read_only { READ_ONLY } else { 0 } | if direct_io { DIRECT_IO } else { 0 };
        let number = self
            .request(BIND, flags, file)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::Unsupported => e,
                kind => std::io::Error::new(
                    kind,
                    format!("binding a loop device to {}: {e}", file.display()),
                ),
            })?;
        Ok(LoopDevice {
            name: format!("loop{number}"),
            dev: format!("7:{number}"),
            direct_io,
            read_only,
        })
    }

    /// `syncfs` of the filesystem mounted at `point`.
    pub fn syncfs(&mut self, point: &Path) -> std::io::Result<()> {
        self.request(SYNCFS, 0, point).map(|_| ())
    }

    /// End the child: its input closes and it exits when idle. Not waited for if it is busy
    /// (a request stuck on this server's FUSE session, which is going away): it is reaped by
    /// init once this process exits.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin, _)) = self.child.take() {
            drop(stdin);
            for _ in 0..20 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

impl Drop for Binder {
    fn drop(&mut self) {
        self.stop();
    }
}
