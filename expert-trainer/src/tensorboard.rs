//! TensorBoard event files: every number a training job records in `metrics.jsonl` also goes,
//! as a scalar at its step, into `<out>/tb/events.out.tfevents.*`, so `tensorboard --logdir RUN`
//! (and `wandb sync --sync-tensorboard`) show every job of a run.
//!
//! The format is TensorFlow's: a file of TFRecords (little-endian u64 length, its masked
//! CRC-32C, the bytes, their masked CRC-32C), each an `Event` protocol buffer
//! (`tensorflow/core/util/event.proto`): the first carries `file_version = "brain.Event:2"`,
//! the rest a `Summary` of one `simple_value` per tag. The few fields written are encoded here
//! by hand (wire types 1, 0, 2 and 5), which keeps protobuf out of the build.
//!
//! A resumed job opens a new file that starts with a `SessionLog` START at the first step it
//! will log: TensorBoard then drops the events of the killed attempt at and after that step
//! (its `purge_orphaned_data`), so a curve shows each step once.

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The folder under a job's `out` that holds its event files.
pub const TB_DIR: &str = "tb";

/// Appends events to one TensorBoard event file.
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorFlow names them; `resumed_at`: the
    /// first step this attempt logs when it resumes a run (events of earlier attempts from that
    /// step on are then dropped by TensorBoard).
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
        // The process id and nanoseconds keep two attempts started in one second apart (TensorBoard
        // reads the files of a folder in name order).
        let name = format!("events.out.tfevents.{}.{host}.{}.{:09}", now.as_secs(), std::process::id(), now.subsec_nanos());
        let path = dir.join(name);
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { path, file: std::io::BufWriter::new(file) };
        let wall = now.as_secs_f64();
        w.write_event(&event(wall, 0, EventBody::FileVersion("brain.Event:2")))?;
        if let Some(step) = resumed_at {
            w.write_event(&event(wall, step, EventBody::SessionStart))?;
        }
        w.flush()?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every number of a metrics record (see [`scalars`]) as a scalar at the record's `step`;
    /// a record without a step is skipped.
    pub fn record(&mut self, rec: &Value) -> Result<()> {
        let Some(step) = rec.get("step").and_then(Value::as_u64) else { return Ok(()) };
        let values = scalars(rec);
        if values.is_empty() {
            return Ok(());
        }
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.write_event(&event(wall, step, EventBody::Summary(&values)))?;
        // Flushed per record: a job's record rate is low, and TensorBoard reads the file live.
        self.flush()
    }

    fn write_event(&mut self, bytes: &[u8]) -> Result<()> {
        let len = (bytes.len() as u64).to_le_bytes();
        let io = |e| anyhow::Error::new(e).context(format!("writing {}", self.path.display()));
        self.file.write_all(&len).map_err(io)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes()).map_err(io)?;
        self.file.write_all(bytes).map_err(io)?;
        self.file.write_all(&masked_crc(bytes).to_le_bytes()).map_err(io)
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The scalars of a metrics record: every number but `step`, by its key; per-layer lists of
/// numbers as `key/layer{l}`, lists of lists as `key/layer{l}/expert{e}` (the MoE's expert load),
/// named numbers as `key/{name}` (validation perplexity per data file).
pub fn scalars(rec: &Value) -> Vec<(String, f32)> {
    let mut out = vec![];
    let Some(map) = rec.as_object() else { return out };
    for (key, v) in map.iter().filter(|(k, _)| k.as_str() != "step") {
        match v {
            Value::Number(n) => out.extend(n.as_f64().map(|x| (key.clone(), x as f32))),
            Value::Array(layers) => {
                for (l, layer) in layers.iter().enumerate() {
                    match layer {
                        Value::Number(n) => out.extend(n.as_f64().map(|x| (format!("{key}/layer{l}"), x as f32))),
                        Value::Array(experts) => out.extend(
                            experts.iter().enumerate().filter_map(|(e, x)| Some((format!("{key}/layer{l}/expert{e}"), x.as_f64()? as f32))),
                        ),
                        _ => {}
                    }
                }
            }
            Value::Object(named) => out.extend(named.iter().filter_map(|(name, x)| Some((format!("{key}/{name}"), x.as_f64()? as f32)))),
            _ => {}
        }
    }
    out
}

/// What an event carries besides its time and step.
enum EventBody<'a> {
    FileVersion(&'a str),
    /// `session_log { status: START }`.
    SessionStart,
    Summary(&'a [(String, f32)]),
}

/// An `Event` message: wall_time (field 1, double), step (2, int64), then file_version (3,
/// string), summary (5, message) or session_log (6, message).
fn event(wall_time: f64, step: u64, body: EventBody) -> Vec<u8> {
    let mut b = vec![];
    tag(&mut b, 1, 1);
    b.extend_from_slice(&wall_time.to_le_bytes());
    tag(&mut b, 2, 0);
    varint(&mut b, step);
    match body {
        EventBody::FileVersion(v) => bytes_field(&mut b, 3, v.as_bytes()),
        // SessionLog: status (field 1, enum) = START (1).
        EventBody::SessionStart => bytes_field(&mut b, 6, &[0x08, 0x01]),
        EventBody::Summary(values) => {
            // Summary: repeated Value value = 1; Value: tag (1, string), simple_value (2, float).
            let mut summary = vec![];
            for (name, x) in values {
                let mut value = vec![];
                bytes_field(&mut value, 1, name.as_bytes());
                tag(&mut value, 2, 5);
                value.extend_from_slice(&x.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut b, 5, &summary);
        }
    }
    b
}

fn tag(b: &mut Vec<u8>, field: u64, wire_type: u64) {
    varint(b, (field << 3) | wire_type);
}

fn varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn bytes_field(b: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    tag(b, field, 2);
    varint(b, bytes.len() as u64);
    b.extend_from_slice(bytes);
}

/// TFRecord's masked CRC-32C (Castagnoli): rotated right by 15 bits, plus a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_flatten_to_named_scalars() {
        let rec =
            json!({"step": 4, "loss": 2.5, "lr": 1e-3, "expert_load": [[0.75, 0.25], [0.5, 0.5]], "dropped": [0.0, 0.125], "note": "x"});
        let s = scalars(&rec);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "loss",
                "lr",
                "expert_load/layer0/expert0",
                "expert_load/layer0/expert1",
                "expert_load/layer1/expert0",
                "expert_load/layer1/expert1",
                "dropped/layer0",
                "dropped/layer1"
            ]
        );
        assert_eq!(s[3].1, 0.25);
        assert_eq!(s[7].1, 0.125);
    }

    /// The framing TensorFlow's reader checks: length, masked CRC of the length, the event,
    /// masked CRC of the event; the CRC is CRC-32C (RFC 3720's check value for "123456789").
    #[test]
    fn records_are_framed_as_tfrecords() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), Some(7)).unwrap();
        w.record(&json!({"step": 7, "loss": 1.0})).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut events = vec![];
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            events.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert!(events[0].windows(13).any(|w| w == b"brain.Event:2"));
        assert!(events[2].windows(4).any(|w| w == b"loss"));
    }
}
