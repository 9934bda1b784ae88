//! The live files (`crate::fuse`) as the snapshotter's `Files`.

use super::snapshots::Files;
use crate::error::{Error, Result};
use crate::fuse::{LiveFiles, LostWrites};
use crate::volume::BlockDevice;
use std::path::PathBuf;

impl Files for LiveFiles {
    fn attach(&self, layer: &str) -> Result<PathBuf> {
        LiveFiles::attach(self, layer)
    }

    fn device(&self, layer: &str, read_only: bool) -> Result<PathBuf> {
        LiveFiles::loop_device(self, layer, read_only)
    }

    fn detach(&self, layer: &str) -> Result<LostWrites> {
        // The snapshot's own loop devices go first (refused while one is mounted); the
        // detach is never forced: a loop device that still held the file would lose its
        // writes.
        LiveFiles::release_loop_devices(self, layer)?;
        match LiveFiles::detach(self, layer, false) {
            Err(Error::NotFound(_)) if self.path(layer).is_none() => Ok(LostWrites::default()),
            r => r,
        }
    }

    fn while_unmounted(
        &self,
        layer: &str,
        f: &mut dyn FnMut(&dyn BlockDevice) -> Result<()>,
    ) -> Result<bool> {
        Ok(LiveFiles::while_unmounted(self, layer, f)?.is_some())
    }

    fn sync_mounted(&self, layer: &str) -> Result<()> {
        match self.path(layer) {
            Some(path) => {
                let devices = self.loop_devices_of(&path);
                super::writeback::sync_filesystems_on(&path, &devices, &|point| {
                    LiveFiles::syncfs(self, point)
                })
            }
            None => Ok(()),
        }
    }

    fn mounted_at(&self, layer: &str) -> Result<Option<PathBuf>> {
        let path = LiveFiles::attach(self, layer)?;
        super::writeback::mounted_at(&self.loop_devices_of(&path))
    }
}
