//! Object-store URLs for model locations: local paths and `file://` are used in place;
//! `s3://`, `gs://` and `az://` (credentials from the standard environment variables, e.g.
//! `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT` for S3-compatible stores) are downloaded once into a
//! local cache and verified against their `MANIFEST.json` when they have one.

use crate::error::{Error, Result};
use crate::manifest::{Manifest, MANIFEST};
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use url::Url;

/// Build a store for a URL; returns the store and the path inside it.
pub fn store_for(url: &Url) -> Result<(Arc<dyn ObjectStore>, StorePath)> {
    let err = |e: object_store::Error| Error::Storage(format!("{url}: {e}"));
    let path = StorePath::from_url_path(url.path()).map_err(|e| Error::Storage(format!("{url}: {e}")))?;
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => Arc::new(object_store::local::LocalFileSystem::new()),
        "s3" | "s3a" => Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(err)?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(err)?,
        ),
        "az" | "abfs" | "abfss" | "azure" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(err)?,
        ),
        other => return Err(Error::Storage(format!("{url}: unsupported URL scheme `{other}`"))),
    };
    Ok((store, path))
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("BTM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("btm")
}

/// A local directory holding the artefact at `location` (a path or URL).
pub fn local_dir(location: &str) -> Result<PathBuf> {
    let url = match Url::parse(location) {
        // A one-letter "scheme" is a Windows drive, not a URL.
        Ok(u) if u.scheme().len() > 1 => u,
        _ => return Ok(PathBuf::from(location)),
    };
    if url.scheme() == "file" {
        return url
            .to_file_path()
            .map_err(|_| Error::Storage(format!("{location}: not a local file URL")));
    }
    let key = hex::encode(Sha256::digest(location.trim_end_matches('/').as_bytes()));
    let dest = cache_root().join("artefacts").join(&key[..32]);
    if dest.join(MANIFEST).exists() && Manifest::read(&dest).and_then(|m| m.verify(&dest)).is_ok() {
        return Ok(dest);
    }
    let (store, prefix) = store_for(&url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Storage(e.to_string()))?;
    runtime.block_on(download_prefix(store.as_ref(), &prefix, &dest, location))?;
    Ok(dest)
}

async fn download_prefix(store: &dyn ObjectStore, prefix: &StorePath, dest: &Path, location: &str) -> Result<()> {
    let err = |e: object_store::Error| Error::Storage(format!("{location}: {e}"));
    let objects: Vec<_> = store.list(Some(prefix)).try_collect().await.map_err(err)?;
    if objects.is_empty() {
        return Err(Error::Storage(format!("{location}: no objects under this prefix")));
    }
    let staging = crate::checkpoint::StagingDir::new(dest, true)?;
    for meta in objects {
        let rel: Vec<_> = meta.location.prefix_match(prefix).map(|p| p.collect()).unwrap_or_default();
        let rel: PathBuf = rel.iter().map(|p: &object_store::path::PathPart| p.as_ref()).collect();
        let file = staging.path.join(&rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let bytes = store.get(&meta.location).await.map_err(err)?.bytes().await.map_err(err)?;
        std::fs::write(&file, &bytes).map_err(|e| Error::io(&file, e))?;
    }
    if staging.path.join(MANIFEST).exists() {
        Manifest::read(&staging.path)?.verify(&staging.path)?;
    }
    staging.publish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_and_file_urls_are_used_in_place() {
        assert_eq!(local_dir("some/dir").unwrap(), PathBuf::from("some/dir"));
        assert_eq!(local_dir("file:///tmp/x").unwrap(), PathBuf::from("/tmp/x"));
        let err = local_dir("ftp://host/x").unwrap_err().to_string();
        assert!(err.contains("unsupported URL scheme `ftp`"), "{err}");
    }
}
