//! Calibration: run the *merged* model one layer at a time on each domain's text and hand the
//! router's real input at every layer (the post-attention RMSNorm output) to a callback that
//! decides that layer's router. Layer l's router is set before layer l+1's inputs are computed,
//! so every layer is calibrated on the hidden states the final model will actually produce.
//!
//! Each domain's tokens are split into a training part (the first 80 % in document order) and a
//! held-out part (the rest), on which routing accuracy is reported.

use anyhow::{bail, ensure, Context, Result};
use btm_model::model::Trace;
use btm_model::Transformer;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// How much calibration text to use.
#[derive(Debug, Clone, Copy)]
pub struct CalibOptions {
    /// Window length in tokens (documents are cut into non-overlapping windows).
    pub seq_len: usize,
    /// At most this many tokens per domain.
    pub max_tokens: usize,
    /// Share of each domain's tokens (the last ones) held out for routing accuracy.
    pub heldout_fraction: f64,
    /// Windows per forward pass.
    pub batch: usize,
}

impl Default for CalibOptions {
    fn default() -> Self {
        Self { seq_len: 128, max_tokens: 8192, heldout_fraction: 0.2, batch: 16 }
    }
}

/// One domain's calibration text, tokenized into windows.
#[derive(Debug, Clone)]
pub struct CalibDomain {
    /// Domain name (the `NAME` of `NAME=FILE.jsonl`).
    pub name: String,
    /// The JSONL file the text was read from.
    pub path: PathBuf,
    /// Token ids in document order, cut into windows of at most `seq_len` tokens.
    pub windows: Vec<Vec<u32>>,
}

impl CalibDomain {
    /// Total tokens over all windows.
    pub fn tokens(&self) -> usize {
        self.windows.iter().map(Vec::len).sum()
    }
}

/// Parse a `NAME=FILE.jsonl` command-line value.
pub fn parse_named(arg: &str) -> Result<(String, PathBuf)> {
    match arg.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => bail!("calibration data must be given as NAME=FILE.jsonl, got `{arg}`"),
    }
}

/// Read and tokenize one domain's JSONL file; a missing file or one without text is an error.
pub fn load_domain(name: &str, path: &Path, tok: &Tokenizer, opts: &CalibOptions) -> Result<CalibDomain> {
    ensure!(path.is_file(), "calibration file for `{name}` not found: {}", path.display());
    let texts = btm_model::jsonl::read_texts(path, None).with_context(|| format!("reading calibration file {}", path.display()))?;
    let mut windows = Vec::new();
    let mut total = 0;
    'docs: for text in &texts {
        let ids = btm_model::tokenizer::encode(tok, text)?;
        for w in ids.chunks(opts.seq_len.max(1)) {
            if total >= opts.max_tokens {
                break 'docs;
            }
            let w = &w[..w.len().min(opts.max_tokens - total)];
            total += w.len();
            windows.push(w.to_vec());
        }
    }
    ensure!(
        total >= 2,
        "calibration file for `{name}` ({}) is empty: it has {} documents and {total} tokens (need at least 2)",
        path.display(),
        texts.len()
    );
    Ok(CalibDomain { name: name.to_string(), path: path.to_path_buf(), windows })
}

/// One layer's router inputs, per domain, split into training and held-out tokens ([N, H] f32).
pub struct LayerFeatures {
    /// 0-based layer index.
    pub layer: usize,
    /// Per domain (in the order given), the router inputs of its training tokens [N_train, H].
    pub train: Vec<Tensor>,
    /// Per domain, the router inputs of its held-out tokens [N_heldout, H] (at least one token).
    pub heldout: Vec<Tensor>,
}

/// A batch of windows, right-padded (harmless under causal attention), and which rows are real.
struct Batch {
    residual: Tensor,
    /// Row indices into the flattened [B·T, H] of the real (unpadded) tokens, in window order.
    rows: Tensor,
}

fn make_batches(model: &Transformer, domain: &CalibDomain, opts: &CalibOptions, device: &Device) -> Result<Vec<Batch>> {
    let mut out = Vec::new();
    for chunk in domain.windows.chunks(opts.batch.max(1)) {
        let t = chunk.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(chunk.len() * t);
        let mut rows = Vec::new();
        for (b, w) in chunk.iter().enumerate() {
            ids.extend_from_slice(w);
            ids.extend(std::iter::repeat_n(0u32, t - w.len()));
            rows.extend((0..w.len()).map(|i| (b * t + i) as u32));
        }
        let ids = Tensor::from_vec(ids, (chunk.len(), t), device)?;
        let n = rows.len();
        out.push(Batch { residual: model.embed(&ids)?, rows: Tensor::from_vec(rows, n, device)? });
    }
    Ok(out)
}

/// Run `model` layer by layer over every domain; at each layer, call `decide` with the router
/// inputs; if it returns a router [E, H], install it (`Transformer::set_router`) and recompute the
/// layer's output with it before moving on.
pub fn calibrate_layerwise(
    model: &mut Transformer,
    domains: &[CalibDomain],
    opts: &CalibOptions,
    mut decide: impl FnMut(&LayerFeatures) -> Result<Option<Tensor>>,
) -> Result<()> {
    let device = Device::Cpu;
    let mut batches = domains.iter().map(|d| make_batches(model, d, opts, &device)).collect::<Result<Vec<_>>>()?;
    for layer in 0..model.config().num_layers {
        let mut train = Vec::new();
        let mut heldout = Vec::new();
        let mut outputs: Vec<Vec<Tensor>> = Vec::new();
        for domain_batches in &batches {
            let mut feats = Vec::new();
            let mut outs = Vec::new();
            for b in domain_batches {
                let mut trace = Trace { collect_ffn_inputs: true, ..Default::default() };
                outs.push(model.forward_layers(&b.residual, layer..layer + 1, &mut trace)?);
                let x = trace.ffn_inputs.pop().expect("one layer ran");
                let h = x.dim(2)?;
                feats.push(x.reshape(((), h))?.index_select(&b.rows, 0)?.to_dtype(candle_core::DType::F32)?);
            }
            let all = Tensor::cat(&feats, 0)?;
            let n = all.dim(0)?;
            let held = ((n as f64 * opts.heldout_fraction).round() as usize).clamp(1, n - 1);
            train.push(all.narrow(0, 0, n - held)?);
            heldout.push(all.narrow(0, n - held, held)?);
            outputs.push(outs);
        }
        let features = LayerFeatures { layer, train, heldout };
        match decide(&features)? {
            Some(router) => {
                model.set_router(layer, router)?;
                for domain_batches in batches.iter_mut() {
                    for b in domain_batches.iter_mut() {
                        b.residual = model.forward_layers(&b.residual, layer..layer + 1, &mut Trace::default())?;
                    }
                }
            }
            None => {
                for (domain_batches, outs) in batches.iter_mut().zip(outputs) {
                    for (b, out) in domain_batches.iter_mut().zip(outs) {
                        b.residual = out;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fixture, input_ids};
    use btm_model::Checkpoint;
    use candle_core::DType;

    #[test]
    fn layer_by_layer_matches_a_whole_forward_pass() {
        let ck = Checkpoint::open(fixture("mixtral")).unwrap();
        let mut model = ck.load_model(DType::F32, &Device::Cpu).unwrap();
        let ids = input_ids();
        let mut whole = Trace { collect_ffn_inputs: true, ..Default::default() };
        model.forward_traced(&ids, &mut whole).unwrap();
        let mut xs = model.embed(&ids).unwrap();
        for layer in 0..2 {
            let mut t = Trace { collect_ffn_inputs: true, ..Default::default() };
            xs = model.forward_layers(&xs, layer..layer + 1, &mut t).unwrap();
            let d = (&t.ffn_inputs[0] - &whole.ffn_inputs[layer]).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
        // A new router changes the routing from that layer on.
        model.set_router(1, Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut t = Trace::default();
        model.forward_traced(&ids, &mut t).unwrap();
        let experts: Vec<u32> = t.router[1].routed.experts.flatten_all().unwrap().to_vec1().unwrap();
        assert!(experts.chunks(2).all(|c| c == [0, 1]), "a zero router ties: lowest indices win");
        assert!(model.set_router(1, Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap()).is_err());
        let dense = Checkpoint::open(fixture("llama")).unwrap();
        let mut dense_model = dense.load_model(DType::F32, &Device::Cpu).unwrap();
        assert!(dense_model.set_router(0, Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap()).is_err());
        // Streaming reads give the same bytes as plain reads.
        let name = "model.embed_tokens.weight";
        let (a, b) = (ck.tensor(name).unwrap(), ck.tensor_streamed(name).unwrap());
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn calibration_files_are_checked() {
        let tok = Checkpoint::open(fixture("llama")).unwrap().tokenizer().unwrap();
        let o = CalibOptions { seq_len: 8, max_tokens: 20, ..Default::default() };
        let d = load_domain("eval", &fixture("eval.jsonl"), &tok, &o).unwrap();
        assert_eq!(d.tokens(), 20);
        assert!(d.windows.iter().all(|w| w.len() <= 8));
        let err = load_domain("x", Path::new("/nonexistent.jsonl"), &tok, &o).unwrap_err().to_string();
        assert_eq!(err, "calibration file for `x` not found: /nonexistent.jsonl");
        assert_eq!(parse_named("web=a=b.jsonl").unwrap(), ("web".to_string(), PathBuf::from("a=b.jsonl")));
        assert!(parse_named("web.jsonl").is_err());
    }
}
