"""Reading the golden timm fixtures in ``tests/fixtures`` (made by the scripts there, read here
without timm).

Two kinds of file:

* ``timm_<case>.safetensors`` (``make_timm_fixtures.py``): a tiny timm model's state dict under
  ``model.<timm key>``, its input / outputs, and the constructor kwargs in the metadata;
* ``timm_resample.safetensors`` (``make_resample_fixtures.py``): sources and timm's resampled
  values for position embeddings and relative position bias tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures"


class TimmFixture(NamedTuple):
    """One golden file: constructor kwargs, timm state dict, every other tensor, the metadata."""

    kwargs: dict
    state_dict: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def fixture_path(case: str | Path) -> Path:
    """``tests/fixtures/timm_<case>.safetensors`` (a path is returned as it is)."""
    return Path(case) if isinstance(case, Path) else FIXTURES / f"timm_{case}.safetensors"


def timm_fixture(case: str | Path) -> TimmFixture:
    """Read ``timm_<case>.safetensors`` (or the file ``case``): ``model.*`` entries become the state
    dict (prefix removed), the rest the tensors; ``kwargs`` is the JSON metadata entry (``{}`` if none)."""
    path = fixture_path(case)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return TimmFixture(json.loads(metadata.get("kwargs", "{}")), sd, rest, metadata)


def resample_reference() -> dict[str, torch.Tensor]:
    """The tensors of ``timm_resample.safetensors`` (see ``make_resample_fixtures.py``)."""
    return timm_fixture("resample").tensors
