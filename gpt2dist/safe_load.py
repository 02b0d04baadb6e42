"""Reading torch files without running code: every .pt file gpt2dist, or DeepSpeed for it, reads.

`torch.load` unpickles, and a pickle can call any function: a checkpoint from elsewhere, or one
that someone could write to, could run code on load. Its manifest does not help, since whoever
writes the file can write the manifest. So every file is read with `weights_only=True`, which
builds only tensors, plain containers and the few DeepSpeed classes a real checkpoint holds, and
refuses anything else before it is built. DeepSpeed passes `weights_only=False` itself; while it
reads a checkpoint, `only_weights` holds it to the same rule.
"""

import contextlib
import pickle
from pathlib import Path

import torch

_torch_load = torch.load  # the real one, also while only_weights stands in for it


def allowed_classes() -> list[type]:
    """The classes besides tensors and containers in DeepSpeed's files: those that
    `torch.serialization.get_unsafe_globals_in_checkpoint` lists in real checkpoints of ZeRO stages
    0-3, fp32 and bf16, with and without offload (all in the ZeRO optimizer files), and the dynamic
    loss scaler those files hold in place of `LossScaler` with fp16. Each is plain data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path, what: str) -> str:
    return (f"{path}: refused: it holds {what}, which is neither a tensor nor part of a DeepSpeed checkpoint; "
            "loading it could run code")


def _load_weights(f, error_cls: type[Exception], *args, **kwargs):
    """torch.load(weights_only=True) with the allowed classes; a file with anything else raises error_cls."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(allowed_classes()):
            return _torch_load(f, *args, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        check(f, error_cls)  # names the class or function it holds
        raise error_cls(_refusal(f, "objects that weights_only refuses to build")) from None


def load(path: str | Path, error_cls: type[Exception], **kwargs):
    """The contents of a torch file (kwargs go to torch.load); error_cls naming the file if it cannot be read
    or holds anything but tensors, containers and `allowed_classes`."""
    try:
        return _load_weights(path, error_cls, **kwargs)
    except error_cls:
        raise
    except Exception as e:  # an absent, truncated or foreign file: each raises its own type
        raise error_cls(f"{path}: unreadable ({e})") from None


def check(path: str | Path, error_cls: type[Exception]) -> None:
    """Refuse a torch file that `load` would refuse, without unpickling it: every rank reads every file of a
    checkpoint this way first, so all of them refuse it together, before DeepSpeed's collectives."""
    try:
        with torch.serialization.safe_globals(allowed_classes()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a torch zip file, or pickle opcodes weights_only does not read
        raise error_cls(_refusal(path, f"pickle data that cannot be checked ({e})")) from None
    if unsafe:
        raise error_cls(_refusal(path, sorted(unsafe)[0]))


@contextlib.contextmanager
def only_weights(error_cls: type[Exception]):
    """While DeepSpeed reads a checkpoint inside this block, its torch.load calls go through `_load_weights`:
    a file with code raises error_cls naming it, instead of running the code."""
    outer = torch.load
    torch.load = lambda f, *args, **kwargs: _load_weights(f, error_cls, *args, **kwargs)
    try:
        yield
    finally:
        torch.load = outer
