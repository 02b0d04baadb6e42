"""One measured training run, for the benchmark drivers: gpt2dist's Trainer, or a minimal
hand-written PyTorch loop of the same model, batch, precision and data (the baseline).

    python benchmarks/worker.py {trainer|bare} [key=value ...]             # one process
    torchrun --nproc_per_node=2 benchmarks/worker.py {trainer|bare} ...    # DDP for `bare`

The overrides are train.py's (conf/), and both runs read them, so they cannot differ in what
they train. Rank 0 prints one line, `RESULT {json}`: steady tokens/s (the first log window,
which holds start-up and compilation, is left out), and each rank's memory: the tensors alive
after the last step (model states and buffers), peak allocated GPU memory, and the growth of the
process's resident memory from just before the model was built (peak, and at the end).
"""

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2dist.data.builtin_corpus import source_corpus  # noqa: E402
from gpt2dist.config import (CONF_DIR, Precision, check, data_sources, gpt_config, grad_accum_steps,  # noqa: E402
                             register, tokens_per_step)
from gpt2dist.data.loader import SampleStream, Windows, train_windows  # noqa: E402
from gpt2dist.training.metrics import device_peak_flops, flops_per_token, mfu, peak_gpu_memory_gib  # noqa: E402
from gpt2dist.models.gpt import GPT  # noqa: E402
from gpt2dist.training import malloc  # noqa: E402
from gpt2dist.training.optim import build_optimizer, lr_scheduler, param_groups  # noqa: E402
from gpt2dist.training.trainer import Trainer  # noqa: E402  (imports DeepSpeed before memory is measured)

GIB = 2**30


def resident_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process, GiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20)


def live_tensor_gib(device: torch.device) -> float:
    """Bytes of every tensor alive now (each storage once), GiB: model states and buffers
    between steps. On a GPU, the allocator's count; on a CPU, tensors found by the garbage
    collector (DeepSpeed keeps its flat buffers and partitions in Python objects)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GIB
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # torch.compile's fake tensors; dead weak proxies
            continue
    return sum(storages.values()) / GIB


def steady_tokens_per_s(window_rates: list[float]) -> float:
    """Tokens/s over the log windows after the first: equal-token windows, so the harmonic mean."""
    steady = window_rates[1:] or window_rates
    return len(steady) / sum(1 / r for r in steady)


def source_windows(cfg) -> tuple[list[Windows], list[float]]:
    """Each training source's windows and weight (config.data_sources), as the trainer reads them."""
    sources = data_sources(cfg)
    corpora = [source_corpus(s.path, s.builtin, cfg.data.cache_dir, progress=False) for s in sources]
    return ([train_windows(c, cfg.data.seq_len, s.weight) for c, s in zip(corpora, sources)],
            [s.weight for s in sources])


def run_trainer(cfg) -> tuple[list[float], float]:
    """gpt2dist's Trainer, in this process; returns the tokens/s of each log window (rank 0) and
    the live tensor memory after the last step."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
        live = live_tensor_gib(trainer.device)
    finally:
        trainer.close()
    if trainer.env.rank != 0:
        return [], live
    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["tokens_per_s"] for m in lines if "tokens_per_s" in m], live


def run_bare(cfg) -> tuple[list[float], float]:
    """The baseline: what one would write by hand (nanoGPT's train.py, reduced to the loop).

    The same GPT, the same optimizer (optim.build_optimizer), groups and schedule, gradient clipping, random windows of
    the same corpus; DDP across ranks (no_sync while accumulating); bf16/fp16 by autocast.
    """
    if cfg.train.retain_freed_memory:
        malloc.retain_freed_memory()  # as the trainer does
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    t, o = cfg.train, cfg.optim
    torch.manual_seed(t.seed)
    raw = GPT(gpt_config(cfg.model)).to(device)
    raw.gradient_checkpointing = t.gradient_checkpointing
    raw.loss_chunk = t.loss_chunk
    model = torch.compile(raw) if t.compile else raw
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = build_optimizer(param_groups(raw, o), o, offload=False, is_main=rank == 0)
    schedule = lr_scheduler(optimizer, o, t.max_steps)
    dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(Precision(t.precision))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    windows, weights = source_windows(cfg)
    stream = SampleStream([len(w) for w in windows], weights, t.seed)  # the trainer's order, mixtures included
    position = rank * t.micro_batch_size
    accum = grad_accum_steps(cfg, world)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal position
        sources, picks = stream.locate(np.arange(position, position + t.micro_batch_size, dtype=np.int64))
        position += t.micro_batch_size * world
        tokens = torch.stack([torch.from_numpy(windows[s].tokens(i).astype("int64")) for s, i in zip(sources, picks)])
        if cuda:
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    rates, t0 = [], time.perf_counter()
    x, y = get_batch()
    for step in range(1, t.max_steps + 1):
        for micro in range(accum):
            sync = micro == accum - 1 or world == 1
            with (nullcontext() if sync else model.no_sync()), autocast:
                _, loss = model(x, y)
            x, y = get_batch()  # the next batch is fetched while the GPU works on this one
            scaler.scale(loss / accum).backward()
        if o.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), o.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.logger.log_interval == 0 or step == t.max_steps:
            loss.item()  # waits for the GPU, as printing the loss does
            now = time.perf_counter()
            rates.append(cfg.logger.log_interval * tokens_per_step(cfg) / (now - t0))
            t0 = now
    return rates, live_tensor_gib(device)


def launch(mode: str, overrides: list[str], nproc: int = 1, timeout: int = 3600) -> dict:
    """Run this worker in a fresh process (under torchrun when nproc > 1); returns its result."""
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    run_dir = tempfile.mkdtemp(prefix="gpt2dist-bench-")
    out = subprocess.run([*launcher, __file__, mode, f"train.run_dir={run_dir}", *overrides], capture_output=True,
                         text=True, env=env, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    results = [line[len("RESULT "):] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    shutil.rmtree(run_dir, ignore_errors=True)
    if out.returncode or not results:
        log = Path(run_dir + ".log")
        log.write_text(out.stdout + out.stderr)
        raise RuntimeError(f"{mode} {' '.join(overrides)} failed (exit {out.returncode}), output in {log}:\n"
                           f"{out.stderr[-3000:]}")
    result = json.loads(results[-1])
    print(f"{mode:8s} {' '.join(overrides)}: {result['tokens_per_s']:,.0f} tokens/s, "
          + (f"MFU {100 * result['mfu']:.1f}%, " if result["mfu"] else "") +
          f"memory per rank {[round(r['gpu_peak_gib'] or r['rss_peak_growth_gib'], 2) for r in result['ranks']]} GiB",
          flush=True)
    return result


def main() -> None:
    mode, overrides = sys.argv[1], sys.argv[2:]
    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        # The same directory on every rank (torchrun gives them one run id).
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
        cfg = compose("config", overrides=[f"train.run_dir={tempfile.gettempdir()}/gpt2dist-bench-{run_id}",
                                           "logger.wandb=disabled", "train.sample_tokens=0", "train.eval_interval=0",
                                           "train.ckpt_interval=0", *overrides])
    check(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.train.max_steps % cfg.logger.log_interval:
        sys.exit("error: train.max_steps must be a multiple of logger.log_interval (equal windows)")
    source_windows(cfg)  # built-in corpora are prepared before anything is timed
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    start_rss, _ = resident_gib()
    rates, live = run_trainer(cfg) if mode == "trainer" else run_bare(cfg)
    rss, peak_rss = resident_gib()
    mine = {"gpu_peak_gib": peak_gpu_memory_gib(),
            "live_tensors_gib": live, "rss_growth_gib": rss - start_rss, "rss_peak_growth_gib": peak_rss - start_rss}
    ranks = [mine]
    if torch.distributed.is_initialized():
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, mine)
    if int(os.environ.get("RANK", 0)) == 0:
        with torch.device("meta"):
            n_params = GPT(gpt_config(cfg.model)).num_params()
        tokens_per_s = steady_tokens_per_s(rates)
        per_token = flops_per_token(n_params, cfg.model.n_layer, cfg.model.n_embd, cfg.data.seq_len)
        result = {"mode": mode, "overrides": overrides, "world_size": len(ranks), "tokens_per_s": tokens_per_s,
                  "mfu": mfu(tokens_per_s / len(ranks), per_token,
                             device_peak_flops(cfg.logger.peak_tflops, cfg.train.precision)),
                  "window_tokens_per_s": rates, "ranks": ranks}
        print("RESULT " + json.dumps(result), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
