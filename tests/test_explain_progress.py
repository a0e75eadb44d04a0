"""Issue 10 (part 2): explainability picks a sane occlusion grid on every backbone and shows
progress on stderr for the long methods (switchable off)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vitlab
from vitlab.cli import main as cli
from vitlab.evaluation.interpretation import OCCLUSION_MAX_CELLS, default_patch_size, occlusion
from vitlab.pretrained import save_checkpoint


class CountingStub(nn.Module):
    """A linear classifier on the mean of each 8x8 block that counts images seen; its finest
    token cell (``feature_info`` reduction) is configurable, like a real backbone's patch."""

    def __init__(self, reduction: int) -> None:
        super().__init__()
        self.feature_info = [{"reduction": reduction}]
        self.head = nn.Linear(3 * 28 * 28, 4)
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        pooled = nn.functional.adaptive_avg_pool2d(x, 28)  # (B, 3, 28, 28)
        return self.head(pooled.flatten(1))  # (B, 3 * 28 * 28) -> (B, 4)


@pytest.mark.parametrize("reduction, patch", [(4, 16), (16, 16), (32, 32), (14, 14)])
def test_occlusion_default_grid_is_at_most_16_by_16_cells(reduction, patch):
    """Swin's 4-pixel patches at 224 used to mean 56 x 56 = 3,136 forward passes."""
    model = CountingStub(reduction)
    x = torch.randn(1, 3, 224, 224)
    res = occlusion(model, x)
    assert default_patch_size(model, (224, 224)) == patch and res.info["patch_size"] == patch
    assert patch % reduction == 0  # whole token cells
    cells = -(-224 // patch)
    assert res.info["masks"] == cells * cells <= OCCLUSION_MAX_CELLS ** 2
    assert model.images == 1 + cells * cells  # one clean pass, one per mask


def test_occlusion_default_on_a_real_swin_is_a_few_hundred_masks():
    with torch.device("meta"):
        swin = vitlab.create_model("swin_tiny_patch4_window7_224")
    assert default_patch_size(swin, (224, 224)) == 16  # 14 x 14 = 196 masks, not 3,136


def test_occlusion_progress_bar_on_stderr_and_off_switch(capsys):
    x = torch.randn(1, 3, 64, 64)
    occlusion(CountingStub(16), x, batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "occlusion (16 masks)" in err and "/4 [" in err  # 4 batches of 4 masks
    occlusion(CountingStub(16), x, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""


def test_cli_explain_all_shows_progress_unless_disabled(tmp_path, capsys):
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=3, image_size=32, patch_size=8, dim=24,
                                depth=2, heads=3, mlp_dim=48).eval()
    save_checkpoint(model, tmp_path / "ck")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    args = ["explain", "--checkpoint", str(tmp_path / "ck"), "--image", str(tmp_path / "x.png"), "--method", "all",
            "--output-dir", str(tmp_path / "out")]
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "explain: " in err and "occlusion (16 masks)" in err  # methods bar and occlusion's own
    assert cli([*args, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
