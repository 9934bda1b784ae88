use super::Target;
use crate::error::Result;
use crate::nbd::{Listener, ServerConfig};
use crate::server;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Serve layers over NBD: read-only layers as read-only exports, writable ones writable.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  thinlayer serve --socket /run/thinlayer.sock\n  nbdinfo --list 'nbd+unix:///?socket=/run/thinlayer.sock'\n  nbdfuse /mnt/web/disk 'nbd+unix:///web?socket=/run/thinlayer.sock' &  # a file backed by layer web\n  nbd-client -unix /run/thinlayer.sock -N web /dev/nbd0   # with the kernel module\n\n\
While serving, every other thinlayer command on this pool (create, commit, rm, import,\n\
export, ls, history, df, check) asks this process over the control socket (POOL.ctl, or\n\
--control; owner-only, see docs/CONTROL.md). New layers are exports at once, removed ones\n\
vanish, and layers NBD clients hold are protected. The sockets appear once it is ready.\n\n\
With --files DIR: `thinlayer attach web` prints DIR/web, a live file for `mount -o loop`;\n\
`thinlayer detach web` removes it (refused while a loop device has it open).\n\n\
SIGINT/SIGTERM: stop accepting, finish requests in flight, commit, exit 0.\n\
Unflushed writes are committed every --commit-interval seconds anyway."
)]
pub struct Args {
    /// Unix socket to listen on (default: POOL.sock beside the pool).
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Listen on TCP instead: `--listen` alone is 127.0.0.1:10809 (the NBD port on loopback);
    /// an address other than loopback only when given explicitly.
    #[arg(long, value_name = "ADDR:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:10809")]
    listen: Option<SocketAddr>,
    /// Export only these layers (repeatable); default: all.
    #[arg(long = "export", value_name = "NAME")]
    exports: Vec<String>,
    /// Mount live files here (created if missing): each layer attached with `thinlayer attach`
    /// appears as a raw disk image for `mount -o loop` / losetup. Root only.
    #[arg(long, value_name = "DIR")]
    files: Option<PathBuf>,
    /// Serve containerd's snapshots API on this Unix socket (owner-only), for
    /// `[proxy_plugins.thinlayer] type = "snapshot"` in containerd's config. Its layers are
    /// mounted through the live files: --files DIR, default POOL.files beside the pool.
    #[arg(long, value_name = "PATH")]
    containerd_socket: Option<PathBuf>,
    /// Seconds between background commits of unflushed writes (0 = only on FLUSH/exit).
    #[arg(long, default_value_t = 5)]
    commit_interval: u64,
    /// Internal: take over from the server that started this process (`thinlayer restart`),
    /// through the hand-over socket on this descriptor.
    #[arg(long, hide = true, value_name = "FD")]
    resume_fd: Option<i32>,
    /// Run without the keeper. By default `serve` starts a keeper process that outlives a crash
    /// of this server: it holds the live files' FUSE connection, the listening sockets and a
    /// journal of the writes not yet committed, and starts a new server with them if this one
    /// dies (SIGKILL, abort, panic), so containers see a pause, not an error. `thinlayer status`
    /// shows its pid; stopping the server (SIGTERM, SIGINT) stops it. Without it, a killed
    /// server ends the live files' I/O and writes acknowledged but not flushed are lost.
    #[arg(long)]
    no_keeper: bool,
    /// The default; accepted for scripts written when the keeper had to be asked for.
    #[arg(long, hide = true, conflicts_with = "no_keeper")]
    keeper: bool,
    /// Leave loop devices over live files buffered. By default the server switches every loop
    /// device set up over one of its files (`mount -o loop`, losetup, containerd) to direct
    /// I/O at its first I/O, as `losetup --direct-io=on` would: it then keeps several requests
    /// in flight instead of one (pgbench through `mount -o loop` 1.9x the TPS, fio qd16 4 KiB
    /// writes 4-7x; docs/BENCHMARKS.md). Restarts are as safe either way (the old process's threads
    /// stop reading before it exits; docs/DESIGN.md §10.1).
    #[arg(long)]
    no_loop_direct_io: bool,
    /// The default; accepted for scripts written when direct I/O had to be asked for.
    #[arg(long, hide = true, conflicts_with = "no_loop_direct_io")]
    loop_direct_io: bool,
    /// Seconds a read of a block of a remote layer (`pull --lazy`) that is not fetched yet
    /// waits for the registry, retrying with back-off, before it fails with EIO (logged with
    /// the layer, the extent and the registry's error). Reads and the background fetch go on
    /// by themselves when the registry answers again.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    remote_timeout: u64,
    /// Fetch only what is read of remote layers (`pull --lazy`): no background fetch of the
    /// rest. They stay remote, and need the registry, until all of them has been read.
    #[arg(long)]
    no_remote_fill: bool,
    /// A registry (`host[:port]`, repeat for more) that containerd's image layers may be
    /// pulled lazily from: a pull that passes the remote-snapshot labels (Docker 24+ with the
    /// containerd image store does; see docs/DESIGN.md §13) gets each thinlayer layer of an image
    /// from it as a remote layer, at once, instead of downloading it (docs/DESIGN.md §13).
    /// Without any, the snapshotter dials no registry and containerd downloads every layer.
    #[arg(long, value_name = "HOST[:PORT]")]
    lazy_registry: Vec<String>,
    /// Memory for the crcs of the maps' paged blocks: a checkpoint keeps the crcs of its runs
    /// and single blocks in checksum pages on disk (4 bytes a block), and reads verify data
    /// against them, so the pages read are cached, up to SIZE (K, M, G suffixes). It bounds
    /// that cache only, not the maps themselves (about 0.1 byte a block for an imported image,
    /// about 7 bytes for a scattered block) nor blocks written since the last checkpoint
    /// (crcs resident, 4 bytes a block). The
    /// default holds the crcs of 16M blocks (64 GiB of 4 KiB data); a miss costs a 4 KiB read
    /// beside the data's. `thinlayer status` shows its size and hit rate.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = crate::units::parse_size)]
    map_cache: u64,
    /// Internal: be the keeper of the server that started this process.
    #[arg(long, hide = true, value_name = "FD")]
    keeper_fd: Option<i32>,
}

pub fn run(t: &Target, a: Args) -> Result<()> {
    if a.containerd_socket.is_some() && !cfg!(feature = "containerd") {
        return Err(crate::features::missing(
            "containerd",
            "serve --containerd-socket",
        ));
    }
    if a.files.is_some() && !cfg!(feature = "fuse") {
        return Err(crate::features::missing("fuse", "serve --files"));
    }
    if let Some(fd) = a.keeper_fd {
        return server::keeper::run(fd);
    }
    if let Some(fd) = a.resume_fd {
        return server::handover::resume(fd, &crate::calls::command_line());
    }
    let nbd = match (a.listen, a.socket) {
        (Some(addr), _) => Listener::Tcp(addr),
        (None, Some(p)) => Listener::Unix(p),
        (None, None) => {
            let mut p = t.pool.as_os_str().to_owned();
            p.push(".sock");
            Listener::Unix(PathBuf::from(p))
        }
    };
    let cfg = server::Config {
        pool: t.pool.clone(),
        nbd,
        control: t.control.clone(),
        only: a.exports,
        commit_interval: (a.commit_interval > 0).then(|| Duration::from_secs(a.commit_interval)),
        nbd_config: ServerConfig::default(),
        files: a.files.or_else(|| {
            a.containerd_socket.as_ref().map(|_| {
                let mut p = t.pool.as_os_str().to_owned();
                p.push(".files");
                PathBuf::from(p)
            })
        }),
        containerd: a.containerd_socket,
        keeper: a.keeper || !a.no_keeper,
        loop_direct_io: a.loop_direct_io || !a.no_loop_direct_io,
        remote: server::lazy::Remote {
            timeout: Duration::from_secs(a.remote_timeout.max(1)),
            background: !a.no_remote_fill,
            registries: a.lazy_registry,
        },
        map_cache: a.map_cache,
    };
    server::run(cfg, &crate::calls::command_line())
}
