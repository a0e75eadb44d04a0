"""What the Trainer hands to each unit: EMA evaluation, layer decay, clipping, bf16 autocast,
progressive resizing, distillation and gradient checkpointing, observed with hooks on a
tiny ViT trained for a few steps on the digits (8x8 images)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tuc

from vitlab.cli import main as cli
from vitlab.training import Trainer, build_trainer, load_config
from vitlab.training.recipes import DIGITS_RECIPE
from vitlab.tasks.image_classification import evaluate_classifier as evaluate_model

DEPTH = 2
# 1257 training digits in batches of 256: 5 optimizer steps per epoch.
TINY = [
    f"model.overrides={{image_size: 8, patch_size: 2, dim: 32, depth: {DEPTH}, heads: 2, mlp_dim: 64, drop_path: 0.1}}",
    "data.batch_size=256", "progress=false", "optim.warmup_epochs=0", "augment.affine_p=0",
    "augment.cutmix_alpha=0", "augment.label_smoothing=0", "ema_decay=null",
]


def make_trainer(tmp_path, *extra: str, epochs: int = 1) -> Trainer:
    cfg = load_config(None, TINY + [f"epochs={epochs}", f"output_dir={tmp_path}", *extra], base=DIGITS_RECIPE)
    trainer = build_trainer(cfg, log=lambda s: None)
    trainer._plots = lambda cm: None  # PNGs are not what these tests look at
    return trainer


def val_kwargs(trainer: Trainer) -> dict:
    return dict(device=trainer.device, image_size=8, mean=trainer.mean, std=trainer.std)


# ---------------------------------------------------------------------------- EMA
def test_ema_follows_the_steps_and_its_metrics_come_from_the_ema_weights(tmp_path):
    trainer = make_trainer(tmp_path, "ema_decay=0.9", "optim.lr=3e-2")
    # The weights after every optimizer step, to rebuild the EMA by hand.
    snapshots = []
    trainer.optimizer.register_step_post_hook(
        lambda opt, a, k: snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    ema = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    results = trainer.fit()
    assert len(snapshots) == trainer.step == 5
    for i, snap in enumerate(snapshots):
        d = min(0.9, (1 + i) / (10 + i))  # ModelEma's warmup
        ema = {n: d * v + (1 - d) * snap[n] for n, v in ema.items()}
    for n, p in trainer.ema.module.named_parameters():
        torch.testing.assert_close(p, ema[n], rtol=1e-5, atol=1e-6, msg=n)

    live = evaluate_model(trainer.model, trainer.val_loader, **val_kwargs(trainer))
    averaged = evaluate_model(trainer.ema.module, trainer.val_loader, **val_kwargs(trainer))
    assert abs(live["loss"] - averaged["loss"]) > 5e-4  # the two models really differ (by ~2e-3)
    rec = trainer.history[-1]
    assert rec["val_loss"] == pytest.approx(live["loss"], rel=1e-6)
    assert rec["ema_val_loss"] == pytest.approx(averaged["loss"], rel=1e-6)
    assert rec["ema_val_top1"] == pytest.approx(averaged["top1"])
    test_live = evaluate_model(trainer.model, trainer.test_loader, **val_kwargs(trainer))
    test_ema = evaluate_model(trainer.ema.module, trainer.test_loader, **val_kwargs(trainer))
    assert abs(test_live["loss"] - test_ema["loss"]) > 5e-4
    assert results["test_loss"] == pytest.approx(test_live["loss"], rel=1e-6)
    assert results["ema_test_loss"] == pytest.approx(test_ema["loss"], rel=1e-6)
    assert results["ema_test_top1"] == pytest.approx(test_ema["top1"])


# ------------------------------------------------------------------- layer decay
def expected_layer(name: str) -> int:
    """ViT depth groups by hand: embeddings 0, block i -> i + 1, final norm and head DEPTH + 1."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    assert name.startswith(("norm", "head", "fc_norm")), name
    return DEPTH + 1


def test_layer_decay_from_the_cli_reaches_the_optimizer(tmp_path, monkeypatch):
    seen = {}

    def fake_fit(self):  # stop before training: we only inspect the built trainer
        seen["trainer"] = self
        return {"split": "test"}

    monkeypatch.setattr(Trainer, "fit", fake_fit)
    assert cli(["train", *TINY, "optim.layer_decay=0.75", "optim.lr=0.002", "--epochs", "1",
                "--output-dir", str(tmp_path)]) == 0
    trainer = seen["trainer"]
    opt = trainer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lr0 = trainer.scheduler.lr_at(0)
    assert lr0 == pytest.approx(0.002)  # no warmup: the base lr at step 0
    checked = set()
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            want = 0.75 ** (DEPTH + 1 - expected_layer(n))
            assert g["lr"] == pytest.approx(lr0 * want, rel=1e-9), (n, g["lr"])
            checked.add(n)
    assert checked == set(names.values())
    assert {expected_layer(n) for n in checked} == set(range(DEPTH + 2))
    # The per-layer ratios survive the scheduler's steps.
    trainer.scheduler.step()
    for g in opt.param_groups:
        n = names[id(g["params"][0])]
        assert g["lr"] == pytest.approx(trainer.scheduler.lr_at(1) * 0.75 ** (DEPTH + 1 - expected_layer(n)), rel=1e-9)


# ------------------------------------------------------------------------ clipping
def test_clip_grad_clips_the_gradients_the_optimizer_steps_with(tmp_path):
    clip = 0.05
    trainer = make_trainer(tmp_path, f"optim.clip_grad={clip}")
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    raw: dict[int, torch.Tensor] = {}
    for p in params:  # the gradient as backward leaves it (before any clipping)
        p.register_post_accumulate_grad_hook(lambda q: raw.__setitem__(id(q), q.grad.detach().clone()))
    checks = []

    def before_step(opt, args, kwargs):
        raw_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(raw[id(p)]) for p in params]))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        factor = clip / (raw_norm + 1e-6)  # clip_grad_norm_'s rule
        for p in params:
            torch.testing.assert_close(p.grad, raw[id(p)] * factor, rtol=1e-5, atol=1e-9)
        checks.append((raw_norm.item(), norm.item()))

    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.train_epoch()
    assert len(checks) == 5
    for raw_norm, norm in checks:
        assert raw_norm > 2 * clip
        assert norm == pytest.approx(clip, rel=1e-4)


# --------------------------------------------------------------------------- bf16
def test_bf16_precision_runs_the_training_forward_in_bf16(tmp_path):
    dtypes = {}
    for precision in ("bf16", "fp32"):
        trainer = make_trainer(tmp_path / precision, f"precision={precision}")
        seen = dtypes.setdefault(precision, [])
        trainer.model.blocks[0].mlp.fc1.register_forward_hook(
            lambda m, i, out, seen=seen: seen.append(out.dtype) if m.training else None)
        trainer.train_epoch()
    assert dtypes["bf16"] == [torch.bfloat16] * 5
    assert dtypes["fp32"] == [torch.float32] * 5


def test_grad_checkpointing_from_the_config_reaches_the_model(tmp_path, monkeypatch):
    calls = []
    real = tuc.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(tuc, "checkpoint", counting)
    trainer = make_trainer(tmp_path, "model.grad_checkpointing=true")
    trainer.train_epoch()
    assert len(calls) == 5 * DEPTH  # every block of every training step
    assert set(map(id, calls)) == set(map(id, trainer.model.blocks))
    calls.clear()
    make_trainer(tmp_path / "off", "model.grad_checkpointing=false").train_epoch()
    assert calls == []


# ------------------------------------------------------------- progressive resizing
@pytest.mark.parametrize("crop", [False, True], ids=["plain", "random_resized_crop"])
def test_progressive_resizing_changes_what_the_model_receives(tmp_path, crop):
    trainer = make_trainer(tmp_path, "data.progressive_sizes=[4, 6, 8]", "data.progressive_epochs=[0, 1, 2]",
                           "data.image_size=8", f"augment.random_resized_crop={str(crop).lower()}", epochs=3)
    sizes: dict[int, set] = {}
    trainer.model.register_forward_pre_hook(
        lambda m, args: sizes.setdefault(trainer.epoch, set()).add(tuple(args[0].shape[-2:])) if m.training else None)
    trainer.fit()
    assert sizes == {0: {(4, 4)}, 1: {(6, 6)}, 2: {(8, 8)}}


# ------------------------------------------------------------------- distillation
DISTILL = ["model.name=deit_tiny_distilled_patch16_224", "distill.teacher=cnn_small", "distill.alpha=0.5",
           "distill.tau=2.0", "optim.clip_grad=null", "model.overrides.drop_path=0.0", "optim.lr=1e-2"]


def distill_gap(kind: str, dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's distillation term written out: KL(teacher_tau || student_tau) * tau^2 per logit
    (soft) or cross-entropy to the teacher's argmax (hard)."""
    if kind == "soft":
        log_pt = torch.log_softmax(teacher_logits / tau, dim=1)
        kl = (log_pt.exp() * (log_pt - torch.log_softmax(dist_logits / tau, dim=1))).sum()
        return kl * tau * tau / dist_logits.numel()
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distillation_is_applied_end_to_end(tmp_path, kind):
    trainer = make_trainer(tmp_path, *DISTILL, f"distill.type={kind}", epochs=1)
    teacher = trainer.criterion.teacher
    assert type(teacher).__name__ == "ConvNet"
    student = trainer.model
    # The loss the trainer backpropagates on its first batch, with that batch.
    record = {}
    real = trainer.criterion

    def recording(x, out, y):
        loss = real(x, out, y)
        if "batch" not in record:
            record["batch"] = (x.detach().clone(), [o.detach().clone() for o in out], y.clone(), loss.detach().clone(),
                               {n: p.detach().clone() for n, p in student.named_parameters()})
        return loss

    trainer.criterion = recording
    x_fixed, _ = next(iter(trainer.val_loader))  # a fixed batch, normalised like training
    x_fixed = (x_fixed.float() - torch.tensor(trainer.mean).view(1, -1, 1, 1)) / torch.tensor(trainer.std).view(1, -1, 1, 1)
    with torch.no_grad():
        # A randomly initialised CNN predicts nearly uniformly; give its head a clear preference
        # (class 9 first, then 8, ...) that the student's distillation head can learn in 5 steps,
        # and that the labels (balanced digits) do not teach it.
        teacher.head.weight.mul_(0.01)
        teacher.head.bias.copy_(torch.linspace(-3.0, 3.0, teacher.head.bias.numel()))
        t_fixed = teacher(x_fixed)
    assert (t_fixed.argmax(1) == 9).all()

    def gap_on_fixed() -> float:
        student.train()
        with torch.no_grad():
            torch.manual_seed(0)
            _, dist = student(x_fixed)
        return distill_gap(kind, dist, t_fixed, 2.0).item()

    before = gap_on_fixed()
    trainer.train_epoch()
    after = gap_on_fixed()

    x, out, y, loss, weights = record["batch"]
    now = {n: p.detach().clone() for n, p in student.named_parameters()}
    student.load_state_dict(weights, strict=False)  # the weights of the first step, to redo its forward
    student.train()
    with torch.no_grad():
        torch.manual_seed(0)
        cls_logits, dist_logits = student(x)
        t = teacher(x)
    student.load_state_dict(now, strict=False)
    # The criterion saw the student's input and both of its heads' outputs ...
    torch.testing.assert_close(cls_logits, out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist_logits, out[1], rtol=1e-5, atol=1e-6)
    base = F.cross_entropy(cls_logits, y)
    distill = distill_gap(kind, dist_logits, t, 2.0)
    assert abs(distill.item()) > 1e-3 and abs(distill.item() - base.item()) > 1e-3
    # ... and the loss it returned is DeiT's: (1 - alpha) * base + alpha * distillation.
    assert loss.item() == pytest.approx(0.5 * base.item() + 0.5 * distill.item(), rel=1e-5)
    # Training pulls the distillation head toward the teacher.
    assert after < 0.6 * before, (before, after)  # ~0.4x (hard) and ~0.4x (soft) here
