import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_model(name: str, **overrides):
    """The registered variant ``name`` shrunk by its family's ``tiny_overrides`` (same structure)."""
    from vitlab.models import build_model, get_entry, model_config

    entry = get_entry(name)
    cfg = model_config(name)
    return build_model(name, **{**entry.model_class.tiny_overrides(cfg), **overrides})
