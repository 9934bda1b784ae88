//! The live server's remote layers (`pull --lazy`, DESIGN.md §13), behind the `registry`
//! feature: this file only forwards to `registry::fills`, or, in a build without it, says
//! what is missing.

use crate::control::{FillStatus, Pulled};
use crate::error::Result;
use crate::format::LayerId;
use crate::volume::exports::LiveExports;
use std::sync::Arc;
use std::time::Duration;

/// How remote layers are fetched: `serve --remote-timeout`, `--no-remote-fill`,
/// `--lazy-registry`.
#[derive(Clone, Debug)]
pub struct Remote {
    /// How long a read of an unfetched block waits for the registry before EIO.
    pub timeout: Duration,
    /// Fetch all of each remote layer in the background (else only what is read).
    pub background: bool,
    /// The registries containerd's remote snapshots may come from (`host[:port]`).
    pub registries: Vec<String>,
}

impl Default for Remote {
    fn default() -> Remote {
        Remote {
            timeout: Duration::from_secs(60),
            background: true,
            registries: Vec::new(),
        }
    }
}

#[cfg(feature = "registry")]
#[derive(Clone)]
pub struct Lazy(Arc<crate::registry::fills::Fills>);

#[cfg(feature = "registry")]
impl Lazy {
    /// Resume the fetch of every remote layer of the pool.
    pub fn start(exports: &Arc<LiveExports>, remote: Remote) -> Lazy {
        let opts = crate::registry::fills::Options {
            timeout: remote.timeout,
            background: remote.background,
            registries: remote.registries,
            ..Default::default()
        };
        let f = crate::registry::fills::Fills::new(exports.clone(), opts);
        f.resume_all();
        Lazy(f)
    }

    pub fn pull(&self, reference: &str, name: Option<&str>, plain_http: bool) -> Result<Pulled> {
        let opts = crate::registry::Options { plain_http };
        self.0.pull(reference, name, &opts)
    }

    pub fn cancel(&self, id: LayerId) {
        self.0.cancel(id)
    }

    /// Stop every fetch: the server stops or hands over.
    pub fn stop(&self) {
        self.0.stop()
    }

    /// After a failed hand-over: fetch again.
    pub fn resume(&self) {
        self.0.resume_all()
    }

    pub fn status(&self) -> Vec<FillStatus> {
        self.0.status()
    }
}

/// containerd's remote snapshots (`snapshot::RemoteLayers`) are made by the fills.
#[cfg(all(feature = "registry", feature = "containerd"))]
impl crate::snapshot::RemoteLayers for Lazy {
    fn create(
        &self,
        at: &crate::snapshot::LayerAt,
        name: &str,
        parent: Option<&str>,
        attrs: crate::volume::AttrChanges,
    ) -> Result<crate::volume::LayerInfo> {
        self.0
            .snapshot(&at.image, &at.manifest, &at.layer, name, parent, attrs)
    }

    fn removed(&self, id: LayerId) {
        self.0.cancel(id)
    }
}

#[cfg(not(feature = "registry"))]
#[derive(Clone)]
pub struct Lazy;

#[cfg(not(feature = "registry"))]
impl Lazy {
    pub fn start(exports: &Arc<LiveExports>, _: Remote) -> Lazy {
        // `remote_layers`, not `layers`: that waits for a lazily opened pool's maps, and this
        // runs before `serve` listens (it waited for the whole load in builds without the
        // `registry` feature).
        let n = exports.store().remote_layers().len();
        if n > 0 {
            crate::log::process(
                crate::log::Level::Warn,
                format_args!(
                    "thinlayer: {n} remote layer(s), and this build has no `registry` feature: their unfetched blocks fail to read (EIO)"
                ),
            );
        }
        Lazy
    }

    pub fn pull(&self, _: &str, _: Option<&str>, _: bool) -> Result<Pulled> {
        Err(crate::features::missing("registry", "pull --lazy"))
    }

    pub fn cancel(&self, _: LayerId) {}

    pub fn stop(&self) {}

    pub fn resume(&self) {}

    pub fn status(&self) -> Vec<FillStatus> {
        Vec::new()
    }
}
