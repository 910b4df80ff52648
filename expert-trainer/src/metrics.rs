//! Metrics and progress: one JSON object a line in `<out>/metrics.jsonl` (training lines have
//! `step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `tokens_seen`, and for MoE models
//! `aux_loss`, `z_loss`, `expert_load`; validation lines have `step`, `val_loss`, `val_ppl`),
//! and progress on stderr: a progress bar (indicatif) on a terminal, plain lines otherwise
//! (logs, pipes, the orchestrator's job logs).
//!
//! On resume, lines for steps after the checkpoint are dropped first, so the file reads as
//! one uninterrupted run.

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS: &str = "metrics.jsonl";

pub struct Metrics {
    path: PathBuf,
    /// `None` on the ranks of a multi-process run other than rank 0, which writes for all.
    file: Option<std::fs::File>,
    quiet: bool,
    /// Only when stderr is a terminal.
    bar: Option<indicatif::ProgressBar>,
    /// The same records as TensorBoard scalars (rank 0 of a btm-trained job).
    tensorboard: Option<crate::tensorboard::EventWriter>,
}

impl Metrics {
    /// Open `<dir>/metrics.jsonl` for appending, keeping only lines with `step <= keep_through`.
    pub fn open(dir: &Path, keep_through: u64, quiet: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(METRICS);
        if path.exists() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= keep_through)
                })
                .collect();
            let mut body = kept.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            std::fs::write(&path, body).with_context(|| format!("rewriting {}", path.display()))?;
        }
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path, file: Some(file), quiet, bar: None, tensorboard: None })
    }

    /// Metrics of a rank other than 0: nothing written, nothing printed (rank 0 reports the
    /// step's all-reduced figures).
    pub fn silent(dir: &Path) -> Self {
        Self { path: dir.join(METRICS), file: None, quiet: true, bar: None, tensorboard: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Also write every record as TensorBoard scalars ([`crate::tensorboard`]).
    pub fn set_tensorboard(&mut self, writer: crate::tensorboard::EventWriter) {
        self.tensorboard = Some(writer);
    }

    /// The TensorBoard event file being written, if any.
    pub fn tensorboard_path(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(|w| w.path())
    }

    /// Append one record (and its numbers to the TensorBoard events).
    pub fn record(&mut self, v: &Value) -> Result<()> {
        let mut line = serde_json::to_string(v)?;
        line.push('\n');
        if let Some(file) = &mut self.file {
            file.write_all(line.as_bytes()).with_context(|| format!("writing {}", self.path.display()))?;
        }
        match &mut self.tensorboard {
            Some(tb) => tb.record(v),
            None => Ok(()),
        }
    }

    /// A progress line on stderr (above the bar, if there is one).
    pub fn say(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(format!("[btm train] {msg}")),
            // A closed stderr (a dead log pipe) must not stop training.
            None => {
                let _ = writeln!(std::io::stderr(), "[btm train] {msg}");
            }
        }
    }

    /// Training progress: the bar on a terminal, else a plain line.
    pub fn progress(&mut self, step: u64, total: u64, msg: &str) {
        use std::io::IsTerminal;
        if self.quiet {
            return;
        }
        if self.bar.is_none() && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("a valid progress template"));
            self.bar = Some(bar);
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg.to_string());
            }
            None => self.say(&format!("step {step}/{total} {msg}")),
        }
    }

    /// Remove the bar (at the end of training).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// "1h02m", "3m05s", "12s".
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reopening_drops_lines_after_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Metrics::open(dir.path(), 0, true).unwrap();
        for step in [0, 5, 10, 15] {
            m.record(&json!({"step": step, "loss": 1.0})).unwrap();
        }
        drop(m);
        let mut m = Metrics::open(dir.path(), 10, true).unwrap();
        m.record(&json!({"step": 15, "loss": 2.0})).unwrap();
        let text = std::fs::read_to_string(m.path()).unwrap();
        let steps: Vec<u64> = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![0, 5, 10, 15]);
        assert!(text.ends_with("{\"step\":15,\"loss\":2.0}\n"));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(12.4), "12s");
        assert_eq!(human_duration(185.0), "3m05s");
        assert_eq!(human_duration(3720.0), "1h02m");
    }
}
