"""Hugging Face Hub access: the local cache first, the network only when allowed and needed."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
HUB_PROBE_TIMEOUT = 3.0


def is_hub_id(source: str) -> bool:
    """``org/repo`` (optionally ``hf-hub:`` prefixed or ``@revision`` suffixed) that is not a local path."""
    s = source.removeprefix("hf-hub:")
    parts = s.split("@")[0].split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists() and not s.startswith((".", "/", "~"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the hub (``HF_ENDPOINT``, default huggingface.co:443) opens
    within ``timeout`` seconds: one quick probe instead of the hub client's retries."""
    if endpoint is None:
        try:
            from huggingface_hub import constants as hf_constants

            endpoint = hf_constants.ENDPOINT
        except ImportError:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # DNS failure, refused, unreachable, timed out
        return False


def download(source: str, cache_dir: str | Path | None = None) -> Path:
    """Local path of a hub repo's weights file (``config.json`` fetched beside it when present).

    Looks in the local cache first; goes to the network only if nothing is cached,
    ``HF_HUB_OFFLINE`` is not set and a quick probe (:func:`hub_reachable`, at most
    :data:`HUB_PROBE_TIMEOUT` seconds) reaches the hub, so an offline machine fails in
    seconds instead of waiting through the hub client's retries.

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
        if not local_only and (offline or not hub_reachable()):
            offline = True
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
            f"(HF_HUB_OFFLINE is set, or huggingface.co could not be reached within {HUB_PROBE_TIMEOUT:g} s). "
            f"Download it on a machine with network access, or pass a local file or folder."
        )
    raise FileNotFoundError(
        f"could not get weights for {repo!r}: not in the local cache ({where}) and the hub could not "
        f"be reached or has no {' / '.join(HUB_WEIGHT_FILES)} ({'; '.join(errors[-3:])}). "
        f"Pass a local file or folder instead."
    )
