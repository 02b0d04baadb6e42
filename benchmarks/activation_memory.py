"""Activation memory of each GPT-2 size, measured, and the ZeRO memory table built from it.

Measures the bytes a forward pass keeps for backward (every tensor handed to autograd's
saved-tensor hooks, counted once per storage, parameters excluded) for one 1024-token
sequence in bf16, with and without gradient checkpointing, and the fixed part again with the
chunked LM head and loss (`train.loss_chunk`). Activations grow linearly with
depth, so two shallow copies of each size (1 and 2 layers, full width) give the per-layer and
the fixed part exactly, in seconds on a CPU; the numbers do not depend on the device.

Then, for 8 GPUs of 40 and 80 GB, it picks per size the fastest setting whose memory fits:
model states from the ZeRO paper (mixed-precision Adam: 16 bytes per parameter, of which
stage 1 partitions the 12 of optimizer state, stage 2 also the 2 of gradients, stage 3 also
the 2 of parameters), plus the measured activations and the LM head's backward transient for
the micro-batch, plus a fixed reserve.

    python benchmarks/activation_memory.py --out benchmarks/results/activation_memory.json
"""

import argparse
import json
from pathlib import Path

import torch

from gpt2dist.config import load_model_preset
from gpt2dist.models.gpt import GPT, GPTConfig

SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GIB = 2**30
RESERVE_GIB = 2.0  # CUDA context, communication buckets, allocator slack
# Backward of the LM head holds, per token, the fp32 softmax gradient and its bf16 copy over the
# whole vocabulary on top of what forward saved: the largest transient of a GPT-2 step.
LM_HEAD_BACKWARD_BYTES_PER_TOKEN = (4 + 2) * 50257


LOSS_CHUNK = 256  # tokens; what is kept for backward does not depend on it


def saved_bytes(config: GPTConfig, seq_len: int, checkpointing: bool, loss_chunk: int = 0) -> int:
    """Bytes autograd keeps for backward after the forward pass of one sequence (bf16)."""
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16)
    model.gradient_checkpointing = checkpointing
    model.loss_chunk = loss_chunk
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    idx = torch.randint(0, config.vocab_size, (1, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(storages.values())


def activations(name: str, seq_len: int) -> dict:
    """Per-layer and fixed activation bytes of one sequence, with and without checkpointing, and
    the fixed part with the chunked loss (the blocks keep the same either way)."""
    cfg = load_model_preset(name)
    out = {"n_layer": cfg.n_layer, "lm_head_backward": LM_HEAD_BACKWARD_BYTES_PER_TOKEN * seq_len}
    for ckpt in (False, True):
        one, two = (saved_bytes(GPTConfig(**{**cfg.__dict__, "n_layer": n}), seq_len, ckpt) for n in (1, 2))
        per_layer, fixed = two - one, one - (two - one)
        out["checkpointing" if ckpt else "plain"] = {
            "per_layer": per_layer, "fixed": fixed, "per_sequence": fixed + cfg.n_layer * per_layer}
    chunked = saved_bytes(GPTConfig(**{**cfg.__dict__, "n_layer": 1}), seq_len, False, LOSS_CHUNK)
    out["fixed_chunked_loss"] = chunked - out["plain"]["per_layer"]
    return out


def model_state_bytes(n_params: int, stage: int, gpus: int, offload: bool = False) -> float:
    """Per-GPU bytes of parameters, gradients and Adam state (ZeRO paper, K = 12)."""
    if offload:
        return 0.0
    return {0: 16 * n_params, 1: 4 * n_params + 12 * n_params / gpus,
            2: 2 * n_params + 14 * n_params / gpus, 3: 16 * n_params / gpus}[stage]


# (stage, checkpointing, offload), fastest first: no recomputation, fewest collectives, no offload.
CHOICES = [(0, False, False), (1, False, False), (2, False, False), (0, True, False), (2, True, False),
           (3, True, False), (3, True, True)]


def recommend(n_params: int, act: dict, gpu_gib: int, gpus: int, micro_batch: int) -> dict:
    for stage, ckpt, offload in CHOICES:
        if (gpus == 1 and stage > 0 and not offload) or (gpus > 1 and stage == 0 and ckpt):
            continue  # partitioning over one GPU saves nothing; over several, ZeRO 2 beats recomputing alone
        per_seq = act["checkpointing" if ckpt else "plain"]["per_sequence"] + act["lm_head_backward"]
        total = model_state_bytes(n_params, stage, gpus, offload) + micro_batch * per_seq + RESERVE_GIB * GIB
        if total <= gpu_gib * GIB:
            return {"stage": stage, "checkpointing": ckpt, "offload": offload, "gib": round(total / GIB, 1)}
    return {"stage": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per forward pass")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "gpus": args.gpus, "dtype": "bf16",
              "reserve_gib": RESERVE_GIB, "models": {}}
    for name in SIZES:
        with torch.device("meta"):
            n_params = GPT(load_model_preset(name)).num_params()
        act = activations(name, args.seq_len)
        result["models"][name] = {"params": n_params, "activations": act,
                                  "recommended": {f"{g}GB": recommend(n_params, act, g, args.gpus, args.micro_batch)
                                                  for g in (40, 80)}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| model | params | activations / sequence (plain, checkpointed) | {args.gpus} x 40 GB | {args.gpus} x 80 GB |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in result["models"].items():
        a = m["activations"]
        cells = []
        for g in ("40GB", "80GB"):
            r = m["recommended"][g]
            setting = f"ZeRO {r['stage']}" + (" + grad ckpt" if r["checkpointing"] else "") + \
                (" + offload" if r["offload"] else "")
            cells.append(f"{setting} (~{r['gib']} GiB)")
        print(f"| {name} | {m['params'] / 1e6:,.0f}M | {a['plain']['per_sequence'] / GIB:.2f} GiB, "
              f"{a['checkpointing']['per_sequence'] / GIB:.2f} GiB | {cells[0]} | {cells[1]} |")
    print("\n| model | fixed part (plain loss) | fixed part (chunked loss) |\n| --- | --- | --- |")
    for name, m in result["models"].items():
        a = m["activations"]
        print(f"| {name} | {a['plain']['fixed'] / 2**20:.0f} MiB | {a['fixed_chunked_loss'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
