//! Inputs of a run kept in an object store. Its workers share no filesystem with `btm run`, so
//! every local file or directory a job reads — data, calibration text, a seed checkpoint — is
//! uploaded once into the run as `inputs/<content hash>/<name>`, and the job is pointed at that
//! URL; workers fetch it into their cache. An uploaded directory always gets a `MANIFEST.json`
//! (the one it has, or one made here), uploaded last, so a half-uploaded input is never used.
//! Local runs are left as they are.

use crate::plan::Plan;
use anyhow::{Context, Result};
use btm_model::folder::{is_remote, Folder};
use btm_model::manifest::{Manifest, MANIFEST};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Point every job of an object-store run at uploaded copies of its local inputs; `upload`
/// false (a dry run) only computes the URLs.
pub fn upload(plan: &mut Plan, upload: bool) -> Result<()> {
    let run = plan.run_dir.to_string_lossy().into_owned();
    if !is_remote(&run) {
        return Ok(());
    }
    let mut uploader = Uploader { folder: Folder::shared(&run)?, upload, uploaded: HashMap::new() };
    for job in &mut plan.jobs {
        for arg in &mut job.args {
            // Whole arguments, `NAME=FILE` (calibration) and `from:DIR` (non-expert weights).
            let (head, tail) = match (arg.split_once('='), arg.strip_prefix("from:")) {
                (Some((name, file)), _) => (format!("{name}="), file.to_string()),
                (None, Some(dir)) => ("from:".to_string(), dir.to_string()),
                (None, None) => (String::new(), arg.clone()),
            };
            if let Some(url) = uploader.upload(&tail)? {
                *arg = format!("{head}{url}");
            }
        }
        for (path, contents) in &mut job.files {
            if path.file_name().is_some_and(|n| n == "job.yaml") {
                let mut spec: btm_trainer::JobSpec = serde_yaml::from_str(contents).with_context(|| format!("{}", path.display()))?;
                if let Some(c) = &mut spec.init.checkpoint {
                    if let Some(url) = uploader.upload(c)? {
                        *c = url;
                    }
                }
                for p in spec.data.train.iter_mut().map(|s| &mut s.path).chain(spec.data.valid.iter_mut()) {
                    if let Some(url) = uploader.upload(&p.to_string_lossy())? {
                        *p = url.into();
                    }
                }
                *contents = serde_yaml::to_string(&spec)?;
            }
        }
    }
    Ok(())
}

struct Uploader {
    folder: std::sync::Arc<Folder>,
    upload: bool,
    /// Local path → its URL in the run.
    uploaded: HashMap<String, String>,
}

impl Uploader {
    /// The URL of the uploaded copy of `local`, when it is an existing local file or directory
    /// (the planner makes every input path absolute; anything else is not an input).
    fn upload(&mut self, local: &str) -> Result<Option<String>> {
        let path = Path::new(local);
        if !path.is_absolute() || !path.exists() {
            return Ok(None);
        }
        if let Some(url) = self.uploaded.get(local) {
            return Ok(Some(url.clone()));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "input".into());
        let url = if path.is_dir() {
            let manifest = match Manifest::read(path) {
                Ok(_) => std::fs::read(path.join(MANIFEST)).with_context(|| format!("{}", path.display()))?,
                Err(_) => serde_json::to_vec_pretty(&Manifest::build(path, &Default::default())?)?,
            };
            let rel = format!("inputs/{}/{name}", &hex::encode(Sha256::digest(&manifest))[..16]);
            if self.upload && !self.folder.exists(format!("{rel}/{MANIFEST}"))? {
                let m: Manifest = serde_json::from_slice(&manifest)?;
                for f in &m.files {
                    self.folder.upload_file(&path.join(&f.path), format!("{rel}/{}", f.path))?;
                }
                self.folder.write(format!("{rel}/{MANIFEST}"), &manifest)?;
            }
            self.folder.join(&rel)
        } else {
            let (_, sha) = btm_model::manifest::hash_file(path)?;
            let rel = format!("inputs/{}/{name}", &sha[..16]);
            // A single PUT, or a multipart upload, appears whole or not at all.
            if self.upload && !self.folder.exists(&rel)? {
                self.folder.upload_file(path, &rel)?;
            }
            self.folder.join(&rel)
        };
        self.uploaded.insert(local.to_string(), url.clone());
        Ok(Some(url))
    }
}
