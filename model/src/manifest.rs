//! `MANIFEST.json`: every file of an artefact with its size and SHA-256, written last.
//!
//! An artefact (checkpoint, model, eval result) is complete exactly when its manifest exists
//! and every listed file matches it; readers trust nothing without one.

use crate::error::{read_capped, Error, Result, MAX_JSON_BYTES};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// The manifest's file name at the root of an artefact directory.
pub const MANIFEST: &str = "MANIFEST.json";
const FORMAT: &str = "btm-manifest/1";

/// One file of an artefact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the artefact directory, `/`-separated (e.g. `sub/b.bin`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

/// The contents of `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format tag, `btm-manifest/1`; [`Manifest::read`] rejects any other.
    pub format: String,
    /// Every file under the directory except the manifest itself, in walk order (names sorted
    /// within each directory).
    pub files: Vec<FileEntry>,
}

/// SHA-256 and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

fn collect(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let here = dir.join(rel);
    let mut entries: Vec<_> =
        std::fs::read_dir(&here).map_err(|e| Error::io(&here, e))?.collect::<std::io::Result<_>>().map_err(|e| Error::io(&here, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if entry.file_type().map_err(|e| Error::io(entry.path(), e))?.is_dir() {
            collect(dir, &path, out)?;
        } else if path != MANIFEST {
            out.push(path);
        }
    }
    Ok(())
}

impl Manifest {
    /// Hash every file under `dir` (recursively), reusing `known` hashes of files just written.
    pub fn build(dir: &Path, known: &BTreeMap<String, (u64, String)>) -> Result<Self> {
        let mut paths = Vec::new();
        collect(dir, "", &mut paths)?;
        let files = paths
            .into_iter()
            .map(|path| {
                let (size, sha256) = match known.get(&path) {
                    Some(k) => k.clone(),
                    None => hash_file(&dir.join(&path))?,
                };
                Ok(FileEntry { path, size, sha256 })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { format: FORMAT.into(), files })
    }

    /// Write `dir/MANIFEST.json` so it appears whole ([`crate::publish::write_file`]).
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::publish::write_file(&dir.join(MANIFEST), &serde_json::to_vec_pretty(self).expect("manifest serialises"))
    }

    /// Read and parse `dir/MANIFEST.json` (without checking the files; see [`Self::verify`]).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let bytes = read_capped(&path, MAX_JSON_BYTES, "manifest")?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Manifest(format!("{}: {e}", path.display())))?;
        if m.format != FORMAT {
            return Err(Error::Manifest(format!("{}: unknown format `{}`", path.display(), m.format)));
        }
        Ok(m)
    }

    /// Check every listed file's size and hash.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for f in &self.files {
            let path = dir.join(&f.path);
            let (size, sha) = hash_file(&path)?;
            if size != f.size {
                return Err(Error::Manifest(format!("{}: {size} bytes, the manifest says {}", path.display(), f.size)));
            }
            if sha != f.sha256 {
                return Err(Error::Manifest(format!("{}: SHA-256 differs from the manifest", path.display())));
            }
        }
        Ok(())
    }

    /// The identity of an artefact: SHA-256 of its manifest's bytes.
    pub fn id(dir: &Path) -> Result<String> {
        let path = dir.join(MANIFEST);
        let bytes = read_capped(&path, MAX_JSON_BYTES, "manifest")?;
        Ok(hex::encode(Sha256::digest(&bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_truncation_and_tampering() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.bin"), b"hello").unwrap();
        std::fs::write(dir.path().join("sub/b.bin"), b"world").unwrap();
        let m = Manifest::build(dir.path(), &BTreeMap::new()).unwrap();
        m.write(dir.path()).unwrap();
        let m = Manifest::read(dir.path()).unwrap();
        assert_eq!(m.files.len(), 2);
        m.verify(dir.path()).unwrap();
        std::fs::write(dir.path().join("sub/b.bin"), b"worle").unwrap();
        assert!(m.verify(dir.path()).unwrap_err().to_string().contains("SHA-256 differs"));
        std::fs::write(dir.path().join("a.bin"), b"hel").unwrap();
        assert!(m.verify(dir.path()).unwrap_err().to_string().contains("3 bytes, the manifest says 5"));
    }

    #[test]
    fn oversized_or_garbage_manifests_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MANIFEST);
        std::fs::write(&p, b"\x00\x01garbage").unwrap();
        assert!(Manifest::read(dir.path()).unwrap_err().to_string().starts_with(&format!("manifest: {}: ", p.display())));
        // Sparse: refused from its size, never read.
        std::fs::File::create(&p).unwrap().set_len(MAX_JSON_BYTES + 1).unwrap();
        let want = format!("{}: manifest of 67108865 bytes exceeds the limit of 64 MiB (67108864 bytes)", p.display());
        assert_eq!(Manifest::read(dir.path()).unwrap_err().to_string(), want);
        assert_eq!(Manifest::id(dir.path()).unwrap_err().to_string(), want);
    }
}
