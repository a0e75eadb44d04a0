"""Webdataset-format tar shards: write them from a folder, COCO, captions or the digits; read them back.

A shard set is a folder of ``shard-000000.tar``, ``shard-000001.tar``, ... plus ``index.json``
(the manifest: samples per shard, classes, channels, mean/std). Each sample is a run of tar
members sharing one key: ``<key>.png`` or ``<key>.jpg`` (the image's own bytes) and
``<key>.cls`` (the class index as text), ``<key>.json`` (COCO targets) or ``<key>.txt`` (a
caption). Any webdataset reader reads them; :class:`ShardIndexDataset` (random access, map
style) and :class:`vitlab.datasets.shard_stream.ShardDataset` (streamed) are vitlab's.

A source with splits (the digits: train/val/test; a folder with ``train/`` and ``val/``) is
written as one shard set per split, ``OUT/<split>/``.

The tar files are written with the standard library's :mod:`tarfile`: the format is plain
tar, and owning the reader is what makes the exact mid-epoch resume of the streamed dataset
possible (no extra dependency).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import VitlabError

#: The source formats :func:`write_shards` reads.
SHARD_FORMATS: tuple[str, ...] = ("folder", "coco", "captions", "digits")
INDEX_FILE = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
MANIFEST_FORMAT = "vitlab-shards"
_IMAGE_EXTS = ("png", "jpg")


class ShardError(VitlabError, ValueError):
    """A shard set or a shard source vitlab cannot use (one message saying what was expected)."""


# --------------------------------------------------------------------------- samples
@dataclass
class _Sample:
    """One sample to write: its image bytes and extension, and the target member(s)."""

    image: bytes
    ext: str
    extras: dict[str, bytes] = field(default_factory=dict)


def _image_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _encoded(path: Path) -> tuple[bytes, str]:
    """The file's own bytes when it is a PNG/JPEG, else the image re-encoded as PNG (lossless)."""
    ext = _image_ext(path)
    if ext in _IMAGE_EXTS:
        return path.read_bytes(), ext
    try:
        with Image.open(path) as im:
            im.load()
            pil = im if im.mode in ("L", "RGB") else im.convert("RGB")
            return _png_bytes(np.asarray(pil)), "png"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ShardError(f"cannot read image {path} (corrupt or not an image): {e}") from None


def _folder_samples(root: Path, split: str | None, indices: Sequence[int] | None = None
                    ) -> tuple[list[_Sample], dict[str, Any]]:
    """A folder's samples: ``root/<split>/`` (classes from ``train/``), or ``root`` (only ``indices`` of it)."""
    from .folder import ImageFolderDataset, _split_dir

    classes = None
    if split is not None and split != "train" and indices is None:
        train = _split_dir(root, "train")
        classes = sorted(d.name for d in os.scandir(train) if d.is_dir() and not d.name.startswith("."))
    folder = _split_dir(root, split) if split is not None and indices is None else root
    data = ImageFolderDataset(folder, classes=classes)
    chosen = data.samples if indices is None else [data.samples[i] for i in indices]
    samples = []
    for path, target in chosen:
        image, ext = _encoded(path)
        samples.append(_Sample(image, ext, {"cls": str(target).encode()}))
    meta = {"kind": "folder", "task": "classification", "classes": data.classes, "channels": data.channels,
            "mean": list(data.mean), "std": list(data.std)}
    return samples, meta


def _digits_samples(split: str) -> tuple[list[_Sample], dict[str, Any]]:
    from .digits import DigitsDataset

    data = DigitsDataset(split)
    # pixels are k/16 (k = 0..16); stored as round(255 k / 16), read back exactly with quantize=16
    pixels = (data.images[:, 0] * 255).round().to(torch.uint8).numpy()  # (n, 1, 8, 8) -> (n, 8, 8)
    samples = [_Sample(_png_bytes(p), "png", {"cls": str(t).encode()}) for p, t in zip(pixels, data.targets)]
    meta = {"kind": "digits", "task": "classification", "classes": data.classes, "channels": 1,
            "mean": list(data.mean), "std": list(data.std), "quantize": 16}
    return samples, meta


def _coco_samples(source: Path) -> tuple[list[_Sample], dict[str, Any]]:
    from .coco import CocoDetection

    if source.is_dir():
        found = sorted(source.glob("*.json"))
        if len(found) != 1:
            raise ShardError(f"{source} must hold exactly one COCO annotation JSON (found {len(found)}); or name the "
                             f"JSON file itself")
        ann = found[0]
    else:
        ann = source
    image_dir = ann.parent / "images" if (ann.parent / "images").is_dir() else ann.parent
    data = CocoDetection(ann, image_dir)
    samples = []
    for image_id in data.image_ids:
        info = data.images[image_id]
        image, ext = _encoded(data.image_dir / str(info["file_name"]))
        objs = data._targets[image_id]
        target = {"image_id": image_id, "file_name": str(info["file_name"]), "width": int(info["width"]),
                  "height": int(info["height"]), "boxes": [o[0] for o in objs], "labels": [o[1] for o in objs]}
        samples.append(_Sample(image, ext, {"json": json.dumps(target).encode()}))
    meta = {"kind": "coco", "task": "detection", "classes": data.classes, "category_ids": data.category_ids}
    return samples, meta


def _caption_samples(source: Path) -> tuple[list[_Sample], dict[str, Any]]:
    from .captions import CaptionFolder

    data = CaptionFolder(source)
    samples = []
    for path, caption in data.items:
        image, ext = _encoded(path)
        samples.append(_Sample(image, ext, {"txt": caption.encode()}))
    return samples, {"kind": "captions", "task": "clip", "classes": [], "mean": [0.5] * 3, "std": [0.5] * 3}


# --------------------------------------------------------------------------- writer
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # mtime 0: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_set(samples: Sequence[_Sample], meta: dict[str, Any], out: Path, max_count: int,
               max_size: int | None) -> Path:
    """Write ``samples`` into ``out/shard-*.tar`` plus ``out/index.json``; returns the index path."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    shards: list[dict[str, Any]] = []
    tar: tarfile.TarFile | None = None
    count = size = 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            name = SHARD_PATTERN.format(len(shards))
            tmp = out / (name + ".tmp")
            tmp.replace(out / name)
            shards.append({"name": name, "count": count, "bytes": (out / name).stat().st_size})
            tar = None

    for n, s in enumerate(samples):
        nbytes = len(s.image) + sum(len(v) for v in s.extras.values()) + 512 * (1 + len(s.extras))
        if tar is not None and (count >= max_count or (max_size is not None and size + nbytes > max_size)):
            close()
        if tar is None:
            tar = tarfile.open(out / (SHARD_PATTERN.format(len(shards)) + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
            count = size = 0
        key = f"{n:08d}"
        _add(tar, f"{key}.{s.ext}", s.image)
        for ext, data in s.extras.items():
            _add(tar, f"{key}.{ext}", data)
        count += 1
        size += nbytes
    close()
    classes = list(meta.get("classes", []))
    manifest = {"format": MANIFEST_FORMAT, "version": 1, **meta, "classes": classes, "num_classes": len(classes),
                "count": sum(s["count"] for s in shards), "shards": shards}
    path = out / INDEX_FILE
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def _guess_format(source: Path) -> str:
    if (source / "captions.csv").is_file() or (source / "captions.jsonl").is_file():
        return "captions"
    if source.suffix.lower() == ".json" or (source.is_dir() and any(source.glob("*.json"))):
        return "coco"
    return "folder"


def write_shards(source: str | os.PathLike, out_dir: str | os.PathLike, format: str | None = None,
                 max_count: int = 1000, max_size: int | None = None, val_fraction: float = 0.0,
                 seed: int = 0) -> list[Path]:
    """Write a dataset as webdataset tar shards plus an ``index.json`` manifest per split.

    Args:
        source: An image folder (``SRC/<class>/<image>``, or ``SRC/{train,val}/<class>/...``), a
            COCO dataset (its annotation JSON, or a folder holding one JSON and ``images/``), a
            caption folder (``captions.csv``/``captions.jsonl``), or ``"digits"``.
        out_dir: Output folder; a source with splits gets ``out_dir/<split>/``. Shards already
            there (``shard-*.tar``) are replaced.
        format: ``"folder"``, ``"coco"``, ``"captions"`` or ``"digits"``; None guesses from ``source``.
        max_count: Most samples per shard.
        max_size: Most bytes per shard (approximate: member data plus headers), or None.
        val_fraction: For an image folder without split folders: the fraction of every class
            written to ``out_dir/val/`` (the rest to ``out_dir/train/``), the same seeded
            stratified split as ``build_dataset(folder, split, val_fraction=..., seed=...)``;
            0 writes one shard set.
        seed: Seed of that split.

    Returns:
        The manifest path of every shard set written.

    Raises:
        ShardError: Unknown format, a bad limit, or an unreadable image.
        FileNotFoundError: ``source`` does not exist or holds no images.
    """
    if format is not None and format not in SHARD_FORMATS:
        raise ShardError(f"unknown shard source format {format!r}; choose one of {', '.join(SHARD_FORMATS)}")
    if max_count < 1 or (max_size is not None and max_size < 1):
        raise ShardError(f"max_count and max_size must be >= 1, got {max_count} and {max_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ShardError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    if format == "digits" or (format is None and str(source) == "digits"):
        return [_write_set(*_digits_samples(s), out / s, max_count, max_size) for s in ("train", "val", "test")]
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"shard source not found: {src} (expected an image folder, a COCO JSON or folder, a "
                                f"caption folder, or 'digits')")
    format = format or _guess_format(src)
    if format == "coco":
        return [_write_set(*_coco_samples(src), out, max_count, max_size)]
    if not src.is_dir():
        raise ShardError(f"a {format} source must be a folder, got the file {src}")
    if format == "captions":
        return [_write_set(*_caption_samples(src), out, max_count, max_size)]
    from .folder import _split_dir

    if _split_dir(src, "train") is not None:
        splits = [s for s in ("train", "val", "test") if _split_dir(src, s) is not None]
        return [_write_set(*_folder_samples(src, s), out / s, max_count, max_size) for s in splits]
    if val_fraction > 0:
        from .digits import stratified_split
        from .folder import ImageFolderDataset

        targets = ImageFolderDataset(src).targets
        parts = stratified_split(targets, (0.0, val_fraction), seed)
        return [_write_set(*_folder_samples(src, None, idx.tolist()), out / name, max_count, max_size)
                for name, idx in zip(("train", "val"), parts)]
    return [_write_set(*_folder_samples(src, None), out, max_count, max_size)]


# --------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike, split: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The folder and manifest of a shard set: ``path/index.json``, or ``path/<split>/index.json``.

    Raises:
        FileNotFoundError: No shard set there (the message says where one was looked for).
        ShardError: The manifest is not a vitlab shard index.
    """
    root = Path(path)
    if root.is_file() and root.name == INDEX_FILE:
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder not found: {root} (write one with `vitlab data shard SRC OUT`)")
    splits = [s for s in ("train", "val", "test") if (root / s / INDEX_FILE).is_file()]
    if split is None:
        folder = root if (root / INDEX_FILE).is_file() else None
    elif split in splits:
        folder = root / split
    else:
        folder = root if split == "train" and not splits and (root / INDEX_FILE).is_file() else None
    if folder is None:
        what = f"the {split} split of " if split is not None else ""
        found = f"; it has the splits {', '.join(splits)}" if splits else ""
        raise FileNotFoundError(f"no shard index for {what}{root}: expected {root / (split or '') / INDEX_FILE}"
                                f"{found} (write shards with `vitlab data shard SRC OUT`)")
    try:
        manifest = json.loads((folder / INDEX_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{folder / INDEX_FILE} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "shards" not in manifest:
        raise ShardError(f"{folder / INDEX_FILE} is not a vitlab shard index (written by `vitlab data shard`)")
    missing = [s["name"] for s in manifest["shards"] if not (folder / s["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: shard file(s) {missing[:5]} listed in {INDEX_FILE} are missing")
    if not manifest["shards"] or not manifest.get("count"):
        raise ShardError(f"{folder / INDEX_FILE} lists no samples")
    return folder, manifest


def shard_kind(path: str | os.PathLike) -> str:
    """The dataset kind of a shard set's source (``"digits"``, ``"folder"``, ``"coco"``, ``"captions"``), from its
    train manifest (or its only one)."""
    try:
        _, manifest = read_manifest(path, "train")
    except FileNotFoundError:
        _, manifest = read_manifest(path, None)
    return str(manifest.get("kind", "folder"))


def tar_index(file: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``(key, {ext: (data offset, size)})`` of every sample of one shard, from its headers only.

    Raises:
        ShardError: The file is not a readable tar archive.
    """
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(file, "r:") as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"cannot read shard {file} (not a tar file, or truncated): {e}") from None
    return out


def read_members(file: str | os.PathLike | BinaryIO, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """The bytes of one sample's members, ``{ext: (offset, size)}`` from :func:`tar_index` (a path or an open file)."""
    if not isinstance(file, (str, os.PathLike)):
        return {ext: (file.seek(offset), file.read(size))[1] for ext, (offset, size) in members.items()}
    with open(file, "rb") as f:
        return read_members(f, members)


def iter_tar_samples(file: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of every sample of one shard, in order (streamed, no seeking)."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    with tarfile.open(file, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if key is not None and k != key:
                yield key, parts
                parts = {}
            key = k
            f = tar.extractfile(member)
            parts[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, parts


class SampleDecoder:
    """Turns ``{ext: bytes}`` into the item the matching vitlab dataset gives.

    Classification shards: ``(image, label)``, the image a (C, H, W) float tensor in [0, 1]
    decoded like :class:`~vitlab.datasets.ImageFolderDataset` (Pillow, ``channels``), digits
    shards exactly :class:`~vitlab.datasets.DigitsDataset`'s values (``quantize``). COCO
    shards: the dict of :class:`~vitlab.datasets.coco.CocoDetection`; caption shards:
    ``{"image", "caption"}``. ``transform`` is applied to the image.
    """

    def __init__(self, manifest: dict[str, Any], transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.task = manifest.get("task", "classification")
        self.channels = int(manifest.get("channels", 3))
        self.quantize = manifest.get("quantize")
        self.transform = transform

    def image(self, data: bytes, where: str) -> Tensor:
        """Decode image bytes to (C, H, W) float in [0, 1]."""
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                pil = im.convert("L") if self.channels == 1 else (im if im.mode == "L" and self.task == "detection"
                                                                  else im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ShardError(f"cannot decode the image of sample {where}: {e}") from None
        arr = np.asarray(pil, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()  # (H, W, C) -> (C, H, W)
        if self.quantize:
            q = float(self.quantize)
            return (x * q / 255.0).round_().div_(q)
        return x.div_(255.0)

    def __call__(self, key: str, parts: dict[str, bytes], where: str = "") -> Any:
        ext = next((e for e in _IMAGE_EXTS if e in parts), None) or next(
            (e for e in parts if e not in ("cls", "json", "txt")), None)
        if ext is None:
            raise ShardError(f"sample {where}{key} has no image member (expected {key}.png or {key}.jpg)")
        x = self.image(parts[ext], f"{where}{key}")
        if self.transform is not None:
            x = self.transform(x)
        if "cls" in parts and self.task == "classification":
            return x, int(parts["cls"].decode())
        if "json" in parts:
            t = json.loads(parts["json"].decode())
            return {"image": x, "boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(t["labels"], dtype=torch.int64), "image_id": t["image_id"]}
        if "txt" in parts:
            return {"image": x, "caption": parts["txt"].decode()}
        raise ShardError(f"sample {where}{key} has no target member (.cls, .json or .txt)")


class _ShardMeta:
    """``classes``, ``num_classes``, ``mean``, ``std`` of a shard set, shared by both readers."""

    def _set_meta(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest
        self.classes: list[str] = list(manifest.get("classes", []))
        self.num_classes = len(self.classes)
        channels = int(manifest.get("channels", 3))
        self.mean = tuple(manifest.get("mean") or ([0.5] * channels))
        self.std = tuple(manifest.get("std") or ([0.5] * channels))
        self.shard_files = [folder / s["name"] for s in manifest["shards"]]
        self.shard_counts = [int(s["count"]) for s in manifest["shards"]]


class ShardIndexDataset(_ShardMeta, Dataset):
    """A shard set as a map-style dataset: random access by reading each tar's headers once.

    For evaluation splits and for the engine's index samplers; the items equal the streamed
    :class:`~vitlab.datasets.shard_stream.ShardDataset`'s and the source dataset's.

    Args:
        path: The shard folder (or its parent holding ``<split>/``).
        split: Which split folder to read, when there are several.
        transform: Applied to each (C, H, W) image.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None,
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        folder, manifest = read_manifest(path, split)
        self._set_meta(folder, manifest)
        self.decode = SampleDecoder(manifest, transform)
        self.entries: list[tuple[int, str, dict[str, tuple[int, int]]]] = []  # (shard, key, {ext: (offset, size)})
        for s, file in enumerate(self.shard_files):
            self.entries += [(s, key, members) for key, members in tar_index(file)]
        self.targets = [int(self._read(i).get("cls", b"-1").decode()) for i in range(len(self.entries))] \
            if manifest.get("task") == "classification" else []

    def _read(self, index: int) -> dict[str, bytes]:
        s, _, members = self.entries[index]
        return read_members(self.shard_files[s], members)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Any:
        s, key, _ = self.entries[index]
        return self.decode(key, self._read(index), f"{self.shard_files[s].name}:")

    def __repr__(self) -> str:
        return f"ShardIndexDataset({str(self.folder)!r}, n={len(self)}, shards={len(self.shard_files)})"


# --------------------------------------------------------------------------- command line
def _cmd_shard(args: Any) -> int:
    paths = write_shards(args.src, args.out, format=args.format, max_count=args.max_count, max_size=args.max_size,
                         val_fraction=args.val_fraction, seed=args.seed)
    for p in paths:
        m = json.loads(p.read_text())
        print(f"{p.parent}: {m['count']} samples in {len(m['shards'])} shard(s), {m['num_classes']} classes")
    return 0


def add_data_command(sub: Any) -> None:
    """``vitlab data shard SRC OUT [--format ...] [--max-count N] [--max-size BYTES]`` (argparse subparsers ``sub``)."""
    d = sub.add_parser("data", help="dataset tools: write webdataset tar shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shard", help="write a folder / COCO / caption dataset (or the digits) as tar shards")
    s.add_argument("src", help="image folder, COCO JSON or folder, caption folder, or 'digits'")
    s.add_argument("out", type=Path, help="output folder (index.json + shard-*.tar; OUT/<split>/ for split sources)")
    s.add_argument("--format", choices=list(SHARD_FORMATS), help="source format (guessed when left out)")
    s.add_argument("--max-count", type=int, default=1000, help="most samples per shard (default 1000)")
    s.add_argument("--max-size", type=int, default=None, help="most bytes per shard")
    s.add_argument("--val-fraction", type=float, default=0.0,
                   help="image folder without train/ and val/: fraction of each class written to OUT/val/")
    s.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split")
    s.set_defaults(func=_cmd_shard)


__all__ = ["INDEX_FILE", "SHARD_FORMATS", "SampleDecoder", "ShardError", "ShardIndexDataset", "add_data_command",
           "iter_tar_samples", "read_manifest", "read_members", "shard_kind", "tar_index", "write_shards"]
