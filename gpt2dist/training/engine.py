"""The one place that talks to DeepSpeed: its config is derived from ours, never kept twice."""

import contextlib
import functools

import torch

from gpt2dist.training import deepspeed_env
from gpt2dist.config import ConfigError, Precision, grad_accum_steps
from gpt2dist.training.optim import Optimizer, build_optimizer, lr_scheduler, param_groups

deepspeed = deepspeed_env.load()


def check_precision(precision: Precision) -> None:
    """Refuse a precision this machine's accelerator cannot run (DeepSpeed would fail later,
    with a traceback): CPUs without oneDNN fp16 kernels, for one."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {Precision.fp16: accelerator.is_fp16_supported, Precision.bf16: accelerator.is_bf16_supported}
    if precision in supported and not supported[precision]():
        device = accelerator.device_name()
        other = "bf16" if precision == Precision.fp16 and accelerator.is_bf16_supported() else "fp32"
        raise ConfigError(f"train.precision={precision.value} is not supported on this {device} device; "
                          f"use train.precision={other}")


def deepspeed_config(cfg, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config for this run, from the Hydra config; `load_universal`: the checkpoint
    it resumes is in DeepSpeed's universal form (checkpoint.make_universal)."""
    z, o, t = cfg.zero, cfg.optim, cfg.train
    zero = {"stage": z.stage}
    if z.stage == 3:
        # DeepSpeed's default gradient bucket, 5e8 elements, is allocated whole at stage 3: 1 GB of
        # bf16 per rank whatever the model (benchmarks/zero.py found it). These sizes follow the
        # width instead, as Hugging Face's DeepSpeed integration derives them ("auto").
        h = cfg.model.n_embd
        zero.update(reduce_bucket_size=h * h, stage3_prefetch_bucket_size=int(0.9 * h * h),
                    stage3_param_persistence_threshold=10 * h)
        if o.name == Optimizer.muon:  # its ZeRO-3 path gathers whole gradients to orthogonalize them
            zero["reduce_scatter"] = False
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    precision = Precision(t.precision)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,  # the optimizer itself is ours (optim.build_optimizer), passed in
        "bf16": {"enabled": precision == Precision.bf16},
        "fp16": {"enabled": precision == Precision.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**62,  # our metrics print progress
        "zero_allow_untested_optimizer": True,
        # Muon is not DeepSpeed's CPU Adam, but under offload its AdamW half is (optim._muon).
        "zero_force_ds_cpu_optimizer": o.name != Optimizer.muon,
        "checkpoint": {"load_universal": load_universal},
    }


def build(model: torch.nn.Module, cfg, world_size: int, is_main: bool = True, load_universal: bool = False):
    """Wrap the model in a DeepSpeed engine with our optimizer and schedule (see deepspeed_config)."""
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim, cfg.zero.offload_optimizer,
                                is_main)
    with deepspeed_env.quiet():  # its build and configuration lines
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=functools.partial(lr_scheduler, optim_cfg=cfg.optim, max_steps=cfg.train.max_steps),
            config=deepspeed_config(cfg, world_size, load_universal),
        )
    if world_size == 1 and cfg.zero.stage == 0:
        # Alone, DeepSpeed would still flatten, "all-reduce" and unflatten every gradient each step:
        # 3.5% of a step of a 30M model on a CPU (ZeRO 1-3 reduce through their optimizers instead).
        engine.enable_backward_allreduce = False
    if cfg.zero.stage == 0:
        keep_clipping_norm(engine)
    return engine


def compile_blocker(engine) -> str | None:
    """Why train.compile=true cannot compile this engine's model here, or None.

    ZeRO-3 gathers each layer's parameters in module hooks that dynamo cannot trace: every module
    breaks the graph and recompiles until dynamo's recompile limit, with a wall of warnings, and a
    step is slower than eager (DeepSpeed's own DeepCompile, which would trace them, does not support
    ZeRO-3 on torch >= 2.9). On a CPU, inductor writes its kernels in C++ and builds them with $CXX
    (default g++), found as torch itself looks for it."""
    if engine.zero_optimization_partition_weights():
        return "ZeRO stage 3's parameter hooks do not compile"
    if engine.device.type != "cpu":
        return None
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()  # runs `$CXX --version`
    except InvalidCxxCompiler:
        tried = " or ".join(cxx for cxx in inductor_config.cpp.cxx if cxx)  # $CXX, else g++
        return f"no C++ compiler ({tried}) for torch.compile on the CPU"
    return None


def compile_training(engine) -> str | None:
    """torch.compile the model's training forward (DeepSpeed's `engine.compile()`, in place: parameter
    names, and so checkpoints, unchanged); returns None, or why this run trains eager instead.
    Validation, evaluation and generation run eager all the same (`inference`)."""
    blocker = compile_blocker(engine)
    if blocker is None:
        engine.compile()
    return blocker


@contextlib.contextmanager
def inference(engine):
    """Within this block the model is in eval mode and runs eager even when compiled, then goes back
    to the mode it was in. A compiled forward would recompile for each new shape and mode: the
    growing KV cache of generation, a last batch of another size (build-nanogpt turns compile off
    because its sampling and HellaSwag broke under it)."""
    was_training = engine.training
    engine.eval()
    try:
        with torch.compiler.set_stance("force_eager") if engine.is_compiled else contextlib.nullcontext():
            yield
    finally:
        engine.train(was_training)


def keep_clipping_norm(engine) -> None:
    """DeepSpeed's plain fp32 path (ZeRO 0) clips with a gradient norm it computes and then drops:
    keep it in `engine.clipping_norm`, so `step` reports that norm instead of computing a second one
    (0.8% of a 30M model's step on a CPU). The clipping itself is DeepSpeed's call, unchanged."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():  # DeepSpeed's own body, plus keeping what it returns
        engine.clipping_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                               max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_fp32_gradients  # shadows the class's method on this instance
    engine.clipping_norm = None


def step(engine) -> torch.Tensor | float | None:
    """`engine.step()`; at an optimizer step, returns the global gradient norm before clipping
    (a tensor is left on the device: reading it waits for the GPU, so callers do that only to log it).

    DeepSpeed's ZeRO and mixed-precision optimizers report the norm, and its plain fp32 path (stage
    0) computes it to clip (kept by `keep_clipping_norm`); only unclipped fp32 at stage 0 has none,
    so there we take it from the (already all-reduced) gradients.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    own = None
    if boundary and engine.zero_optimization_stage() == 0 and not engine.gradient_clipping() > 0 \
            and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        own = torch.nn.utils.get_total_norm(grads) if grads else None
    engine.step()
    if not boundary:
        return None
    reported = (engine.get_global_grad_norm(), getattr(engine, "clipping_norm", None), own)
    return next((norm for norm in reported if norm is not None), None)


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO / mixed-precision wrappers."""
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@contextlib.contextmanager
def update_skipped(engine):
    """Within this block, `engine.step()` applies no update: the innermost torch optimizer's step is
    a no-op, so weights, fp32 masters and Adam moments stay as they were, for every ZeRO stage,
    precision and offload; DeepSpeed still clears the gradients and keeps its counters."""
    optimizer = torch_optimizer(engine)
    optimizer.step = lambda *args, **kwargs: None  # shadows the class's step on this instance
    try:
        yield
    finally:
        del optimizer.step


def release() -> None:
    """Put back what DeepSpeed changed in torch for the process: ZeRO-3 replaces torch.nn.functional.linear
    with its own (which "will persist unless manually reset"), and a later model in the same process (a
    torchao-quantized one, whose weights have no .t()) would run through it."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    original = getattr(Init, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original
