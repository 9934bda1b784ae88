//! What each management request does: one function for the live server and for a CLI that
//! opens the pool itself, so both give the same replies, the same errors and the same
//! transactions. Every changing request is one transaction: applied under the store's lock,
//! committed before the reply.

use crate::control::{ConnectionInfo, Reply, Request, Status};
use crate::error::{Error, Result};
use crate::fuse::LiveFiles;
use crate::live::LivePool;
use crate::log::{self, Level};
use crate::stream::content;
use crate::volume::exports::LiveExports;
use crate::volume::Store;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

/// Run `req` on an open store. `exports`: the live server's exports, whose connections protect
/// the layers they hold; `files`: the descriptors the request carried (already checked: as
/// many as it needs).
pub fn execute(
    store: &Store,
    exports: Option<&LiveExports>,
    req: Request,
    files: Vec<OwnedFd>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Reply> {
    let mut files = files.into_iter().map(File::from);
    let pool = match exports {
        Some(x) => LivePool::serving(x),
        None => LivePool::direct(store),
    };
    match req {
        Request::Create { name, parent, size } => {
            let info = pool.create(&name, parent.as_deref(), size, &[])?;
            Ok(Reply::Layer(store.layer(&info.name)?))
        }
        Request::Commit { name } => {
            pool.commit(&name, None, &[])?;
            Ok(Reply::Committed { name })
        }
        Request::Remove { name, force } => {
            let freed = pool.remove(&name, force, &mut |n| {
                log::process(
                    Level::Warn,
                    format_args!("thinlayer: rm --force {name:?}: cut off {n} connection(s)"),
                )
            })?;
            Ok(Reply::Removed { name, freed })
        }
        Request::Import {
            name,
            parent,
            label,
        } => {
            let f = files.next().ok_or_else(|| missing("import"))?;
            let label = label.unwrap_or_else(|| passed("image", &name));
            let (layer, stats) = pool.import(&name, parent.as_deref(), &f, &label, progress)?;
            Ok(Reply::Imported { layer, stats })
        }
        Request::Export { name, label } => {
            let f = files.next().ok_or_else(|| missing("export"))?;
            let label = label.unwrap_or_else(|| passed("file", &name));
            let stats = crate::image::export_to(store, &name, &f, &label, progress)?;
            Ok(Reply::Exported { stats })
        }
        Request::Ls => Ok(Reply::Layers(content::fill(store, store.layers())?)),
        Request::History { name } => {
            Ok(Reply::Layers(content::fill(store, store.history(&name)?)?))
        }
        Request::Send { name, from, label } => {
            let mut f = files.next().ok_or_else(|| missing("send"))?;
            let label = label.unwrap_or_else(|| passed("stream", &name));
            let stats =
                crate::stream::send(store, &name, from.as_deref(), &mut f, &label, progress)?;
            Ok(Reply::Sent { stats })
        }
        Request::Receive {
            name,
            parent,
            digest,
            label,
        } => {
            let mut f = files.next().ok_or_else(|| missing("receive"))?;
            let label = label.unwrap_or_else(|| passed("stream", &name));
            let expect = digest.map(|d| d.parse()).transpose()?;
            let (layer, stats) =
                pool.receive(&name, parent.as_deref(), expect, &mut f, &label, progress)?;
            Ok(Reply::Received { layer, stats })
        }
        Request::RecordSource { name, location } => {
            let sources = crate::stream::source::record(store, &name, &location)?;
            Ok(Reply::SourceRecorded { name, sources })
        }
        Request::Df => Ok(Reply::Usage(store.usage()?)),
        Request::Check { data } => {
            // What is durable is checked: commit first, then hold commits off while reading,
            // so no block the durable state names is freed and reused under the check.
            if store.is_writable() {
                store.flush()?;
            }
            let r = store.with_commits_paused(|storage| {
                crate::check::check(storage.clone(), data, progress)
            })?;
            Ok(Reply::Check(r))
        }
        Request::Status => match exports {
            None => Err(Error::Unavailable(
                "no server is running for this pool".into(),
            )),
            Some(x) => Ok(Reply::Status(Box::new(status(store, x)))),
        },
        // Only a server's live files can answer these (`execute_files`).
        Request::Attach { .. } | Request::Detach { .. } => Err(no_live_files(store.path())),
        // Only the server itself can be restarted (`server::restart`).
        Request::Restart { .. } => Err(no_server(store.path())),
        // Only a server fetches remote layers (`server::lazy`).
        Request::PullLazy { .. } => Err(no_lazy(store.path())),
    }
}

/// `attach` and `detach` on a server's live files (`serve --files`); `files` is `None` when
/// the server was started without them.
pub fn execute_files(store: &Store, files: Option<&LiveFiles>, req: Request) -> Result<Reply> {
    let Some(files) = files else {
        return Err(Error::NotFound(format!(
            "the server for pool {} was started without --files: no live files",
            store
                .path()
                .map_or_else(String::new, |p| p.display().to_string())
        )));
    };
    match req {
        Request::Attach { name } => {
            let path = files.attach(&name)?;
            Ok(Reply::Attached {
                writable: store.layer(&name)?.writable && store.is_writable(),
                path: path.display().to_string(),
                name,
            })
        }
        Request::Detach { name, force } => {
            files.detach(&name, force)?;
            Ok(Reply::Detached { name })
        }
        other => Err(Error::Internal(format!(
            "{other} is not a live-files request"
        ))),
    }
}

fn no_live_files(pool: Option<&Path>) -> Error {
    Error::Unavailable(format!(
        "no server is running for pool {}: live files need `thinlayer serve --files DIR`",
        pool.map_or_else(String::new, |p| p.display().to_string())
    ))
}

/// How a passed file is named in messages when the client gave no label.
fn passed(what: &str, layer: &str) -> String {
    format!("the {what} passed for {layer:?}")
}

fn no_server(pool: Option<&Path>) -> Error {
    Error::Unavailable(format!(
        "no server is running for pool {}: nothing to restart",
        pool.map_or_else(|| "?".into(), |p| p.display().to_string())
    ))
}

fn no_lazy(pool: Option<&Path>) -> Error {
    Error::Unavailable(format!(
        "no server is running for pool {}: `pull --lazy` needs `thinlayer serve`, which fetches the layers' data after the pull returns",
        pool.map_or_else(|| "?".into(), |p| p.display().to_string())
    ))
}

fn missing(what: &str) -> Error {
    Error::InvalidInput(format!("{what} needs a file descriptor and none came"))
}

fn status(store: &Store, x: &LiveExports) -> Status {
    let connections = x
        .all()
        .into_iter()
        .map(|a| ConnectionInfo {
            client: a.client.clone(),
            export: a.export.clone(),
            writable: a.writable,
            since: humantime::format_rfc3339_seconds(a.since).to_string(),
        })
        .collect();
    Status {
        pid: std::process::id(),
        pool: store
            .path()
            .map_or_else(String::new, |p| p.display().to_string()),
        server: format!("thinlayer {}", env!("CARGO_PKG_VERSION")),
        exports: x.names(),
        connections,
        pending_bytes: store.pending_bytes() as u64,
        map_cache: {
            let c = store.map_cache_stats();
            crate::control::MapCacheStatus {
                bytes: c.bytes,
                budget: c.budget,
                hits: c.hits,
                misses: c.misses,
            }
        },
        maps: {
            let (ranges, ranges_left, stopped) = store.load_progress();
            crate::control::MapsStatus {
                loaded: store.is_loaded(),
                ranges,
                ranges_left,
                stopped,
            }
        },
        ..Default::default()
    }
}

/// Run `req` by opening the pool at `pool` here (no server runs): changing requests take the
/// pool's lock and commit; `ls`, `history`, `df` read the last committed state without it, so
/// they work while another command holds the pool.
pub fn direct(
    pool: &Path,
    command_line: &str,
    req: Request,
    files: Vec<OwnedFd>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Reply> {
    match req {
        // A send reads committed layers only, which nothing changes under it.
        Request::Ls | Request::History { .. } | Request::Df | Request::Send { .. } => {
            let store = Store::open_read_only(pool)?;
            execute(&store, None, req, files, progress)
        }
        Request::Export { name, label } => {
            let out = File::from(files.into_iter().next().ok_or_else(|| missing("export"))?);
            let label = label.unwrap_or_else(|| passed("file", &name));
            let stats =
                crate::image::export_pool(pool, &name, &out, &label, progress, &mut || {
                    log::process(
                        Level::Info,
                        format_args!(
                            "thinlayer: {name:?} changed while being exported; starting again"
                        ),
                    )
                })?;
            Ok(Reply::Exported { stats })
        }
        Request::Check { data } => Ok(Reply::Check(crate::check::check_pool(
            pool, data, progress,
        )?)),
        Request::Status => Err(Error::Unavailable(format!(
            "no server is running for pool {}",
            pool.display()
        ))),
        Request::Attach { .. } | Request::Detach { .. } => Err(no_live_files(Some(pool))),
        Request::Restart { .. } => Err(no_server(Some(pool))),
        Request::PullLazy { .. } => Err(no_lazy(Some(pool))),
        _ => {
            let store = Store::open(pool, command_line)?;
            execute(&store, None, req, files, progress)
        }
    }
}
