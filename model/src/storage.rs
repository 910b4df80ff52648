//! Object-store URLs for model locations: local paths and `file://` are used in place;
//! `s3://`, `gs://` and `az://` (credentials from the standard environment variables, e.g.
//! `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT` for S3-compatible stores) are downloaded once into a
//! local cache and verified against their `MANIFEST.json` when they have one.
//!
//! Every store retries failed requests with exponential backoff (100 ms doubling up to 5 s,
//! at most 10 times and 60 s), on top of object_store's 5 s connect and 30 s request
//! timeouts, so an unreachable or dead server fails a job within about a minute.

use crate::error::{Error, Result};
use object_store::path::Path as StorePath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5), base: 2.0 },
        max_retries: 10,
        retry_timeout: Duration::from_secs(60),
    }
}

/// Build a store for a URL; returns the store and the path inside it.
pub fn store_for(url: &Url) -> Result<(Arc<dyn ObjectStore>, StorePath)> {
    let err = |e: object_store::Error| Error::Storage(format!("{url}: {e}"));
    let path = StorePath::from_url_path(url.path()).map_err(|e| Error::Storage(format!("{url}: {e}")))?;
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => Arc::new(object_store::local::LocalFileSystem::new()),
        "s3" | "s3a" => {
            Arc::new(object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str()).with_retry(retry()).build().map_err(err)?)
        }
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url.as_str()).with_retry(retry()).build().map_err(err)?,
        ),
        "az" | "abfs" | "abfss" | "azure" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url.as_str()).with_retry(retry()).build().map_err(err)?,
        ),
        other => return Err(Error::Storage(format!("{url}: unsupported URL scheme `{other}`"))),
    };
    Ok((store, path))
}

/// A local directory holding the artefact at `location` (a path or URL); see
/// [`crate::folder::fetch_dir`] for the cache.
pub fn local_dir(location: &str) -> Result<PathBuf> {
    let url = match Url::parse(location) {
        // A one-letter "scheme" is a Windows drive, not a URL.
        Ok(u) if u.scheme().len() > 1 => u,
        _ => return Ok(PathBuf::from(location)),
    };
    if url.scheme() == "file" {
        return url.to_file_path().map_err(|_| Error::Storage(format!("{location}: not a local file URL")));
    }
    // Refuse unknown schemes before touching the network.
    store_for(&url)?;
    crate::folder::fetch_dir(location)
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
