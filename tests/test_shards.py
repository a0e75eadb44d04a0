"""Webdataset tar shards: writer round trips, the streamed dataset's rank x worker split, fixed-length
resampled epochs, exact mid-epoch resume, ``shards:PATH`` training and the ``vitlab data shard`` command."""

from __future__ import annotations

import argparse
import collections
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from optional import importable, needs
from vitlab.cli import main as cli
from vitlab.datasets import DigitsDataset, ImageFolderDataset, build_dataset
from vitlab.datasets.pipeline import dataset_kind, dataset_label
from vitlab.datasets.shard_stream import ShardDataset, ShardLoader
from vitlab.datasets.shards import ShardError, ShardIndexDataset, add_data_command, iter_tar_samples, write_shards

digits = needs("sklearn", extra="pip install 'vitlab[digits]'")
TINY_VIT = "model.overrides={patch_size: 2, dim: 16, depth: 1, heads: 2, mlp_dim: 32}"


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """The digits as shards of at most 100 samples (train: 1259 samples in 13 shards)."""
    if not importable("sklearn"):
        pytest.skip("needs sklearn: pip install 'vitlab[digits]'")
    out = tmp_path_factory.mktemp("digit_shards")
    write_shards("digits", out, max_count=100)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An image folder of 3 classes, PNG and JPEG files of mixed sizes and modes."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog", "eel")):
        (root / cls).mkdir()
        for i in range(4 + c):
            h, w = int(rng.integers(5, 20)), int(rng.integers(5, 20))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            if i % 2:
                img.convert("L").save(root / cls / f"im{i}.png")
            else:
                img.save(root / cls / f"im{i}.jpg", quality=85)
    return root


def _keys(items) -> list[str]:
    return [k for k, _ in items]


# ------------------------------------------------------------------ writer round trips
@digits
def test_digit_shards_round_trip_every_sample_and_the_manifest(digit_shards):
    index = json.loads((digit_shards / "train" / "index.json").read_text())
    ref = DigitsDataset("train")
    assert index["count"] == len(ref) == sum(s["count"] for s in index["shards"])
    assert [s["count"] for s in index["shards"]] == [100] * 12 + [59]
    assert index["classes"] == ref.classes and index["num_classes"] == 10 and index["kind"] == "digits"
    data = ShardIndexDataset(digit_shards, "train")
    assert len(data) == len(ref) and data.mean == ref.mean and data.std == ref.std and data.targets == ref.targets
    for i in range(len(ref)):  # the exact tensors DigitsDataset gives (pixels k/16), and the labels
        x, y = data[i]
        assert torch.equal(x, ref[i][0]) and y == ref[i][1]
    for split in ("val", "test"):
        assert len(ShardIndexDataset(digit_shards, split)) == len(DigitsDataset(split))


def test_folder_shards_keep_the_file_bytes_and_decode_like_the_folder(folder, tmp_path):
    write_shards(folder, tmp_path, max_count=4)
    ref = ImageFolderDataset(folder)
    stored = [parts for f in sorted(tmp_path.glob("shard-*.tar")) for _, parts in iter_tar_samples(f)]
    assert len(stored) == len(ref.samples)
    for parts, (path, label) in zip(stored, ref.samples):
        ext = "jpg" if path.suffix == ".jpg" else "png"
        assert parts[ext] == path.read_bytes() and int(parts["cls"]) == label
    data = ShardIndexDataset(tmp_path)
    assert data.classes == ref.classes and data.mean == ref.mean
    for i in range(len(ref)):
        assert torch.equal(data[i][0], ref[i][0]) and data[i][1] == ref[i][1]
    # the streamed reader, unshuffled, gives the same items in the same order
    streamed = list(ShardDataset(tmp_path, shuffle=False))
    assert len(streamed) == len(ref) and all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(streamed, data))


def test_folder_splits_become_shard_splits(folder, tmp_path):
    # a flat folder with val_fraction: the same seeded stratified split build_dataset(folder) makes
    write_shards(folder, tmp_path / "flat", val_fraction=0.25, seed=2)
    for split in ("train", "val"):
        ref = build_dataset(folder, split, val_fraction=0.25, seed=2)
        data = build_dataset(f"shards:{tmp_path / 'flat'}", split)
        assert len(data) == len(ref) and data.targets == ref.targets
        assert all(torch.equal(data[i][0], ref[i][0]) for i in range(len(ref)))
    # a train/ + val/ tree: one shard set per split, val labelled with the train split's classes
    tree = tmp_path / "tree"
    for split, classes in (("train", ("cat", "dog", "eel")), ("val", ("dog", "eel"))):
        for cls in classes:
            (tree / split / cls).mkdir(parents=True)
            for p in (folder / cls).iterdir():
                (tree / split / cls / p.name).write_bytes(p.read_bytes())
    write_shards(tree, tmp_path / "tree_shards")
    val = ShardIndexDataset(tmp_path / "tree_shards", "val")
    assert val.classes == ["cat", "dog", "eel"] and sorted(set(val.targets)) == [1, 2]
    assert dataset_kind(f"shards:{tmp_path / 'tree_shards'}") == "folder"


def test_max_size_starts_a_new_shard(folder, tmp_path):
    write_shards(folder, tmp_path, max_count=1000, max_size=3000)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["shards"]) > 1 and index["count"] == len(ImageFolderDataset(folder))
    assert all(tarfile.is_tarfile(tmp_path / s["name"]) for s in index["shards"])


@digits
def test_coco_shards_hold_the_validated_targets(tmp_path):
    from vitlab.datasets.coco import CocoDetection, write_coco
    from vitlab.datasets.digit_scenes import DigitScenes

    scenes = DigitScenes("train", num_scenes=6, canvas_size=32, digit_size=(8, 12), seed=0)
    ann = write_coco([scenes[i] for i in range(len(scenes))], tmp_path / "coco", [str(d) for d in range(10)])
    write_shards(tmp_path / "coco", tmp_path / "shards", max_count=4)
    ref = CocoDetection(ann, tmp_path / "coco" / "images")
    data = ShardIndexDataset(tmp_path / "shards")
    assert len(data) == len(ref) == 6 and data.classes == ref.classes
    for i in range(len(ref)):
        a, b = data[i], ref[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["labels"], b["labels"]) and a["image_id"] == b["image_id"]


def test_caption_shards_hold_the_captions(folder, tmp_path):
    rows = [f"{p.relative_to(folder)},a picture of a {p.parent.name}" for p in sorted(folder.rglob("*.*"))
            if p.suffix in (".png", ".jpg")]
    (folder / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    try:
        write_shards(folder, tmp_path)  # format guessed from captions.csv
    finally:
        (folder / "captions.csv").unlink()
    texts = [parts["txt"].decode() for _, parts in iter_tar_samples(tmp_path / "shard-000000.tar")]
    assert texts == [r.split(",", 1)[1] for r in rows]
    assert ShardIndexDataset(tmp_path)[0]["caption"] == texts[0]


# ------------------------------------------------------------------ streaming
@digits
def test_two_ranks_by_two_workers_cover_every_sample_exactly_once(digit_shards):
    seen: list[str] = []
    per_rank = []
    for rank in range(2):
        ds = ShardDataset(digit_shards, "train", seed=3, rank=rank, world_size=2, return_key=True)
        loader = ShardLoader(ds, batch_size=16, num_workers=2)
        keys = [k for batch in loader for k in batch[0]]
        per_rank.append(set(keys))
        seen += keys
    assert len(seen) == 1259 and len(set(seen)) == 1259  # every sample, none twice
    assert not per_rank[0] & per_rank[1]
    # and every slot reads whole shards of its own: no shard is split between two slots
    shards_of = collections.defaultdict(set)
    for rank in range(2):
        ds = ShardDataset(digit_shards, "train", seed=3, rank=rank, world_size=2)
        for w in range(2):
            for s in ds.shards_of(w, 2):
                shards_of[s].add((rank, w))
    assert len(shards_of) == 13 and all(len(v) == 1 for v in shards_of.values())
    # a fixed-length epoch gives every rank the same number of batches (DDP steps together)
    lengths = [len(ShardLoader(ShardDataset(digit_shards, "train", samples_per_epoch=1000, rank=r, world_size=2),
                               batch_size=16, num_workers=2, drop_last=True)) for r in range(2)]
    assert lengths == [2 * (250 // 16)] * 2


def _rank_keys(rank: int, init: str, shards: str, out: str) -> None:
    """One gloo rank: the keys its ShardDataset (rank and world size from torch.distributed) yields."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ds = ShardDataset(shards, "train", return_key=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps([ds.rank, ds.world_size, _keys(ds)]))
    finally:
        torch.distributed.destroy_process_group()


@digits
def test_ranks_come_from_torch_distributed(digit_shards, tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank_keys, args=(r, init, str(digit_shards), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g[:2] for g in got] == [[0, 2], [1, 2]]
    assert not set(got[0][2]) & set(got[1][2]) and len(got[0][2]) + len(got[1][2]) == 1259


@digits
def test_resampled_epochs_have_a_fixed_length_and_are_reproducible(digit_shards):
    def epoch(e: int, seed: int = 0, rank: int = 0) -> list[str]:
        ds = ShardDataset(digit_shards, "train", samples_per_epoch=3000, seed=seed, rank=rank, world_size=2,
                          return_key=True, shuffle_buffer=64)
        ds.set_epoch(e)
        assert len(ds) == 1500
        return _keys(ds)

    e0 = epoch(0)
    assert len(e0) == 1500  # 3000 // 2 ranks, beyond the rank's ~630 samples: resampled
    assert epoch(0) == e0  # the same (seed, epoch): the same samples in the same order
    assert epoch(1) != e0 and sorted(epoch(1)) != sorted(e0)
    assert epoch(0, seed=1) != e0
    assert not set(e0) & set(epoch(0, rank=1))  # ranks still read disjoint shards
    assert e0[:64] != sorted(e0[:64])  # the buffer shuffles within shards


@digits
def test_resume_mid_epoch_in_process_yields_exactly_the_rest(digit_shards):
    def make() -> ShardDataset:
        ds = ShardDataset(digit_shards, "train", samples_per_epoch=900, seed=5, return_key=True, shuffle_buffer=50)
        ds.set_epoch(2)
        return ds

    full = _keys(make())
    ds = make()
    it = iter(ds)
    head = [next(it)[0] for _ in range(337)]
    state = json.loads(json.dumps(ds.state_dict()))  # a checkpoint holds it as JSON
    resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed) == 900 - 337
    rest = _keys(resumed)
    assert head + rest == full
    assert _keys(resumed) == full  # the next iteration is a whole epoch again


@digits
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_with_workers_yields_exactly_the_rest(digit_shards, workers):
    def make() -> ShardLoader:
        ds = ShardDataset(digit_shards, "train", samples_per_epoch=700, seed=1, return_key=True)
        ds.set_epoch(1)
        return ShardLoader(ds, batch_size=32, num_workers=workers)

    loader = make()
    full = [k for batch in loader for k in batch[0]]
    assert len(full) == 700
    loader = make()
    head: list[str] = []
    for n, batch in enumerate(loader):
        head += batch[0]
        if n == 6:
            state = loader.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    rest = [k for batch in resumed for k in batch[0]]
    assert sum(state["positions"]) == len(head) and len(head) + len(rest) == 700  # delivered, not prefetched
    assert collections.Counter(head + rest) == collections.Counter(full)  # exactly the rest: nothing lost or repeated
    if workers == 0:
        assert head + rest == full
    with pytest.raises(ShardError, match="same ranks, workers"):
        ShardLoader(ShardDataset(digit_shards, "train", samples_per_epoch=700, seed=1), 32, num_workers=2 - min(workers, 1))\
            .load_state_dict(state)


# ------------------------------------------------------------------ bad input
def test_bad_input_gets_one_clear_message(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="shard source not found: .*nowhere"):
        write_shards(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found in .*empty"):
        write_shards(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ShardError, match="unknown shard source format 'parquet'; choose one of folder, coco"):
        write_shards(folder, tmp_path / "out", format="parquet")
    with pytest.raises(FileNotFoundError, match="no shard index for .*empty.*vitlab data shard"):
        ShardDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="shard folder not found"):
        build_dataset(f"shards:{tmp_path / 'nowhere'}")
    write_shards(folder, tmp_path / "one", max_count=100)  # one shard, for 2 workers
    with pytest.raises(ShardError, match="1 shard.*fewer than 1 rank.*2 worker"):
        ShardLoader(ShardDataset(tmp_path / "one"), batch_size=2, num_workers=2)
    with pytest.raises(FileNotFoundError, match="no shard index for the val split"):
        build_dataset(f"shards:{tmp_path / 'one'}", "val")
    (tmp_path / "one" / "shard-000000.tar").write_bytes(b"not a tar file")
    with pytest.raises(ShardError, match="cannot read shard .*shard-000000.tar"):
        ShardIndexDataset(tmp_path / "one")
    with pytest.raises(ShardError, match="cannot read shard .*shard-000000.tar"):
        list(ShardDataset(tmp_path / "one"))
    parser = argparse.ArgumentParser()
    add_data_command(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "shard", str(folder), str(tmp_path), "--format", "parquet"])


# ------------------------------------------------------------------ wiring
@digits
def test_shards_dataset_name_builds_the_digits_and_trains(digit_shards, tmp_path):
    name = f"shards:{digit_shards}"
    assert dataset_kind(name) == "digits" and dataset_label(name).startswith("shards-")
    assert isinstance(build_dataset(name, "train", streaming=True, samples_per_epoch=64), ShardDataset)
    train = build_dataset(name, "train")
    assert len(train) == 1259 and torch.equal(train[5][0], DigitsDataset("train")[5][0])
    code = cli(["train", TINY_VIT, f"data.dataset={name}", "--epochs", "1", "--device", "cpu",
                "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec and "val_top1" in rec[-1]


@digits
def test_the_engine_streams_a_shard_loader_epoch_by_epoch(digit_shards, tmp_path):
    from vitlab.tasks import get_task
    from vitlab.training import Trainer, load_config

    cfg = load_config(None, [TINY_VIT, f"data.dataset=shards:{digit_shards}", "epochs=2", "progress=false",
                             "data.batch_size=32", f"output_dir={tmp_path}", "ema_decay=null"])
    setup = get_task(cfg.task).from_config(cfg)
    stream = ShardDataset(digit_shards, "train", samples_per_epoch=256, seed=cfg.seed)
    epochs: list[int] = []
    original = stream.set_epoch
    stream.set_epoch = lambda e: (epochs.append(e), original(e))[1]  # type: ignore[method-assign]
    loader = ShardLoader(stream, batch_size=32, num_workers=0, drop_last=True)
    trainer = Trainer(setup.model, cfg, loader, setup.val_data, task=setup.task, output_dir=tmp_path,
                      log=lambda s: None)
    assert trainer.train_loader is loader and trainer.steps_per_epoch == 8
    trainer.fit()
    assert trainer.step == 16 and epochs == [0, 1] and stream.positions == [256]


def test_data_shard_command_writes_shards(folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_data_command(parser.add_subparsers())
    args = parser.parse_args(["data", "shard", str(folder), str(tmp_path / "s"), "--format", "folder",
                              "--max-count", "5"])
    assert args.func(args) == 0
    assert "15 samples in 3 shard(s), 3 classes" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["index.json", "shard-000000.tar",
                                                                  "shard-000001.tar", "shard-000002.tar"]
