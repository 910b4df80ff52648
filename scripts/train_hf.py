"""A reference external trainer for btm: PyTorch + transformers, data-parallel, resumable.

btm hands a training phase to any command that honours its contract (docs/training.md, "External
trainers"): start from the Hugging Face model in ``--model-in``, leave a Hugging Face checkpoint
of the same architecture in ``--model-out`` and exit 0; after a kill, running again resumes
from this script's own checkpoints in ``--work-dir``. This script is the example to copy: the
pipeline block that runs it on two processes is

    trainer: {kind: torchrun, script: scripts/train_hf.py, nproc_per_node: 2, args: [
      --model-in, "{model_in}", --model-out, "{model_out}", --work-dir, "{work_dir}",
      --train, "{train_files}", --weights, "{train_weights}", --valid, "{valid_files}",   # lists
      --steps, "{steps}", --batch-size, "{batch_size}", --grad-accum, "{grad_accum}",
      --seq-len, "{seq_len}", --lr, "{lr}", --min-lr, "{min_lr}", --warmup-steps, "{warmup_steps}",
      --decay, "{decay}", --weight-decay, "{weight_decay}", --beta1, "{beta1}", --beta2, "{beta2}",
      --grad-clip, "{grad_clip}", --seed, "{seed}"]}

It follows btm's own trainer (``expert-trainer``) where it matters for comparing the two:
- data: JSONL, the ``text`` of each line tokenized with the model's ``tokenizer.json`` as it
  says (post-processor included) and followed by EOS; a source's documents form one token
  stream, cut into sequences of ``seq_len + 1`` tokens (inputs and shifted targets) that
  overlap by one; each sample picks a source by weight, and each source yields its
  sequences in a fresh permutation per epoch (seeded by the seed and the epoch);
- one optimizer step = ``batch_size × grad_accum`` sequences in all, split over the ranks;
- AdamW (float32, decoupled weight decay on tensors of rank ≥ 2 only, ε = 1e-8), global-norm
  clipping, linear warm-up then cosine to ``min_lr`` (or constant);
- progress: one JSON line per ``--log-interval`` steps on stdout,
  ``{"step", "loss", "lr", "tokens_seen"}``, and ``{"step", "val_loss", "val_ppl"}`` at the end
  (btm records them in the job's metrics).

Data parallelism is torch's DistributedDataParallel: gloo on the CPU, NCCL on GPUs (one per
process, ``LOCAL_RANK``). Launch with ``torchrun --nproc_per_node N`` or run it plain for one
process. Checkpoints (``work-dir/step-N/``: model, optimizer, data position) are written by
rank 0, the newest two kept, the folder renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-in", required=True)
    ap.add_argument("--model-out", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--train", nargs="+", required=True, help="JSONL files")
    ap.add_argument("--weights", default="", help="their sampling weights, comma-separated")
    ap.add_argument("--valid", nargs="*", default=[], help="validation JSONL files")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--decay", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0 = no clipping")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--checkpoint-interval", type=int, default=50)
    ap.add_argument("--eval-sequences", type=int, default=16)
    return ap.parse_args()


def token_stream(path: str, tok: Tokenizer, eos: int) -> list[int]:
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            ids.extend(tok.encode(json.loads(line)["text"]).ids)
            ids.append(eos)
    return ids


class Source:
    """Sequences i = tokens[i·T : i·T + T + 1] of one stream, a fresh permutation per epoch."""

    def __init__(self, ids: list[int], seq_len: int, seed: int, index: int):
        self.ids, self.t, self.seed, self.index = ids, seq_len, seed, index
        self.count = max((len(ids) - 1) // seq_len, 0)
        if self.count == 0:
            sys.exit(f"train_hf.py: a source has fewer than {seq_len + 1} tokens")

    def sequence(self, drawn: int) -> list[int]:
        epoch, k = divmod(drawn, self.count)
        order = list(range(self.count))
        random.Random(hash((self.seed, self.index, epoch)) & 0xFFFFFFFF).shuffle(order)
        i = order[k]
        return self.ids[i * self.t : i * self.t + self.t + 1]


def lr_at(a: argparse.Namespace, step: int) -> float:
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    if a.decay == "constant":
        return a.lr
    span = max(a.steps - a.warmup_steps, 1)
    progress = min((step - a.warmup_steps) / span, 1.0)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1.0 + math.cos(math.pi * progress))


def newest_checkpoint(work_dir: str) -> str | None:
    steps = []
    for name in os.listdir(work_dir):
        if name.startswith("step-") and os.path.exists(os.path.join(work_dir, name, "state.json")):
            steps.append((int(name[5:]), name))
    return os.path.join(work_dir, max(steps)[1]) if steps else None


def main() -> None:
    a = parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if a.batch_size % world:
        sys.exit(f"train_hf.py: batch size {a.batch_size} does not split over {world} processes")
    if rank == 0:
        print(f"train_hf.py: world {world} ({'nccl' if cuda else 'gloo'})" if distributed else "train_hf.py: one process", file=sys.stderr)
    os.makedirs(a.work_dir, exist_ok=True)

    resume = newest_checkpoint(a.work_dir)
    config = AutoConfig.from_pretrained(a.model_in)
    model = AutoModelForCausalLM.from_pretrained(resume or a.model_in, dtype=torch.float32).to(device)
    model.train()
    tok = Tokenizer.from_file(os.path.join(a.model_in, "tokenizer.json"))
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    files = a.train
    weights = [float(w) for w in a.weights.split(",")] if a.weights else [1.0] * len(files)
    sources = [Source(token_stream(p, tok, eos), a.seq_len, a.seed, i) for i, p in enumerate(files)]

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(a.beta1, a.beta2), eps=1e-8,
    )
    state = {"step": 0, "samples": 0, "drawn": [0] * len(sources)}
    if resume:
        opt.load_state_dict(torch.load(os.path.join(resume, "optimizer.pt"), map_location=device))
        with open(os.path.join(resume, "state.json")) as f:
            state = json.load(f)
        if rank == 0:
            print(f"train_hf.py: resuming from {resume} at step {state['step']}", file=sys.stderr)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    def next_sample() -> list[int]:
        # The source of sample n is drawn from a generator seeded by (seed, n): a function of
        # the position alone, so a resumed run continues the same stream.
        rng = random.Random(hash((a.seed, state["samples"])) & 0xFFFFFFFF)
        s = rng.choices(range(len(sources)), weights=weights)[0]
        state["samples"] += 1
        seq = sources[s].sequence(state["drawn"][s])
        state["drawn"][s] += 1
        return seq

    per_rank = a.batch_size // world
    tokens_per_step = a.batch_size * a.grad_accum * a.seq_len
    last = time.time()
    while state["step"] < a.steps:
        lr = lr_at(a, state["step"])
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for micro in range(a.grad_accum):
            batch = [next_sample() for _ in range(a.batch_size)]
            mine = torch.tensor(batch[rank * per_rank : (rank + 1) * per_rank], device=device)
            out = ddp(input_ids=mine[:, :-1])
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1))
            (loss / a.grad_accum).backward()
            total += loss.detach() / a.grad_accum
        if distributed:
            dist.all_reduce(total)
            total /= world
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]
        if rank == 0 and (step % a.log_interval == 0 or step == a.steps):
            now = time.time()
            print(json.dumps({"step": step, "loss": float(total), "lr": lr, "tokens_seen": step * tokens_per_step,
                              "tokens_per_s": tokens_per_step * a.log_interval / max(now - last, 1e-9)}), flush=True)
            last = now
        if rank == 0 and (step % a.checkpoint_interval == 0 or step == a.steps):
            save(a, model, opt, state)

    if rank == 0:
        if a.valid:
            print(json.dumps(evaluate(a, model, tok, eos, device)), flush=True)
        model.save_pretrained(a.model_out, safe_serialization=True)
        shutil.copy(os.path.join(a.model_in, "tokenizer.json"), os.path.join(a.model_out, "tokenizer.json"))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def save(a: argparse.Namespace, model, opt, state: dict) -> None:
    final = os.path.join(a.work_dir, f"step-{state['step']}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)  # last: a folder without it is incomplete
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    kept = sorted((int(n[5:]) for n in os.listdir(a.work_dir) if n.startswith("step-") and not n.endswith(".tmp")))
    for s in kept[:-2]:
        shutil.rmtree(os.path.join(a.work_dir, f"step-{s}"), ignore_errors=True)


@torch.no_grad()
def evaluate(a: argparse.Namespace, model, tok: Tokenizer, eos: int, device) -> dict:
    """Mean next-token loss over the first ``--eval-sequences`` sequences of each valid file."""
    model.eval()
    nll, count = 0.0, 0
    for path in a.valid:
        src = Source(token_stream(path, tok, eos), a.seq_len, a.seed, 0)
        for i in range(min(a.eval_sequences, src.count)):
            seq = torch.tensor([src.ids[i * a.seq_len : i * a.seq_len + a.seq_len + 1]], device=device)
            logits = model(input_ids=seq[:, :-1]).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()
            count += seq.shape[1] - 1
    model.train()
    val = nll / max(count, 1)
    return {"step": a.steps, "val_loss": val, "val_ppl": math.exp(val)}


if __name__ == "__main__":
    main()
