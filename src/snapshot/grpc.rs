//! containerd's snapshots service on a Unix socket: the server trait tonic generated
//! (`super::api`), each request handed to one method of `Snapshots` (tonic 0.9, prost 0.11).
//!
//! The tokio runtime runs on its own threads inside `serve`; each request's store work runs
//! on tokio's blocking pool (`spawn_blocking`), because it takes the store's lock and may
//! commit (fsync) or run mkfs, which must not stall the workers that move other requests.

use super::api::services::snapshots::v1 as wire;
use super::api::{Info, Kind};
use super::snapshots::Snapshots;
use super::status::Failure;
use crate::control::ControlSocket;
use crate::error::{Error, Result};
use crate::listen::{Acceptor, Stop};
use crate::log::Log;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};
/// Worker threads moving gRPC requests (the store work runs on the blocking pool).
const WORKERS: usize = 2;

struct Service(Arc<Snapshots>);

impl Service {
    /// Run request `what` (a method name, for the debug log's timing) on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Snapshots) -> super::status::Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let core = self.0.clone();
        let started = std::time::Instant::now();
        let done = tokio::task::spawn_blocking(move || f(&core)).await;
        Log::process().debug(format_args!(
            "containerd {what}: {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        ));
        match done {
            Ok(r) => r.map_err(|f: Failure| {
                if matches!(
                    f.code,
                    Code::Internal | Code::ResourceExhausted | Code::DataLoss
                ) {
                    let log = Log::process();
                    log.error(format_args!("containerd request failed: {}", f.message));
                }
                f.into()
            }),
            Err(e) => Err(Failure::from(Error::panicked(format!("snapshot request: {e}"))).into()),
        }
    }
}

/// A List answer carries this many snapshots per message.
const LIST_CHUNK: usize = 100;

// `Status` is what the generated trait returns; its size is tonic's.
#[allow(clippy::result_large_err)]
fn reply<T>(t: T) -> std::result::Result<Response<T>, Status> {
    Ok(Response::new(t))
}

#[tonic::async_trait]
impl wire::snapshots_server::Snapshots for Service {
    async fn prepare(
        &self,
        r: Request<wire::PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<wire::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = self
            .run("prepare", move |s| {
                s.prepare(&r.key, &r.parent, r.labels, Kind::Active)
            })
            .await?;
        reply(wire::PrepareSnapshotResponse { mounts })
    }

    async fn view(
        &self,
        r: Request<wire::ViewSnapshotRequest>,
    ) -> std::result::Result<Response<wire::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = self
            .run("view", move |s| {
                s.prepare(&r.key, &r.parent, r.labels, Kind::View)
            })
            .await?;
        reply(wire::ViewSnapshotResponse { mounts })
    }

    async fn mounts(
        &self,
        r: Request<wire::MountsRequest>,
    ) -> std::result::Result<Response<wire::MountsResponse>, Status> {
        let key = r.into_inner().key;
        let mounts = self.run("mounts", move |s| s.mounts(&key)).await?;
        reply(wire::MountsResponse { mounts })
    }

    async fn commit(
        &self,
        r: Request<wire::CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run("commit", move |s| s.commit(&r.name, &r.key, r.labels))
            .await?;
        reply(())
    }

    async fn remove(
        &self,
        r: Request<wire::RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let key = r.into_inner().key;
        self.run("remove", move |s| s.remove(&key)).await?;
        reply(())
    }

    async fn stat(
        &self,
        r: Request<wire::StatSnapshotRequest>,
    ) -> std::result::Result<Response<wire::StatSnapshotResponse>, Status> {
        let key = r.into_inner().key;
        let info = self.run("stat", move |s| s.stat(&key)).await?;
        reply(wire::StatSnapshotResponse {
            info: Some(info.into()),
        })
    }

    async fn update(
        &self,
        r: Request<wire::UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<wire::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let info: Info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without a snapshot info"))?
            .into();
        let fieldpaths = r.update_mask.map(|m| m.paths);
        let info = self
            .run("update", move |s| s.update(info, fieldpaths))
            .await?;
        reply(wire::UpdateSnapshotResponse {
            info: Some(info.into()),
        })
    }

    type ListStream = tokio_stream::Iter<
        std::vec::IntoIter<std::result::Result<wire::ListSnapshotsResponse, Status>>,
    >;

    /// Every snapshot at once: a pool holds hundreds of layers, not millions. containerd
    /// filters the list itself.
    async fn list(
        &self,
        _r: Request<wire::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        let infos = self.run("list", |s| Ok(s.list())).await?;
        let mut chunks = Vec::new();
        let mut infos = infos.into_iter().map(wire::Info::from).peekable();
        while infos.peek().is_some() {
            let info = infos.by_ref().take(LIST_CHUNK).collect();
            chunks.push(Ok(wire::ListSnapshotsResponse { info }));
        }
        reply(tokio_stream::iter(chunks))
    }

    async fn usage(
        &self,
        r: Request<wire::UsageRequest>,
    ) -> std::result::Result<Response<wire::UsageResponse>, Status> {
        let key = r.into_inner().key;
        let size = self.run("usage", move |s| s.usage(&key)).await?;
        // A block layer does not know how many inodes its filesystem changed.
        reply(wire::UsageResponse {
            size: size as i64,
            inodes: 0,
        })
    }

    /// Removing a snapshot frees its blocks at once: nothing is left for Cleanup to do.
    async fn cleanup(
        &self,
        _r: Request<wire::CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        reply(())
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
        let socket = ControlSocket::bind(path, pool).map_err(|e| e.context(&ctx))?;
        Self::start_on(core, socket, stop)
    }

    /// Serve a socket already bound (here, or by the server process before a restart).
    pub fn start_on(
        core: Arc<Snapshots>,
        socket: ControlSocket,
        stop: Arc<Stop>,
    ) -> Result<Server> {
        let ctx = format!("containerd socket {}", socket.path().display());
        let stop_fd = stop
            .wake_fd()
            .map_err(|e| Error::io(format!("{ctx}: the stop signal"), e))?;
        let std_listener = socket.listener_clone().map_err(|e| e.context(&ctx))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("containerd-grpc")
            .enable_all()
            .build()
            .map_err(|e| Error::io(format!("{ctx}: starting the tokio runtime"), e))?;
        // Connections are accepted on a thread of their own through `listen::Acceptor`, which
        // leaves the listener alone while a restart hands it over, and go to the reactor.
        let (conns, incoming) = tokio::sync::mpsc::channel::<std::os::unix::net::UnixStream>(16);
        let accept_stop = stop.clone();
        let accepter = std::thread::Builder::new()
            .name("containerd-accept".into())
            .spawn(move || {
                let log = Log::process().scoped("containerd");
                let acceptor = match Acceptor::new(&std_listener, &accept_stop) {
                    Ok(a) => a,
                    Err(e) => return log.error(format_args!("containerd socket: {e}")),
                };
                while let Some(conn) = acceptor.next(&log, "containerd socket") {
                    if conns.blocking_send(conn).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::io("starting the containerd accept thread", e))?;
        let thread = std::thread::Builder::new()
            .name("containerd".into())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming).map(
                        |c: std::os::unix::net::UnixStream| {
                            c.set_nonblocking(true)?;
                            tokio::net::UnixStream::from_std(c)
                        },
                    );
                    let stopped = stopped(stop, stop_fd);
                    tonic::transport::Server::builder()
                        .add_service(wire::snapshots_server::SnapshotsServer::new(Service(core)))
                        .serve_with_incoming_shutdown(incoming, stopped)
                        .await
                        .map_err(|e| Error::Internal(format!("{ctx}: serving: {e}")))
                });
                let _ = accepter.join();
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
            .unwrap_or_else(|_| Err(Error::panicked("the containerd server")))
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
