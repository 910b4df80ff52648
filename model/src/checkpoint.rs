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

/// Parse a dtype name as used on the command line and in configs.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "float32" | "f32" | "fp32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
        other => Err(Error::Unsupported(format!("dtype `{other}` (expected float32, bfloat16 or float16)"))),
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
            let st =
                SafeTensors::deserialize(&mmap).map_err(|e| Error::CorruptSafetensors { path: path.clone(), reason: e.to_string() })?;
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
    let want_rows = if fused_name == "gate_up_proj" { 2 * rows } else { rows };
    if loc.shape.len() != 3 || loc.shape[1] != want_rows || loc.shape[2] != cols || e >= loc.shape[0] {
        return Err(Error::ShapeMismatch { name: name.clone(), expected: vec![e + 1, want_rows, cols], found: loc.shape.clone() });
    }
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

    // Plan shards by writer, then by size: (writer, tensors).
    let mut shards: Vec<(usize, Vec<&TensorSpec>)> = vec![];
    for writer in 0..part.writers {
        let mut current = 0u64;
        for spec in specs.iter().filter(|s| (part.owner)(&s.name) == writer) {
            let bytes = spec.shape.iter().product::<usize>() as u64 * elem;
            match shards.last_mut() {
                Some((w, tensors)) if *w == writer && !(current > 0 && current + bytes > opts.max_shard_bytes) => tensors.push(spec),
                _ => {
                    shards.push((writer, vec![spec]));
                    current = 0;
                }
            }
            current += bytes;
        }
    }
    let n = shards.len();
    let shard_name = |i: usize| {
        if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };

    let mut known: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (i, (writer, shard)) in shards.iter().enumerate() {
        let file_name = shard_name(i);
        let path = dir.join(&file_name);
        // Header: every tensor's dtype, shape and byte range, known before any data is written.
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for spec in shard {
            let bytes = spec.shape.iter().product::<usize>() as u64 * elem;
            let hf = hf_name(arch, &spec.name);
            header
                .insert(hf.clone(), json!({"dtype": format!("{st_dt:?}"), "shape": spec.shape, "data_offsets": [offset, offset + bytes]}));
            weight_map.insert(hf, json!(file_name));
            offset += bytes;
        }
        total_size += offset;
        if *writer != part.writer {
            continue;
        }
        let mut header = serde_json::to_vec(&header).expect("header serialises");
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = HashingWriter { inner: std::io::BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new(), size: 0 };
        let io = |e| Error::io(&path, e);
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for spec in shard {
            let t = tensor_to_write(cfg, spec, get)?;
            if t.dims() != spec.shape.as_slice() {
                return Err(Error::ShapeMismatch { name: spec.name.clone(), expected: spec.shape.clone(), found: t.dims().to_vec() });
            }
            w.write_all(&tensor_bytes(&t, opts.dtype)?).map_err(io)?;
        }
        w.flush().map_err(io)?;
        known.insert(file_name, (w.size, hex::encode(w.hasher.finalize())));
    }
    if part.writer != 0 {
        return Ok(known);
    }
    let write_file = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    if n > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_file(INDEX_FILE, &serde_json::to_vec_pretty(&index).expect("json"))?;
    }
    let mut hf_config = cfg.to_hf()?;
    hf_config["torch_dtype"] = json!(torch_dtype_name(opts.dtype));
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
        let bytes = std::fs::read(tok).map_err(|e| Error::io(tok, e))?;
        write_file(TOKENIZER, &bytes)?;
        for (name, side) in crate::card::tokenizer_side_files(tok, &bytes, cfg)? {
            write_file(&name, &side)?;
        }
    }
    if let Some(lineage) = &extras.lineage {
        write_file(LINEAGE, &lineage.to_json())?;
    }
    write_file(crate::card::CARD, crate::card::model_card(cfg, extras.lineage.as_ref()).as_bytes())?;
    Ok(known)
}

/// Copy a checkpoint (optionally to another dtype or shard size) through the writer.
pub fn rewrite(src: &Checkpoint, dest: &Path, opts: &WriteOptions, lineage: Option<Lineage>) -> Result<()> {
    let tokenizer = src.dir().join(TOKENIZER);
    let extras = Extras { tokenizer: tokenizer.exists().then_some(tokenizer), lineage };
    write_checkpoint(dest, &src.config, &mut |name| src.tensor(name), &extras, opts)
}
