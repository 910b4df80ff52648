//! Object-store URLs for model locations: local paths and `file://` are used in place;
//! `s3://`, `gs://` and `az://` (credentials from the standard environment variables, e.g.
//! `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT` for S3-compatible stores, `AZURE_STORAGE_ACCOUNT_NAME`
//! and `AZURE_STORAGE_USE_EMULATOR` for Azure Blob and Azurite; see [`azure`]) are downloaded
//! once into a local cache and verified against their `MANIFEST.json` when they have one.
//!
//! Every store retries failed requests (5xx answers such as S3's `503 SlowDown`, 429, request
//! timeouts, connection errors) with exponential backoff: 100 ms doubling up to 5 s, jittered,
//! at most 10 retries and no retry begun after 60 s (object_store's [`RetryConfig`]), on top of
//! object_store's 5 s connect and 30 s request timeouts, so an unreachable, dead or always
//! failing server fails a job within about a minute and a half, naming the request and the
//! retries. `BTM_STORE_MAX_RETRIES` and `BTM_STORE_RETRY_TIMEOUT_S` change the two bounds (for
//! a flakier store, or a test that wants its failure in a second).

use crate::error::{Error, Result};
use object_store::path::Path as StorePath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// The retry bounds of every store (see the module docs), from the environment when set.
fn retry() -> Result<RetryConfig> {
    fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
        match std::env::var(name) {
            Ok(v) => v.trim().parse().map_err(|_| Error::Storage(format!("{name}=`{v}`: not a whole number"))),
            Err(_) => Ok(default),
        }
    }
    Ok(RetryConfig {
        backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5), base: 2.0 },
        max_retries: var("BTM_STORE_MAX_RETRIES", 10usize)?,
        retry_timeout: Duration::from_secs(var("BTM_STORE_RETRY_TIMEOUT_S", 60u64)?),
    })
}

/// Build a store for a URL; returns the store and the path inside it.
pub fn store_for(url: &Url) -> Result<(Arc<dyn ObjectStore>, StorePath)> {
    let err = |e: object_store::Error| Error::Storage(format!("{url}: {e}"));
    let path = StorePath::from_url_path(url.path()).map_err(|e| Error::Storage(format!("{url}: {e}")))?;
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => Arc::new(object_store::local::LocalFileSystem::new()),
        "s3" | "s3a" => {
            Arc::new(object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str()).with_retry(retry()?).build().map_err(err)?)
        }
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url.as_str()).with_retry(retry()?).build().map_err(err)?,
        ),
        "az" | "abfs" | "abfss" | "azure" => Arc::new(azure(url)?.build().map_err(err)?),
        other => return Err(Error::Storage(format!("{url}: unsupported URL scheme `{other}`"))),
    };
    Ok((store, path))
}

/// The well-known account of Azurite (and the older Azure Storage Emulator), published by
/// Microsoft: <https://learn.microsoft.com/azure/storage/common/storage-use-azurite>.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// The well-known key of [`AZURITE_ACCOUNT`] (public: it only opens local emulators).
pub const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The Azure Blob store of `az://CONTAINER/path` (also `azure://CONTAINER/path` and
/// `abfs[s]://`), configured from the `AZURE_*` environment variables
/// (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, a SAS token, a service
/// principal, …; `AZURE_STORAGE_ENDPOINT` for another endpoint, `AZURE_ALLOW_HTTP=true` for
/// a plain-HTTP one).
///
/// `AZURE_STORAGE_USE_EMULATOR=true` talks to Azurite over HTTP with the well-known account
/// unless `AZURE_STORAGE_ACCOUNT_NAME`/`_KEY` name another: at `AZURE_STORAGE_ENDPOINT` when
/// set (the account's URL, `http://127.0.0.1:10000/devstoreaccount1`, as in an Azurite
/// connection string), else at object_store's default for the emulator
/// (`AZURITE_BLOB_STORAGE_URL`, or `http://127.0.0.1:10000`), which ignores the endpoint.
pub fn azure(url: &Url) -> Result<object_store::azure::MicrosoftAzureBuilder> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut b = MicrosoftAzureBuilder::from_env().with_url(url.as_str()).with_retry(retry()?);
    let get = |b: &MicrosoftAzureBuilder, key| b.get_config_value(&key).filter(|v| !v.is_empty());
    // object_store's own parsing of the flag (1/true/on/yes/y).
    let emulator =
        get(&b, AzureConfigKey::UseEmulator).is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes" | "y"));
    let account = get(&b, AzureConfigKey::AccountName);
    if emulator {
        if let Some(endpoint) = get(&b, AzureConfigKey::Endpoint) {
            let has_credential =
                [AzureConfigKey::AccessKey, AzureConfigKey::SasKey, AzureConfigKey::Token].into_iter().any(|k| get(&b, k).is_some());
            b = b
                .with_use_emulator(false)
                .with_endpoint(endpoint)
                .with_account(account.unwrap_or_else(|| AZURITE_ACCOUNT.to_string()))
                .with_allow_http(true);
            if !has_credential {
                b = b.with_access_key(AZURITE_KEY);
            }
        }
    } else if account.is_none() && url.username().is_empty() {
        // Only `abfs[s]://FS@ACCOUNT.dfs.core.windows.net/` URLs name the account themselves.
        return Err(Error::Storage(format!(
            "{url}: no Azure storage account: set AZURE_STORAGE_ACCOUNT_NAME (and AZURE_STORAGE_ACCOUNT_KEY or another \
             credential), or AZURE_STORAGE_USE_EMULATOR=true for Azurite"
        )));
    }
    Ok(b)
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

    #[test]
    fn an_azure_url_without_an_account_is_a_named_error() {
        if std::env::vars().any(|(k, _)| k.starts_with("AZURE_")) {
            eprintln!("skipping: AZURE_* variables are set here");
            return;
        }
        for url in ["az://container/x", "azure://container/x", "abfs://container/x"] {
            let err = local_dir(url).unwrap_err().to_string();
            assert!(err.contains(&format!("{url}: no Azure storage account")) && err.contains("AZURE_STORAGE_USE_EMULATOR"), "{err}");
        }
        // The Hadoop form names the account itself.
        store_for(&Url::parse("abfss://fs@account.dfs.core.windows.net/x").unwrap()).unwrap();
    }
}
