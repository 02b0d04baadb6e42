"""Pretrain GPT-2: `python train.py [key=value ...]` (see conf/config.yaml and the README).

Launch the same way on one process, under `torchrun --nproc_per_node=N`, or with `srun`.
"""

import sys

import hydra

from gpt2dist.checkpoint import CheckpointError
from gpt2dist.config import ConfigError, register
from gpt2dist.guard import TrainingDiverged
from gpt2dist.shards import CorpusError
from gpt2dist.trainer import Trainer
from gpt2dist.weights import WeightsError

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    try:
        trainer = Trainer(cfg)
        try:
            status = trainer.train()
        finally:
            trainer.close()
    except (ConfigError, CorpusError, CheckpointError, WeightsError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
