"""FLOP counting with attention included.

PyTorch's FlopCounterMode does not count the CPU flash-attention kernel, so the count runs
with every vitlab attention on its explicit (matmul + softmax) path, on the meta device.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..components import explicit_attention


def count_flops(model: nn.Module, input_size: tuple[int, int, int, int] | None = None) -> int:
    """Forward FLOPs (multiply and add counted separately, i.e. 2 x MACs) of one batch.

    Args:
        model: Any module with vitlab attention (others are counted as they are).
        input_size: (B, C, H, W); defaults to one image at the model's configured size.
    """
    if input_size is None:
        cfg = model.config
        h, w = cfg.image_size if isinstance(cfg.image_size, tuple) else (cfg.image_size,) * 2
        input_size = (1, cfg.in_channels, h, w)
    device = next(model.parameters()).device
    x = torch.zeros(input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        # Grad mode stays on: FlopCounterMode's module tracker fails on a parameter passed
        # straight into a submodule under no_grad (CaiT's class token).
        with explicit_attention(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
