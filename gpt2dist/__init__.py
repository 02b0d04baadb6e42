"""gpt2dist: pretrain GPT-2 with DeepSpeed ZeRO, from one CPU to many GPU nodes."""

import logging

# torchao (quantization) logs, when first imported (transformers imports it too), each kernel library
# built for hardware this machine lacks, and torch a deprecation of its enums: not our output.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
