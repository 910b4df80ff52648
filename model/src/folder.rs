//! A folder that is either a local directory or a prefix in an object store (`s3://`, `gs://`,
//! `az://`), with the few operations btm does on a run folder: exists, read, write, list,
//! remove, and moving whole files and artefact directories up and down. The orchestrator keeps
//! a run in one; workers (trainer, merge, eval, …) use it to fetch their inputs into a local
//! cache and to publish their outputs, since they may share no filesystem with anyone.
//!
//! Publishing is ordered so readers that trust only manifests never see half an artefact:
//! every file of a directory goes up first (large ones as multipart uploads, which the store
//! makes visible only once complete), `MANIFEST.json` last; removal deletes the manifest first.
//! Requests are retried with backoff by object_store (see [`crate::storage::store_for`]).

use crate::error::{Error, Result};
use crate::manifest::{Manifest, MANIFEST};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Part size of multipart uploads: files larger than one part go up in parts. 16 MiB;
/// `BTM_UPLOAD_PART_BYTES` overrides it (tests use S3's smallest, 5 MiB, which it enforces).
pub fn part_bytes() -> usize {
    std::env::var("BTM_UPLOAD_PART_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(16 << 20).max(5 << 20)
}

/// Parts of one file in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// Whether `location` is an object-store URL (anything with a scheme but `file://`).
pub fn is_remote(location: &str) -> bool {
    location.split_once("://").is_some_and(|(scheme, _)| scheme.len() > 1 && scheme != "file")
}

enum Kind {
    Local(PathBuf),
    Remote { store: Arc<dyn ObjectStore>, prefix: StorePath, runtime: tokio::runtime::Runtime },
}

/// A local directory or an object-store prefix, addressed by `/`-separated paths relative to
/// its root (see the module docs).
pub struct Folder {
    /// The location as given (a path or URL), without a trailing `/`.
    root: String,
    kind: Kind,
}

impl std::fmt::Debug for Folder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Folder({})", self.root)
    }
}

impl Folder {
    /// A local path, `file://` URL or object-store URL.
    pub fn open(location: &str) -> Result<Self> {
        let root = location.trim_end_matches('/').to_string();
        if !is_remote(location) {
            let path = match location.strip_prefix("file://") {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(location),
            };
            return Ok(Self { root, kind: Kind::Local(path) });
        }
        let url = url::Url::parse(location).map_err(|e| Error::Storage(format!("{location}: {e}")))?;
        let (store, prefix) = crate::storage::store_for(&url)?;
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Storage(format!("{location}: {e}")))?;
        Ok(Self { root, kind: Kind::Remote { store, prefix, runtime } })
    }

    /// The folder at `location`, opened once per process and shared: one store client (and
    /// its connection pool) serves every read and write of a run.
    pub fn shared(location: &str) -> Result<Arc<Self>> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static OPEN: OnceLock<Mutex<HashMap<String, Arc<Folder>>>> = OnceLock::new();
        let mut open = OPEN.get_or_init(Default::default).lock().expect("folder cache");
        let key = location.trim_end_matches('/').to_string();
        if let Some(f) = open.get(&key) {
            return Ok(f.clone());
        }
        let f = Arc::new(Self::open(location)?);
        open.insert(key, f.clone());
        Ok(f)
    }

    /// The location this folder was opened with.
    pub fn location(&self) -> &str {
        &self.root
    }

    /// Whether the folder is in an object store rather than on the local filesystem.
    pub fn is_remote(&self) -> bool {
        matches!(self.kind, Kind::Remote { .. })
    }

    /// The full location of `rel` (a path, or a URL for a remote folder).
    pub fn join(&self, rel: &str) -> String {
        let rel = rel.trim_matches('/');
        if rel.is_empty() {
            self.root.clone()
        } else {
            format!("{}/{rel}", self.root)
        }
    }

    /// `loc` relative to the root: `loc` is relative already, or a full location under it.
    fn rel(&self, loc: &Path) -> Result<String> {
        let s = loc.to_string_lossy();
        if let Some(rest) = s.strip_prefix(self.root.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                return Ok(rest.trim_matches('/').to_string());
            }
        }
        if loc.is_absolute() || s.contains("://") {
            return Err(Error::Storage(format!("{s} is not inside {}", self.root)));
        }
        Ok(s.trim_matches('/').to_string())
    }

    fn key(prefix: &StorePath, rel: &str) -> StorePath {
        rel.split('/').filter(|p| !p.is_empty()).fold(prefix.clone(), |p, part| p.join(part))
    }

    fn err(&self, what: &str, rel: &str, e: impl std::fmt::Display) -> Error {
        Error::Storage(format!("{what} {}: {e}", self.join(rel)))
    }

    /// Run a storage future to completion from sync code, also when called from inside an
    /// async runtime (the orchestrator's executor), where blocking on another runtime in the
    /// same thread is not allowed.
    fn block<T: Send>(runtime: &tokio::runtime::Runtime, f: impl std::future::Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(|| runtime.block_on(f)).join().expect("storage thread panicked"))
        } else {
            runtime.block_on(f)
        }
    }

    /// Whether a file, or anything under a directory, exists at `loc`.
    pub fn exists(&self, loc: impl AsRef<Path>) -> Result<bool> {
        let rel = self.rel(loc.as_ref())?;
        match &self.kind {
            Kind::Local(root) => Ok(root.join(&rel).exists()),
            Kind::Remote { store, prefix, runtime } => {
                let key = Self::key(prefix, &rel);
                Self::block(runtime, async {
                    match store.head(&key).await {
                        Ok(_) => return Ok(true),
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(self.err("checking", &rel, e)),
                    }
                    let mut under = store.list(Some(&key));
                    match under.next().await {
                        Some(Ok(_)) => Ok(true),
                        Some(Err(e)) => Err(self.err("listing", &rel, e)),
                        None => Ok(false),
                    }
                })
            }
        }
    }

    /// The bytes of the file at `loc`, `None` when there is none, whatever its size: for files
    /// whose size btm bounds itself (a job's log, a download it asked for). Small metadata
    /// another process may have written (plan.json, done.json, manifests) is read with
    /// [`Folder::read_capped`], so a corrupt or hostile file cannot take all memory.
    pub fn read(&self, loc: impl AsRef<Path>) -> Result<Option<Vec<u8>>> {
        self.read_bounded(loc.as_ref(), None)
    }

    /// [`Folder::read`], ending in [`Error::TooLarge`] when the file holds more than `limit`
    /// bytes; no more than `limit` bytes (and one chunk) are ever held.
    pub fn read_capped(&self, loc: impl AsRef<Path>, limit: u64) -> Result<Option<Vec<u8>>> {
        self.read_bounded(loc.as_ref(), Some(limit))
    }

    fn read_bounded(&self, loc: &Path, limit: Option<u64>) -> Result<Option<Vec<u8>>> {
        let rel = self.rel(loc)?;
        let too_large = |limit: u64, size: String| Error::TooLarge { path: self.join(&rel).into(), what: format!("file of {size}"), limit };
        match &self.kind {
            Kind::Local(root) => {
                let path = root.join(&rel);
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(Error::io(&path, e)),
                };
                let Some(limit) = limit else {
                    let mut bytes = Vec::new();
                    (&file).read_to_end(&mut bytes).map_err(|e| Error::io(&path, e))?;
                    return Ok(Some(bytes));
                };
                let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
                if size > limit {
                    return Err(too_large(limit, format!("{size} bytes")));
                }
                // The read stops after `limit + 1` bytes, so a file that grows meanwhile is
                // bounded too.
                let mut bytes = Vec::with_capacity(size as usize);
                file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(&path, e))?;
                if bytes.len() as u64 > limit {
                    return Err(too_large(limit, format!("more than {limit} bytes")));
                }
                Ok(Some(bytes))
            }
            Kind::Remote { store, prefix, runtime } => {
                let key = Self::key(prefix, &rel);
                Self::block(runtime, async {
                    let r = match store.get(&key).await {
                        Ok(r) => r,
                        Err(object_store::Error::NotFound { .. }) => return Ok(None),
                        Err(e) => return Err(self.err("reading", &rel, e)),
                    };
                    let Some(limit) = limit else {
                        return r.bytes().await.map(|b| Some(b.to_vec())).map_err(|e| self.err("reading", &rel, e));
                    };
                    if r.meta.size > limit {
                        return Err(too_large(limit, format!("{} bytes", r.meta.size)));
                    }
                    // The stream is counted too, in case the store sends more than it said.
                    let mut bytes = Vec::with_capacity(r.meta.size as usize);
                    let mut stream = r.into_stream();
                    while let Some(chunk) = stream.try_next().await.map_err(|e| self.err("reading", &rel, e))? {
                        if (bytes.len() + chunk.len()) as u64 > limit {
                            return Err(too_large(limit, format!("more than {limit} bytes")));
                        }
                        bytes.extend_from_slice(&chunk);
                    }
                    Ok(Some(bytes))
                })
            }
        }
    }

    /// Write a whole file (locally through a temporary file and a rename; a single PUT is
    /// atomic in an object store).
    pub fn write(&self, loc: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
        let rel = self.rel(loc.as_ref())?;
        match &self.kind {
            Kind::Local(root) => crate::publish::write_file(&root.join(&rel), bytes),
            Kind::Remote { store, prefix, runtime } => {
                let key = Self::key(prefix, &rel);
                let payload = PutPayload::from(bytes.to_vec());
                Self::block(runtime, async { store.put(&key, payload).await.map(|_| ()).map_err(|e| self.err("writing", &rel, e)) })
            }
        }
    }

    /// Create the directory `loc` (object stores have none: nothing to do there).
    pub fn ensure_dir(&self, loc: impl AsRef<Path>) -> Result<()> {
        let rel = self.rel(loc.as_ref())?;
        if let Kind::Local(root) = &self.kind {
            let path = root.join(&rel);
            std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Files under `loc`, relative to it, sorted.
    pub fn list(&self, loc: impl AsRef<Path>) -> Result<Vec<String>> {
        let rel = self.rel(loc.as_ref())?;
        let mut out = match &self.kind {
            Kind::Local(root) => {
                let base = root.join(&rel);
                let mut out = vec![];
                let mut stack = vec![base.clone()];
                while let Some(dir) = stack.pop() {
                    let entries = match std::fs::read_dir(&dir) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(Error::io(&dir, e)),
                    };
                    for e in entries {
                        let p = e.map_err(|e| Error::io(&dir, e))?.path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if let Ok(r) = p.strip_prefix(&base) {
                            out.push(r.to_string_lossy().into_owned());
                        }
                    }
                }
                out
            }
            Kind::Remote { store, prefix, runtime } => {
                let key = Self::key(prefix, &rel);
                let objects: Vec<StorePath> = Self::block(runtime, async {
                    store.list(Some(&key)).map_ok(|m| m.location).try_collect().await.map_err(|e| self.err("listing", &rel, e))
                })?;
                objects
                    .iter()
                    .filter_map(|o| o.prefix_match(&key).map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/")))
                    .collect()
            }
        };
        out.sort();
        Ok(out)
    }

    /// Remove the file or the whole directory at `loc`; a manifest goes first, so a
    /// half-removed artefact is never taken for a whole one.
    pub fn remove(&self, loc: impl AsRef<Path>) -> Result<()> {
        let rel = self.rel(loc.as_ref())?;
        match &self.kind {
            Kind::Local(root) => {
                let path = root.join(&rel);
                let r = if path.is_dir() {
                    let _ = std::fs::remove_file(path.join(MANIFEST));
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match r {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
                    _ => Ok(()),
                }
            }
            Kind::Remote { store, prefix, runtime } => {
                let key = Self::key(prefix, &rel);
                Self::block(runtime, async {
                    let mut objects: Vec<StorePath> =
                        store.list(Some(&key)).map_ok(|m| m.location).try_collect().await.map_err(|e| self.err("listing", &rel, e))?;
                    // The key itself, when it is an object rather than a prefix.
                    if objects.is_empty() {
                        match store.head(&key).await {
                            Ok(_) => objects.push(key.clone()),
                            Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(self.err("checking", &rel, e)),
                        }
                    }
                    objects.sort_by_key(|p| p.filename() != Some(MANIFEST));
                    for o in objects {
                        match store.delete(&o).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(self.err("deleting", &rel, e)),
                        }
                    }
                    Ok(())
                })
            }
        }
    }

    /// Copy the local file `local` to `loc`; large files go up as a multipart upload, which
    /// the store shows only once every part is in (a failed one is aborted).
    pub fn upload_file(&self, local: &Path, loc: impl AsRef<Path>) -> Result<()> {
        let rel = self.rel(loc.as_ref())?;
        let (store, prefix, runtime) = match &self.kind {
            Kind::Local(root) => {
                let dest = root.join(&rel);
                if dest == local {
                    return Ok(());
                }
                let bytes = std::fs::read(local).map_err(|e| Error::io(local, e))?;
                return self.write(&rel, &bytes);
            }
            Kind::Remote { store, prefix, runtime } => (store, prefix, runtime),
        };
        let key = Self::key(prefix, &rel);
        let size = std::fs::metadata(local).map_err(|e| Error::io(local, e))?.len();
        let part = part_bytes();
        let up = |e: object_store::Error| self.err(&format!("uploading {} to", local.display()), &rel, e);
        Self::block(runtime, async {
            if size <= part as u64 {
                let bytes = std::fs::read(local).map_err(|e| Error::io(local, e))?;
                store.put(&key, PutPayload::from(bytes)).await.map_err(up)?;
                return Ok(());
            }
            let mut upload = store.put_multipart(&key).await.map_err(up)?;
            let result: Result<()> = async {
                let mut file = std::fs::File::open(local).map_err(|e| Error::io(local, e))?;
                let mut in_flight = FuturesUnordered::new();
                loop {
                    let mut buf = Vec::with_capacity(part);
                    (&mut file).take(part as u64).read_to_end(&mut buf).map_err(|e| Error::io(local, e))?;
                    if buf.is_empty() {
                        break;
                    }
                    in_flight.push(upload.put_part(PutPayload::from(buf)));
                    while in_flight.len() >= PARTS_IN_FLIGHT {
                        in_flight.next().await.expect("a part in flight").map_err(up)?;
                    }
                }
                while let Some(r) = in_flight.next().await {
                    r.map_err(up)?;
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => upload.complete().await.map(|_| ()).map_err(up),
                Err(e) => {
                    // Leave no orphaned parts behind when the store can still be reached.
                    let _ = upload.abort().await;
                    Err(e)
                }
            }
        })
    }

    /// Publish the artefact directory `local` (it must have a manifest) at `loc`: every file
    /// the manifest lists, then the manifest.
    pub fn upload_dir(&self, local: &Path, loc: impl AsRef<Path>) -> Result<()> {
        let rel = self.rel(loc.as_ref())?;
        let manifest = Manifest::read(local)?;
        for f in &manifest.files {
            self.upload_file(&local.join(&f.path), sub(&rel, &f.path))?;
        }
        self.upload_file(&local.join(MANIFEST), sub(&rel, MANIFEST))
    }

    /// Download one file to `dest`; `false` when there is none.
    pub fn download_file(&self, loc: impl AsRef<Path>, dest: &Path) -> Result<bool> {
        match self.read(loc)? {
            Some(bytes) => {
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                std::fs::write(dest, &bytes).map_err(|e| Error::io(dest, e))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Download everything under `loc` into `dest` (replaced if it exists), verified against
    /// its manifest when it has one (`require_manifest`: it must).
    pub fn download_dir(&self, loc: impl AsRef<Path>, dest: &Path, require_manifest: bool) -> Result<()> {
        let rel = self.rel(loc.as_ref())?;
        let files = self.list(&rel)?;
        if files.is_empty() {
            return Err(Error::Storage(format!("{}: nothing there", self.join(&rel))));
        }
        let staging = crate::publish::StagingDir::new(dest, true)?;
        for f in &files {
            let file = staging.path.join(f);
            if !self.download_file(sub(&rel, f), &file)? {
                return Err(Error::Storage(format!("{}: vanished while downloading", self.join(&sub(&rel, f)))));
            }
        }
        if require_manifest || staging.path.join(MANIFEST).exists() {
            Manifest::read(&staging.path)?.verify(&staging.path)?;
        }
        staging.publish()
    }

    /// Size and ETag of the object at `loc` (remote folders), `None` when there is none.
    fn head(&self, rel: &str) -> Result<Option<(u64, Option<String>)>> {
        let Kind::Remote { store, prefix, runtime } = &self.kind else {
            return Ok(None);
        };
        let key = Self::key(prefix, rel);
        Self::block(runtime, async {
            match store.head(&key).await {
                Ok(m) => Ok(Some((m.size, m.e_tag))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("checking", rel, e)),
            }
        })
    }
}

/// `rel/name`, or `name` at the root.
fn sub(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// btm's local cache: `$BTM_CACHE`, default `~/.cache/btm`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("BTM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("btm")
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    hex::encode(h.finalize())[..32].to_string()
}

/// A local copy of the file at `location`: a path is used in place; a URL is downloaded once
/// into `$BTM_CACHE/files`, keyed by the object's URL, size and ETag (a content hash for
/// uploads in one part), so a changed object is fetched again.
pub fn fetch_file(location: &str) -> Result<PathBuf> {
    if !is_remote(location) {
        return Ok(PathBuf::from(location.strip_prefix("file://").unwrap_or(location)));
    }
    let folder = Folder::open(location)?;
    let (size, etag) = folder.head("")?.ok_or_else(|| Error::Storage(format!("{location}: no such object")))?;
    let name = location.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("file");
    let key = short_hash(&[location.as_bytes(), size.to_string().as_bytes(), etag.unwrap_or_default().as_bytes()]);
    let dest = cache_root().join("files").join(key).join(name);
    if std::fs::metadata(&dest).is_ok_and(|m| m.len() == size) {
        return Ok(dest);
    }
    let staging = crate::publish::StagingFile::new(&dest)?;
    if !folder.download_file("", &staging.path)? {
        return Err(Error::Storage(format!("{location}: no such object")));
    }
    staging.publish()?;
    Ok(dest)
}

/// A local copy of the directory at `location` (a model): a path is used in place; a URL is
/// downloaded into `$BTM_CACHE/artefacts`, keyed by the SHA-256 of its `MANIFEST.json` (which
/// holds the hash of every file) and verified, so a changed artefact is fetched again. A
/// prefix without a manifest is keyed by its listing and downloaded unverified.
pub fn fetch_dir(location: &str) -> Result<PathBuf> {
    if !is_remote(location) {
        return Ok(PathBuf::from(location.strip_prefix("file://").unwrap_or(location)));
    }
    let folder = Folder::open(location)?;
    let key = match folder.read_capped(MANIFEST, crate::error::MAX_JSON_BYTES)? {
        Some(bytes) => short_hash(&[&bytes]),
        None => {
            let files = folder.list("")?;
            if files.is_empty() {
                return Err(Error::Storage(format!("{location}: no objects under this prefix")));
            }
            short_hash(&[location.as_bytes(), files.join("\n").as_bytes()])
        }
    };
    let dest = cache_root().join("artefacts").join(key);
    if dest.join(MANIFEST).exists() && Manifest::read(&dest).and_then(|m| m.verify(&dest)).is_ok() {
        return Ok(dest);
    }
    folder.download_dir("", &dest, false)?;
    Ok(dest)
}

/// One object in a store, read in place: as a stream from an offset (fetched in chunks by a
/// background thread, a few chunks ahead of the reader, never stored on disk) or by byte
/// ranges. Every byte fetched is counted ([`RemoteObject::fetched`]).
pub struct RemoteObject {
    location: String,
    store: Arc<dyn ObjectStore>,
    key: StorePath,
    runtime: tokio::runtime::Runtime,
    size: u64,
    etag: Option<String>,
    fetched: Arc<std::sync::atomic::AtomicU64>,
}

/// Chunks a streaming read keeps in flight ahead of its reader.
const STREAM_CHUNKS_AHEAD: usize = 4;

impl RemoteObject {
    /// Ask the store for the object at the URL `location` (its size and ETag; no bytes yet).
    pub fn open(location: &str) -> Result<Self> {
        let folder = Folder::open(location)?;
        if !folder.is_remote() {
            return Err(Error::Storage(format!("{location}: not an object-store URL")));
        }
        let (size, etag) = folder.head("")?.ok_or_else(|| Error::Storage(format!("{location}: no such object")))?;
        let Folder { kind: Kind::Remote { store, prefix: key, runtime }, .. } = folder else { unreachable!("checked: remote") };
        Ok(Self { location: location.to_string(), store, key, runtime, size, etag, fetched: Default::default() })
    }

    /// The object's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The object's ETag, when the store gives one (with the size, it names this version).
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// Bytes fetched from the store so far, by every read of this object.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes `range` of the object.
    pub fn read_range(&self, range: std::ops::Range<u64>) -> Result<bytes::Bytes> {
        let (store, key) = (&self.store, &self.key);
        let bytes = Folder::block(&self.runtime, async { store.get_range(key, range.clone()).await })
            .map_err(|e| Error::Storage(format!("reading bytes {}..{} of {}: {e}", range.start, range.end, self.location)))?;
        self.fetched.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(bytes)
    }

    /// The object's bytes from `offset` to its end, as a reader: a background thread fetches
    /// them in the store's chunks, at most a few ahead, so memory stays bounded whatever the
    /// object's size. A store error surfaces as the reader's error.
    pub fn stream_from(&self, offset: u64) -> Box<dyn Read + Send> {
        let (store, key, fetched, location) = (self.store.clone(), self.key.clone(), self.fetched.clone(), self.location.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<bytes::Bytes>>(STREAM_CHUNKS_AHEAD);
        let size = self.size;
        std::thread::spawn(move || {
            let io_err = |e: object_store::Error| std::io::Error::other(format!("{location}: {e}"));
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                let _ = tx.send(Err(std::io::Error::other(format!("{location}: cannot start a runtime"))));
                return;
            };
            runtime.block_on(async move {
                if offset >= size {
                    return;
                }
                let opts = object_store::GetOptions { range: Some((offset..size).into()), ..Default::default() };
                let mut stream = match store.get_opts(&key, opts).await {
                    Ok(r) => r.into_stream(),
                    Err(e) => {
                        let _ = tx.send(Err(io_err(e)));
                        return;
                    }
                };
                while let Some(chunk) = stream.next().await {
                    if let Ok(c) = &chunk {
                        fetched.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    // A reader that stopped reading (an error, enough documents) ends the fetch.
                    if tx.send(chunk.map_err(io_err)).is_err() {
                        return;
                    }
                }
            });
        });
        Box::new(ChannelReader { rx, chunk: bytes::Bytes::new(), remaining: size.saturating_sub(offset), location: self.location.clone() })
    }
}

/// The reading end of [`RemoteObject::stream_from`].
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
    /// Bytes still to come: a fetch that ends early is an error, not a short object.
    remaining: u64,
    location: String,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.recv() {
                Ok(Ok(c)) => self.chunk = c,
                Ok(Err(e)) => return Err(e),
                Err(_) if self.remaining == 0 => return Ok(0),
                Err(_) => {
                    return Err(std::io::Error::other(format!(
                        "{}: the fetch ended {} bytes before the end",
                        self.location, self.remaining
                    )))
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        self.remaining = self.remaining.saturating_sub(n as u64);
        Ok(n)
    }
}

/// Where a worker writes an output bound for `location`, and how it is published: a local
/// path is written in place; for a URL the worker writes into a local staging path, and
/// [`Output::publish`] uploads it (a directory file by file, manifest last).
pub struct Output {
    location: String,
    local: PathBuf,
    staging: Option<tempfile::TempDir>,
}

impl Output {
    /// The output bound for `location` (a path, `file://` URL or object-store URL); for a URL,
    /// a fresh staging directory under [`cache_root`]`/staging` holds it until [`Self::publish`].
    pub fn new(location: &str) -> Result<Self> {
        if !is_remote(location) {
            let local = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
            return Ok(Self { location: location.into(), local, staging: None });
        }
        // Check the store is reachable before the work, not after it.
        Folder::open(location)?;
        let root = cache_root().join("staging");
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let staging = tempfile::Builder::new().prefix("out-").tempdir_in(&root).map_err(|e| Error::io(&root, e))?;
        let name = location.trim_end_matches('/').rsplit('/').next().unwrap_or("out").to_string();
        Ok(Self { location: location.into(), local: staging.path().join(name), staging: Some(staging) })
    }

    /// The local path to write.
    pub fn path(&self) -> &Path {
        &self.local
    }

    /// Upload what was written (nothing to do for a local output). An old artefact at the
    /// location is removed first, manifest first.
    pub fn publish(self) -> Result<()> {
        if self.staging.is_none() {
            return Ok(());
        }
        let folder = Folder::open(&self.location)?;
        if self.local.is_dir() {
            folder.remove("")?;
            folder.upload_dir(&self.local, "")
        } else {
            folder.upload_file(&self.local, "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folder_reads_writes_lists_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        let f = Folder::open(root.to_str().unwrap()).unwrap();
        assert!(!f.is_remote());
        f.write("jobs/a/done.json", b"{}").unwrap();
        // Full locations under the root work as well as relative ones.
        assert_eq!(f.read(root.join("jobs/a/done.json")).unwrap().unwrap(), b"{}");
        assert!(f.read("jobs/b/done.json").unwrap().is_none());
        assert!(f.exists("jobs/a").unwrap());
        assert!(f.read("/elsewhere/x").is_err(), "a path outside the folder is refused");
        f.write("jobs/a/x/y.txt", b"y").unwrap();
        assert_eq!(f.list("jobs").unwrap(), vec!["a/done.json", "a/x/y.txt"]);
        f.remove("jobs/a").unwrap();
        assert!(!f.exists("jobs/a").unwrap());
        f.remove("never/was").unwrap();
        assert_eq!(f.join("x/y"), format!("{}/x/y", root.display()));
    }

    #[test]
    fn capped_reads_end_in_a_named_error_above_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let local = Folder::open(&tmp.path().join("local").to_string_lossy()).unwrap();
        let store = Folder::open(&format!("file://{}", tmp.path().join("store").display())).unwrap();
        for f in [&local, &store] {
            f.write("plan.json", &[b' '; 100]).unwrap();
            assert_eq!(f.read_capped("plan.json", 100).unwrap().unwrap().len(), 100, "{f:?}");
            let err = f.read_capped("plan.json", 99).unwrap_err();
            assert!(matches!(err, Error::TooLarge { limit: 99, .. }), "{f:?}: {err}");
            assert!(err.to_string().contains("plan.json: file of 100 bytes exceeds the limit of 99 bytes"), "{err}");
            assert!(f.read_capped("done.json", 99).unwrap().is_none(), "{f:?}");
            assert_eq!(f.read("plan.json").unwrap().unwrap().len(), 100, "{f:?}: read stays unbounded");
        }
    }

    #[test]
    fn directories_go_up_and_down_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let art = tmp.path().join("art");
        std::fs::create_dir_all(&art).unwrap();
        std::fs::write(art.join("a.bin"), vec![7u8; 1000]).unwrap();
        Manifest::build(&art, &Default::default()).unwrap().write(&art).unwrap();
        let store = Folder::open(&format!("file://{}", tmp.path().join("store").display())).unwrap();
        store.upload_dir(&art, "x/art").unwrap();
        assert_eq!(store.list("x/art").unwrap(), vec!["MANIFEST.json", "a.bin"]);
        let back = tmp.path().join("back");
        store.download_dir("x/art", &back, true).unwrap();
        assert_eq!(std::fs::read(back.join("a.bin")).unwrap(), vec![7u8; 1000]);
        // A corrupted copy fails verification and leaves nothing behind.
        store.write("x/art/a.bin", b"short").unwrap();
        let bad = tmp.path().join("bad");
        let e = store.download_dir("x/art", &bad, true).unwrap_err().to_string();
        assert!(e.contains("a.bin"), "{e}");
        assert!(!bad.exists());
    }

    #[test]
    fn local_outputs_are_written_in_place() {
        let o = Output::new("/tmp/some/out").unwrap();
        assert_eq!(o.path(), Path::new("/tmp/some/out"));
        o.publish().unwrap();
        assert!(is_remote("s3://b/x") && is_remote("gs://b") && !is_remote("file:///x") && !is_remote("rel/x") && !is_remote("C:\\x"));
    }
}
