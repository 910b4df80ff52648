#!/usr/bin/env python3
"""Generates tiny random Hugging Face checkpoints + reference outputs for btm's Rust parity tests.

What it makes (under --out, normally ``model/tests/fixtures``):

* ``tokenizer.json``  a byte-level BPE tokenizer (vocab 320) trained with the
  ``tokenizers`` library on the small English + code text embedded below.
  ByteLevel pre-tokenizer (add_prefix_space=False, default GPT-2 regex),
  ByteLevel decoder, no normalizer, BPE model without unk token.
  Special tokens: ``<s>`` = id 0 (BOS), ``</s>`` = id 1 (EOS); they are the first
  two ids because the trainer adds special tokens first. The post-processor is
  a TemplateProcessing that prepends ``<s>`` to every single sequence
  (``encode(text).ids[0] == 0``).
* ``eval.jsonl``      a handful of ``{"id", "text"}`` documents of varying
  length, token counts include ``<s>``: one that is exactly 16 tokens (one full
  window), one that is 33 tokens (two full windows + a 1-token window that is
  skipped), "a" (2 tokens -> 1 prediction), unicode, code, odd whitespace, and
  longer prose).
* one directory per model, each with ``config.json``, ``model.safetensors``,
  ``generation_config.json`` (transformers writes it), ``tokenizer.json``
  (copy of the shared one), ``expected.safetensors`` and ``expected.json``:

  - ``llama``              LlamaForCausalLM, GQA 4q/2kv, untied, rope llama3 scaling
                           (transformers-5 ``rope_parameters`` config style)
  - ``llama_legacy``       LlamaForCausalLM, MHA, tied, head_dim 16 != 32/4,
                           rope_theta 500000; config.json rewritten to the legacy
                           style (top-level ``rope_theta``, ``rope_scaling: null``,
                           no ``rope_parameters``)
  - ``mistral``            MistralForCausalLM, sliding_window 8 < seq_len 16
  - ``qwen2``              Qwen2ForCausalLM, random non-zero q/k/v biases, tied
  - ``mixtral``            MixtralForCausalLM, 4 experts top-2, GQA, legacy
                           per-expert tensors (``block_sparse_moe.experts.E.w1/w2/w3``)
  - ``mixtral_fused``      the same weights saved with transformers 5's in-memory
                           fused layout (``mlp.experts.gate_up_proj`` / ``down_proj``,
                           ``save_pretrained(save_original_format=False)``)
  - ``qwen2_moe``          Qwen2MoeForCausalLM, 4 experts top-2, norm_topk_prob false,
                           shared expert + sigmoid gate, legacy per-expert tensors
  - ``qwen2_moe_normtopk`` the same weights with norm_topk_prob true
  - ``qwen3``              Qwen3ForCausalLM, per-head q_norm/k_norm, head_dim 16 != 32/4,
                           no biases, tied
  - ``qwen3_moe``          Qwen3MoeForCausalLM, q_norm/k_norm, head_dim 16, 3 layers with
                           layer 1 dense (mlp_only_layers), 4 experts top-2, norm_topk_prob
                           true, no shared expert, legacy per-expert tensors
  - ``qwen3_moe_softmax``  the same weights with norm_topk_prob false
  - ``olmo2``              Olmo2ForCausalLM, post-sublayer norms (no pre-norms), q_norm/k_norm
                           over the full projection width, GQA, untied
  - ``olmoe``              OlmoeForCausalLM, pre-norms, full-width q/k norms, clip_qkv 2.0,
                           4 experts top-2, norm_topk_prob false, legacy per-expert tensors
  - ``flex_olmo``          FlexOlmoForCausalLM, OLMo2's layers with 4 experts top-2,
                           norm_topk_prob true, legacy per-expert tensors

  ``expected.safetensors`` holds ``input_ids`` (int64 [2, 16], random ids from the
  vocab) and ``logits`` (float32 [2, 16, vocab]) = ``model(input_ids).logits``
  (float32, eager attention, eval mode, no_grad), computed from the model as
  re-loaded by ``AutoModelForCausalLM.from_pretrained`` from the written directory.
  ``expected.json`` holds the perplexity of that model on ``../eval.jsonl`` with
  seq_len 16 by the convention documented in ``scripts/hf_ppl.py``.

All parameters (embeddings, projections, biases, RMSNorm weights = 1 + 0.1*randn,
routers, experts, shared-expert gates) are drawn from fixed-seed torch
generators, so the output is deterministic for a given torch/transformers
version (torch is run single-threaded).

How to run (needs torch, transformers 5.x, tokenizers, safetensors, numpy;
never touches the Hugging Face hub)::

    /opt/pyref/bin/python scripts/make_fixtures.py --out model/tests/fixtures

The shared perplexity code lives in ``scripts/hf_ppl.py``; ``scripts/hf_check.py``
recomputes the perplexity of any checkpoint directory with transformers.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")  # deterministic tokenizer training
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_ppl  # noqa: E402

SEQ_LEN = 16
BATCH = 2
VOCAB_SIZE = 320
BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1
INIT_STD = 0.2  # also written as initializer_range
MIN_ROUTER_GAP = 1e-4  # min prob gap between the k-th and (k+1)-th expert, to keep top-k stable across impls

# ---------------------------------------------------------------------------------------------
# Tokenizer training text (written for this project; no third-party text).
# ---------------------------------------------------------------------------------------------
TRAIN_TEXT = r'''
The river runs past the old mill and under the stone bridge, where the children of the village
throw sticks into the water and race to the other side to see whose stick comes out first. In
the summer the water is low and slow, and the stones at the bottom are green with moss. In the
spring it is loud and fast, and nobody plays on the bridge when the rain has been falling for a
week.

A small model is a useful thing to have when you are writing a new implementation of an old idea.
It is fast to load, it is easy to inspect, and when the numbers do not match you can print every
tensor and look at it. The trick is to make the weights random enough that every part of the
computation matters: if a norm weight is exactly one, a bug that forgets to multiply by it will
never be seen.

Tokens are the atoms of the text that a language model reads. A byte level tokenizer starts from
the two hundred and fifty six possible bytes and learns to merge the pairs that appear most often,
so that common words like the, and, of and to become single tokens while rare words are spelled
out piece by piece. Nothing is ever unknown, because every string is a string of bytes.

Perplexity measures how surprised a model is by a piece of text. We cut each document into windows,
ask the model to predict every token from the ones before it, add up the negative log
probabilities, divide by the number of predictions and take the exponential. Lower is better; a
model that guesses uniformly over the vocabulary has a perplexity equal to the vocabulary size.

def perplexity(model, windows):
    total, count = 0.0, 0
    for ids in windows:
        logits = model(ids[:-1])
        for pos, target in enumerate(ids[1:]):
            total -= log_softmax(logits[pos])[target]
            count += 1
    return math.exp(total / count)

class Router:
    def __init__(self, num_experts, top_k):
        self.num_experts = num_experts
        self.top_k = top_k

    def route(self, scores):
        order = sorted(range(self.num_experts), key=lambda e: -scores[e])
        return order[: self.top_k]

fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(weight).map(|(v, w)| v * scale * w).collect()
}

pub struct Window {
    pub start: usize,
    pub len: usize,
}

impl Window {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

for (i, layer) in self.layers.iter().enumerate() {
    hidden = layer.forward(&hidden, &positions)?;
    if i % 2 == 0 {
        println!("layer {} done", i);
    }
}

When the evening comes, the lamps along the quay are lit one by one, and the boats that went out
in the morning return with their nets folded and their decks washed. The harbour master writes the
names of the boats in a thick book, as his father did, and as his grandmother did before him.
'''

# ---------------------------------------------------------------------------------------------
# Evaluation documents.
# ---------------------------------------------------------------------------------------------
EVAL_DOCS_FIXED = [
    (
        "prose",
        "The children throw sticks from the bridge and race to see whose stick comes out first. "
        "When the rain has been falling for a week, the river is loud and nobody plays there.",
    ),
    (
        "code",
        "def route(scores, top_k):\n    order = sorted(range(len(scores)), key=lambda e: -scores[e])\n"
        "    return order[:top_k]\n",
    ),
    ("short", "a"),
    ("unicode", "Caf\u00e9 d\u00e9j\u00e0 vu \u2014 na\u00efve fa\u00e7ade, 3.14 \u2248 \u03c0 \u2713 \U0001f642"),
    ("whitespace", "  two leading spaces,\n\n\ta tab, and trailing   "),
]
# Documents whose length (in tokens, including <s>) is tuned by _tune_doc below: the shortest
# word-prefix (trying the candidates in order) with the wanted token count.
EXACT_BASES = [
    "Lower is better, and a model that guesses uniformly has a perplexity equal to the vocabulary size.",
    "Tokens are the atoms of the text that a language model reads, and nothing is ever unknown.",
    "The lamps along the quay are lit one by one when the evening comes and the boats return.",
]
TAIL_BASES = [
    "The harbour master writes the names of the boats in a thick book, as his father did, and as his "
    "grandmother did before him, when the lamps along the quay are lit one by one in the evening.",
    "A small model is fast to load and easy to inspect, and when the numbers do not match you can print "
    "every tensor and look at it until the bug has nowhere left to hide.",
    "In the spring the river is loud and fast, and nobody plays on the bridge when the rain has been "
    "falling for a week, but in the summer the water is low and slow and the stones are green with moss.",
]


def _tune_doc(tokenizer, bases, want) -> str:
    """Shortest word-prefix of one of ``bases`` (in order) whose token count satisfies ``want(n)``."""
    for base in bases:
        words = base.split(" ")
        for k in range(1, len(words) + 1):
            for text in (" ".join(words[:k]), " ".join(words[:k]).rstrip(",.") + "."):
                if want(len(tokenizer.encode(text).ids)):
                    return text
    for k in range(1, len(bases[0]) + 1):  # fall back to character prefixes
        if want(len(tokenizer.encode(bases[0][:k]).ids)):
            return bases[0][:k]
    raise RuntimeError(f"could not tune a document from {bases!r}")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [l for l in TRAIN_TEXT.split("\n")]
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, BOS_ID)],
    )
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def build_eval_docs(tokenizer):
    docs = list(EVAL_DOCS_FIXED)
    docs.insert(2, ("exact16", _tune_doc(tokenizer, EXACT_BASES, lambda n: n == SEQ_LEN)))
    docs.insert(3, ("tail1", _tune_doc(tokenizer, TAIL_BASES, lambda n: n == 2 * SEQ_LEN + 1)))
    out = []
    for doc_id, text in docs:
        n = len(tokenizer.encode(text).ids)
        out.append({"id": doc_id, "text": text, "_n": n})
    ns = {d["id"]: d["_n"] for d in out}
    assert ns["short"] == 2, ns
    assert ns["exact16"] == SEQ_LEN, ns
    assert ns["tail1"] == 2 * SEQ_LEN + 1, ns
    assert max(ns.values()) > 2 * SEQ_LEN, ns
    return out


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=INIT_STD,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=None,
    use_cache=True,
)


def model_specs():
    import transformers as T

    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # head_dim 8 -> wavelengths 2*pi*{1, 10, 100, 1000}; with 64: high_freq_wavelen 16,
        # low_freq_wavelen 64 -> one unchanged, one smoothed, two divided by `factor`.
        "original_max_position_embeddings": 64,
    }
    moe_common = dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[],
                      qkv_bias=True, tie_word_embeddings=False, use_sliding_window=False,
                      router_aux_loss_coef=0.001, output_router_logits=False)
    # Both Qwen2-MoE fixtures share their weights (same seed); the seed search checks both variants.
    qwen_variants = [{"norm_topk_prob": False}, {"norm_topk_prob": True}]
    # Qwen3-MoE: head_dim 16 != 32/4, 3 layers with layer 1 dense (`mlp_only_layers`), no shared
    # expert; both fixtures share their weights, as the Qwen2-MoE pair does.
    qwen3_moe_common = dict(COMMON, num_hidden_layers=3, head_dim=16, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1],
                            attention_bias=False, tie_word_embeddings=False, use_sliding_window=False,
                            router_aux_loss_coef=0.001, output_router_logits=False)
    qwen3_variants = qwen_variants
    # OLMo: the experts are `intermediate_size` wide (24, as the other MoE fixtures' experts).
    olmo_moe_common = dict(COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=False, attention_bias=False,
                           router_aux_loss_coef=0.001, output_router_logits=False)
    olmo_rope = {"rope_type": "default", "rope_theta": 500000.0}
    return [
        dict(name="llama", seed=1001, cls=T.LlamaForCausalLM,
             config=T.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=llama3)),
        dict(name="llama_legacy", seed=1002, cls=T.LlamaForCausalLM, legacy_rope_config=True,
             config=T.LlamaConfig(**dict(COMMON, num_key_value_heads=4), head_dim=16, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
        dict(name="mistral", seed=1003, cls=T.MistralForCausalLM, check_sliding=True,
             config=T.MistralConfig(**COMMON, sliding_window=8, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        dict(name="qwen2", seed=1004, cls=T.Qwen2ForCausalLM,
             config=T.Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="mixtral", seed=1005, cls=T.MixtralForCausalLM, moe="mixtral",
             config=T.MixtralConfig(**dict(COMMON, intermediate_size=48), num_local_experts=4,
                                    num_experts_per_tok=2, tie_word_embeddings=False, sliding_window=None,
                                    router_jitter_noise=0.0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="mixtral_fused", seed=1005, cls=T.MixtralForCausalLM, moe="mixtral", fused=True,
             config=T.MixtralConfig(**dict(COMMON, intermediate_size=48), num_local_experts=4,
                                    num_experts_per_tok=2, tie_word_embeddings=False, sliding_window=None,
                                    router_jitter_noise=0.0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="qwen2_moe", seed=1007, cls=T.Qwen2MoeForCausalLM, moe="qwen2_moe", gap_variants=qwen_variants,
             config=T.Qwen2MoeConfig(**moe_common, norm_topk_prob=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="qwen2_moe_normtopk", seed=1007, cls=T.Qwen2MoeForCausalLM, moe="qwen2_moe", gap_variants=qwen_variants,
             config=T.Qwen2MoeConfig(**moe_common, norm_topk_prob=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="qwen3", seed=1011, cls=T.Qwen3ForCausalLM,
             config=T.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True, attention_bias=False,
                                  use_sliding_window=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="qwen3_moe", seed=1012, cls=T.Qwen3MoeForCausalLM, moe="qwen3_moe", gap_variants=qwen3_variants,
             config=T.Qwen3MoeConfig(**qwen3_moe_common, norm_topk_prob=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="qwen3_moe_softmax", seed=1012, cls=T.Qwen3MoeForCausalLM, moe="qwen3_moe", gap_variants=qwen3_variants,
             config=T.Qwen3MoeConfig(**qwen3_moe_common, norm_topk_prob=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
        dict(name="olmo2", seed=1021, cls=T.Olmo2ForCausalLM,
             config=T.Olmo2Config(**COMMON, tie_word_embeddings=False, attention_bias=False,
                                  rope_parameters=olmo_rope)),
        # clip_qkv 2.0: the normalised queries and keys have unit RMS, so some entries are clipped.
        dict(name="olmoe", seed=1022, cls=T.OlmoeForCausalLM, moe="olmoe",
             config=T.OlmoeConfig(**olmo_moe_common, norm_topk_prob=False, clip_qkv=2.0,
                                  rope_parameters=olmo_rope)),
        dict(name="flex_olmo", seed=1023, cls=T.FlexOlmoForCausalLM, moe="flex_olmo",
             config=T.FlexOlmoConfig(**olmo_moe_common, norm_topk_prob=True, rope_parameters=olmo_rope)),
    ]


def randomize_(model, seed: int):
    """Overwrites every parameter from a seeded generator (sorted by name, so order-independent)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):  # tied params appear once
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() == 1 and "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(INIT_STD * noise)


def new_model(spec, seed, overrides=None):
    cfg = copy.deepcopy(spec["config"])
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    model = spec["cls"](cfg)
    model.eval()
    randomize_(model, seed)
    return model


def router_min_gap(model, batches):
    """Minimum (over tokens and layers) gap between the k-th and (k+1)-th routing probability."""
    import torch

    k = model.config.num_experts_per_tok
    gaps = []

    def hook(_mod, inp, _out):
        x = inp[0].reshape(-1, inp[0].shape[-1])
        probs = torch.softmax(torch.nn.functional.linear(x, _mod.weight).float(), dim=-1)
        top = torch.sort(probs, dim=-1, descending=True).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))

    # Dense layers among MoE ones (Qwen3-MoE's mlp_only_layers) have no router.
    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers
               if hasattr(getattr(layer.mlp, "gate", None), "weight")]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return min(gaps)


def sd_equal(a, b):
    import torch

    if set(a) != set(b):
        return False
    return all(torch.equal(a[k], b[k]) for k in a)


def safetensors_listing(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return [(k, list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in sorted(f.keys())]


def to_legacy_experts(state: dict, moe: str) -> dict:
    """Converts fused 3-D expert tensors into the legacy per-expert layout (only if needed)."""
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix = k[: -len("mlp.experts.gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                gate, up = v[e, :inter], v[e, inter:]
                if moe == "mixtral":
                    out[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"] = gate.contiguous()
                    out[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"] = up.contiguous()
                else:
                    out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate.contiguous()
                    out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up.contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("mlp.experts.down_proj")]
            for e in range(v.shape[0]):
                if moe == "mixtral":
                    out[f"{prefix}block_sparse_moe.experts.{e}.w2.weight"] = v[e].contiguous()
                else:
                    out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = v[e].contiguous()
        elif moe == "mixtral" and ".mlp.gate." in k:
            out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
        else:
            out[k] = v
    return out


def is_fused_listing(listing):
    return any(k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj") for k, _, _ in listing)


def write_model(spec, out_root, tokenizer_path, tokenizer, eval_docs, log):
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    name = spec["name"]
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)

    texts = [doc["text"] for doc in eval_docs]
    windows = hf_ppl.make_windows(tokenizer, texts, SEQ_LEN)
    g_ids = torch.Generator().manual_seed(spec["seed"] + 500_000)
    input_ids = torch.randint(0, VOCAB_SIZE, (BATCH, SEQ_LEN), generator=g_ids, dtype=torch.int64)

    # --- build + randomize (re-seed MoE models until top-k routing is unambiguous) -----------
    seed = spec["seed"]
    if spec.get("moe"):
        eval_batches = [input_ids] + [torch.tensor([w]) for w in windows]
        for attempt in range(50):
            gap = min(router_min_gap(new_model(spec, seed, ov), eval_batches)
                      for ov in spec.get("gap_variants", [{}]))
            model = new_model(spec, seed)
            if gap >= MIN_ROUTER_GAP:
                break
            log(f"  {name}: seed {seed} router gap {gap:.2e} too small, retrying")
            seed += 1
        else:
            raise RuntimeError("no seed with a clear routing margin")
        log(f"  {name}: seed {seed}, min router top-k gap {gap:.3e}")
    else:
        model = new_model(spec, seed)
    if spec["config"].tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"

    with torch.no_grad():
        ref_logits = model(input_ids=input_ids).logits.detach().clone()

    # --- model-specific sanity checks ----------------------------------------------------
    if name == "llama":
        rot = model.model.rotary_emb
        cfg = model.config
        hd = cfg.head_dim
        base = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        changed = ~torch.isclose(rot.inv_freq, base)
        log(f"  llama: default inv_freq {base.tolist()}")
        log(f"  llama: llama3    inv_freq {rot.inv_freq.tolist()} (changed: {changed.tolist()})")
        assert changed.any() and not changed.all(), "llama3 scaling should change some (not all) frequencies"
    if spec.get("check_sliding"):
        cfg2 = copy.deepcopy(model.config)
        cfg2.sliding_window = None
        full = spec["cls"](cfg2)
        full.load_state_dict(model.state_dict())
        full.eval()
        with torch.no_grad():
            full_logits = full(input_ids=input_ids).logits
        w = model.config.sliding_window
        same_early = torch.allclose(full_logits[:, :w], ref_logits[:, :w], atol=1e-6, rtol=0)
        diff_late = (full_logits[:, w:] - ref_logits[:, w:]).abs().amax(dim=-1)  # [B, L-w]
        log(f"  mistral: positions < {w} identical to full attention: {same_early}; "
            f"max |diff| at positions >= {w}: min over positions {float(diff_late.min()):.3e}")
        assert same_early and bool((diff_late > 1e-4).all()), "sliding window not applied as expected"

    # --- save -----------------------------------------------------------------------------
    if spec.get("fused"):
        model.save_pretrained(d, save_original_format=False)
    else:
        model.save_pretrained(d)
    st_path = os.path.join(d, "model.safetensors")
    listing = safetensors_listing(st_path)
    if spec.get("moe"):
        fused = is_fused_listing(listing)
        if spec.get("fused"):
            assert fused, f"{name}: expected transformers to write fused expert tensors"
        elif fused:
            log(f"  {name}: save_pretrained wrote fused experts; converting to legacy per-expert layout")
            save_file(to_legacy_experts(load_file(st_path), spec["moe"]), st_path, metadata={"format": "pt"})
            listing = safetensors_listing(st_path)
            assert not is_fused_listing(listing)

    cfg_path = os.path.join(d, "config.json")
    if spec.get("legacy_rope_config"):
        with open(cfg_path) as f:
            cfg_json = json.load(f)
        rp = cfg_json.pop("rope_parameters")
        assert rp.get("rope_type", "default") == "default", rp
        new_cfg = {}
        for k, v in cfg_json.items():  # keep key order, insert legacy keys alphabetically-ish
            new_cfg[k] = v
        new_cfg["rope_scaling"] = None
        new_cfg["rope_theta"] = rp["rope_theta"]
        new_cfg = dict(sorted(new_cfg.items()))
        with open(cfg_path, "w") as f:
            json.dump(new_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    shutil.copyfile(tokenizer_path, os.path.join(d, "tokenizer.json"))

    # --- reload exactly as a user would, verify, compute expectations -----------------------
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                  local_files_only=True)
    loaded.eval()
    assert type(loaded) is spec["cls"], type(loaded)
    assert sd_equal(loaded.state_dict(), model.state_dict()), f"{name}: reloaded weights differ"
    if spec.get("legacy_rope_config"):
        assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}, \
            loaded.config.rope_parameters
        assert loaded.config.head_dim == 16 and loaded.config.tie_word_embeddings
    with torch.no_grad():
        logits = loaded(input_ids=input_ids).logits.detach().to(torch.float32).contiguous()
    assert torch.equal(logits, ref_logits), f"{name}: reloaded logits differ from in-memory model"
    std = float(logits.std())
    log(f"  {name}: logits std {std:.3f}, |max| {float(logits.abs().max()):.3f}")
    assert std > 0.5, "logits too close to zero"

    save_file({"input_ids": input_ids.contiguous(), "logits": logits}, os.path.join(d, "expected.safetensors"),
              metadata={"format": "pt"})
    res = hf_ppl.perplexity_from_windows(loaded, windows, batch_size=1)
    expected = {
        "architecture": spec["cls"].__name__,
        "model_type": loaded.config.model_type,
        "eval": {"data": "../eval.jsonl", "seq_len": SEQ_LEN, "tokens": res["tokens"], "nll": res["nll"],
                 "ppl": res["ppl"]},
        "logits": {"input_ids_shape": list(input_ids.shape), "shape": list(logits.shape)},
        "expert_layout": ("fused" if spec.get("fused") else "legacy_per_expert") if spec.get("moe") else None,
        "seed": seed,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")
    log(f"  {name}: eval tokens {res['tokens']} nll {res['nll']:.6f} ppl {res['ppl']:.6f}")
    return listing


def check_mixtral_layouts(legacy_path, fused_path):
    import torch
    from safetensors.torch import load_file

    leg, fus = load_file(legacy_path), load_file(fused_path)
    n_layers = 1 + max(int(k.split(".")[2]) for k in fus if k.startswith("model.layers."))
    for l in range(n_layers):
        gu = fus[f"model.layers.{l}.mlp.experts.gate_up_proj"]
        dn = fus[f"model.layers.{l}.mlp.experts.down_proj"]
        assert torch.equal(fus[f"model.layers.{l}.mlp.gate.weight"], leg[f"model.layers.{l}.block_sparse_moe.gate.weight"])
        for e in range(gu.shape[0]):
            p = f"model.layers.{l}.block_sparse_moe.experts.{e}."
            assert torch.equal(gu[e], torch.cat([leg[p + "w1.weight"], leg[p + "w3.weight"]], dim=0))
            assert torch.equal(dn[e], leg[p + "w2.weight"])
    rest_l = {k for k in leg if "block_sparse_moe" not in k}
    rest_f = {k for k in fus if ".mlp." not in k}
    assert rest_l == rest_f and all(torch.equal(leg[k], fus[k]) for k in rest_l)


README = """# btm parity fixtures (generated, do not edit by hand)

Generated by `scripts/make_fixtures.py` (see its docstring); regenerate with

    /opt/pyref/bin/python scripts/make_fixtures.py --out model/tests/fixtures

* `tokenizer.json`: byte-level BPE, vocab 320, `<s>` = 0 (BOS, prepended by the
  post-processor to every single sequence), `</s>` = 1 (EOS). Copied into every model dir.
* `eval.jsonl`: evaluation documents (`{"id", "text"}`).
* `<model>/`: `config.json`, `model.safetensors` (float32), `generation_config.json`,
  `tokenizer.json`, `expected.safetensors` (`input_ids` i64 [2,16], `logits` f32 [2,16,320]
  from transformers, eager attention), `expected.json` (perplexity on `../eval.jsonl` with
  seq_len 16, convention in `scripts/hf_ppl.py`: per-document tokenization with `<s>`,
  non-overlapping windows of <= 16 tokens, windows of < 2 tokens skipped, each window on its
  own from position 0, nll summed in float64).

Models: llama (GQA, untied, rope llama3 in `rope_parameters`), llama_legacy (MHA, tied,
head_dim 16 != hidden/heads, legacy top-level `rope_theta`), mistral (sliding_window 8),
qwen2 (q/k/v biases, tied), mixtral (legacy per-expert `block_sparse_moe.experts.E.w1/w2/w3`),
mixtral_fused (same weights as mixtral, transformers-5 fused `mlp.experts.gate_up_proj` /
`mlp.experts.down_proj`, so its expected outputs equal mixtral's), qwen2_moe (legacy per-expert,
shared expert, norm_topk_prob false), qwen2_moe_normtopk (same weights, norm_topk_prob true),
qwen3 (per-head q_norm/k_norm, head_dim 16 != hidden/heads, tied), qwen3_moe (q/k norms,
head_dim 16, layer 1 of 3 dense via mlp_only_layers, no shared expert, norm_topk_prob true),
qwen3_moe_softmax (same weights, norm_topk_prob false), olmo2 (post-sublayer norms, full-width
q_norm/k_norm), olmoe (pre-norms, full-width q/k norms, clip_qkv 2.0, norm_topk_prob false),
flex_olmo (OLMo2's layers with 4 experts top-2, norm_topk_prob true).
"""


def write_readme(out):
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="model/tests/fixtures", help="output directory")
    ap.add_argument("--only", nargs="*", default=None, help="only (re)generate these model dirs")
    ap.add_argument("--list", action="store_true", help="print safetensors key/shape listings")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out = args.out
    os.makedirs(out, exist_ok=True)

    tokenizer = build_tokenizer()
    tok_path = os.path.join(out, "tokenizer.json")
    tokenizer.save(tok_path, pretty=True)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tok_path)  # use exactly what the tests will read
    assert tokenizer.encode("hello").ids[0] == BOS_ID

    docs = build_eval_docs(tokenizer)
    with open(os.path.join(out, "eval.jsonl"), "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc["id"], "text": doc["text"]}, ensure_ascii=False) + "\n")
    log("eval docs (tokens incl. <s>): " + ", ".join(f"{d['id']}={d['_n']}" for d in docs))

    for spec in model_specs():
        if args.only and spec["name"] not in args.only:
            continue
        log(f"[{spec['name']}]")
        listing = write_model(spec, out, tok_path, tokenizer, docs, log)
        if args.list:
            print(f"== {spec['name']}/model.safetensors")
            for k, shape, dtype in listing:
                print(f"   {k} {shape} {dtype}")

    # Cross-check the two Mixtral layouts against each other (same seed -> same weights).
    leg, fus = os.path.join(out, "mixtral", "model.safetensors"), os.path.join(out, "mixtral_fused", "model.safetensors")
    if os.path.exists(leg) and os.path.exists(fus):
        check_mixtral_layouts(leg, fus)
        log("mixtral vs mixtral_fused: gate_up_proj[e] == cat(w1, w3, dim=0), down_proj[e] == w2: OK")

    write_readme(out)

    # Summary of hashes (handy for determinism checks).
    for root, _dirs, files in sorted(os.walk(out)):
        for fn in sorted(files):
            if fn.endswith(".safetensors") or fn.endswith(".json") or fn.endswith(".jsonl"):
                p = os.path.join(root, fn)
                with open(p, "rb") as f:
                    h = hashlib.sha256(f.read()).hexdigest()[:16]
                log(f"{h}  {os.path.relpath(p, out)}  {os.path.getsize(p)}")


if __name__ == "__main__":
    main()
