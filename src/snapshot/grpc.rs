//! containerd's snapshots service on a Unix socket, through the `containerd-snapshots` crate:
//! it owns the generated protobuf types and the stream plumbing of List, and hands each
//! request to one trait method, which is the whole of what we need (tonic 0.9, prost 0.11).
//!
//! The tokio runtime runs on its own threads inside `serve`; each request's store work runs
//! on tokio's blocking pool (`spawn_blocking`), because it takes the store's lock and may
//! commit (fsync) or run mkfs, which must not stall the workers that move other requests.

use super::snapshots::Snapshots;
use super::status::Failure;
use crate::control::ControlSocket;
use crate::error::{Error, Result};
use crate::listen::Stop;
use crate::log::Log;
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::{self, Code, Status};
use containerd_snapshots::{Info, Kind, Usage};
use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
/// Worker threads moving gRPC requests (the store work runs on the blocking pool).
const WORKERS: usize = 2;

struct Service(Arc<Snapshots>);

impl Service {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshots) -> super::status::Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let core = self.0.clone();
        match tokio::task::spawn_blocking(move || f(&core)).await {
            Ok(r) => r.map_err(|f: Failure| {
                if f.code == Code::Internal || f.code == Code::ResourceExhausted {
                    let log = Log::process();
                    log.error(format_args!("containerd request failed: {}", f.message));
                }
                f.into()
            }),
            Err(e) => Err(Status::internal(format!("snapshot request panicked: {e}"))),
        }
    }
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = Status;

    async fn stat(&self, key: String) -> std::result::Result<Info, Status> {
        self.run(move |s| s.stat(&key)).await
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> std::result::Result<Info, Status> {
        self.run(move |s| s.update(info, fieldpaths)).await
    }

    async fn usage(&self, key: String) -> std::result::Result<Usage, Status> {
        let size = self.run(move |s| s.usage(&key)).await?;
        // A block layer does not know how many inodes its filesystem changed.
        Ok(Usage {
            inodes: 0,
            size: size as i64,
        })
    }

    async fn mounts(&self, key: String) -> std::result::Result<Vec<Mount>, Status> {
        self.run(move |s| s.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<Mount>, Status> {
        self.run(move |s| s.prepare(&key, &parent, labels, Kind::Active))
            .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<Mount>, Status> {
        self.run(move |s| s.prepare(&key, &parent, labels, Kind::View))
            .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> std::result::Result<(), Status> {
        self.run(move |s| s.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> std::result::Result<(), Status> {
        self.run(move |s| s.remove(&key)).await
    }

    type InfoStream = tokio_stream::Iter<std::vec::IntoIter<std::result::Result<Info, Status>>>;

    /// Every snapshot at once: a pool holds hundreds of layers, not millions. containerd
    /// filters the list itself.
    async fn list(
        &self,
        _snapshotter: String,
        _filters: Vec<String>,
    ) -> std::result::Result<Self::InfoStream, Status> {
        let infos = self.run(|s| Ok(s.list())).await?;
        Ok(tokio_stream::iter(
            infos.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }
}

/// The containerd socket being served.
pub struct Server {
    thread: JoinHandle<Result<()>>,
}

impl Server {
    /// Bind `path` (owner-only, published like the control socket) and serve until `stop`.
    pub fn start(
        core: Arc<Snapshots>,
        path: &Path,
        pool: &Path,
        stop: Arc<Stop>,
    ) -> Result<Server> {
        let ctx = format!("containerd socket {}", path.display());
        let stop_fd = stop
            .wake_fd()
            .map_err(|e| Error::io(format!("{ctx}: the stop signal"), e))?;
        let socket = ControlSocket::bind(path, pool).map_err(|e| e.context(&ctx))?;
        let std_listener = socket.listener_clone().map_err(|e| e.context(&ctx))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("containerd-grpc")
            .enable_all()
            .build()
            .map_err(|e| Error::io(format!("{ctx}: starting the tokio runtime"), e))?;
        let thread = std::thread::Builder::new()
            .name("containerd".into())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    std_listener
                        .set_nonblocking(true)
                        .map_err(|e| Error::io(format!("{ctx}: non-blocking"), e))?;
                    let listener = tokio::net::UnixListener::from_std(std_listener)
                        .map_err(|e| Error::io(format!("{ctx}: registering it"), e))?;
                    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                    let stopped = stopped(stop, stop_fd);
                    tonic::transport::Server::builder()
                        .add_service(containerd_snapshots::server(Arc::new(Service(core))))
                        .serve_with_incoming_shutdown(incoming, stopped)
                        .await
                        .map_err(|e| Error::Invalid(format!("{ctx}: serving: {e}")))
                });
                // The socket file goes once no new request can come.
                drop(socket);
                // Requests still on the blocking pool finish before the store's last commit.
                runtime.shutdown_timeout(Duration::from_secs(30));
                served
            })
            .map_err(|e| Error::io("starting the containerd thread", e))?;
        Ok(Server { thread })
    }

    /// Wait for the server to end (after `stop`).
    pub fn join(self) -> Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("the containerd thread panicked".into())))
    }
}

/// Resolves once `stop` is set: the reactor watches the stop's eventfd, so nothing polls.
async fn stopped(stop: Arc<Stop>, fd: RawFd) {
    // A descriptor of our own on the eventfd, so the reactor's stays open as long as it needs.
    // SAFETY: `fd` is open (`stop` holds it) for the duration of the call.
    let own = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned();
    // SAFETY: the AsyncFd owns `dup`, which stays open and the same until it is dropped.
    let watch = own.and_then(|dup| unsafe {
        AsyncFd::register_with_interest(dup, Interest::READABLE).map_err(io::Error::from)
    });
    if let Ok(watch) = watch {
        while !stop.is_stopped() {
            match watch.readable().await {
                // Readable means stopped; clear readiness in case it was spurious.
                Ok(mut ready) if !stop.is_stopped() => ready.clear_ready(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    if !stop.is_stopped() {
        // The reactor refused the descriptor: wait on a blocking thread instead.
        let _ = tokio::task::spawn_blocking(move || stop.wait(None)).await;
    }
}
