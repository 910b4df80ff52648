//! Mirroring a run to an object store (`s3://`, `gs://`, `az://`, or `file://` for tests).
//!
//! Training always happens in a local working directory; when the job's `out` is an object
//! store, every published checkpoint is uploaded file by file with `MANIFEST.json` last (so
//! a reader that trusts only manifests never sees a partial upload), pruned checkpoints are
//! deleted manifest first, and `metrics.jsonl` and the final `model/` follow. On resume with
//! no valid local checkpoint, the newest remote checkpoint whose manifest verifies is
//! downloaded into the working directory.

use anyhow::{bail, Context, Result};
use btm_model::manifest::{Manifest, MANIFEST};
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Files above this go up in parts.
const MULTIPART_BYTES: u64 = 64 << 20;
const PART_BYTES: usize = 16 << 20;

pub struct Mirror {
    runtime: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    url: String,
}

impl Mirror {
    pub fn new(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).with_context(|| format!("out: `{url}` is not a URL"))?;
        let (store, prefix) = btm_model::storage::store_for(&parsed)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Self {
            runtime,
            store,
            prefix,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    fn path(&self, rel: &str) -> StorePath {
        rel.split('/').filter(|p| !p.is_empty()).fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// Upload one local file to `rel` under the prefix.
    pub fn upload_file(&self, local: &Path, rel: &str) -> Result<()> {
        let dest = self.path(rel);
        let size = std::fs::metadata(local).with_context(|| format!("{}", local.display()))?.len();
        let err = |e: object_store::Error| anyhow::anyhow!("uploading {} to {}/{rel}: {e}", local.display(), self.url);
        self.runtime.block_on(async {
            if size <= MULTIPART_BYTES {
                let bytes = std::fs::read(local).with_context(|| format!("reading {}", local.display()))?;
                self.store.put(&dest, PutPayload::from(bytes)).await.map_err(err)?;
            } else {
                let upload = self.store.put_multipart(&dest).await.map_err(err)?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
                let mut file = std::fs::File::open(local).with_context(|| format!("reading {}", local.display()))?;
                let mut buf = vec![0u8; PART_BYTES];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    writer.wait_for_capacity(4).await.map_err(err)?;
                    writer.write(&buf[..n]);
                }
                writer.finish().await.map_err(err)?;
            }
            Ok(())
        })
    }

    /// Upload an artefact directory (every file its manifest lists, then the manifest).
    pub fn upload_dir(&self, local: &Path, rel: &str) -> Result<()> {
        let manifest = Manifest::read(local)?;
        for f in &manifest.files {
            self.upload_file(&local.join(&f.path), &format!("{rel}/{}", f.path))?;
        }
        self.upload_file(&local.join(MANIFEST), &format!("{rel}/{MANIFEST}"))
    }

    /// Delete everything under `rel`, the manifest first so a half-deleted artefact is invalid.
    pub fn delete_dir(&self, rel: &str) -> Result<()> {
        let prefix = self.path(rel);
        let err = |e: object_store::Error| anyhow::anyhow!("deleting {}/{rel}: {e}", self.url);
        self.runtime.block_on(async {
            let mut objects: Vec<StorePath> = self.store.list(Some(&prefix)).map_ok(|m| m.location).try_collect().await.map_err(err)?;
            objects.sort_by_key(|p| p.filename() != Some(MANIFEST));
            for o in objects {
                self.store.delete(&o).await.map_err(err)?;
            }
            Ok(())
        })
    }

    /// Steps of the remote checkpoints that have a manifest, newest first.
    pub fn checkpoint_steps(&self) -> Result<Vec<u64>> {
        let prefix = self.path("checkpoints");
        let err = |e: object_store::Error| anyhow::anyhow!("listing {}/checkpoints: {e}", self.url);
        let objects: Vec<StorePath> = self
            .runtime
            .block_on(async { self.store.list(Some(&prefix)).map_ok(|m| m.location).try_collect().await })
            .map_err(err)?;
        let mut steps: Vec<u64> = objects
            .iter()
            .filter(|p| p.filename() == Some(MANIFEST))
            .filter_map(|p| {
                let parts: Vec<_> = p.parts().collect();
                let dir = parts.get(parts.len().checked_sub(2)?)?;
                dir.as_ref().strip_prefix("step-")?.parse().ok()
            })
            .collect();
        steps.sort_by_key(|s| std::cmp::Reverse(*s));
        Ok(steps)
    }

    /// Download one object to `dest`; `false` when there is none.
    pub fn download_file(&self, rel: &str, dest: &Path) -> Result<bool> {
        let path = self.path(rel);
        let got = self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        match got.map_err(|e| anyhow::anyhow!("downloading {}/{rel}: {e}", self.url))? {
            Some(bytes) => {
                std::fs::write(dest, &bytes).with_context(|| format!("writing {}", dest.display()))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Download `rel` into `dest` (which must not exist) and verify its manifest.
    pub fn download_dir(&self, rel: &str, dest: &Path) -> Result<()> {
        let prefix = self.path(rel);
        let err = |e: object_store::Error| anyhow::anyhow!("downloading {}/{rel}: {e}", self.url);
        let staging = btm_model::checkpoint::StagingDir::new(dest, false)?;
        self.runtime.block_on(async {
            let objects: Vec<StorePath> = self.store.list(Some(&prefix)).map_ok(|m| m.location).try_collect().await.map_err(err)?;
            if objects.is_empty() {
                bail!("{}/{rel}: nothing there", self.url);
            }
            for o in objects {
                let rel_parts: Vec<String> = o
                    .prefix_match(&prefix)
                    .map(|ps| ps.map(|p| p.as_ref().to_string()).collect())
                    .unwrap_or_default();
                let file = rel_parts.iter().fold(staging.path.clone(), |p, part| p.join(part));
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let bytes = self.store.get(&o).await.map_err(err)?.bytes().await.map_err(err)?;
                std::fs::write(&file, &bytes).with_context(|| format!("writing {}", file.display()))?;
            }
            Ok(())
        })?;
        Manifest::read(&staging.path)?.verify(&staging.path)?;
        staging.publish()?;
        Ok(())
    }
}
