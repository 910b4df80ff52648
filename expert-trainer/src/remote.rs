//! Mirroring a run to an object store (`s3://`, `gs://`, `az://`, or `file://` for tests).
//!
//! Training always happens in a local working directory; when the job's `out` is an object
//! store, every published checkpoint is uploaded with `MANIFEST.json` last (so a reader that
//! trusts only manifests never sees a partial upload; large files go up in parts), pruned
//! checkpoints are deleted manifest first, and `metrics.jsonl` and the final `model/` follow.
//! The store is the truth: on resume the newest remote checkpoint whose manifest verifies is
//! used — from the working directory when it holds the same checkpoint, else downloaded.
//! The file operations themselves are [`btm_model::folder::Folder`]'s.

use anyhow::{Context, Result};
use btm_model::folder::Folder;
use btm_model::manifest::MANIFEST;
use std::path::Path;

pub struct Mirror {
    folder: Folder,
}

impl Mirror {
    pub fn new(url: &str) -> Result<Self> {
        url::Url::parse(url).with_context(|| format!("out: `{url}` is not a URL"))?;
        Ok(Self { folder: Folder::open(url)? })
    }

    /// Upload one local file to `rel` under the prefix.
    pub fn upload_file(&self, local: &Path, rel: &str) -> Result<()> {
        Ok(self.folder.upload_file(local, rel)?)
    }

    /// Upload an artefact directory (every file its manifest lists, then the manifest).
    pub fn upload_dir(&self, local: &Path, rel: &str) -> Result<()> {
        Ok(self.folder.upload_dir(local, rel)?)
    }

    /// Delete everything under `rel`, the manifest first so a half-deleted artefact is invalid.
    pub fn delete_dir(&self, rel: &str) -> Result<()> {
        Ok(self.folder.remove(rel)?)
    }

    /// Steps of the remote checkpoints that have a manifest, newest first.
    pub fn checkpoint_steps(&self) -> Result<Vec<u64>> {
        let mut steps: Vec<u64> = self
            .folder
            .list("checkpoints")?
            .iter()
            .filter_map(|f| f.strip_suffix(&format!("/{MANIFEST}")))
            .filter_map(crate::checkpoint::parse_step_dir_name)
            .collect();
        steps.sort_by_key(|s| std::cmp::Reverse(*s));
        Ok(steps)
    }

    /// The bytes of one object, `None` when there is none.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.folder.read(rel)?)
    }

    /// Download one object to `dest`; `false` when there is none.
    pub fn download_file(&self, rel: &str, dest: &Path) -> Result<bool> {
        Ok(self.folder.download_file(rel, dest)?)
    }

    /// Download `rel` into `dest` and verify its manifest.
    pub fn download_dir(&self, rel: &str, dest: &Path) -> Result<()> {
        Ok(self.folder.download_dir(rel, dest, true)?)
    }
}
