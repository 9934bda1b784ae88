//! Push and pull layer chains through an OCI registry (OCI distribution API, via the
//! `oci-client` crate). An image is one blob per layer — the layer's send stream, media type
//! `application/vnd.oci.image.layer.thinlayer.v1` (`image::LAYER_TYPE`) — an OCI image config whose diff IDs are those
//! streams' digests, and an image manifest with annotations for block size, disk size and
//! stream format version. A runtime that does not know the layer type fails loudly instead of
//! untarring a block stream.
//!
//! Push and pull run in the CLI process, as the user: for them the server never opens a
//! connection or a path for a client. A lazy pull (`fills.rs`) is the exception: its layers
//! are fetched after the client has gone, so the live server reaches the registry itself. It reaches the pool through `Layers`: the CLI's implementation goes
//! through the live server's control socket (streams cross as pipe descriptors) or opens the
//! pool itself.

pub mod auth;
pub mod client;
pub mod fetcher;
pub mod fills;
pub mod image;
pub mod lazy;
pub mod pull;
pub mod push;
pub mod range;

#[cfg(test)]
pub(crate) mod conformance;

use crate::error::Result;
use crate::stream::{ReceiveStats, SendStats};
use crate::volume::LayerInfo;
use std::os::fd::OwnedFd;

/// What the registry code needs of a pool.
pub trait Layers: Sync {
    /// Every layer, with content IDs filled in.
    fn layers(&self) -> Result<Vec<LayerInfo>>;
    /// The chain from `name` down to its base, with content IDs filled in.
    fn history(&self, name: &str) -> Result<Vec<LayerInfo>>;
    /// The pool's block size.
    fn block_size(&self) -> Result<u32>;
    /// Write `name`'s stream over its parent into `out` (the write end of a pipe).
    fn send(&self, name: &str, out: OwnedFd, progress: &mut Meter) -> Result<SendStats>;
    /// Receive a stream from `input` as `name` over `parent`, refusing it unless its digest is
    /// `digest`.
    fn receive(
        &self,
        name: &str,
        parent: Option<&str>,
        digest: &str,
        input: OwnedFd,
        progress: &mut Meter,
    ) -> Result<(LayerInfo, ReceiveStats)>;
    /// Note that read-only layer `name`'s blob is in `location` (`host[:port]/repository`).
    fn record_source(&self, name: &str, location: &str) -> Result<()>;
}

/// `Layers` over a store opened in this process, with the live pool's rules (`LivePool`): the
/// twin of the CLI's `calls::Target`, for tests and for callers that hold the store.
pub struct StoreLayers<'a>(pub crate::live::LivePool<'a>);

impl Layers for StoreLayers<'_> {
    fn layers(&self) -> Result<Vec<LayerInfo>> {
        let store = self.0.store();
        crate::stream::content::fill(store, store.layers())
    }

    fn history(&self, name: &str) -> Result<Vec<LayerInfo>> {
        let store = self.0.store();
        crate::stream::content::fill(store, store.history(name)?)
    }

    fn block_size(&self) -> Result<u32> {
        Ok(self.0.store().block_size())
    }

    fn send(&self, name: &str, out: OwnedFd, progress: &mut Meter) -> Result<SendStats> {
        let mut out = std::fs::File::from(out);
        crate::stream::send(self.0.store(), name, None, &mut out, "the upload", progress)
    }

    fn receive(
        &self,
        name: &str,
        parent: Option<&str>,
        digest: &str,
        input: OwnedFd,
        progress: &mut Meter,
    ) -> Result<(LayerInfo, ReceiveStats)> {
        let label = format!("the download of {digest}");
        let mut input = std::fs::File::from(input);
        let expect = Some(digest.parse()?);
        self.0
            .receive(name, parent, expect, &mut input, &label, progress)
    }

    fn record_source(&self, name: &str, location: &str) -> Result<()> {
        crate::stream::source::record(self.0.store(), name, location).map(drop)
    }
}

/// Progress of one layer: (bytes of the layer done, its size).
pub type Meter = dyn FnMut(u64, u64) + Send;

/// Makes the meter for a step ("push web", "pull sha256:..."); the CLI draws bars with it.
pub type Meters<'a> = &'a (dyn Fn(String) -> Box<Meter> + Sync);

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Plain HTTP to a registry that is not on loopback (loopback registries always get it).
    pub plain_http: bool,
}

/// A pipe: (read end, write end), closed on exec.
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(crate::Error::io(
            "making a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both were just returned by pipe2 and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
