"""Run by tests/test_generate.py under torchrun: greedy generation through a ZeRO-3 engine on 2 ranks,
each rank from its own prompt, rank 0's stopping after its first token, rank 1's running on. Prints
each rank's generated tokens."""

import sys

import torch
from hydra import compose, initialize_config_dir

from gpt2dist.config import CONF_DIR, gpt_config, register
from gpt2dist.models.sampling import generate
from gpt2dist.models.gpt import GPT
from gpt2dist.training import dist
from gpt2dist.training import engine as ds_engine

register()
with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
                                       "zero=stage3", "train.micro_batch_size=1", "train.global_batch_size=2",
                                       "dist.timeout_s=20"])
env = dist.init(cfg.dist.timeout_s)
torch.manual_seed(0)
engine = ds_engine.build(GPT(gpt_config(cfg.model)), cfg, env.world_size, env.is_main)
engine.eval()
first = generate(engine, torch.tensor([[1, 2, 3]]), 1, temperature=0)[0, -1].item()  # the same on every rank
prompt = [1, 2, 3] if env.rank == 0 else [4, 5, 6]
out = generate(engine, torch.tensor([prompt]), 6, temperature=0, stop_token=first)
# One write per line: the two ranks share the pipe, and print's separate newline could land in the other's line.
sys.stdout.write(f"rank {env.rank} stop {first}: {out[0, 3:].tolist()}\n")
sys.stdout.flush()
dist.close()
