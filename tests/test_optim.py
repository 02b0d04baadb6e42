"""The optimizer, built by name, and the learning-rate schedule's shapes, value by value."""

import shutil

import pytest
import torch

from gpt2dist.config import ConfigError, check, gpt_config
from gpt2dist.models.gpt import GPT
from gpt2dist.training.checkpoint import CHECKPOINTS, CheckpointError, check_compatible
from gpt2dist.training.optim import build_optimizer, lr_factor, param_groups
from tests.conftest import make_cfg, tiny_overrides, train


def factors(*overrides: str, max_steps: int = 10) -> list[float]:
    optim = make_cfg(*overrides).optim
    return [lr_factor(step, optim, max_steps) for step in range(max_steps + 2)]


def test_cosine_warms_up_then_decays_to_min_lr():
    f = factors("optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=2")
    assert f[:2] == pytest.approx([0.5, 1.0])
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 8 decay steps
    assert all(a > b for a, b in zip(f[2:10], f[3:11]))
    assert f[10:] == pytest.approx([0.1, 0.1])


def test_constant_holds_the_peak_then_anneals_linearly():
    f = factors("optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=2", "optim.schedule=constant",
                "optim.decay_steps=4")
    assert f == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1])


def test_constant_without_decay_stays_at_the_peak():
    f = factors("optim.warmup_steps=0", "optim.schedule=constant")
    assert f == pytest.approx([1.0] * 12)


@pytest.mark.parametrize("overrides,key", [
    (["optim.schedule=constant", "optim.decay_steps=9", "optim.warmup_steps=2", "train.max_steps=10"],
     "optim.decay_steps=9"),
    (["optim.decay_steps=3"], "optim.decay_steps is for optim.schedule=constant"),
    (["optim.min_lr=1e-3", "optim.lr=1e-4"], "optim.min_lr"),
    (["train.init_optimizer=true"], "train.init_optimizer needs train.init_from"),
    (["optim=muon", "optim.grad_clip=1.0"], "optim.grad_clip=1.0: with optim=muon use 0"),
])
def test_bad_schedules_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        check(make_cfg(*overrides), world_size=1)


@pytest.mark.parametrize("extra,lr", [
    (["optim=lion"], 1e-3),
    (["optim=lion", "zero=stage2", "zero.offload_optimizer=true"], 1e-3),
    (["optim=muon"], 3e-3),
    (["optim=muon", "zero=stage3"], 3e-3),
], ids=["lion", "lion-offload", "muon", "muon-zero3"])
def test_each_optimizer_trains_and_resumes_exactly(corpus, tmp_path, extra, lr):
    """Lion and Muon (AdamW: tests/test_train.py) learn, and resuming from the step-3 checkpoint
    reproduces steps 4-6 of the uninterrupted run bit for bit, their momenta included (Muon's at
    ZeRO 3 sits in DeepSpeed's partitions, not in the torch optimizer)."""
    lrs = (f"optim.lr={lr}", f"optim.min_lr={lr}")  # lr-sized steps: a high rate shows in 6 steps
    full = train(corpus, tmp_path / "full", "train.max_steps=6", "train.ckpt_interval=3", *lrs, *extra)
    losses = [m["loss"] for m in full if "loss" in m]
    assert min(losses[3:]) < losses[0] - 0.2, losses
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / CHECKPOINTS / "step_00000006")
    resumed = train(corpus, resumed_dir, "train.max_steps=6", "train.ckpt_interval=3", *lrs, *extra)
    assert [(m["step"], m.get("loss"), m.get("val_loss")) for m in resumed] == \
        [(m["step"], m.get("loss"), m.get("val_loss")) for m in full]


def test_resume_with_another_optimizer_is_refused(corpus, tmp_path):
    train(corpus, tmp_path, "train.max_steps=2")
    for other in ("lion", "muon"):
        with pytest.raises(CheckpointError, match=r"AdamW|adamw.*optim=adamw"):
            train(corpus, tmp_path, "train.max_steps=4", f"optim={other}")


def test_muon_checkpoint_resumes_as_muon_on_its_own_ranks_only(corpus, tmp_path):
    """Another optimizer is refused; so is another number of ranks at ZeRO 1-3, whose universal form
    would drop Muon's momentum (a ZeRO-0 state is whole and resumes on any number)."""
    train(corpus, tmp_path, "train.max_steps=2", "optim=muon", "zero=stage1")
    with pytest.raises(CheckpointError, match=r"its optimizer state is muon's.*use optim=muon"):
        train(corpus, tmp_path, "train.max_steps=4", "zero=stage1")
    ckpt = tmp_path / CHECKPOINTS / "step_00000002"
    for world_size, stage in ((2, 1), (1, 2)):
        cfg = make_cfg(*tiny_overrides(corpus, tmp_path, "optim=muon", f"zero.stage={stage}"))
        with pytest.raises(CheckpointError, match=r"written by 1 ranks at ZeRO stage 1.*not Muon's momentum: "
                                                  r"resume on 1 ranks with zero.stage=1"):
            check_compatible(cfg, ckpt, world_size)
    check_compatible(make_cfg(*tiny_overrides(corpus, tmp_path, "optim=muon", "zero=stage1")), ckpt, 1)


def test_muon_takes_the_blocks_matrices_at_adamw_like_step_sizes():
    """Muon gets exactly the blocks' weight matrices; the embeddings (the head is tied to them), norms and
    biases go to AdamW. Moonlight's matching: each matrix's first update has an RMS of 0.2 x lr whatever its
    shape (times 0.82-0.89 here: Newton-Schulz stops short of singular values of 1; Keller Jordan's scaling
    alone would give about 0.53 at 64 x 64 and 0.27 at 64 x 256), and its decay per step is lr x
    weight_decay as for AdamW."""
    cfg = make_cfg("model=gpt2-tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "optim=muon",
                   "optim.lr=0.01", "optim.weight_decay=0.1")
    model = GPT(gpt_config(cfg.model))
    groups = param_groups(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in groups if g["use_muon"] for p in g["params"])
    assert muon == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    adam = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert adam == set(names.values()) - set(muon) and "transformer.wte.weight" in adam
    for g in groups:
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.01 * 0.1 if g["use_muon"] or g["weight_decay"] else 0)
    optimizer = build_optimizer(param_groups(model, make_cfg("optim=muon", "optim.lr=0.01",
                                                             "optim.weight_decay=0").optim), cfg.optim, offload=False)
    matrices = {n: p for n, p in model.named_parameters() if n in muon}
    before = {n: p.detach().clone() for n, p in matrices.items()}
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    for n, p in matrices.items():
        rms = (p.detach() - before[n]).pow(2).mean().sqrt().item()
        assert 0.75 < rms / (0.2 * 0.01) < 0.95, (n, tuple(p.shape), rms)


def test_the_optimizer_is_built_by_name():
    from deepspeed.ops.lion import DeepSpeedCPULion

    model = torch.nn.Linear(4, 4)
    adamw = build_optimizer(param_groups(model, make_cfg().optim), make_cfg().optim, offload=False)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.95)
    lion_cfg = make_cfg("optim=lion").optim
    lion = build_optimizer(param_groups(model, lion_cfg), lion_cfg, offload=True)
    assert isinstance(lion, DeepSpeedCPULion) and lion.param_groups[0]["weight_decay"] == 1.0
