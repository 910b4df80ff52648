//! Loading a pipeline: YAML → `${VAR}` interpolation → `--set` overrides → typed spec →
//! semantic checks. Every error carries `file:line:column` and the key path.

use super::spec::{DType, Device, Domain, Pipeline, TrainParams};
use serde_yaml::Value;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineError {
    pub file: String,
    /// 1-based line and column; 0 when the value came from `--set` or the defaults.
    pub line: usize,
    pub column: usize,
    /// Key path like `domains[1].name`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found, one per line.
#[derive(Debug, Clone)]
pub struct PipelineErrors(pub Vec<PipelineError>);

impl fmt::Display for PipelineErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineErrors {}

/// Where every key path starts in the source text: the value's position, and the key's.
#[derive(Debug, Default)]
pub struct Spans {
    values: HashMap<String, (usize, usize)>,
    keys: HashMap<String, (usize, usize)>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct SpanCollector {
    stack: Vec<Frame>,
    spans: Spans,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl SpanCollector {
    /// The path of the node that starts now, or None if this event is a mapping key.
    fn node_path(&mut self, ev: &Event, pos: (usize, usize)) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    let k = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => String::from("<complex key>"),
                    };
                    // libyaml-style parsers mark a block mapping's start after its first
                    // key; the first key's position is where the mapping really starts.
                    self.spans.values.entry(path.clone()).or_insert(pos);
                    self.spans.keys.insert(join(path, &k), pos);
                    *key = Some(k);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for SpanCollector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // yaml-rust2 lines are 1-based, columns 0-based.
        let pos = (mark.line(), mark.col() + 1);
        match &ev {
            Event::Scalar(..) | Event::Alias(..) => {
                if let Some(p) = self.node_path(&ev, pos) {
                    self.spans.values.insert(p, pos);
                }
            }
            Event::MappingStart(..) => {
                let p = self.node_path(&ev, pos).unwrap_or_default();
                self.stack.push(Frame::Map { path: p, key: None });
            }
            Event::SequenceStart(..) => {
                let p = self.node_path(&ev, pos).unwrap_or_default();
                self.spans.values.insert(p.clone(), pos);
                self.stack.push(Frame::Seq { path: p, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl Spans {
    pub fn of(text: &str) -> Self {
        let mut collector = SpanCollector::default();
        // Syntax errors are reported by serde_yaml with their own location.
        let _ = Parser::new_from_str(text).load(&mut collector, false);
        collector.spans
    }

    /// Position of `path`'s value (or key), or of its nearest ancestor that has one.
    pub fn find(&self, path: &str) -> (usize, usize) {
        let mut p = path.to_string();
        loop {
            if let Some(&pos) = self.values.get(&p).or_else(|| self.keys.get(&p)) {
                return pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return self.values.get("").copied().unwrap_or((0, 0)),
            }
        }
    }

    /// Position of the key that names `path`, falling back to [`Self::find`].
    pub fn find_key(&self, path: &str) -> (usize, usize) {
        self.keys.get(path).copied().unwrap_or_else(|| self.find(path))
    }
}

/// Replace `${VAR}` in every string value; an unset variable is an error at that value.
fn interpolate(value: &mut Value, path: &str, errors: &mut Vec<(String, String)>) {
    match value {
        Value::String(s) if s.contains("${") => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                match rest[i + 2..].find('}') {
                    Some(j) => {
                        let var = &rest[i + 2..i + 2 + j];
                        match std::env::var(var) {
                            Ok(v) => out.push_str(&v),
                            Err(_) => errors.push((path.to_string(), format!("environment variable `{var}` is not set"))),
                        }
                        rest = &rest[i + 3 + j..];
                    }
                    None => {
                        errors.push((path.to_string(), "unterminated `${`".into()));
                        rest = "";
                    }
                }
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Mapping(m) => {
            for (k, v) in m.iter_mut() {
                let key = k.as_str().unwrap_or("?").to_string();
                interpolate(v, &join(path, &key), errors);
            }
        }
        Value::Sequence(seq) => {
            for (i, v) in seq.iter_mut().enumerate() {
                interpolate(v, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

/// Apply `a.b.c=value` (value parsed as YAML; `domains.0.name` indexes sequences).
fn apply_set(root: &mut Value, assignment: &str) -> Result<(), String> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| format!("--set `{assignment}`: expected KEY.PATH=VALUE"))?;
    let new: Value = serde_yaml::from_str(raw).map_err(|e| format!("--set {path}: {e}"))?;
    let mut node = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        node = match node {
            Value::Sequence(seq) => {
                let idx: usize = part.parse().map_err(|_| format!("--set {path}: `{part}` indexes a list and must be a number"))?;
                let len = seq.len();
                seq.get_mut(idx).ok_or_else(|| format!("--set {path}: index {idx} is out of range (the list has {len})"))?
            }
            Value::Null => {
                *node = Value::Mapping(Default::default());
                let Value::Mapping(m) = node else { unreachable!() };
                m.entry(Value::String(part.to_string())).or_insert(Value::Null)
            }
            Value::Mapping(m) => m.entry(Value::String(part.to_string())).or_insert(Value::Null),
            _ => return Err(format!("--set {path}: `{part}` is inside a value that is not a mapping")),
        };
        if last {
            *node = new.clone();
        }
    }
    Ok(())
}

/// `domains.0.name` (as written after --set) → `domains[0].name` (as errors name it).
fn set_path_to_key_path(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('.') {
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            out = join(&out, part);
        }
    }
    out
}

/// serde's "unknown field `x`, expected one of `a`, `b`" plus the closest valid name.
fn suggest(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((unknown, tail)) = rest.split_once('`') else {
        return message.to_string();
    };
    let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    let best = expected.iter().map(|e| (strsim::levenshtein(unknown, e), *e)).filter(|(d, e)| *d <= 2.max(e.len() / 3)).min();
    match best {
        Some((_, e)) => format!("unknown key `{unknown}`; did you mean `{e}`?"),
        None => format!("unknown key `{unknown}` (expected one of: {})", expected.join(", ")),
    }
}

/// Turn serde_path_to_error's path into ours: `domains[1].name`.
fn key_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => out = join(&out, key),
            serde_path_to_error::Segment::Enum { variant } => out = join(&out, variant),
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    out
}

/// A loaded pipeline and the file it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub pipeline: Pipeline,
    /// The folder relative data paths are resolved against.
    pub base_dir: PathBuf,
    /// The spec after interpolation and overrides, as YAML (stored in the run).
    pub resolved_yaml: String,
    /// Old key names the file used, each naming its new one (`warning: …` on the console).
    pub warnings: Vec<PipelineError>,
}

/// Load, interpolate, override and check a pipeline file.
pub fn load(file: &Path, sets: &[String]) -> Result<Loaded, PipelineErrors> {
    let name = file.display().to_string();
    let err =
        |line, column, path: &str, message: String| PipelineError { file: name.clone(), line, column, path: path.to_string(), message };
    let text = crate::yaml::read_to_string(file).map_err(|e| PipelineErrors(vec![err(0, 0, "", format!("cannot read: {e}"))]))?;
    let mut value: Value = crate::yaml::from_str(&text).map_err(|e| {
        let (line, col) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        PipelineErrors(vec![err(line, col, "", format!("invalid YAML: {e}"))])
    })?;
    let spans = Spans::of(&text);
    // Values given with --set have no place in the file.
    let set_paths: Vec<String> = sets.iter().filter_map(|s| s.split_once('=').map(|(p, _)| set_path_to_key_path(p))).collect();
    let at = |path: &str, message: String| {
        // `discover` is read from under `domains` (lift_discover).
        let path = if path == "discover" || path.starts_with("discover.") { format!("domains.{path}") } else { path.to_string() };
        let path = path.as_str();
        if set_paths.iter().any(|s| path == s || path.starts_with(&format!("{s}.")) || path.starts_with(&format!("{s}["))) {
            return err(0, 0, path, format!("{message} (set with --set)"));
        }
        // An unknown key is reported where the key is, anything else where its value is.
        let (line, col) = if message.starts_with("unknown key") { spans.find_key(path) } else { spans.find(path) };
        err(line, col, path, message)
    };

    let mut interp = vec![];
    interpolate(&mut value, "", &mut interp);
    if !interp.is_empty() {
        return Err(PipelineErrors(interp.into_iter().map(|(p, m)| at(&p, m)).collect()));
    }
    for s in sets {
        apply_set(&mut value, s).map_err(|m| PipelineErrors(vec![err(0, 0, "", m)]))?;
    }
    let renamed = rename_old_keys(&mut value).map_err(|(p, m)| PipelineErrors(vec![at(&p, m)]))?;
    let warnings = renamed
        .iter()
        .map(|(old, new)| {
            let (line, column) = spans.find_key(old);
            err(line, column, old, format!("`{old}` is now `{new}`; the old name still works but will be removed"))
        })
        .collect();
    // Errors point at the key the file wrote: an old name's new path is mapped back.
    let at = |path: &str, message: String| at(&old_path(&renamed, path), message);
    let mut pipeline: Pipeline = serde_path_to_error::deserialize(lift_discover(value.clone())).map_err(|e| {
        let path = key_path(e.path());
        let message = e.inner().to_string();
        // serde_yaml appends its own (meaningless for a Value) location; drop it.
        let message = message.split(" at line ").next().unwrap_or(&message).to_string();
        PipelineErrors(vec![at(&path, suggest(&message))])
    })?;
    let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Some(d) = &pipeline.discover {
        // Before the domains are made: a `k` of 10^12 would allocate them without bound.
        if d.k > MAX_DISCOVERED_DOMAINS {
            let message = format!("at most {MAX_DISCOVERED_DOMAINS} clusters (one expert each), got {}", d.k);
            return Err(PipelineErrors(vec![at("discover.k", message)]));
        }
        pipeline.domains = discovered_domains(d.k, Path::new(""));
    }
    let problems = check(&pipeline, &base_dir);
    if !problems.is_empty() {
        return Err(PipelineErrors(problems.into_iter().map(|(p, m)| at(&p, m)).collect()));
    }
    Ok(Loaded { resolved_yaml: serde_yaml::to_string(&value).unwrap_or_default(), pipeline, base_dir, warnings })
}

/// The most domains `domains.discover.k` may ask for: c-BTM trains up to 128 experts, and btm
/// plans runs of 1,024 domains.
pub const MAX_DISCOVERED_DOMAINS: usize = 65_536;

/// Keys renamed so that a reader can guess them: (old, new), at the top level. `train` was the
/// expert phase; `ensemble` trained BTM's own arm and was easily confused with `eval.ensemble`.
const RENAMED_KEYS: [(&str, &str); 2] = [("train", "experts"), ("ensemble", "ensemble_arm")];

/// Moves the old key names to the new ones and returns the (old, new) key paths it moved; a
/// file that writes both is an error. `seed.train: {model, tokenizer, train}` became
/// `seed: {model, tokenizer, train}`: one level less.
fn rename_old_keys(value: &mut Value) -> Result<Vec<(String, String)>, (String, String)> {
    let mut renamed = vec![];
    let Some(map) = value.as_mapping_mut() else { return Ok(renamed) };
    for (old, new) in RENAMED_KEYS {
        let Some(v) = map.remove(old) else { continue };
        if map.contains_key(new) {
            return Err((old.into(), format!("`{old}` is the old name of `{new}`: give only `{new}`")));
        }
        map.insert(new.into(), v);
        renamed.push((old.to_string(), new.to_string()));
    }
    let Some(seed) = map.get_mut("seed").and_then(Value::as_mapping_mut) else { return Ok(renamed) };
    let old_layout = seed.get("train").and_then(Value::as_mapping).is_some_and(|t| t.contains_key("model") || t.contains_key("tokenizer"));
    if old_layout {
        let Some(Value::Mapping(mut old)) = seed.remove("train") else { unreachable!("checked above") };
        for key in ["model", "tokenizer", "train"] {
            let Some(v) = old.remove(key) else { continue };
            if seed.contains_key(key) {
                return Err((
                    format!("seed.train.{key}"),
                    format!("`seed.train.{key}` is the old place of `seed.{key}`: give only `seed.{key}`"),
                ));
            }
            seed.insert(key.into(), v);
            renamed.push((format!("seed.train.{key}"), format!("seed.{key}")));
        }
        // Anything else left under the old `seed.train` is an unknown key there.
        if let Some((k, _)) = old.into_iter().next() {
            let k = k.as_str().unwrap_or("?").to_string();
            return Err((format!("seed.train.{k}"), format!("unknown key `{k}`; expected one of `model`, `tokenizer`, `train`")));
        }
    }
    Ok(renamed)
}

/// The key path as the file wrote it, for a path under a renamed key.
fn old_path(renamed: &[(String, String)], path: &str) -> String {
    for (old, new) in renamed {
        if let Some(rest) = path.strip_prefix(new.as_str()) {
            if rest.is_empty() || rest.starts_with('.') || rest.starts_with('[') {
                return format!("{old}{rest}");
            }
        }
    }
    path.to_string()
}

/// `domains: {discover: X}` → `discover: X` and `domains: []`: the pipeline reads `discover` as
/// a field of its own, and the domains are filled in once the clusters' folder is known.
fn lift_discover(mut value: Value) -> Value {
    let Some(map) = value.as_mapping_mut() else { return value };
    let discover = match map.get_mut("domains").and_then(Value::as_mapping_mut) {
        Some(domains) if domains.contains_key("discover") => domains.remove("discover"),
        _ => return value,
    };
    let leftover = map.get("domains").and_then(Value::as_mapping).is_some_and(|m| !m.is_empty());
    if !leftover {
        map.insert("domains".into(), Value::Sequence(vec![]));
    }
    map.insert("discover".into(), discover.unwrap_or(Value::Null));
    value
}

/// The domains `discover` makes: `cluster-<i>`, its train, valid and test splits as `btm
/// cluster` writes them under `clusters`.
pub fn discovered_domains(k: usize, clusters: &Path) -> Vec<Domain> {
    (0..k)
        .map(|i| {
            let name = super::spec::cluster_domain_name(i);
            let split = |s: &str| clusters.join(&name).join(format!("{s}.jsonl")).to_string_lossy().into_owned();
            Domain {
                train: split("train"),
                valid: Some(split("valid")),
                test: Some(split("test")),
                name,
                format: None,
                text_key: None,
                overrides: Default::default(),
            }
        })
        .collect()
}

/// A name that can be a path segment in every object store.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Resolve a data location against the pipeline's folder; URLs stay as they are.
pub fn resolve(base: &Path, location: &str) -> String {
    if location.contains("://") || Path::new(location).is_absolute() {
        location.to_string()
    } else {
        base.join(location).to_string_lossy().into_owned()
    }
}

fn check_data(base: &Path, path: &str, location: &str, problems: &mut Vec<(String, String)>) {
    let resolved = resolve(base, location);
    let local = match resolved.strip_prefix("file://") {
        Some(p) => PathBuf::from(p),
        None if resolved.contains("://") => return, // checked when the job reads it
        None => PathBuf::from(&resolved),
    };
    match std::fs::metadata(&local) {
        Err(_) => problems.push((path.into(), format!("data file `{}` does not exist", local.display()))),
        Ok(m) if m.len() == 0 => problems.push((path.into(), format!("data file `{}` is empty", local.display()))),
        Ok(_) => {}
    }
}

fn check_domains(domains: &[Domain], list: &str, base: &Path, seen: &mut Vec<String>, problems: &mut Vec<(String, String)>) {
    for (i, d) in domains.iter().enumerate() {
        let p = format!("{list}[{i}]");
        if !valid_name(&d.name) {
            problems
                .push((format!("{p}.name"), format!("`{}` cannot be used as a path segment (use letters, digits, `-`, `_`, `.`)", d.name)));
        }
        if seen.contains(&d.name) {
            problems.push((format!("{p}.name"), format!("duplicate domain name `{}`", d.name)));
        }
        seen.push(d.name.clone());
        let train = resolve(base, &d.train);
        match d.format.unwrap_or_else(|| btm_trainer::sources::Format::detect(&train)) {
            btm_trainer::sources::Format::Parquet if !train.contains("://") => {
                if let Err(e) = btm_trainer::sources::parquet_files(&train) {
                    problems.push((format!("{p}.train"), format!("{e:#}")));
                }
            }
            _ => check_data(base, &format!("{p}.train"), &d.train, problems),
        }
        if d.text_key.as_deref().is_some_and(str::is_empty) {
            problems.push((format!("{p}.text_key"), "must not be empty".into()));
        }
        for (key, loc) in [("valid", &d.valid), ("test", &d.test)] {
            if let Some(loc) = loc {
                check_data(base, &format!("{p}.{key}"), loc, problems);
            }
        }
    }
}

/// `domains.discover`: its text exists, and it makes at least two clusters.
fn check_discover(d: &super::spec::Discover, base: &Path, problems: &mut Vec<(String, String)>) {
    if d.data.is_empty() {
        problems.push(("domains.discover.data".into(), "give at least one file of unlabelled text".into()));
    }
    for (i, f) in d.data.iter().enumerate() {
        check_data(base, &format!("domains.discover.data[{i}]"), f, problems);
    }
    if d.k < 2 {
        problems.push(("domains.discover.k".into(), format!("must be at least 2 (one expert per cluster), got {}", d.k)));
    }
}

/// With `seed.model`, the tokenizer is trained on every domain's training text: text (not an
/// indexed dataset), read under one key.
fn check_tokenizer_sources(p: &super::spec::Pipeline, base: &Path, problems: &mut Vec<(String, String)>) {
    if p.seed.scratch().is_none() {
        return;
    }
    let key = |d: &super::spec::Domain| d.text_key.clone().unwrap_or_else(|| btm_trainer::sources::DEFAULT_TEXT_KEY.into());
    for (i, d) in p.domains.iter().enumerate() {
        let format = d.format.unwrap_or_else(|| btm_trainer::sources::Format::detect(&resolve(base, &d.train)));
        if format == btm_trainer::sources::Format::Indexed {
            problems.push((
                format!("domains[{i}].train"),
                "an indexed dataset is tokens already: `seed.tokenizer` needs text to train on (give `seed.checkpoint`)".into(),
            ));
        }
        if key(d) != key(&p.domains[0]) {
            problems.push((
                format!("domains[{i}].text_key"),
                format!(
                    "`{}` differs from domains[0]'s `{}`: `seed.tokenizer` is trained on every domain's text under one key",
                    key(d),
                    key(&p.domains[0])
                ),
            ));
        }
    }
}

/// Every training phase as its jobs run it (blocks layered as the plan layers them), under
/// the key path of the block a user edits to change it.
fn training_phases(p: &Pipeline) -> Vec<(String, TrainParams)> {
    let none = TrainParams::default();
    let mut phases: Vec<(String, TrainParams)> = vec![];
    phases.extend(p.seed.scratch().map(|t| ("seed.train".to_string(), t.train.clone())));
    for (i, d) in p.domains.iter().enumerate() {
        let path = if d.overrides == none { "experts".to_string() } else { format!("domains[{i}].overrides") };
        phases.push((path, p.experts.overlay(&d.overrides)));
    }
    phases.extend(p.continue_training.as_ref().map(|c| ("continue".to_string(), p.experts.mix_phase(c))));
    phases.extend(p.ensemble_arm.as_ref().map(|e| ("ensemble_arm".to_string(), p.experts.overlay(e))));
    if let Some(u) = &p.upcycle {
        let t = p.experts.mix_phase(p.continue_training.as_ref().unwrap_or(&none)).overlay(u.train.as_ref().unwrap_or(&none));
        phases.push(("upcycle.train".to_string(), t));
    }
    if let Some(add) = &p.add_experts {
        for (i, d) in add.domains.iter().enumerate() {
            let path = if d.overrides == none { "experts".to_string() } else { format!("add_experts.domains[{i}].overrides") };
            phases.push((path, p.experts.overlay(&d.overrides)));
        }
        phases.extend(add.train_in_place.as_ref().map(|t| ("add_experts.train_in_place".to_string(), p.experts.mix_phase(t))));
    }
    phases
}

/// Device and precision pairs no job can run: float16 training, a CUDA phase that asks for
/// no GPU, a job that needs more GPUs than the local engine has.
fn check_devices(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let mut seen = vec![];
    for (path, t) in training_phases(p) {
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        let placement = t.placement(&p.engine);
        if placement.dtype == DType::Float16 {
            problems.push((
                format!("{path}.dtype"),
                "float16 training needs loss scaling, which btm does not do: use bfloat16 (or float32)".into(),
            ));
        }
        if placement.device == Device::Cuda && placement.gpus_per_task == 0 {
            problems.push((
                format!("{path}.device"),
                format!("`cuda`, but this phase asks for no GPU: set {path}.resources.gpus_per_task (or the engine's gpus_per_task)"),
            ));
        }
        let ranks = t.data_parallel.unwrap_or(1).saturating_mul(t.expert_parallel.unwrap_or(1));
        if let super::spec::EngineSpec::Local { gpus: super::spec::Gpus::Count(n), .. } = p.engine {
            let need = placement.gpus_per_task.saturating_mul(ranks);
            if need > n {
                problems.push((
                    format!("{path}.resources.gpus_per_task"),
                    format!(
                        "each job of this phase needs {need} GPUs ({} per rank × {ranks} ranks); engine.gpus is {n}",
                        placement.gpus_per_task
                    ),
                ));
            }
        }
    }
}

/// What the Ray engine cannot run: each job is one entrypoint process on one node, with no
/// launcher for btm's ranks (`data_parallel`, `expert_parallel`) and no rendezvous for the
/// nodes of a multi-node torchrun. A one-node torchrun (any `nproc_per_node`) runs.
fn check_ray(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let super::spec::EngineSpec::Ray(r) = &p.engine else { return };
    if !(r.address.starts_with("http://") || r.address.starts_with("https://")) {
        let why = format!("`{}` is not an http(s) URL (the Ray dashboard's, e.g. http://HOST:8265)", r.address);
        problems.push(("engine.address".into(), why));
    }
    let mut seen = vec![];
    for (path, t) in training_phases(p) {
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        for (key, n) in [("data_parallel", t.data_parallel.unwrap_or(1)), ("expert_parallel", t.expert_parallel.unwrap_or(1))] {
            if n > 1 {
                problems.push((
                    format!("{path}.{key}"),
                    format!("{n} ranks: the Ray engine runs one process per job, so multi-rank phases need the local, Slurm or Kubernetes engine"),
                ));
            }
        }
        let nodes = t.trainer.as_ref().map_or(1, |tr| tr.nodes());
        if nodes > 1 {
            problems.push((
                format!("{path}.trainer.nnodes"),
                format!("{nodes} nodes: the Ray engine runs each job on one node (use nnodes: 1, or the Slurm or Kubernetes engine)"),
            ));
        }
    }
}

/// Checks types cannot express. Returns (key path, message) pairs, section by section in the
/// order they are reported.
pub fn check(p: &Pipeline, base: &Path) -> Vec<(String, String)> {
    let mut problems = vec![];
    check_name(p, &mut problems);
    check_seed(p, &mut problems);
    check_domain_lists(p, base, &mut problems);
    check_every_train_block(p, base, &mut problems);
    check_add_experts(p, &mut problems);
    check_phase_layouts(p, &mut problems);
    check_dense_phases(p, &mut problems);
    check_seed_trainer(p, &mut problems);
    check_merge(p, &mut problems);
    check_upcycle(p, &mut problems);
    check_arm_seeds(p, &mut problems);
    check_slurm(p, &mut problems);
    check_continue(p, &mut problems);
    check_eval(p, &mut problems);
    check_tokenizer_sources(p, base, &mut problems);
    check_devices(p, &mut problems);
    check_ray(p, &mut problems);
    problems
}

/// The run's name becomes a folder (and an object-store prefix).
fn check_name(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    if !valid_name(&p.name) {
        problems.push(("name".into(), format!("`{}` cannot be used as a path segment (use letters, digits, `-`, `_`, `.`)", p.name)));
    }
}

/// The seed comes from exactly one of `checkpoint` and `model` (with its `tokenizer`); `train`
/// only goes with `model`.
fn check_seed(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let s = &p.seed;
    match (&s.checkpoint, &s.model) {
        (Some(_), Some(_)) => problems.push(("seed".into(), "give either `checkpoint` or `model`, not both".into())),
        (None, None) => problems.push(("seed".into(), "give `checkpoint` (an existing model) or `model` (a seed to train here)".into())),
        (None, Some(_)) if s.tokenizer.is_none() => {
            problems.push(("seed".into(), "a seed trained here needs `tokenizer: {vocab_size: N}` beside `model`".into()))
        }
        (Some(_), None) if s.tokenizer.is_some() => {
            problems.push(("seed.tokenizer".into(), "a checkpoint brings its own tokenizer: `tokenizer` goes with `model`".into()))
        }
        (Some(_), None) if s.train != TrainParams::default() => {
            problems.push(("seed.train".into(), "a checkpoint is not trained again: `train` goes with `model`".into()))
        }
        _ => {}
    }
}

/// `domains` (at least one) and `add_experts.domains`, with names unique across both.
fn check_domain_lists(p: &Pipeline, base: &Path, problems: &mut Vec<(String, String)>) {
    let mut seen = vec![];
    match &p.discover {
        // Discovered domains' files are written by the run's cluster job.
        Some(d) => {
            check_discover(d, base, problems);
            seen.extend(p.domains.iter().map(|d| d.name.clone()));
        }
        None if p.domains.is_empty() => problems.push(("domains".into(), "at least one domain is needed".into())),
        None => check_domains(&p.domains, "domains", base, &mut seen, problems),
    }
    if let Some(add) = &p.add_experts {
        check_domains(&add.domains, "add_experts.domains", base, &mut seen, problems);
    }
}

/// Every block of training parameters, as written (before any layering).
fn check_every_train_block(p: &Pipeline, base: &Path, problems: &mut Vec<(String, String)>) {
    check_train_params("experts", &p.experts, base, problems);
    for (i, d) in p.domains.iter().enumerate() {
        check_train_params(&format!("domains[{i}].overrides"), &d.overrides, base, problems);
    }
    if let Some(c) = &p.continue_training {
        check_train_params("continue", c, base, problems);
    }
    if let Some(e) = &p.ensemble_arm {
        check_train_params("ensemble_arm", e, base, problems);
    }
    check_train_params("seed.train", &p.seed.train, base, problems);
    if let Some(t) = p.upcycle.as_ref().and_then(|u| u.train.as_ref()) {
        check_train_params("upcycle.train", t, base, problems);
    }
    if let Some(t) = p.add_experts.as_ref().and_then(|add| add.train_in_place.as_ref()) {
        check_train_params("add_experts.train_in_place", t, base, problems);
    }
}

/// One block of training parameters, at key path `path`: positive sizes and learning rate,
/// btm's ranks only for btm's trainer, an external trainer that checks out.
fn check_train_params(path: &str, t: &TrainParams, base: &Path, problems: &mut Vec<(String, String)>) {
    if let Some(lr) = t.lr {
        if !(lr > 0.0 && lr.is_finite()) {
            problems.push((format!("{path}.lr"), format!("must be a positive number, got {lr}")));
        }
    }
    for (k, v) in [("batch_size", t.batch_size), ("seq_len", t.seq_len), ("grad_accum", t.grad_accum)] {
        if v == Some(0) {
            problems.push((format!("{path}.{k}"), "must be positive".into()));
        }
    }
    for (k, v) in [("data_parallel", t.data_parallel), ("expert_parallel", t.expert_parallel)] {
        if v == Some(0) {
            problems.push((format!("{path}.{k}"), "must be at least 1".into()));
        }
    }
    let ranks = t.data_parallel.unwrap_or(1).saturating_mul(t.expert_parallel.unwrap_or(1));
    if ranks > 1 && t.trainer.as_ref().is_some_and(|tr| !tr.is_btm()) {
        problems.push((
            format!("{path}.data_parallel"),
            "an external trainer is launched by its own command (torchrun's nproc_per_node); btm's ranks are for its own trainer".into(),
        ));
    }
    if let Some(trainer) = &t.trainer {
        if let Err(e) = trainer.check() {
            problems.push((format!("{path}.trainer"), format!("{e:#}")));
        }
        if let btm_trainer::spec::Trainer::Torchrun { script, .. } = trainer {
            if !Path::new(&resolve(base, script)).is_file() {
                problems.push((
                    format!("{path}.trainer.script"),
                    format!("{script}: no such file (relative paths start at the pipeline's folder)"),
                ));
            }
        }
    }
}

/// `add_experts`' replay share and forgetting guard.
fn check_add_experts(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let Some(add) = &p.add_experts else { return };
    if !(0.0..1.0).contains(&add.replay) {
        problems.push(("add_experts.replay".into(), format!("must lie in [0, 1) (a share of the training data), got {}", add.replay)));
    }
    for (key, v) in [("add_experts.guard.margin", add.guard.margin), ("add_experts.guard.coef", add.guard.coef)] {
        if !(v.is_finite() && v >= 0.0) {
            problems.push((key.into(), format!("must be non-negative, got {v}")));
        }
    }
}

/// Each phase as its jobs will run it (a domain's overrides over `experts`, a mix phase's block
/// over `experts`' hyperparameters): nodes the engine can give, micro-batches the ranks share.
fn check_phase_layouts(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let mut phases: Vec<(String, TrainParams)> = vec![("experts".into(), p.experts.clone())];
    phases.extend(p.seed.scratch().map(|t| ("seed.train".to_string(), t.train.clone())));
    // A domain whose overrides leave the layout alone has `experts`' (already checked).
    let sets_layout = |t: &TrainParams| t.grad_accum.or(t.data_parallel).or(t.expert_parallel).is_some() || t.trainer.is_some();
    phases.extend(
        p.domains
            .iter()
            .enumerate()
            .filter(|(_, d)| sets_layout(&d.overrides))
            .map(|(i, d)| (format!("domains[{i}].overrides"), p.experts.overlay(&d.overrides))),
    );
    phases.extend(p.continue_training.as_ref().map(|t| ("continue".to_string(), p.experts.mix_phase(t))));
    phases.extend(p.ensemble_arm.as_ref().map(|t| ("ensemble_arm".to_string(), p.experts.overlay(t))));
    phases.extend(p.upcycle.as_ref().and_then(|u| u.train.as_ref()).map(|t| ("upcycle.train".to_string(), p.experts.mix_phase(t))));
    for (path, t) in &phases {
        let nodes = t.trainer.as_ref().map_or(1, |tr| tr.nodes());
        if nodes > 1 && matches!(p.engine, super::spec::EngineSpec::Local { .. }) {
            problems.push((
                format!("{path}.trainer.nnodes"),
                format!("{nodes} nodes need a cluster engine (Slurm or Kubernetes); the local engine runs one node"),
            ));
        }
        let ranks = t.data_parallel.unwrap_or(1).saturating_mul(t.expert_parallel.unwrap_or(1));
        let grad_accum = t.grad_accum.unwrap_or(1);
        if ranks > 1 && !grad_accum.is_multiple_of(ranks) {
            problems.push((
                format!("{path}.grad_accum"),
                format!(
                    "{grad_accum} is not a multiple of the {ranks} ranks (data_parallel × expert_parallel): each rank takes an equal share of a step's micro-batches"
                ),
            ));
        }
    }
}

/// The expert and seed phases train dense models: nothing to split by expert.
fn check_dense_phases(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let mut dense_phases: Vec<(String, &TrainParams)> = vec![("experts".into(), &p.experts)];
    dense_phases.extend(p.seed.scratch().map(|t| ("seed.train".to_string(), t.train)));
    dense_phases.extend(p.domains.iter().enumerate().map(|(i, d)| (format!("domains[{i}].overrides"), &d.overrides)));
    dense_phases.extend(p.ensemble_arm.as_ref().map(|t| ("ensemble_arm".to_string(), t)));
    for (path, t) in dense_phases {
        if t.expert_parallel.is_some_and(|ep| ep > 1) {
            problems.push((
                format!("{path}.expert_parallel"),
                "this phase trains dense models; expert parallelism is for the MoE phases (`continue`, `upcycle.train`)".into(),
            ));
        }
    }
}

/// A seed trained from scratch is btm's to train.
fn check_seed_trainer(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    if p.seed.train.trainer.as_ref().is_some_and(|tr| !tr.is_btm()) {
        problems.push((
            "seed.train.trainer".into(),
            "a seed trained from scratch has no model to start from, and external trainers start from one: train it with btm, or give `seed.checkpoint`".into(),
        ));
    }
}

/// `merge`: its top-k within the experts, calibration text for the router inits that need it,
/// each router init merged once, a non-expert source that is one of the domains.
fn check_merge(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let Some(m) = &p.merge else { return };
    let experts = p.domains.len();
    if m.top_k == 0 || m.top_k > experts {
        problems.push(("merge.top_k".into(), format!("must be between 1 and the number of domains ({experts}), got {}", m.top_k)));
    }
    let calibrated = std::iter::once(&m.router_init)
        .chain(&m.also_router_init)
        .find(|init| matches!(init, super::spec::RouterInit::Centroid | super::spec::RouterInit::Fit));
    if let Some(init) = calibrated {
        for (i, d) in p.domains.iter().enumerate() {
            if d.valid.is_none() {
                problems.push((
                    format!("domains[{i}].valid"),
                    format!("`{}` router init takes calibration text from every domain's `valid` file", init.as_str()),
                ));
            }
        }
    }
    for (i, init) in m.also_router_init.iter().enumerate() {
        if *init == m.router_init || m.also_router_init[..i].contains(init) {
            problems.push((format!("merge.also_router_init[{i}]"), format!("`{}` is already merged", init.as_str())));
        }
    }
    if let super::spec::NonExpertSource::Expert(from) = &m.non_expert {
        if !p.domains.iter().any(|d| &d.name == from) {
            problems.push(("merge.non_expert".into(), format!("no domain named `{from}`")));
        }
    }
}

/// `upcycle`: its top-k within its experts.
fn check_upcycle(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    if let Some(u) = &p.upcycle {
        if u.top_k == 0 || u.top_k > u.experts {
            problems.push(("upcycle.top_k".into(), format!("must be between 1 and upcycle.experts ({})", u.experts)));
        }
    }
}

/// `arm_seeds`: each seed once.
fn check_arm_seeds(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    let mut seen_seeds = std::collections::HashSet::new();
    for (i, s) in p.arm_seeds.iter().enumerate() {
        if !seen_seeds.insert(*s) {
            problems.push((format!("arm_seeds[{i}]"), format!("seed {s} is listed twice")));
        }
    }
}

/// The Slurm engine's REST API: given when asked for, at an http(s) URL.
fn check_slurm(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    if let super::spec::EngineSpec::Slurm { api, rest, .. } = &p.engine {
        match (api, rest) {
            (super::spec::SlurmApi::Rest, None) => {
                problems.push(("engine".into(), "`api: rest` needs `rest: {url: http://HOST:PORT}`".into()))
            }
            (_, Some(r)) if !(r.url.starts_with("http://") || r.url.starts_with("https://")) => {
                problems.push(("engine.rest.url".into(), format!("`{}` is not an http(s) URL", r.url)))
            }
            _ => {}
        }
    }
}

/// `continue` trains an MoE, which `merge` or `upcycle` makes.
fn check_continue(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    if p.continue_training.is_some() && p.merge.is_none() && p.upcycle.is_none() {
        problems.push(("continue".into(), "needs an MoE to continue: add `merge` or `upcycle`".into()));
    }
}

/// `eval`: the split it scores exists for every domain.
fn check_eval(p: &Pipeline, problems: &mut Vec<(String, String)>) {
    if p.eval.split == super::spec::Split::Test {
        for (i, d) in p.domains.iter().enumerate() {
            if d.test.is_none() {
                problems.push((format!("domains[{i}].test"), "eval.split is `test` but this domain has no `test` file".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Found while writing the pipeline fuzz target (its input is in
    /// fuzz/regressions/pipeline_yaml): a huge `k` made as many domains before any check ran.
    #[test]
    fn a_huge_discover_k_is_refused_before_domains_are_made() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "p.yaml",
            "name: t\nseed:\n  model: {hidden_size: 32, layers: 1, heads: 2, ffn: 64}\n  tokenizer: {vocab_size: 300}\n\
             domains:\n  discover: {data: [u.jsonl], k: 1000000000000}\nexperts: {steps: 10}\n",
        );
        let err = load(&f, &[]).unwrap_err().to_string();
        assert!(err.contains("domains.discover.k") && err.contains(&format!("at most {MAX_DISCOVERED_DOMAINS} clusters")), "{err}");
    }

    /// Found reading the checks for the fuzz target (input: fuzz/regressions/pipeline_yaml):
    /// `data_parallel × expert_parallel` overflowed (a panic in debug builds, a wrong rank
    /// count in release); the product saturates and is checked like any other.
    #[test]
    fn huge_parallel_degrees_are_checked_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let yaml =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/regressions/pipeline_yaml/ranks-overflow.yaml")).unwrap();
        let f = write(dir.path(), "p.yaml", &yaml);
        let err = load(&f, &[]).unwrap_err().to_string();
        assert!(err.contains("grad_accum") && err.contains(&format!("{} ranks", usize::MAX)), "{err}");
    }

    #[test]
    fn spans_follow_key_paths() {
        let s = Spans::of("a: 1\nlist:\n  - name: x\n  - name: y\n    k: {z: 2}\n");
        assert_eq!(s.find("a"), (1, 4));
        assert_eq!(s.find_key("a"), (1, 1));
        assert_eq!(s.find("list[1].name"), (4, 11));
        assert_eq!(s.find_key("list[1].name"), (4, 5));
        assert_eq!(s.find("list[1].k.z"), (5, 12));
        assert_eq!(s.find_key("list[1].k"), (5, 5));
        assert_eq!(s.find("list[1].missing"), (4, 5));
    }

    #[test]
    fn set_overrides_nested_and_list_values() {
        let mut v: Value = serde_yaml::from_str("train: {lr: 1}\ndomains: [{name: a}]").unwrap();
        apply_set(&mut v, "train.lr=0.5").unwrap();
        apply_set(&mut v, "domains.0.name=b").unwrap();
        apply_set(&mut v, "eval.baseline=true").unwrap();
        assert_eq!(v["train"]["lr"], Value::from(0.5));
        assert_eq!(v["domains"][0]["name"], Value::from("b"));
        assert_eq!(v["eval"]["baseline"], Value::from(true));
        assert_eq!(apply_set(&mut v, "domains.3.name=c").unwrap_err(), "--set domains.3.name: index 3 is out of range (the list has 1)");
    }

    #[test]
    fn suggestions_for_unknown_keys() {
        assert_eq!(
            suggest("unknown field `lerning_rate`, expected one of `steps`, `lr`, `learning_rate`"),
            "unknown key `lerning_rate`; did you mean `learning_rate`?"
        );
        assert_eq!(suggest("unknown field `zzz`, expected `a` or `b`"), "unknown key `zzz` (expected one of: a, b)");
    }

    #[test]
    fn interpolation_reports_unset_variables() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "p.yaml", "name: x\nstorage: ${BTM_TEST_UNSET_VAR_1}/runs\n");
        let e = load(&f, &[]).unwrap_err().to_string();
        assert!(e.ends_with("p.yaml:2:10: storage: environment variable `BTM_TEST_UNSET_VAR_1` is not set"), "{e}");
    }

    /// A pipeline in the old names (`train`, `ensemble`, `seed.train.{model,tokenizer,train}`)
    /// loads as the same pipeline in the new ones, with one warning per old key at its place;
    /// an error under an old key still points at the key the file wrote.
    #[test]
    fn old_key_names_load_with_warnings() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "{\"text\": \"x\"}\n").unwrap();
        let body = |seed: &str, experts: &str, arm: &str| {
            format!("name: x\nseed:\n{seed}\ndomains: [{{name: a, train: a.jsonl, test: a.jsonl}}]\n{experts}: {{steps: 3, lr: 0.01}}\n{arm}: {{steps: 2}}\n")
        };
        let new_seed = "  model: {hidden_size: 8, layers: 1, heads: 2, ffn: 16}\n  tokenizer: {vocab_size: 300}\n  train: {steps: 4}";
        let old_seed =
            "  train:\n    model: {hidden_size: 8, layers: 1, heads: 2, ffn: 16}\n    tokenizer: {vocab_size: 300}\n    train: {steps: 4}";
        let new = load(&write(dir.path(), "new.yaml", &body(new_seed, "experts", "ensemble_arm")), &[]).unwrap();
        let old = load(&write(dir.path(), "old.yaml", &body(old_seed, "train", "ensemble")), &[]).unwrap();
        assert!(new.warnings.is_empty());
        assert_eq!(old.pipeline, new.pipeline);
        let warnings: Vec<String> = old.warnings.iter().map(|w| format!("{}:{} {}", w.line, w.column, w.message)).collect();
        assert_eq!(
            warnings,
            [
                "8:1 `train` is now `experts`; the old name still works but will be removed",
                "9:1 `ensemble` is now `ensemble_arm`; the old name still works but will be removed",
                "4:5 `seed.train.model` is now `seed.model`; the old name still works but will be removed",
                "5:5 `seed.train.tokenizer` is now `seed.tokenizer`; the old name still works but will be removed",
                "6:5 `seed.train.train` is now `seed.train`; the old name still works but will be removed",
            ]
        );
        let bad = body(&old_seed.replace("steps: 4", "steps: 4, lr: -2"), "train", "ensemble").replace("lr: 0.01", "lr: -1");
        let e = load(&write(dir.path(), "bad.yaml", &bad), &[]).unwrap_err();
        let paths: Vec<(usize, &str)> = e.0.iter().map(|e| (e.line, e.path.as_str())).collect();
        assert!(paths.contains(&(8, "train.lr")), "{e}");
        assert!(paths.contains(&(6, "seed.train.train.lr")), "{e}");
        let both = body(new_seed, "experts", "ensemble_arm") + "train: {steps: 1}\n";
        let e = load(&write(dir.path(), "both.yaml", &both), &[]).unwrap_err().to_string();
        assert!(e.contains("train: `train` is the old name of `experts`: give only `experts`"), "{e}");
    }
}
