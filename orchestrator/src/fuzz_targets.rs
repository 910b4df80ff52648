//! Entry points for fuzzing the orchestrator's readers of bytes it does not control: pipeline
//! files, job spec files, and the answers of Slurm, Kubernetes and Ray. Each takes arbitrary
//! bytes and returns a [`Result`]; whatever the bytes, it must end in `Ok` or a named error,
//! never a panic, a hang, an abort or an allocation the input's size does not bound. The
//! cargo-fuzz targets in `fuzz/` call these; `orchestrator/tests/fuzz_replay.rs` replays their
//! corpus and regressions on stable. Nothing here is used by btm itself.

use crate::engine::JobState;
use anyhow::{Context, Result};

/// The input as text: the readers take text, as they do from files and servers.
fn text(data: &[u8]) -> Result<&str> {
    std::str::from_utf8(data).context("not UTF-8")
}

/// A pipeline file, loaded and checked as `btm validate` does ([`crate::pipeline::load`]): from
/// a temporary directory, so that relative data paths resolve to nothing that exists.
pub fn pipeline_yaml(data: &[u8]) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, data).with_context(|| format!("writing {}", file.display()))?;
    crate::pipeline::load(&file, &[])?;
    Ok(())
}

/// The job spec kinds, in the order of the selector byte of [`job_spec`].
pub const JOB_SPEC_KINDS: [&str; 10] =
    ["train", "merge", "upcycle", "add-expert", "remove-expert", "eval", "average", "tokenizer", "cluster", "train-parse"];

/// A job spec file (`btm <kind> --spec FILE`), its kind picked by the first byte (modulo
/// [`JOB_SPEC_KINDS`]'s length): parsed as [`crate::commands::read_spec`] parses it, and for
/// `train-parse` as `btm train --job FILE` does ([`btm_trainer::JobSpec::parse`]).
pub fn job_spec(data: &[u8]) -> Result<()> {
    let Some((&kind, rest)) = data.split_first() else { return Ok(()) };
    let text = text(rest)?;
    fn spec<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
        Ok(crate::yaml::from_str(text)?)
    }
    match JOB_SPEC_KINDS[kind as usize % JOB_SPEC_KINDS.len()] {
        "train" => drop(spec::<btm_trainer::JobSpec>(text)?),
        "merge" => drop(spec::<btm_merger::MergeSpec>(text)?),
        "upcycle" => drop(spec::<btm_merger::UpcycleSpec>(text)?),
        "add-expert" => drop(spec::<btm_merger::AddExpertSpec>(text)?),
        "remove-expert" => drop(spec::<btm_merger::RemoveExpertSpec>(text)?),
        "eval" => drop(spec::<btm_trainer::jobs::EvalBatch>(text)?),
        "average" => drop(spec::<btm_trainer::jobs::AverageSpec>(text)?),
        "tokenizer" => drop(spec::<btm_trainer::jobs::TokenizerSpec>(text)?),
        "cluster" => drop(spec::<btm_cluster::ClusterSpec>(text)?.options()?),
        _ => drop(btm_trainer::JobSpec::parse(text, std::path::Path::new("/nonexistent"))?),
    }
    Ok(())
}

/// Split `data` at its first byte `0`: the parts a target reads as two answers.
fn two_parts(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Answers from Slurm, the first byte picking which: the output of `sbatch --parsable`,
/// `squeue -h -o %T`, `scontrol show job -o` and `scontrol show config`; a slurmrestd answer
/// (read as the engine reads a submission's and a job's); a slurmrestd OpenAPI document, with a
/// job to check against it. The handle a state is asked for comes from the second part.
pub fn slurm_answers(data: &[u8]) -> Result<()> {
    use crate::engine::slurm;
    let Some((&kind, rest)) = data.split_first() else { return Ok(()) };
    let (answer, handle) = two_parts(rest);
    let answer = String::from_utf8_lossy(answer);
    match kind % 6 {
        0 => drop(slurm::sbatch_job_id(&answer)?),
        1 => drop(slurm::squeue_state(&answer)),
        2 => drop(slurm::scontrol_state(&answer)),
        3 => {
            let _ = slurm::parse_max_array_size(&answer);
        }
        4 => {
            let (v, errors) = slurm::rest_answer(&answer)?;
            drop(errors);
            drop(slurm::rest_submitted_id(&v));
            let (_, task) = slurm::array_task(text(handle)?)?;
            drop(slurm::rest_job_state(&v, task));
        }
        _ => {
            let (openapi, _) = slurm::rest_answer(&answer)?;
            let job: serde_json::Value = serde_json::from_slice(handle).context("the job is not JSON")?;
            if let Some(version) = slurm::newest_version(&openapi) {
                drop(slurm::schema_mismatches(&openapi, version, &job));
            }
            drop(slurm::schema_mismatches(&openapi, "v0.0.38", &job));
        }
    }
    Ok(())
}

/// Answers from the Kubernetes API server about a Job, as kube reads them (`serde_json` into
/// `k8s_openapi`'s `Job`, or an error `Status`), and the state btm takes from the Job's status
/// for the handle in the second part.
pub fn kubernetes_answers(data: &[u8]) -> Result<()> {
    use crate::engine::kubernetes;
    let (answer, handle) = two_parts(data);
    let (_, first, last) = kubernetes::job_indices(text(handle)?)?;
    match serde_json::from_slice::<k8s_openapi::api::batch::v1::Job>(answer) {
        Ok(job) => drop(kubernetes::indices_state(job.status.as_ref(), first, last)),
        Err(_) => drop(serde_json::from_slice::<kube::core::Status>(answer).context("neither a Job nor a Status")?),
    }
    Ok(())
}

/// Answers from Ray's Jobs API: a job's record (`GET /api/jobs/{id}`), its state, and the
/// text btm quotes from an error answer.
pub fn ray_answers(data: &[u8]) -> Result<()> {
    use crate::engine::ray;
    let answer = String::from_utf8_lossy(data);
    drop(ray::ray_error(&answer));
    let _ = ray::refusal(&answer);
    let v = ray::job_answer(&answer)?;
    let state = ray::to_state(&v);
    if let JobState::Failed(why) = &state {
        anyhow::ensure!(!why.is_empty(), "a failed state without a reason");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The pipeline target reaches the checks past parsing: a quickstart-like pipeline fails
    /// only on its data files, which do not exist in the temporary directory.
    #[test]
    fn a_valid_pipeline_gets_past_parsing() {
        let yaml = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/quickstart.yaml")).unwrap();
        let err = pipeline_yaml(&yaml).unwrap_err().to_string();
        assert!(!err.contains("invalid YAML") && !err.contains("unknown key"), "{err}");
    }

    /// Every job file the plans of the example pipelines (`configs/`) write reads through
    /// [`job_spec`] as its kind. With `BTM_FUZZ_SEEDS` set to a folder, they are also written
    /// there, selector byte first: the seed corpus of the `job_spec` fuzz target.
    #[test]
    fn every_planned_job_file_reads_as_its_kind() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let seeds = std::env::var_os("BTM_FUZZ_SEEDS").map(std::path::PathBuf::from);
        let mut read = 0;
        for entry in std::fs::read_dir(&configs).unwrap() {
            let path = entry.unwrap().path();
            let Ok(loaded) = crate::pipeline::load(&path, &[]) else { continue };
            let run = tempfile::tempdir().unwrap();
            let Ok(plan) = crate::plan::plan(&loaded.pipeline, &loaded.base_dir, run.path()) else { continue };
            for job in &plan.jobs {
                // The command names the spec's kind: `btm merge --spec …`, `btm train --job …`.
                let kind = job.args.first().map_or("", String::as_str);
                let selector = JOB_SPEC_KINDS.iter().position(|k| *k == kind).unwrap_or_else(|| panic!("{}: kind {kind}", job.name)) as u8;
                // The spec the job's command reads (`--job job.yaml`, `--spec spec.json`); the
                // other files (a seed's config.json) are the model readers'.
                let specs = job.files.iter().filter(|(f, _)| job.args.iter().any(|a| Path::new(a) == f.as_path()));
                for (file, contents) in specs {
                    let input = [&[selector][..], contents.as_bytes()].concat();
                    job_spec(&input).unwrap_or_else(|e| panic!("{}: {} {}: {e:#}", path.display(), job.name, file.display()));
                    read += 1;
                    if let Some(dir) = &seeds {
                        let stem = path.file_stem().unwrap().to_string_lossy();
                        std::fs::write(dir.join(format!("{stem}-{}", job.name.replace('/', "-"))), &input).unwrap();
                    }
                }
            }
        }
        assert!(read > 10, "only {read} job files read from {}", configs.display());
    }

    #[test]
    fn each_job_spec_kind_is_read() {
        let remove = [&[4u8][..], b"moe: m\nexpert: 1\nout: o\n"].concat();
        job_spec(&remove).unwrap();
        let err = job_spec(&[&[4u8][..], b"moe: m\nexpert: 1\nout: o\noverwrit: true\n"].concat()).unwrap_err().to_string();
        assert!(err.contains("unknown field `overwrit`"), "{err}");
    }

    #[test]
    fn engine_answers_are_read() {
        slurm_answers(b"\x004242;cluster\n").unwrap();
        assert!(slurm_answers(b"\x00sbatch: error: no\n").is_err());
        slurm_answers(b"\x04{\"jobs\": [{\"job_state\": [\"RUNNING\"], \"array_task_id\": {\"set\": true, \"number\": 3}}]}\x0012_3")
            .unwrap();
        kubernetes_answers(b"{\"status\": {\"completedIndexes\": \"0-2\"}}\x00job/0-2").unwrap();
        assert!(kubernetes_answers(b"{}\x00job/0-18446744073709551615").is_err());
        ray_answers(b"{\"status\": \"FAILED\", \"message\": \"x\"}").unwrap();
    }
}
