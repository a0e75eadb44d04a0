"""Using a trained CLIP: image files in, zero-shot labels, retrieval rankings, evaluation metrics.

The functions behind ``vitlab zero-shot``, ``vitlab retrieve`` and ``vitlab eval`` on a CLIP
checkpoint. Images are preprocessed as the checkpoint records (``pretrained_cfg``: input
size, channels, mean/std).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ...datasets.captions import DIGIT_TEMPLATES, DigitCaptions, SceneCaptions, digit_prompts
from ...datasets.transforms import normalize
from ...errors import CheckpointError
from ..base import TaskInference, evaluate_task, resize_images
from ..inputs import to_unit_tensor
from ..registry import register_inference
from ...models.registry import register_task_model
from .convert import load_clip_checkpoint
from .model import CLIP, CLIPConfig
from .tokenizer import CLIPTokenizer
from .zero_shot import DEFAULT_TEMPLATES, _input_spec, zero_shot_classifier_from_prompts, zero_shot_notes


def load_for_inference(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, CLIPTokenizer]:
    """A CLIP checkpoint (any form :func:`load_clip_checkpoint` reads) and its tokenizer, on ``device``.

    Raises:
        CheckpointError: Not a CLIP checkpoint, or one without a tokenizer.
    """
    model, tokenizer = load_clip_checkpoint(checkpoint)
    if tokenizer is None:
        raise CheckpointError(f"{checkpoint} holds no tokenizer: expected tokenizer.json beside the weights or a "
                              "checkpoint written by vitlab train --task clip")
    return model.to(device).eval(), tokenizer


def load_images(model: CLIP, paths: Sequence[Any]) -> Tensor:
    """Image files (or PIL images, arrays) -> the model's normalised input batch (B, C, S, S).

    Each image is read (colour or grey, transparency on white), converted to the model's
    channels (grey: channel mean; colour: the grey channel repeated), resized to its input
    side (bilinear, antialiased) and normalised with the checkpoint's mean/std.

    Raises:
        ValueError: No image given.
        FileNotFoundError: A missing file.
        InputError: A file that is not an image.
    """
    if not paths:
        raise ValueError("no image given: pass one or more image files")
    size, channels, mean, std = _input_spec(model)
    out = []
    for p in paths:
        x = to_unit_tensor(p)  # a file, PIL image or array -> (C, H, W) in [0, 1], transparency on white
        if x.shape[0] != channels:
            x = x.mean(dim=0, keepdim=True) if channels == 1 else x.expand(channels, -1, -1)
        x = resize_images(x[None].float(), size)  # (C, H, W) -> (1, C, H, W) -> (1, C, S, S)
        out.append(x)
    return normalize(torch.cat(out), mean, std)


def default_templates(model: CLIP) -> list[str]:
    """The prompt templates a checkpoint was trained with (``pretrained_cfg["templates"]``), else CLIP's."""
    templates = (getattr(model, "pretrained_cfg", {}) or {}).get("templates")
    return list(templates) if templates else list(DEFAULT_TEMPLATES)


@torch.no_grad()
def zero_shot_predict(model: CLIP, tokenizer: CLIPTokenizer, images: Tensor, labels: Sequence[str],
                      templates: Sequence[str] | None = None) -> Tensor:
    """Class probabilities (B, K) of ``images`` over ``labels`` with a prompt-template ensemble.

    Raises:
        ValueError: No label, an empty label, or a template without ``{}``.
    """
    labels = [str(c).strip() for c in labels]
    if not labels or any(not c for c in labels):
        raise ValueError("zero-shot classification needs class names, e.g. --labels 'cat,dog' (no empty names)")
    templates = list(templates) if templates else default_templates(model)
    if any("{}" not in t for t in templates):
        raise ValueError("every prompt template must contain '{}' where the class name goes, e.g. 'a photo of a {}'")
    device = model.logit_scale.device
    weights = zero_shot_classifier_from_prompts(model, tokenizer, [[t.format(c) for t in templates] for c in labels])
    img = model.encode_image(images.to(device), normalize=True)
    return (model.scale() * img @ weights).softmax(dim=-1).cpu()


@torch.no_grad()
def retrieval_scores(model: CLIP, tokenizer: CLIPTokenizer, images: Tensor, texts: Sequence[str],
                     rerank: int = 0) -> Tensor:
    """Image x text scores (N_i, N_t): cosine similarities; with ``rerank > 0`` and an ITM head,
    every text's top ``rerank`` images re-ordered by the matching head (scores then rank only).

    Raises:
        ValueError: No text, an empty text, or ``rerank`` asked of a model without an ITM head.
    """
    if not texts or any(not str(t).strip() for t in texts):
        raise ValueError("retrieval needs one or more non-empty texts")
    device = model.logit_scale.device
    ids = tokenizer(list(texts)).to(device)
    img_emb, img_tok = model.image_features(images.to(device))
    txt_emb, txt_tok = model.text_features(ids)
    sim = F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).t()  # (N_i, N_t)
    if rerank > 0:
        if model.itm is None:
            raise ValueError("--rerank needs a CLIP model with an image-text matching head (trained with itm_depth > 0)")
        from .itm import rerank_top_k

        scored = rerank_top_k(sim.t(), rerank, lambda q, g: model.itm_logits(img_tok[g], txt_tok[q], ids[q]))
        sim = scored.t()
    return sim.cpu()


def evaluation_data(dataset: str, split: str, seed: int = 0, num_scenes: int = 1000,
                    scenes: dict[str, Any] | None = None) -> Any:
    """The captioned evaluation data of a dataset name: ``digits`` or ``digit_scenes``
    (``scenes``: the canvas and digit sizes and the converse-phrasing probability a checkpoint was
    trained with).

    Raises:
        ValueError: Another name (a caption folder is evaluated with the Python API).
    """
    if dataset == "digits":
        return DigitCaptions(split, seed=seed)
    if dataset == "digit_scenes":
        s = scenes or {}
        return SceneCaptions(split, num_scenes, int(s.get("canvas_size", 24)), tuple(s.get("digit_size", (8, 11))),
                             converse=float(s.get("converse", 0.5)), seed=seed)
    raise ValueError(f"vitlab eval of a CLIP checkpoint knows the datasets digits and digit_scenes, got {dataset!r}")


def evaluate_clip(model: CLIP, tokenizer: CLIPTokenizer, data: Any, device: str | torch.device = "cpu",
                  batch_size: int = 256, prompts: Sequence[Sequence[str]] | None = None, rerank: int = 10
                  ) -> dict[str, Any]:
    """Zero-shot accuracy (with ``prompts``), retrieval R@1/5/10 and mean/median ranks in both
    directions, and (with an ITM head and ``rerank``) the re-ranked text->image metrics.

    Args:
        model: The CLIP model.
        tokenizer: Its tokenizer.
        data: Samples ``{"image", "caption", "label"}``; labels are class indices when ``prompts``
            are given, and mark the positives of retrieval (same label).
        device: Where to run.
        batch_size: Evaluation batch size.
        prompts: Zero-shot prompts per class.
        rerank: Images re-ranked per text by the ITM head (0: none).
    """
    from .task import CLIPTask

    dev = torch.device(device)
    _, _, mean, std = _input_spec(model)
    task = CLIPTask(tokenizer, mean, std, itm_top_k=rerank, prompts=prompts)
    size, _, _, _ = _input_spec(model)
    return evaluate_task(model.to(dev), task, DataLoader(data, batch_size=batch_size), dev, size)


def evaluate_clip_checkpoint(checkpoint: str | Path, dataset: str | None = None, split: str = "test",
                             device: str = "cpu", batch_size: int = 256, rerank: int = 10) -> dict[str, Any]:
    """:func:`evaluate_clip` of a checkpoint on ``dataset`` (default: the one it was trained on)."""
    model, tokenizer = load_for_inference(checkpoint, device)
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    dataset = dataset or pcfg.get("dataset") or "digits"
    data = evaluation_data(dataset, split, scenes=pcfg.get("scenes"))
    res = evaluate_clip(model, tokenizer, data, device, batch_size,
                        prompts=digit_prompts() if dataset == "digits" else None, rerank=rerank)
    res.update(dataset=dataset, split=split)
    return res


register_task_model("CLIP", CLIP, CLIPConfig, "clip")


@register_inference("clip")
class CLIPInference(TaskInference):
    """CLIP checkpoints (vitlab-trained or a Hugging Face ``CLIPModel`` folder): zero-shot labels
    per image, retrieval metrics; the tokenizer travels as ``model.tokenizer``."""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
        model, tokenizer = load_for_inference(path, device)
        model.tokenizer = tokenizer
        return model

    @classmethod
    def predict(cls, model: torch.nn.Module, images: Sequence[Any], labels: Sequence[str] | None = None,
                templates: Sequence[str] | None = None, top_k: int = 3, **options: Any) -> list[dict[str, Any]]:
        """Zero-shot classification over ``labels`` (default: the checkpoint's classes): per image
        ``class``, ``confidence`` and the ``top_k`` classes."""
        labels = list(labels) if labels is not None else (getattr(model, "pretrained_cfg", {}) or {}).get("classes")
        if not labels:
            raise ValueError("CLIP predictions need class names: labels=['cat', 'dog'] (vitlab zero-shot --labels)")
        probs = zero_shot_predict(model, model.tokenizer, load_images(model, list(images)), labels, templates)
        notes = zero_shot_notes(model, list(images))
        k = max(1, min(top_k, len(labels)))
        records = []
        for p, note in zip(probs, notes):
            top = p.topk(k)
            ranked = [{"class": labels[int(i)], "confidence": float(v)} for v, i in zip(top.values, top.indices)]
            records.append({**ranked[0], "top_k": ranked, "notes": note})
        return records

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 256,
                 **options: Any) -> dict[str, Any]:
        dataset = None if dataset == "digits" else dataset  # default: the checkpoint's own dataset
        return evaluate_clip_checkpoint(checkpoint, dataset, split=split or "test",
                                        device="cpu" if device == "auto" else device, batch_size=batch_size)

    @classmethod
    def report(cls, results: dict[str, Any]) -> str:
        lines = [f"{results['dataset']} {results['split']} (n={results['n']}), CLIP checkpoint"]
        if "zero_shot_top1" in results:
            lines.append(f"zero-shot accuracy: top-1 {100 * results['zero_shot_top1']:.2f}%")
        for d, name in (("i2t", "image->text"), ("t2i", "text->image"), ("itm_t2i", "text->image, ITM re-ranked")):
            if f"{d}_R@1" in results:
                lines.append(f"{name}: R@1 {100 * results[f'{d}_R@1']:.2f}%  R@5 {100 * results[f'{d}_R@5']:.2f}%  "
                             f"R@10 {100 * results[f'{d}_R@10']:.2f}%  mean rank {results[f'{d}_mean_rank']:.2f}  "
                             f"median rank {results[f'{d}_median_rank']:.0f}")
        return "\n".join(lines)

    @classmethod
    def describe(cls, name: str, record: dict[str, Any]) -> str:
        return f"{name}: " + "  ".join(f"{t['class']} {t['confidence']:.1%}" for t in record["top_k"])

    @classmethod
    def add_commands(cls, sub: Any) -> None:
        """``vitlab zero-shot`` and ``vitlab retrieve``."""
        add_clip_commands(sub)


# ----------------------------------------------------------------------------- commands
def _cmd_zero_shot(args: Any) -> int:
    """``vitlab zero-shot``: a thin alias of ``vitlab predict`` on a CLIP checkpoint with ``--labels``."""
    labels = [c.strip() for c in args.labels.split(",")]
    if not any(labels) or any(not c for c in labels):
        raise ValueError(f"--labels must be comma-separated class names, e.g. --labels 'cat,dog'; got {args.labels!r}")
    model = CLIPInference.load(args.checkpoint, args.device)
    records = CLIPInference.predict(model, [str(p) for p in args.images], labels=labels, templates=args.templates,
                                    top_k=args.top_k)
    for path, record in zip(args.images, records):
        for note in record.get("notes", []):
            print(f"vitlab zero-shot: note: {path}: {note}", file=sys.stderr)
        print(CLIPInference.describe(str(path), record))
    return 0


def _cmd_retrieve(args: Any) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    model, tokenizer = load_for_inference(args.checkpoint, args.device)
    sim = retrieval_scores(model, tokenizer, load_images(model, args.images), args.texts, rerank=args.rerank)
    if args.direction in ("t2i", "both"):
        k = min(args.top_k, sim.shape[0])
        for j, text in enumerate(args.texts):
            top = sim[:, j].topk(k)
            print(f"text {text!r}: " + "  ".join(f"{args.images[i]} ({float(v):.3f})" for v, i in zip(top.values, top.indices)))
    if args.direction in ("i2t", "both"):
        k = min(args.top_k, sim.shape[1])
        for i, path in enumerate(args.images):
            top = sim[i].topk(k)
            print(f"image {path}: " + "  ".join(f"{args.texts[j]!r} ({float(v):.3f})" for v, j in zip(top.values, top.indices)))
    return 0


def add_clip_commands(sub: Any) -> None:
    """``vitlab zero-shot`` and ``vitlab retrieve``."""
    z = sub.add_parser("zero-shot", help="classify images by class names with a CLIP checkpoint")
    z.add_argument("--checkpoint", required=True, help="CLIP checkpoint (a clip run, its checkpoint or a HF folder)")
    z.add_argument("--labels", required=True, help="comma-separated class names, e.g. 'cat,dog'")
    z.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                   help="prompt templates with {} for the class (default: the checkpoint's)")
    z.add_argument("images", nargs="+", type=Path, help="image files")
    z.add_argument("--top-k", type=int, default=3)
    z.add_argument("--device", default="cpu")
    z.set_defaults(func=_cmd_zero_shot)

    r = sub.add_parser("retrieve", help="rank images for texts and texts for images with a CLIP checkpoint")
    r.add_argument("--checkpoint", required=True, help="CLIP checkpoint (a clip run, its checkpoint or a HF folder)")
    r.add_argument("--images", nargs="+", type=Path, required=True, help="image files (the image gallery)")
    r.add_argument("--texts", nargs="+", required=True, help="texts (the text gallery)")
    r.add_argument("--top-k", type=int, default=5)
    r.add_argument("--direction", choices=["t2i", "i2t", "both"], default="both")
    r.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="re-rank each text's top K images with the ITM head (models trained with one)")
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=_cmd_retrieve)


__all__ = ["CLIPInference", "DIGIT_TEMPLATES", "default_templates", "evaluate_clip", "evaluate_clip_checkpoint", "evaluation_data",
           "load_for_inference", "load_images", "retrieval_scores", "zero_shot_predict"]
