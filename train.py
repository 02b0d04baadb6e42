"""Pretrain GPT-2: `python train.py [key=value ...]` (see conf/config.yaml and the README).

Launch the same way on one process, under `torchrun --nproc_per_node=N`, or with `srun`.
"""

import sys

import hydra

from gpt2dist.config import one_line_errors, register
from gpt2dist.training.trainer import run

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float | None:
    """Returns the run's objective (the last val_loss, or train.keep_best's best), which a sweeper minimises."""
    with one_line_errors():  # every gpt2dist error: one line, exit status 2 (or its own)
        status, objective = run(cfg)
    if status:
        sys.exit(status)
    return objective


if __name__ == "__main__":
    with one_line_errors():
        main()
