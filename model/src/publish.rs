//! Publishing: the one way btm makes a file or a folder appear at its final path whole, or
//! not at all.
//!
//! Everything btm writes (checkpoints, training checkpoints, token caches, downloads, merged
//! models, results) is first written under a hidden temporary sibling of its destination
//! (`.NAME.tmp-PID-NANOS`, on the same file system) and then renamed into place, so a reader,
//! a resumed job or a crashed writer never meets half of it. A folder's `MANIFEST.json` is
//! written last inside the staging folder ([`crate::manifest`]); an object store gets the
//! same guarantee from uploading the manifest last ([`crate::folder::Folder::upload_dir`]).
//! What is dropped unpublished is removed.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A hidden temporary sibling of `dest`: `.NAME.tmp-PID-NANOS` beside it. The process id and
/// the clock keep two writers (or two attempts of one job) apart.
pub fn temporary_sibling(dest: &Path) -> PathBuf {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

/// Write `bytes` to `dest` through a temporary sibling and a rename (creating the parent
/// folders), so `dest` holds the old content or the new one, never a part.
pub fn write_file(dest: &Path, bytes: &[u8]) -> Result<()> {
    let staging = StagingFile::new(dest)?;
    std::fs::write(&staging.path, bytes).map_err(|e| Error::io(&staging.path, e))?;
    staging.publish()
}

/// A temporary sibling file that is renamed onto its destination by [`StagingFile::publish`]
/// and removed if dropped unpublished (an error, a panic).
pub struct StagingFile {
    /// Where to write.
    pub path: PathBuf,
    dest: PathBuf,
    published: bool,
}

impl StagingFile {
    /// A staging path for `dest`; its parent folders are created.
    pub fn new(dest: &Path) -> Result<Self> {
        create_parent(dest)?;
        Ok(Self { path: temporary_sibling(dest), dest: dest.to_path_buf(), published: false })
    }

    /// Rename the finished file onto its destination (replacing an old one).
    pub fn publish(mut self) -> Result<()> {
        std::fs::rename(&self.path, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for StagingFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A temporary sibling folder that is renamed onto its destination by [`StagingDir::publish`]
/// and removed if dropped unpublished.
pub struct StagingDir {
    /// The folder to write into (created empty).
    pub path: PathBuf,
    dest: PathBuf,
    published: bool,
}

impl StagingDir {
    /// An empty staging folder for `dest`; an existing `dest` is an error unless `overwrite`.
    pub fn new(dest: &Path, overwrite: bool) -> Result<Self> {
        if dest.exists() && !overwrite {
            return Err(Error::Storage(format!("{} already exists (refusing to overwrite)", dest.display())));
        }
        create_parent(dest)?;
        let path = temporary_sibling(dest);
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, dest: dest.to_path_buf(), published: false })
    }

    /// Rename the finished folder into place. An old folder there is first moved aside and
    /// removed after, so the destination is never missing a part of either.
    pub fn publish(mut self) -> Result<()> {
        if self.dest.exists() {
            let old = self.path.with_extension("old");
            std::fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
            std::fs::rename(&self.path, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.path, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        self.published = true;
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn create_parent(dest: &Path) -> Result<()> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_appears_whole_and_an_unpublished_one_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("a/b/x.json");
        write_file(&dest, b"one").unwrap();
        write_file(&dest, b"two").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        let staging = StagingFile::new(&dest).unwrap();
        std::fs::write(&staging.path, b"half").unwrap();
        drop(staging);
        assert_eq!(names(&tmp.path().join("a/b")), vec!["x.json"]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
    }

    #[test]
    fn a_folder_replaces_the_old_one_or_leaves_it_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("model");
        let s = StagingDir::new(&dest, false).unwrap();
        std::fs::write(s.path.join("w"), b"1").unwrap();
        s.publish().unwrap();
        let e = StagingDir::new(&dest, false).err().unwrap().to_string();
        assert!(e.contains("already exists"), "{e}");
        let s = StagingDir::new(&dest, true).unwrap();
        std::fs::write(s.path.join("w"), b"half").unwrap();
        drop(s);
        assert_eq!(names(tmp.path()), vec!["model"]);
        assert_eq!(std::fs::read(dest.join("w")).unwrap(), b"1");
        let s = StagingDir::new(&dest, true).unwrap();
        std::fs::write(s.path.join("v"), b"2").unwrap();
        s.publish().unwrap();
        assert_eq!(names(&dest), vec!["v"]);
        assert_eq!(names(tmp.path()), vec!["model"]);
    }
}
