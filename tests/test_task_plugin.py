"""A task registered in one file (this one) gets everything the built-in tasks get, with no edit
anywhere else: its typed config section validated, ``vitlab train --task``, exact resume,
``vitlab.load``, ``vitlab.pipeline``, ``vitlab predict`` and ``vitlab eval`` from the checkpoint.

The toy task: regress the mean brightness of an 8x8 grey image with a linear model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import vitlab
from vitlab.cli import main
from vitlab.models.registry import register_task_model
from vitlab.tasks import Batch, Metrics, Task, TaskSetup, register_inference, register_task
from vitlab.tasks.base import TaskInference
from vitlab.tasks.inputs import to_unit_tensor
from vitlab.training.checkpoint import latest_checkpoint

SIDE = 8


# ----------------------------------------------------------------------------- the plugin
@dataclass
class BrightnessSection:
    """The toy task's config section ``brightness``."""

    train_images: int = 64
    hidden: int = 4

    def __post_init__(self) -> None:
        if self.train_images < 8:
            raise ValueError(f"brightness.train_images must be >= 8, got {self.train_images}")


@dataclass(frozen=True)
class BrightnessConfig:
    hidden: int = 4


class BrightnessNet(nn.Module):
    family = "brightness_net"

    def __init__(self, config: BrightnessConfig) -> None:
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(SIDE * SIDE, config.hidden)
        self.fc2 = nn.Linear(config.hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x.flatten(1))).squeeze(1)  # (B, 1, S, S) -> (B,)


def brightness_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIDE, SIDE, generator=g) * torch.rand(n, 1, 1, 1, generator=g)
    return TensorDataset(x, x.mean(dim=(1, 2, 3)))


class AbsError(Metrics):
    def __init__(self) -> None:
        self.err, self.n = 0.0, 0

    def update(self, batch: Batch, outputs: Any) -> None:
        self.err += float((outputs.detach() - batch.targets).abs().sum())
        self.n += batch.size

    def compute(self) -> dict[str, Any]:
        return {"mae": self.err / max(self.n, 1), "n": self.n}


@register_task("brightness")
class BrightnessTask(Task):
    primary_metric = "mae"
    config_section = "brightness"
    config_class = BrightnessSection
    families = ("brightness_net",)

    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        x, y = (t.to(device).float() for t in batch)
        return Batch(x, y, int(x.shape[0]))

    def loss(self, batch: Batch, outputs: Any) -> torch.Tensor:
        return F.mse_loss(outputs, batch.targets)

    def eval_metrics(self) -> Metrics:
        return AbsError()

    @classmethod
    def from_config(cls, cfg: Any) -> TaskSetup:
        s: BrightnessSection = cfg.brightness
        model = BrightnessNet(BrightnessConfig(hidden=s.hidden))
        model.pretrained_cfg = {"input_size": [1, SIDE, SIDE]}
        return TaskSetup(cls(), model, brightness_data(s.train_images, 1), brightness_data(16, 2),
                         brightness_data(16, 3))


register_task_model("brightness_net", BrightnessNet, BrightnessConfig, "brightness")


@register_inference("brightness")
class BrightnessInference(TaskInference):
    @classmethod
    def predict(cls, model: nn.Module, images: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        x = torch.stack([to_unit_tensor(im, 0.0).mean(0, keepdim=True) for im in images])  # (B, 1, H, W)
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            return [{"brightness": float(v), "notes": []} for v in model(x)]

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 **options: Any) -> dict[str, Any]:
        from vitlab.tasks import evaluate_task

        data = torch.utils.data.DataLoader(brightness_data(16, 3), batch_size=batch_size)
        return evaluate_task(cls.load(checkpoint), BrightnessTask(), data, torch.device("cpu"))

    @classmethod
    def report(cls, results: dict[str, Any]) -> str:
        return f"brightness test: mean absolute error {results['mae']:.6f} (n={results['n']})"


# ----------------------------------------------------------------------------- the checks
def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "brightness", "--output-dir", str(out), "--no-progress", "optim.warmup_epochs=0",
            "optim.lr=0.01", "brightness.hidden=3", *extra]


def test_section_is_validated_through_the_registry() -> None:
    from vitlab.training.config import config_to_dict, load_config

    cfg = load_config(None, ["task=brightness", "brightness.hidden=6"])
    assert cfg.brightness == BrightnessSection(hidden=6)
    assert config_to_dict(cfg)["brightness"] == {"train_images": 64, "hidden": 6}
    with pytest.raises(ValueError, match="unknown config key 'brightness.hiden'.*hidden"):
        load_config(None, ["brightness.hiden=6"])
    with pytest.raises(ValueError, match="brightness.hidden must be an integer"):
        load_config(None, ["brightness.hidden=wide"])
    with pytest.raises(ValueError, match="brightness.train_images must be >= 8"):
        load_config(None, ["brightness.train_images=2"])


def test_train_resume_load_pipeline_predict_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(train_args(out, "--epochs", "3")) == 0
    full = latest_checkpoint(out)
    whole = vitlab.load(full)
    # killed right after epoch 2's checkpoint, resumed: the same weights as the whole run
    resumed = tmp_path / "resumed"
    from resume_helpers import kill_after_epoch
    from vitlab.training import build_trainer, load_config

    cfg = load_config(None, [f"output_dir={resumed}"], base=json.loads((out / "config.json").read_text()))
    kill_after_epoch(build_trainer(cfg), 2)
    assert main(train_args(resumed, "--epochs", "3", "--resume")) == 0
    again = vitlab.load(latest_checkpoint(resumed))
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k

    # vitlab.load: the task's model class, from the meta layout alone
    assert isinstance(whole, BrightnessNet) and whole.vitlab_task == "brightness" and not whole.training
    from vitlab.pretrained.io import read_weights

    meta = read_weights(full).vitlab_config
    assert (meta["family"], meta["task"], meta["config"]) == ("brightness_net", "brightness", {"hidden": 3})

    # vitlab.pipeline on an array, a PIL image and a file give the model's own output
    img = (np.linspace(0, 1, SIDE * SIDE).reshape(SIDE, SIDE) * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "x.png")
    expected = float(whole(torch.from_numpy(img / 255.0).float()[None, None]))
    pipe = vitlab.pipeline(out)
    for item in (img, Image.fromarray(img), str(tmp_path / "x.png")):
        assert pipe(item)["brightness"] == pytest.approx(expected, abs=1e-6)
    assert [r["brightness"] for r in pipe([img, img])] == pytest.approx([expected] * 2, abs=1e-6)
    assert vitlab.pipeline("brightness", model=out)(img)["brightness"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="is a brightness checkpoint, not a detection one"):
        vitlab.pipeline("detection", model=out)

    # vitlab predict / eval: dispatched from the checkpoint, no --task
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), str(tmp_path / "x.png"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["brightness"] == pytest.approx(expected, abs=1e-6)
    assert main(["eval", "--checkpoint", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert f"mean absolute error {results['test_mae']:.6f} (n=16)" in capsys.readouterr().out


def test_the_engine_config_is_the_run_config_tasks_are_typed_with() -> None:
    import typing

    from vitlab.tasks.base import DataOptions, ModelOptions, RunConfig
    from vitlab.training.config import load_config

    cfg = load_config(None, [])
    for proto, obj in ((RunConfig, cfg), (ModelOptions, cfg.model), (DataOptions, cfg.data)):
        hints = typing.get_type_hints(proto)
        assert hints and all(hasattr(obj, name) for name in hints), proto.__name__
    tasks = Path(vitlab.__file__).parent / "tasks"
    untyped = [f"{p.name}:{i}" for p in tasks.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
               if "cfg: Any" in line]
    assert untyped == []
