//! Hugging Face checkpoints in and out.
//!
//! Reading memory-maps `model.safetensors` (or the shards listed in
//! `model.safetensors.index.json`), checks every tensor the config implies is present with the
//! right shape, and hands tensors out one at a time under btm's canonical names (see
//! [`crate::weights`]). Both MoE layouts are read: the per-expert tensors of the original
//! checkpoints and the fused 3-D expert tensors transformers 5 writes.
//!
//! Writing streams tensors into shards of a configurable size inside a temporary directory,
//! writes `config.json`, `tokenizer.json` with its side files, `btm.json`, the `README.md` model
//! card, then `MANIFEST.json` last, and only then
//! renames the directory into place: a reader never sees a partial checkpoint.

use crate::config::{Architecture, ModelConfig, SharedExpertConfig};
use crate::error::{read_json, Error, Result};
use crate::lineage::{Lineage, LINEAGE};
use crate::manifest::{Manifest, MANIFEST};
use crate::publish::StagingDir;
use crate::weights::{expected_tensors, hf_name, TensorSpec};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The Hugging Face model config file of a checkpoint directory.
pub const CONFIG: &str = "config.json";
/// The tokenizer file of a checkpoint directory (optional when reading).
pub const TOKENIZER: &str = "tokenizer.json";
/// The weights of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index of a sharded checkpoint (its `weight_map` names each tensor's file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one canonical tensor's bytes live.
#[derive(Debug, Clone)]
struct Location {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the memory-mapped file.
    start: usize,
    end: usize,
}

/// An opened, validated Hugging Face checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    /// The model's shape, from `config.json`, less the zero placeholders btm writes (q/k/v or
    /// o biases, a shared expert) once they are checked to be zero.
    pub config: ModelConfig,
    /// The Hugging Face architecture `config.json` declares.
    pub architecture: Architecture,
    /// The `config.json` as read.
    pub hf_config: Value,
    mmaps: Vec<Arc<Mmap>>,
    tensors: HashMap<String, Location>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).field("architecture", &self.architecture).finish()
    }
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

fn st_dtype(d: DType) -> Result<Dtype> {
    match d {
        DType::F32 => Ok(Dtype::F32),
        DType::BF16 => Ok(Dtype::BF16),
        DType::F16 => Ok(Dtype::F16),
        DType::F64 => Ok(Dtype::F64),
        other => Err(Error::Unsupported(format!("writing tensors of dtype {other:?}"))),
    }
}

fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

impl Checkpoint {
    /// Open and validate a checkpoint directory. Fails with a named error on a missing or
    /// corrupt file, an unknown architecture, a missing tensor, a shape that disagrees with
    /// `config.json`, or a tokenizer larger than the embedding.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::MissingFile(dir));
        }
        let hf_config = read_json(&dir.join(CONFIG))?;
        let (mut config, architecture) = ModelConfig::from_hf(&hf_config)?;

        // Which files hold the weights.
        let files: Vec<String> = if dir.join(INDEX_FILE).exists() {
            let index = read_json(&dir.join(INDEX_FILE))?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::InvalidConfig(format!("{}: no `weight_map`", dir.join(INDEX_FILE).display())))?;
            let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(String::from).collect();
            files.sort();
            files.dedup();
            // The index names files inside the checkpoint; an absolute path or `..` would make
            // btm map whatever file the index points at.
            if let Some(bad) = files.iter().find(|f| Path::new(f).components().any(|c| !matches!(c, std::path::Component::Normal(_)))) {
                return Err(Error::InvalidConfig(format!("{}: shard `{bad}` lies outside the checkpoint", dir.join(INDEX_FILE).display())));
            }
            files
        } else {
            vec![SINGLE_FILE.to_string()]
        };

        let mut mmaps = Vec::new();
        let mut raw: HashMap<String, Location> = HashMap::new();
        for (i, name) in files.iter().enumerate() {
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the file is opened read-only; btm never writes a published checkpoint in place.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let st = parse_safetensors(&path, &mmap)?;
            let base = mmap.as_ptr() as usize;
            for (tname, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                raw.insert(
                    tname,
                    Location { file: i, dtype: view.dtype(), shape: view.shape().to_vec(), start, end: start + view.data().len() },
                );
            }
            mmaps.push(Arc::new(mmap));
        }

        let tensors = resolve_names(&config, architecture, &raw, &dir)?;
        let mut ckpt = Self { dir, config: config.clone(), architecture, hf_config, mmaps, tensors };
        ckpt.drop_zero_placeholders(&mut config)?;
        ckpt.config = config;

        if ckpt.dir.join(TOKENIZER).exists() {
            let tok = crate::tokenizer::load(&ckpt.dir.join(TOKENIZER))?;
            crate::tokenizer::check_fits(&tok, ckpt.config.vocab_size)?;
        }
        Ok(ckpt)
    }

    /// btm writes zero-valued q/k/v biases, o biases and shared experts where a target format
    /// demands them; drop them again on read, but only if they really are zero.
    fn drop_zero_placeholders(&mut self, config: &mut ModelConfig) -> Result<()> {
        let hint = |key: &str| self.hf_config.pointer(&format!("/btm/{key}")).and_then(Value::as_str).map(String::from);
        let layers = config.num_layers;
        let all_zero = |names: Vec<String>| -> Result<bool> {
            for n in names {
                let t = self.tensor(&n)?.to_dtype(DType::F32)?;
                if t.abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        if hint("qkv_bias").as_deref() == Some("zero") && config.qkv_bias {
            let names = (0..layers).flat_map(|l| ["q", "k", "v"].map(|p| format!("model.layers.{l}.self_attn.{p}_proj.bias"))).collect();
            if all_zero(names)? {
                config.qkv_bias = false;
            }
        }
        if hint("o_bias").as_deref() == Some("zero") && config.o_bias {
            let names = (0..layers).map(|l| format!("model.layers.{l}.self_attn.o_proj.bias")).collect();
            if all_zero(names)? {
                config.o_bias = false;
            }
        }
        let has_shared = config.moe.as_ref().is_some_and(|m| m.shared_expert.is_some());
        if hint("shared_expert").as_deref() == Some("none") && has_shared {
            let names = (0..layers)
                .filter(|&l| config.is_moe_layer(l))
                .map(|l| format!("model.layers.{l}.mlp.shared_expert.down_proj.weight"))
                .collect();
            if all_zero(names)? {
                config.moe.as_mut().expect("moe").shared_expert = None;
            }
        }
        let keep: std::collections::HashSet<String> = expected_tensors(config).into_iter().map(|t| t.name).collect();
        self.tensors.retain(|name, _| keep.contains(name));
        Ok(())
    }

    /// The checkpoint directory as opened.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dtype the weights are stored in (that of the embedding).
    pub fn dtype(&self) -> DType {
        self.tensors.get("model.embed_tokens.weight").and_then(|l| dtype_of(l.dtype)).unwrap_or(DType::F32)
    }

    /// Canonical tensor names in model order.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        expected_tensors(&self.config)
    }

    /// One tensor, in its on-disk dtype, on the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let loc = self.tensors.get(name).ok_or_else(|| Error::MissingTensor { name: name.into(), dir: self.dir.clone() })?;
        let bytes = &self.mmaps[loc.file][loc.start..loc.end];
        let view = TensorView::new(loc.dtype, loc.shape.clone(), bytes)
            .map_err(|e| Error::CorruptSafetensors { path: self.dir.clone(), reason: format!("{name}: {e}") })?;
        Ok(view.load(&Device::Cpu)?)
    }

    /// Like [`Self::tensor`], then drops the tensor's memory-mapped pages from this process
    /// (`madvise(MADV_DONTNEED)`; they stay in the page cache), so streaming through a whole
    /// checkpoint does not accumulate it in the resident set.
    pub fn tensor_streamed(&self, name: &str) -> Result<Tensor> {
        let t = self.tensor(name)?;
        let loc = &self.tensors[name];
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            // Only whole pages inside the tensor's bytes; neighbours may share the edge pages.
            let start = loc.start.div_ceil(PAGE) * PAGE;
            let end = loc.end / PAGE * PAGE;
            if end > start {
                // SAFETY: the map is private and read-only; DONTNEED on it only drops this
                // process's page-table entries, and a later access faults the same bytes back in.
                unsafe {
                    let _ = self.mmaps[loc.file].unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start);
                }
            }
        }
        #[cfg(not(unix))]
        let _ = loc;
        Ok(t)
    }

    /// A `VarBuilder` that loads tensors lazily from the memory maps, converting dtype and device.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = Backend { mmaps: self.mmaps.clone(), tensors: self.tensors.clone(), dir: self.dir.clone() };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Build the model in `dtype` on `device`.
    pub fn load_model(&self, dtype: DType, device: &Device) -> Result<crate::model::Transformer> {
        Ok(crate::model::Transformer::new(&self.config, self.var_builder(dtype, device))?)
    }

    /// Load the directory's `tokenizer.json` ([`Error::MissingFile`] if it has none).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        crate::tokenizer::load(&self.dir.join(TOKENIZER))
    }

    /// The directory's `btm.json`, or `None` for a checkpoint without one.
    pub fn lineage(&self) -> Result<Option<Lineage>> {
        Lineage::read(&self.dir)
    }

    /// A stable identity: the manifest's hash when there is one, else a hash of the weights'
    /// and config's file hashes.
    pub fn id(&self) -> Result<String> {
        if self.dir.join(MANIFEST).exists() {
            return Manifest::id(&self.dir);
        }
        let mut hasher = Sha256::new();
        let mut names: Vec<PathBuf> = vec![self.dir.join(CONFIG)];
        for entry in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let p = entry.map_err(|e| Error::io(&self.dir, e))?.path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                names.push(p);
            }
        }
        names.sort();
        for p in names {
            hasher.update(crate::manifest::hash_file(&p)?.1.as_bytes());
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Largest safetensors header btm parses: the format's own bound (100 MB, as the safetensors
/// crate enforces), checked before the header's JSON is read.
pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = 100_000_000;

/// Parse a safetensors file's bytes (`path` is what errors name), checking everything the header
/// says against the bytes before any of it is used: the header length against
/// [`MAX_SAFETENSORS_HEADER_BYTES`] and the file, then each tensor's element count (with
/// overflow checks) times its dtype's size against its byte range, each range inside the data,
/// and the ranges back to back from the first data byte to the last. Only then is the file handed
/// to the safetensors crate, which checks it again.
pub fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    let corrupt = |reason: String| Error::CorruptSafetensors { path: path.to_path_buf(), reason };
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(corrupt(format!("{file_len} bytes, too short for the 8-byte header length")));
    };
    let header_len = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if header_len > MAX_SAFETENSORS_HEADER_BYTES {
        let what = format!("safetensors header length {header_len}");
        return Err(Error::TooLarge { path: path.to_path_buf(), what, limit: MAX_SAFETENSORS_HEADER_BYTES });
    }
    // header_len is at most 100 MB here, so this cannot overflow.
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(corrupt(format!("header length {header_len} runs past the end of the file ({file_len} bytes)")));
    }
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..data_start as usize]).map_err(|e| corrupt(format!("the header is not a JSON object: {e}")))?;
    let data_len = file_len - data_start;
    let mut ranges = Vec::with_capacity(header.len());
    for (name, info) in &header {
        if name != "__metadata__" {
            ranges.push((tensor_range(name, info, data_len).map_err(corrupt)?, name));
        }
    }
    // Sorted by start, each range must begin where the previous one ended: no gap, no overlap.
    ranges.sort_unstable();
    let mut end = 0;
    for ((start, stop), name) in ranges {
        if start != end {
            return Err(corrupt(format!("tensor `{name}` starts at data byte {start}, but the previous tensor ends at {end}")));
        }
        end = stop;
    }
    if end != data_len {
        return Err(corrupt(format!("the tensors end at data byte {end}, but the file holds {data_len} data bytes")));
    }
    SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))
}

/// The byte range `[start, stop)` (in the data section of `data_len` bytes) of the header entry
/// `info` of tensor `name`, once its dtype, shape and offsets agree; else why not.
fn tensor_range(name: &str, info: &Value, data_len: u64) -> std::result::Result<(u64, u64), String> {
    let bad = |why: String| format!("tensor `{name}`: {why}");
    let dtype: Dtype =
        info.get("dtype").and_then(|d| serde_json::from_value(d.clone()).ok()).ok_or_else(|| bad(format!("no known dtype in {info}")))?;
    let shape: Vec<u64> = info
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| dims.iter().map(Value::as_u64).collect())
        .ok_or_else(|| bad(format!("no shape of non-negative integers in {info}")))?;
    let offsets: Vec<u64> = info
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|o| o.iter().map(Value::as_u64).collect())
        .filter(|o: &Vec<u64>| o.len() == 2)
        .ok_or_else(|| bad(format!("no data_offsets [start, end] in {info}")))?;
    let (start, stop) = (offsets[0], offsets[1]);
    let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let bits = elements.and_then(|n| n.checked_mul(dtype.bitsize() as u64));
    let Some(bits) = bits else {
        return Err(bad(format!("shape {shape:?} of {dtype:?} holds more bytes than 64 bits count")));
    };
    if bits % 8 != 0 {
        return Err(bad(format!("shape {shape:?} of {dtype:?} is not a whole number of bytes")));
    }
    if start > stop || stop > data_len {
        return Err(bad(format!("data_offsets [{start}, {stop}] lie outside the {data_len} data bytes")));
    }
    if stop - start != bits / 8 {
        return Err(bad(format!(
            "shape {shape:?} of {dtype:?} takes {} bytes, but data_offsets [{start}, {stop}] hold {}",
            bits / 8,
            stop - start
        )));
    }
    Ok((start, stop))
}

/// Map the raw tensors of a file to canonical names, checking presence and shapes.
fn resolve_names(
    config: &ModelConfig,
    arch: Architecture,
    raw: &HashMap<String, Location>,
    dir: &Path,
) -> Result<HashMap<String, Location>> {
    let mut out = HashMap::new();
    for spec in expected_tensors(config) {
        // transformers 5's fused MoE layout keeps the router under its canonical name.
        let loc = match raw.get(&hf_name(arch, &spec.name)).or_else(|| raw.get(&spec.name)) {
            Some(loc) => loc.clone(),
            None => match fused_expert_slice(&spec, raw)? {
                Some(loc) => loc,
                None => return Err(Error::MissingTensor { name: hf_name(arch, &spec.name), dir: dir.to_path_buf() }),
            },
        };
        if loc.shape != spec.shape {
            return Err(Error::ShapeMismatch { name: hf_name(arch, &spec.name), expected: spec.shape.clone(), found: loc.shape.clone() });
        }
        if dtype_of(loc.dtype).is_none() {
            return Err(Error::UnsupportedDtype { name: spec.name, dtype: format!("{:?}", loc.dtype) });
        }
        out.insert(spec.name, loc);
    }
    Ok(out)
}

/// transformers 5 stores each MoE layer's experts fused: `mlp.experts.gate_up_proj`
/// [E, 2F, H] (gate rows first, then up rows) and `mlp.experts.down_proj` [E, H, F].
/// Expert e's matrices are contiguous byte ranges of those.
fn fused_expert_slice(spec: &TensorSpec, raw: &HashMap<String, Location>) -> Result<Option<Location>> {
    let Some((layer, rest)) = spec.name.split_once(".mlp.experts.") else {
        return Ok(None);
    };
    let Some((e, proj)) = rest.split_once('.') else {
        return Ok(None);
    };
    let e: usize = e.parse().map_err(|_| Error::InvalidConfig(format!("bad expert index in {}", spec.name)))?;
    let (fused_name, first_row) = match proj {
        "gate_proj.weight" => ("gate_up_proj", 0),
        "up_proj.weight" => ("gate_up_proj", spec.shape[0]),
        "down_proj.weight" => ("down_proj", 0),
        _ => return Ok(None),
    };
    let candidates = [format!("{layer}.mlp.experts.{fused_name}"), format!("{layer}.block_sparse_moe.experts.{fused_name}")];
    let Some((name, loc)) = candidates.iter().find_map(|n| raw.get(n).map(|l| (n, l))) else {
        return Ok(None);
    };
    let (rows, cols) = (spec.shape[0], spec.shape[1]);
    // Saturating: a config width too large to double cannot match a tensor that exists.
    let want_rows = if fused_name == "gate_up_proj" { rows.saturating_mul(2) } else { rows };
    if loc.shape.len() != 3 || loc.shape[1] != want_rows || loc.shape[2] != cols || e >= loc.shape[0] {
        return Err(Error::ShapeMismatch { name: name.clone(), expected: vec![e + 1, want_rows, cols], found: loc.shape.clone() });
    }
    // The fused tensor's shape was checked against its bytes (parse_safetensors), and expert e's
    // rows lie inside it, so none of this overflows or leaves the tensor's range.
    let elem = dtype_of(loc.dtype).map_or(0, |d| d.size_in_bytes());
    let start = loc.start + ((e * want_rows + first_row) * cols) * elem;
    Ok(Some(Location { file: loc.file, dtype: loc.dtype, shape: spec.shape.clone(), start, end: start + rows * cols * elem }))
}

struct Backend {
    mmaps: Vec<Arc<Mmap>>,
    tensors: HashMap<String, Location>,
    dir: PathBuf,
}

impl Backend {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` is missing from {}", self.dir.display())))?;
        let bytes = &self.mmaps[loc.file][loc.start..loc.end];
        let view = TensorView::new(loc.dtype, loc.shape.clone(), bytes).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        view.load(&Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for Backend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), s.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// How to write a checkpoint.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Dtype on disk.
    pub dtype: DType,
    /// Largest shard in bytes; a checkpoint bigger than this is split into
    /// `model-0000i-of-0000n.safetensors` files with an index.
    pub max_shard_bytes: u64,
    /// Replace an existing directory at the destination.
    pub overwrite: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, max_shard_bytes: 2 << 30, overwrite: false }
    }
}

/// What goes beside the weights.
#[derive(Debug, Default, Clone)]
pub struct Extras {
    /// `tokenizer.json` to copy in.
    pub tokenizer: Option<PathBuf>,
    /// `btm.json` to write; `None` writes none.
    pub lineage: Option<Lineage>,
}

/// The config as written: formats that demand q/k/v biases or a shared expert get zero ones.
fn written_config(cfg: &ModelConfig) -> ModelConfig {
    let mut w = cfg.clone();
    if cfg.output_architecture() == Architecture::Qwen2Moe {
        w.qkv_bias = true;
        let m = w.moe.as_mut().expect("moe");
        let ffn = cfg.written_shared_ffn().expect("qwen2-moe has a shared expert");
        m.shared_expert = Some(SharedExpertConfig { ffn, gated: true });
    } else if cfg.qkv_bias || cfg.o_bias {
        w.qkv_bias = true;
        w.o_bias = true;
    }
    w
}

/// Produce the tensor to write for `spec`: the model's own, or a placeholder the target format
/// needs (zero biases; a shared expert with zero output; the sigmoid gate of an ungated shared
/// expert, zero so σ = 1/2, with its down projection doubled to compensate).
fn tensor_to_write(cfg: &ModelConfig, spec: &TensorSpec, get: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<Tensor> {
    let shared = cfg.moe.as_ref().and_then(|m| m.shared_expert.as_ref());
    let zeros = || Tensor::zeros(spec.shape.as_slice(), DType::F32, &Device::Cpu).map_err(Error::from);
    let is = |suffix: &str| spec.name.ends_with(suffix);
    if (is("q_proj.bias") || is("k_proj.bias") || is("v_proj.bias")) && !cfg.qkv_bias {
        return zeros();
    }
    if is("o_proj.bias") && !cfg.o_bias {
        return zeros();
    }
    if spec.name.contains(".mlp.shared_expert") {
        match shared {
            None => return zeros(),
            Some(s) if !s.gated => {
                if is("shared_expert_gate.weight") {
                    return zeros();
                }
                if is("shared_expert.down_proj.weight") {
                    return Ok((get(&spec.name)? * 2.0)?);
                }
            }
            Some(_) => {}
        }
    }
    get(&spec.name)
}

/// Little-endian bytes of a tensor in `dtype`.
fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        other => return Err(Error::Unsupported(format!("writing tensors of dtype {other:?}"))),
    })
}

/// A writer that hashes what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Write a model as a Hugging Face checkpoint at `dest`, streaming tensors from `get`
/// (canonical name → tensor, any dtype) one at a time; published whole ([`StagingDir`]).
pub fn write_checkpoint(
    dest: &Path,
    cfg: &ModelConfig,
    get: &mut dyn FnMut(&str) -> Result<Tensor>,
    extras: &Extras,
    opts: &WriteOptions,
) -> Result<()> {
    cfg.validate()?;
    let staging = StagingDir::new(dest, opts.overwrite)?;
    write_checkpoint_files(&staging.path, cfg, get, extras, opts)?;
    staging.publish()
}

/// Write a checkpoint's files (weights, config, tokenizer, lineage, card, manifest last) into
/// the empty folder `dir`, for a caller that adds files of its own before publishing it.
pub fn write_checkpoint_files(
    dir: &Path,
    cfg: &ModelConfig,
    get: &mut dyn FnMut(&str) -> Result<Tensor>,
    extras: &Extras,
    opts: &WriteOptions,
) -> Result<()> {
    let known = write_checkpoint_part(dir, cfg, get, extras, opts, &WriterPart::whole())?;
    Manifest::build(dir, &known)?.write(dir)
}

/// One writer's share of a checkpoint that several processes write into one shared folder
/// (expert-parallel training, where each rank holds only its own experts). `owner` names the
/// writer of every tensor (by canonical name); each writer writes the weight files of its
/// tensors, and writer 0 also the rest of the folder.
pub struct WriterPart<'a> {
    /// This writer, `0..writers`.
    pub writer: usize,
    /// How many write the checkpoint together.
    pub writers: usize,
    /// The writer of a tensor, by canonical name.
    pub owner: &'a dyn Fn(&str) -> usize,
}

impl WriterPart<'_> {
    /// One writer for everything.
    pub fn whole() -> WriterPart<'static> {
        WriterPart { writer: 0, writers: 1, owner: &|_| 0 }
    }
}

/// Write `part`'s share of a checkpoint into `dir` (see [`WriterPart`]); returns the size and
/// SHA-256 of the weight files it wrote, for the manifest. Every writer plans the same shards:
/// the tensors grouped by writer (writer 0's first), each group split at
/// `opts.max_shard_bytes`, named `model-0000i-of-0000n.safetensors` over all groups (or
/// `model.safetensors` when there is one), so the index writer 0 writes names every writer's
/// files. Writer 0 also writes the index, config, tokenizer, lineage and card. The manifest is
/// the caller's, once every writer has finished (a single writer: [`write_checkpoint_files`]).
pub fn write_checkpoint_part(
    dir: &Path,
    cfg: &ModelConfig,
    get: &mut dyn FnMut(&str) -> Result<Tensor>,
    extras: &Extras,
    opts: &WriteOptions,
    part: &WriterPart,
) -> Result<BTreeMap<String, (u64, String)>> {
    cfg.validate()?;
    let arch = cfg.output_architecture();
    let specs = expected_tensors(&written_config(cfg));
    let st_dt = st_dtype(opts.dtype)?;
    let elem = opts.dtype.size_in_bytes() as u64;
    let shards = plan_shards(&specs, part, elem, opts.max_shard_bytes);
    let n = shards.len();

    let mut known: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (i, (writer, shard)) in shards.iter().enumerate() {
        let file_name = shard_name(i, n);
        let (header, data_size) = shard_header(arch, shard, elem, st_dt);
        for spec in shard {
            weight_map.insert(hf_name(arch, &spec.name), json!(file_name));
        }
        total_size += data_size;
        if *writer == part.writer {
            let written = write_shard(&dir.join(&file_name), &header, shard, cfg, get, opts.dtype)?;
            known.insert(file_name, written);
        }
    }
    if part.writer == 0 {
        let index = (n > 1).then(|| json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}));
        write_side_files(dir, cfg, extras, opts.dtype, index)?;
    }
    Ok(known)
}

/// The shards of a checkpoint: the tensors grouped by writer (writer 0's first), each group
/// split where a shard would pass `max_shard_bytes` (a tensor larger than that gets a shard of
/// its own). Returns (writer, tensors) per shard, in file order.
fn plan_shards<'s>(specs: &'s [TensorSpec], part: &WriterPart, elem: u64, max_shard_bytes: u64) -> Vec<(usize, Vec<&'s TensorSpec>)> {
    let mut shards: Vec<(usize, Vec<&TensorSpec>)> = vec![];
    for writer in 0..part.writers {
        let mut current = 0u64;
        for spec in specs.iter().filter(|s| (part.owner)(&s.name) == writer) {
            let bytes = spec.shape.iter().product::<usize>() as u64 * elem;
            match shards.last_mut() {
                Some((w, tensors)) if *w == writer && !(current > 0 && current + bytes > max_shard_bytes) => tensors.push(spec),
                _ => {
                    shards.push((writer, vec![spec]));
                    current = 0;
                }
            }
            current += bytes;
        }
    }
    shards
}

/// The file name of shard `i` of `n`.
fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", i + 1)
    }
}

/// A shard's safetensors header (every tensor's dtype, shape and byte range under its Hugging
/// Face name, known before any data is written) and the size of its data.
fn shard_header(arch: Architecture, shard: &[&TensorSpec], elem: u64, st_dt: Dtype) -> (serde_json::Map<String, Value>, u64) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for spec in shard {
        let bytes = spec.shape.iter().product::<usize>() as u64 * elem;
        header.insert(
            hf_name(arch, &spec.name),
            json!({"dtype": format!("{st_dt:?}"), "shape": spec.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    (header, offset)
}

/// Write one safetensors shard at `path`; returns its size and SHA-256, for the manifest.
fn write_shard(
    path: &Path,
    header: &serde_json::Map<String, Value>,
    shard: &[&TensorSpec],
    cfg: &ModelConfig,
    get: &mut dyn FnMut(&str) -> Result<Tensor>,
    dtype: DType,
) -> Result<(u64, String)> {
    let mut header = serde_json::to_vec(header).expect("header serialises");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = HashingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new(), size: 0 };
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for spec in shard {
        let t = tensor_to_write(cfg, spec, get)?;
        if t.dims() != spec.shape.as_slice() {
            return Err(Error::ShapeMismatch { name: spec.name.clone(), expected: spec.shape.clone(), found: t.dims().to_vec() });
        }
        w.write_all(&tensor_bytes(&t, dtype)?).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok((w.size, hex::encode(w.hasher.finalize())))
}

/// Writer 0's files besides its weights: the shard index (`index`, when there are several
/// shards), config, generation config, tokenizer, lineage and model card.
fn write_side_files(dir: &Path, cfg: &ModelConfig, extras: &Extras, dtype: DType, index: Option<Value>) -> Result<()> {
    let write_file = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    if let Some(index) = index {
        write_file(INDEX_FILE, &serde_json::to_vec_pretty(&index).expect("json"))?;
    }
    let mut hf_config = cfg.to_hf()?;
    hf_config["torch_dtype"] = json!(torch_dtype_name(dtype));
    write_file(CONFIG, &serde_json::to_vec_pretty(&hf_config).expect("json"))?;
    let mut generation = serde_json::Map::new();
    if let Some(b) = cfg.bos_token_id {
        generation.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = cfg.eos_token_id {
        generation.insert("eos_token_id".into(), json!(e));
    }
    write_file("generation_config.json", &serde_json::to_vec_pretty(&generation).expect("json"))?;
    if let Some(tok) = &extras.tokenizer {
        let bytes = crate::error::read_capped(tok, crate::error::MAX_TOKENIZER_BYTES, "tokenizer file")?;
        write_file(TOKENIZER, &bytes)?;
        for (name, side) in crate::card::tokenizer_side_files(tok, &bytes, cfg)? {
            write_file(&name, &side)?;
        }
    }
    if let Some(lineage) = &extras.lineage {
        write_file(LINEAGE, &lineage.to_json())?;
    }
    write_file(crate::card::CARD, crate::card::model_card(cfg, extras.lineage.as_ref()).as_bytes())
}

/// Copy a checkpoint (optionally to another dtype or shard size) through the writer.
pub fn rewrite(src: &Checkpoint, dest: &Path, opts: &WriteOptions, lineage: Option<Lineage>) -> Result<()> {
    let tokenizer = src.dir().join(TOKENIZER);
    let extras = Extras { tokenizer: tokenizer.exists().then_some(tokenizer), lineage };
    write_checkpoint(dest, &src.config, &mut |name| src.tensor(name), &extras, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file: the header's length, the header, then `data` zero bytes.
    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    fn err(bytes: &[u8]) -> String {
        parse_safetensors(Path::new("w.safetensors"), bytes).expect_err("an error").to_string()
    }

    #[test]
    fn header_lengths_beyond_the_limit_or_the_file_are_named() {
        let mut huge = (1u64 << 63).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert_eq!(err(&huge), "w.safetensors: safetensors header length 9223372036854775808 exceeds the limit of 100000000 bytes");
        let over = (MAX_SAFETENSORS_HEADER_BYTES + 1).to_le_bytes();
        assert!(err(&over).contains("header length 100000001 exceeds the limit of 100000000 bytes"));
        let mut past = 100u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(err(&past).ends_with("header length 100 runs past the end of the file (10 bytes)"), "{}", err(&past));
        assert!(err(b"abc").ends_with("3 bytes, too short for the 8-byte header length"));
    }

    #[test]
    fn garbage_is_named_not_a_panic() {
        // Eight printable bytes read as a header length of about 7.5e18.
        assert!(err(b"garbage bytes, not a safetensors file").contains("exceeds the limit of 100000000 bytes"));
        let not_json = file("]]]]", 0);
        assert!(err(&not_json).contains("w.safetensors: truncated or corrupt safetensors file: the header is not a JSON object"));
        let no_shape = file(r#"{"t":{"dtype":"F32","data_offsets":[0,0]}}"#, 0);
        assert!(err(&no_shape).contains("tensor `t`: no shape of non-negative integers"), "{}", err(&no_shape));
        let bad_dtype = file(r#"{"t":{"dtype":"F33","shape":[],"data_offsets":[0,4]}}"#, 4);
        assert!(err(&bad_dtype).contains("tensor `t`: no known dtype"), "{}", err(&bad_dtype));
    }

    #[test]
    fn shapes_whose_size_overflows_are_named() {
        // 2^32 · 2^32 elements: the product itself overflows u64.
        let product = file(r#"{"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#, 16);
        assert!(err(&product).ends_with("tensor `t`: shape [4294967296, 4294967296] of F32 holds more bytes than 64 bits count"));
        // 2^61 elements fit, their 32 bits each do not.
        let bits = file(r#"{"t":{"dtype":"F32","shape":[2305843009213693952],"data_offsets":[0,16]}}"#, 16);
        assert!(err(&bits).contains("holds more bytes than 64 bits count"), "{}", err(&bits));
    }

    #[test]
    fn offsets_past_the_end_or_inconsistent_are_named() {
        let past = file(r#"{"t":{"dtype":"F32","shape":[274877906944],"data_offsets":[0,1099511627776]}}"#, 16);
        assert!(err(&past).ends_with("tensor `t`: data_offsets [0, 1099511627776] lie outside the 16 data bytes"), "{}", err(&past));
        let backwards = file(r#"{"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, 16);
        assert!(err(&backwards).contains("data_offsets [8, 0] lie outside"));
        let size = file(r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#, 16);
        assert!(err(&size).ends_with("shape [2] of F32 takes 8 bytes, but data_offsets [0, 16] hold 16"), "{}", err(&size));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(err(&file(overlap, 12)).ends_with("tensor `b` starts at data byte 4, but the previous tensor ends at 8"));
        let gap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
        assert!(err(&file(gap, 16)).ends_with("tensor `a` starts at data byte 8, but the previous tensor ends at 0"));
        let trailing = file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 16);
        assert!(err(&trailing).ends_with("the tensors end at data byte 8, but the file holds 16 data bytes"));
    }

    #[test]
    fn valid_files_parse_as_before() {
        let ok = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[0],"data_offsets":[8,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let bytes = file(ok, 8);
        let st = parse_safetensors(Path::new("w"), &bytes).unwrap();
        assert_eq!(st.len(), 2);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model.safetensors");
        let bytes = std::fs::read(fixture.as_path()).unwrap();
        assert_eq!(parse_safetensors(&fixture, &bytes).unwrap().len(), SafeTensors::deserialize(&bytes).unwrap().len());
    }

    fn fixture_copy() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        for f in [CONFIG, SINGLE_FILE] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        dir
    }

    #[test]
    fn checkpoints_name_the_file_and_the_limit() {
        let dir = fixture_copy();
        let weights = dir.path().join(SINGLE_FILE);
        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[..8].copy_from_slice(&(1u64 << 63).to_le_bytes());
        std::fs::write(&weights, &bytes).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert_eq!(e, format!("{}: safetensors header length 9223372036854775808 exceeds the limit of 100000000 bytes", weights.display()));
        // A config.json past the JSON bound is refused before it is read (a sparse file).
        let dir = fixture_copy();
        std::fs::File::options().write(true).open(dir.path().join(CONFIG)).unwrap().set_len(70 << 20).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.ends_with("config.json: JSON file of 73400320 bytes exceeds the limit of 64 MiB (67108864 bytes)"), "{e}");
        // A shard index may only name files inside the checkpoint.
        let dir = fixture_copy();
        std::fs::write(dir.path().join(INDEX_FILE), r#"{"weight_map": {"lm_head.weight": "../../etc/passwd"}}"#).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(e.ends_with("shard `../../etc/passwd` lies outside the checkpoint"), "{e}");
    }
}
