"""Hugging Face Hub access: the local cache first, the network only when allowed and needed."""

from __future__ import annotations

import os
from pathlib import Path

HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def is_hub_id(source: str) -> bool:
    """``org/repo`` (optionally ``hf-hub:`` prefixed or ``@revision`` suffixed) that is not a local path."""
    s = source.removeprefix("hf-hub:")
    parts = s.split("@")[0].split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists() and not s.startswith((".", "/", "~"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download(source: str, cache_dir: str | Path | None = None) -> Path:
    """Local path of a hub repo's weights file (``config.json`` fetched beside it when present).

    Looks in the local cache first; goes to the network only if nothing is cached and
    ``HF_HUB_OFFLINE`` is not set.

    Raises:
        ImportError: huggingface_hub is not installed (extra ``vitlab[hub]``).
        FileNotFoundError: Not cached and offline, or the hub could not be reached.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import constants as hf_constants
    except ImportError:
        raise ImportError("loading from the Hugging Face Hub needs huggingface_hub: pip install 'vitlab[hub]'") from None
    repo, _, revision = source.removeprefix("hf-hub:").partition("@")
    revision = revision or None
    cache = str(cache_dir) if cache_dir is not None else None
    offline = _offline() or bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))
    errors: list[str] = []
    for local_only in (True, False):
        if not local_only and offline:
            break
        for name in HUB_WEIGHT_FILES:
            try:
                path = hf_hub_download(repo, name, revision=revision, cache_dir=cache, local_files_only=local_only)
            except Exception as e:  # noqa: BLE001 - the hub raises many types; we report them all
                errors.append(f"{name}: {type(e).__name__}")
                continue
            try:
                hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache, local_files_only=local_only)
            except Exception:  # noqa: BLE001 - a config is optional
                pass
            return Path(path)
    where = cache or getattr(hf_constants, "HF_HUB_CACHE", "the Hugging Face cache")
    if offline:
        raise FileNotFoundError(
            f"{repo!r} is not in the local Hugging Face cache ({where}) and the hub is offline "
            f"(HF_HUB_OFFLINE is set). Download it on a machine with network access, or pass a local file or folder."
        )
    raise FileNotFoundError(
        f"could not get weights for {repo!r}: not in the local cache ({where}) and the hub could not "
        f"be reached or has no {' / '.join(HUB_WEIGHT_FILES)} ({'; '.join(errors[-3:])}). "
        f"Pass a local file or folder instead."
    )
