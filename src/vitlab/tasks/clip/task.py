"""CLIP-style image-text training as a task of the engine (``task: clip``).

What it owns: the batches (images to the device, normalised and, for single digits,
augmented; captions tokenised), the loss (the symmetric contrastive loss or SigLIP's, over
features gathered from every rank with gradients, duplicate-aware targets, plus the ITM
loss on mined hard negatives), the temperature clamp after every optimizer step, the
metrics (zero-shot accuracy when the data has class prompts, retrieval R@1/5/10 and ranks,
ITM re-ranked text->image recall; with mirror captions, ``mirror_acc`` / ``itm_mirror_acc``: how
often an image's own caption scores above its mirror caption, contrastively and by the ITM head)
and the similarity-matrix plot.

Data (``data.dataset``): ``digits`` (the default: :class:`~vitlab.datasets.captions.DigitCaptions`),
``digit_scenes`` (:class:`~vitlab.datasets.captions.SceneCaptions`) or a folder with
``captions.csv`` / ``captions.jsonl`` (:class:`~vitlab.datasets.captions.CaptionFolder`).

Options come from the typed ``clip`` section (:class:`CLIPSection`; ``model.overrides``
configures the image backbone ``model.name`` alone): ``text`` (a text-tower variant, ``clip_text_tiny``), ``text_overrides``,
``embed_dim`` (64), ``loss`` (``clip`` | ``siglip``), ``duplicate_aware`` (true), ``itm_depth``
(0 for digits, 1 for scenes), ``itm_heads`` (2), ``itm_image_pos`` (false: the head adds a 2-D
sin-cos encoding of each image token's place; for backbones without absolute positions, Swin),
``itm_weight`` (1.0), ``itm_top_k`` (10),
``itm_fusion`` (1.0: weight of the contrastive logit in the fused re-ranking),
``swap_negatives`` (true: each scene's digit-swapped caption is an ITM negative),
``itm_epochs`` (0: the last epochs that train the ITM head alone on frozen towers),
``itm_hard_negatives`` (4), ``itm_shifted_negatives`` (2) and ``itm_residual`` (false: train the
fused score) of that phase, ``itm_lr_scale`` (1: the ITM head's learning-rate factor),
``init_logit_scale`` (1/0.07; SigLIP 10) and ``init_logit_bias`` (SigLIP only, -10: the
paper's prior for batches of many thousands with one positive per row; a batch whose rows hold
a fraction p of positives starts closer to its prior at log(p / (1 - p))),
``vocab_size`` (learned BPE tokens, 256), ``context_length`` (16; 32 for folders),
``captions_per_image`` (training copies of each digit, 4), ``num_scenes`` (training scenes,
4000; every scene is drawn afresh from its index, so more scenes cost no more per epoch),
``eval_scenes`` (val and test scenes each; a quarter of ``num_scenes``), ``converse`` (0.5: how
often a scene's caption uses the converse phrasing, "a 7 to the right of a 3" for "a 3 to the
left of a 7"), ``canvas_size`` (24) and ``digit_size`` ((8, 11)) of the scenes. The tokenizer is a BPE trained on the
training captions and travels inside every checkpoint (``pretrained_cfg["tokenizer"]``).
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ...datasets.captions import DIGIT_TEMPLATES, CaptionFolder, DigitCaptions, SceneCaptions, digit_prompts
from ...datasets.transforms import normalize
from ...models.text import text_config
from ..base import Batch, Metrics, NoMetrics, RunConfig, Task, resize_images
from ..registry import TaskSetup, register_task
from .distributed import gather_no_grad, gather_with_grad
from .itm import itm_loss, rerank_top_k
from .losses import clip_loss, siglip_loss
from .model import CLIP, CLIPConfig
from .retrieval import retrieval_from_similarity
from .tokenizer import CLIPTokenizer
from .plots import plot_similarity
from .zero_shot import zero_shot_classifier_from_prompts, zero_shot_logits

#: What ``vitlab train --task clip`` runs without a recipe: digit captions on a small ViT.
CLIP_DIGITS_RECIPE: dict[str, Any] = {
    "recipe": "clip_digits",
    "task": "clip",
    "model": {
        "name": "vit_tiny_patch16_224",
        "overrides": {"patch_size": 2, "dim": 64, "depth": 4, "heads": 4, "mlp_dim": 128},
    },
    "clip": {"text": "clip_text_tiny", "embed_dim": 64, "loss": "clip", "duplicate_aware": True, "captions_per_image": 4},
    "data": {"dataset": "digits", "batch_size": 128, "eval_batch_size": 512},
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 2, "min_lr": 1e-5, "clip_grad": 1.0},
    "epochs": 30,
    "seed": 0,
}


@dataclasses.dataclass
class CLIPSection:
    """The CLIP task's options (config section ``clip``; ``model`` names the image tower and
    ``model.overrides`` holds its options only). None: the dataset's default (``itm_depth`` 1
    on digit scenes, else 0; ``context_length`` 16, 32 for caption folders; ``eval_scenes`` a
    quarter of ``num_scenes``; ``init_logit_scale`` 1/0.07, 10 for SigLIP).

    Towers: ``text`` (a text variant), ``text_overrides``, ``embed_dim``, ``vocab_size`` and
    ``context_length`` of the BPE tokenizer trained on the captions. Loss: ``loss`` (clip |
    siglip), ``duplicate_aware``, ``init_logit_scale``, ``init_logit_bias``, ``swap_contrastive``.
    Image-text matching: ``itm_depth``, ``itm_heads``, ``itm_weight``, ``itm_top_k``,
    ``itm_fusion``, ``swap_negatives``, ``itm_epochs``, ``itm_hard_negatives``,
    ``itm_shifted_negatives``, ``itm_residual``, ``itm_lr_scale``, ``itm_image_pos``. Data:
    ``captions_per_image`` (digits), ``num_scenes``, ``eval_scenes``, ``canvas_size``,
    ``digit_size``, ``converse`` (digit scenes).
    """

    text: str = "clip_text_tiny"
    text_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    embed_dim: int = 64
    loss: str = "clip"
    duplicate_aware: bool = True
    itm_depth: int | None = None
    itm_heads: int = 2
    itm_weight: float = 1.0
    itm_top_k: int = 10
    vocab_size: int = 256
    context_length: int | None = None
    captions_per_image: int = 4
    num_scenes: int = 4000
    canvas_size: int = 24
    digit_size: tuple[int, int] = (8, 11)
    init_logit_scale: float | None = None
    init_logit_bias: float = -10.0
    itm_fusion: float = 1.0
    swap_negatives: bool = True
    itm_epochs: int = 0
    itm_hard_negatives: int = 4
    itm_shifted_negatives: int = 2
    itm_residual: bool = False
    itm_lr_scale: float = 1.0
    swap_contrastive: bool = False
    eval_scenes: int | None = None
    converse: float = 0.5
    itm_image_pos: bool = False

    def __post_init__(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"clip.loss must be clip or siglip, got {self.loss!r}")


#: The options of the ``clip`` section (``model.overrides`` holds the image tower's alone).
CLIP_OPTIONS: tuple[str, ...] = (
    "text", "text_overrides", "embed_dim", "loss", "duplicate_aware", "itm_depth", "itm_heads", "itm_weight",
    "itm_top_k", "vocab_size", "context_length", "captions_per_image", "num_scenes", "canvas_size", "digit_size",
    "init_logit_scale", "init_logit_bias", "itm_fusion", "swap_negatives", "itm_epochs", "itm_hard_negatives",
    "itm_shifted_negatives", "itm_residual", "itm_lr_scale", "swap_contrastive",
    "eval_scenes", "converse", "itm_image_pos",
)
#: How many eval samples the similarity-matrix plot shows.
PLOT_SAMPLES = 12


class CLIPEvalMetrics(Metrics):
    """Collects the embeddings of an evaluation; computes loss, zero-shot and retrieval metrics."""

    def __init__(self, task: CLIPTask) -> None:
        self.task = task
        self.images: list[Tensor] = []
        self.texts: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.classes: list[Tensor] = []
        self.image_tokens: list[Tensor] = []
        self.text_tokens: list[Tensor] = []
        self.ids: list[Tensor] = []
        self.captions: list[str] = []
        self.loss_sum, self.n = 0.0, 0
        #: Per image with a mirror caption: whether its own caption beats the mirror (contrastive, ITM).
        self.mirror_wins: list[Tensor] = []
        self.itm_mirror_wins: list[Tensor] = []
        self.zero_shot: Tensor | None = None
        self.scale = 1.0

    def update(self, batch: Batch, outputs: Any) -> None:
        self.images.append(outputs["image_emb"].float().cpu())
        self.texts.append(outputs["text_emb"].float().cpu())
        self.labels.append(batch.targets.cpu())
        self.captions += batch.extra["captions"]
        if "image_tokens" in outputs:
            self.image_tokens.append(outputs["image_tokens"])
            self.text_tokens.append(outputs["text_tokens"])
            self.ids.append(batch.inputs[1])
        if "mirror_emb" in outputs:
            self._update_mirror(outputs, batch.inputs[1])
        self.zero_shot = outputs.get("zero_shot", self.zero_shot)
        self.scale = float(outputs["scale"])
        self.loss_sum += float(self.task.contrastive(outputs, batch.targets)) * batch.size
        self.n += batch.size

    @torch.no_grad()
    def _update_mirror(self, outputs: dict[str, Any], ids: Tensor) -> None:
        """Images with a mirror caption (their digits exchanged): does their own caption score higher?"""
        has = outputs["has_mirror"]
        if not bool(has.any()):
            return
        img = outputs["image_emb"][has]
        own = (img * outputs["text_emb"][has]).sum(-1)  # (B',) cosine with the own caption
        mirror = (img * outputs["mirror_emb"][has]).sum(-1)  # (B',) with the mirror caption
        self.mirror_wins.append((own > mirror).cpu())
        if "mirror_tokens" in outputs:
            model, tok = self.task.eval_model, outputs["image_tokens"][has]
            own_itm = model.itm_logits(tok, outputs["text_tokens"][has], ids[has])
            mirror_itm = model.itm_logits(tok, outputs["mirror_tokens"][has], outputs["mirror_ids"][has])
            self.itm_mirror_wins.append((own_itm > mirror_itm).cpu())

    def compute(self) -> dict[str, Any]:
        if not self.n:
            return {"n": 0}
        img, txt, labels = torch.cat(self.images), torch.cat(self.texts), torch.cat(self.labels)
        sim = img @ txt.t()  # (N, N) cosine similarities (the embeddings are normalised)
        pos = labels[:, None] == labels[None, :]
        out: dict[str, Any] = {"loss": self.loss_sum / self.n, "n": self.n}
        out.update(retrieval_from_similarity(sim, pos))
        if self.zero_shot is not None:
            pred = zero_shot_logits(img, self.zero_shot.cpu()).argmax(dim=1)
            out["zero_shot_top1"] = float((pred == labels).float().mean())
        if self.image_tokens and self.task.itm_top_k:
            out.update(self._reranked(sim, pos))
        if self.mirror_wins:  # 0.5 is a bag-of-words model (it cannot tell a layout from its mirror)
            out["mirror_acc"] = float(torch.cat(self.mirror_wins).float().mean())
        if self.itm_mirror_wins:
            out["itm_mirror_acc"] = float(torch.cat(self.itm_mirror_wins).float().mean())
        k = min(PLOT_SAMPLES, self.n)
        out["similarity"] = sim[:k, :k]
        out["similarity_captions"] = self.captions[:k]
        return out

    def _reranked(self, sim: Tensor, pos: Tensor) -> dict[str, float]:
        model = self.task.eval_model
        img_tok, txt_tok, ids = torch.cat(self.image_tokens), torch.cat(self.text_tokens), torch.cat(self.ids)

        cache: dict[str, Tensor] = {}

        def score(q: Tensor, g: Tensor) -> Tensor:  # text queries q, image gallery g; the same pairs both times
            if "itm" not in cache:
                cache["itm"] = torch.cat([model.itm_logits(img_tok[g[i : i + 512]], txt_tok[q[i : i + 512]],
                                                           ids[q[i : i + 512]])
                                          for i in range(0, q.shape[0], 512)]).cpu()
            return cache["itm"]

        t2i = sim.t()  # (texts, images)
        out: dict[str, float] = {}
        for prefix, fusion in (("itm", 0.0), ("itm_fused", self.task.itm_fusion)):
            reranked = rerank_top_k(t2i, self.task.itm_top_k, score, fusion=fusion * self.scale)  # (texts, images)
            res = retrieval_from_similarity(reranked.t(), pos, directions=("t2i",))
            out.update({f"{prefix}_{k}": v for k, v in res.items()})
        return out


@register_task("clip")
class CLIPTask(Task):
    """CLIP training: batches of dicts ``image`` (B, C, H, W) in [0, 1], ``caption`` (B strings), ``label`` (B,).

    Args:
        tokenizer: Turns captions into token ids.
        mean: Image normalisation mean.
        std: Image normalisation std.
        loss: ``"clip"`` (symmetric softmax) or ``"siglip"`` (pairwise sigmoid).
        duplicate_aware: Pairs with the same label are positives (False: only the diagonal).
        itm_weight: Weight of the image-text matching loss (used when the model has the head).
        itm_top_k: How many images the ITM head re-ranks per text in evaluation (0: none).
        itm_fusion: Weight of the contrastive logit (scale x cosine similarity) added to the
            ITM logit for the fused re-ranking (``itm_fused_*`` metrics); the ``itm_*``
            metrics re-rank by the ITM logit alone.
        swap_negatives: Pair every image with its given negative caption (a batch's
            ``negative_caption``: a scene's caption with its digits exchanged) as a further
            ITM negative.
        itm_epochs: The last ``itm_epochs`` epochs of a run are the ITM phase: both towers
            frozen (run without gradients, so the optimizer leaves them bit-identical) and
            only the matching head trained, on the ITM loss alone with many negatives per
            image (:meth:`~vitlab.tasks.clip.model.CLIP.forward_itm`), positives and
            negatives weighted equally. 0: no such phase.
        itm_hard_negatives: Hardest mined negatives per image and per text in the ITM phase.
        itm_shifted_negatives: Further (random) negative texts per image in the ITM phase.
        itm_residual: In the ITM phase, train the fused score (ITM logit + ``itm_fusion`` x
            the contrastive logit) instead of the ITM logit alone: the head learns what the
            similarity misses, and the fused re-ranking uses exactly the trained score.
        prompts: Zero-shot prompts per class (the eval data's labels are the class indices);
            None: no zero-shot metric.
        augment: ``augment(images, generator)`` on [0, 1] batches ending with the normalisation
            (training only); None: normalisation only.
    """

    higher_is_better = True
    config_section = "clip"
    config_class = CLIPSection
    default_recipe = CLIP_DIGITS_RECIPE
    families = ("CLIP",)

    def __init__(self, tokenizer: CLIPTokenizer, mean: Sequence[float], std: Sequence[float], loss: str = "clip",
                 duplicate_aware: bool = True, itm_weight: float = 1.0, itm_top_k: int = 10,
                 prompts: Sequence[Sequence[str]] | None = None, augment: Any = None, itm_fusion: float = 1.0,
                 swap_negatives: bool = True, itm_epochs: int = 0, itm_hard_negatives: int = 4,
                 itm_shifted_negatives: int = 2, itm_residual: bool = False, swap_contrastive: bool = False) -> None:
        if loss not in ("clip", "siglip"):
            raise ValueError(f"unknown CLIP loss {loss!r}; choose clip or siglip")
        self.tokenizer = tokenizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.loss_name, self.duplicate_aware = loss, duplicate_aware
        self.itm_weight, self.itm_top_k = float(itm_weight), int(itm_top_k)
        self.itm_fusion, self.swap_negatives = float(itm_fusion), bool(swap_negatives)
        if swap_contrastive and loss != "clip":
            raise ValueError(f"swap_contrastive adds the digit-swapped captions to the softmax of the clip loss; "
                             f"got loss {loss!r}")
        self.swap_contrastive = bool(swap_contrastive)
        if itm_epochs < 0 or itm_hard_negatives < 0 or itm_shifted_negatives < 0:
            raise ValueError(f"itm_epochs, itm_hard_negatives and itm_shifted_negatives must be >= 0, got "
                             f"{itm_epochs}, {itm_hard_negatives} and {itm_shifted_negatives}")
        self.itm_epochs, self.itm_hard_negatives = int(itm_epochs), int(itm_hard_negatives)
        self.itm_shifted_negatives, self.itm_residual = int(itm_shifted_negatives), bool(itm_residual)
        #: Whether the current epoch belongs to the frozen-tower ITM phase (set by :meth:`start_epoch`).
        self.itm_phase = False
        self.prompts = [list(p) for p in prompts] if prompts is not None else None
        self.augment = augment
        self.primary_metric = "zero_shot_top1" if prompts is not None else "t2i_R@1"
        self.eval_model: CLIP | None = None
        self._zero_shot: Tensor | None = None

    # ------------------------------------------------------------------ batches
    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        images = resize_images(batch["image"].to(device, non_blocking=True).float(), image_size)
        if generator is not None and self.augment is not None:
            images = resize_images(self.augment(images, generator), image_size)  # ends with the normalisation
        else:
            images = normalize(images, self.mean, self.std)
        captions = list(batch["caption"])
        ids = self.tokenizer(captions).to(device)
        labels = torch.as_tensor(batch["label"]).to(device)
        inputs: tuple[Tensor, ...] = (images, ids, labels)
        if "negative_caption" in batch:  # ITM negatives in training (swap_negatives), the mirror metric in eval
            negatives = list(batch["negative_caption"])  # "" where a scene has no mirror layout
            has = torch.tensor([bool(c) for c in negatives], device=device)
            inputs += (self.tokenizer(negatives).to(device), has)
        extra: dict[str, Any] = {"captions": captions}
        if "negative_label" in batch:
            extra["negative_labels"] = torch.as_tensor(batch["negative_label"]).to(device)
        return Batch(inputs, labels, int(labels.shape[0]), extra)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Enter the frozen-tower ITM phase for the last ``itm_epochs`` epochs of the run."""
        self.itm_phase = self.itm_epochs > 0 and epoch >= epochs - self.itm_epochs

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        images, ids, labels = inputs[:3]
        if model.training:
            use = self.swap_negatives or (self.swap_contrastive and not self.itm_phase)
            negatives = inputs[3:5] if len(inputs) == 5 and use else (None, None)
            if self.itm_phase:
                return model(images, ids, labels, train_outputs=True, negative_ids=negatives[0],
                             has_negative=negatives[1], itm_only=True, hard_negatives=self.itm_hard_negatives,
                             shifted_negatives=self.itm_shifted_negatives,
                             itm_residual=self.itm_fusion if self.itm_residual else 0.0)
            return model(images, ids, labels, train_outputs=True, negative_ids=negatives[0],
                         has_negative=negatives[1], itm_negatives=self.swap_negatives,
                         negative_emb=self.swap_contrastive)
        # evaluation: the unwrapped model; tokens for ITM re-ranking, the zero-shot classifier once
        self.eval_model = model
        img, img_tok = model.image_features(images)
        txt, txt_tok = model.text_features(ids)
        out: dict[str, Any] = {"image_emb": nn.functional.normalize(img, dim=-1),
                               "text_emb": nn.functional.normalize(txt, dim=-1), "scale": model.scale(),
                               "bias": model.logit_bias}
        if model.itm is not None and self.itm_top_k:
            out.update(image_tokens=img_tok, text_tokens=txt_tok)
        if len(inputs) == 5:  # mirror captions: how often the own caption beats its mirror
            m_emb, m_tok = model.text_features(inputs[3])
            out.update(mirror_emb=nn.functional.normalize(m_emb, dim=-1), has_mirror=inputs[4])
            if "image_tokens" in out:
                out.update(mirror_tokens=m_tok, mirror_ids=inputs[3])
        if self.prompts is not None:
            if self._zero_shot is None:
                self._zero_shot = zero_shot_classifier_from_prompts(model, self.tokenizer, self.prompts)
            out["zero_shot"] = self._zero_shot
        return out

    # --------------------------------------------------------------------- loss
    def contrastive(self, outputs: dict[str, Any], labels: Tensor, negative_labels: Tensor | None = None) -> Tensor:
        """The contrastive (or SigLIP) loss of the global batch: features gathered from every rank.

        With ``negative_emb`` in the outputs (``swap_contrastive``), each image's digit-swapped
        caption joins the image->text softmax as a further candidate (NegCLIP's hard negative; a
        positive of any image whose layout it describes, with ``negative_labels`` and
        duplicate-aware targets)."""
        img = gather_with_grad(outputs["image_emb"])
        txt = gather_with_grad(outputs["text_emb"])
        groups = gather_no_grad(labels) if self.duplicate_aware else None
        if "negative_emb" in outputs:
            keep = gather_no_grad(outputs["negative_keep"].long()).bool()
            neg = gather_with_grad(outputs["negative_emb"])[keep]
            neg_groups = None
            if groups is not None and negative_labels is not None:
                neg_groups = gather_no_grad(negative_labels)[keep]
            return clip_loss(img, txt, outputs["scale"], groups, negative_text_emb=neg,
                             negative_text_labels=neg_groups)
        if self.loss_name == "siglip":
            if outputs["bias"] is None:
                raise ValueError("the SigLIP loss needs a model with a logit bias (CLIPConfig.logit_bias)")
            return siglip_loss(img, txt, outputs["scale"], outputs["bias"], groups)
        return clip_loss(img, txt, outputs["scale"], groups)

    def loss(self, batch: Batch, outputs: Any) -> Tensor:
        if self.itm_phase:  # the towers are frozen: the matching head's loss alone
            return itm_loss(outputs["itm_logits"], outputs["itm_targets"], balanced=True)
        loss = self.contrastive(outputs, batch.targets, batch.extra.get("negative_labels"))
        if "itm_logits" in outputs and self.itm_weight:
            loss = loss + self.itm_weight * itm_loss(outputs["itm_logits"], outputs["itm_targets"])
        return loss

    def after_step(self, model: nn.Module) -> None:
        """Clamp the temperature (CLIP's log-scale at most log 100) after every optimizer step."""
        model.clamp_logit_scale_()

    # ------------------------------------------------------------------ metrics
    def train_metrics(self) -> Metrics:
        return NoMetrics()

    def eval_metrics(self) -> Metrics:
        self._zero_shot = None  # the classifier of the model being evaluated, computed on its first batch
        return CLIPEvalMetrics(self)

    def format_metric(self, name: str, value: float) -> str:
        if name in ("zero_shot_top1", "mirror_acc", "itm_mirror_acc") or "R@" in name:
            return f"{name} {100 * value:.2f}%"
        return super().format_metric(name, value)

    def plots(self, out_dir: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
        files: list[Path] = []
        if final is not None and final.get("similarity") is not None:
            files.append(plot_similarity(final["similarity"], final["similarity_captions"],
                                         Path(out_dir) / "similarity_matrix.png"))
        return files

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSetup:
        """Datasets, tokenizer (a BPE trained on the training captions), model and task from a ``TrainConfig``."""
        opts = dict(cfg.model.overrides)
        moved = sorted(k for k in opts if k in CLIP_OPTIONS)
        if moved:
            raise ValueError(f"model.overrides.{moved[0]} is a CLIP option: set it in the clip section "
                             f"(clip.{moved[0]}=...); model.overrides holds the image tower's options only")
        clip = {k: v for k, v in dataclasses.asdict(cfg.clip).items() if v is not None}
        dataset = str(cfg.data.dataset)
        aug = cfg.augment
        augment = None
        prompts = None
        if dataset == "digits":
            per_image = int(clip.get("captions_per_image", 4))
            train = DigitCaptions("train", captions_per_image=per_image, seed=cfg.seed)
            val, test = DigitCaptions("val", seed=cfg.seed), DigitCaptions("test", seed=cfg.seed)
            size = 8
            prompts = digit_prompts()
            if aug.affine_p > 0:
                from ...datasets.augment import Compose, Normalize, RandomAffine

                augment = Compose([RandomAffine(aug.affine_degrees, aug.affine_translate, tuple(aug.affine_scale),
                                                aug.affine_shear, fill=0.0, p=aug.affine_p),
                                   Normalize(train.mean, train.std)])
            default_itm, context = 0, 16
        elif dataset == "digit_scenes":
            # no augmentation for scenes: a flip or crop would change "left of" / "above" in the captions
            n = int(clip.get("num_scenes", 4000))
            canvas = int(clip.get("canvas_size", 24))
            dsize = tuple(int(v) for v in clip.get("digit_size", (8, 11)))
            converse = float(clip.get("converse", 0.5))
            train = SceneCaptions("train", n, canvas, dsize, converse=converse, seed=cfg.seed)
            n_eval = int(clip.get("eval_scenes", max(n // 4, 1)))
            if n < 1 or n_eval < 1:
                raise ValueError(f"num_scenes and eval_scenes must be >= 1, got {n} and {n_eval}")
            val = SceneCaptions("val", n_eval, canvas, dsize, converse=converse, seed=cfg.seed)
            test = SceneCaptions("test", n_eval, canvas, dsize, converse=converse, seed=cfg.seed)
            size, default_itm, context = canvas, 1, 16
        else:
            size = int(cfg.data.image_size or 224)
            channels = int(opts.get("in_channels", 3))
            train = CaptionFolder(dataset, split="train", image_size=size, channels=channels, seed=cfg.seed)
            val = CaptionFolder(dataset, split="val", image_size=size, channels=channels, seed=cfg.seed)
            test = None
            if len(val) == 0:
                val = None
            default_itm, context = 0, 32
        cfg.data.image_size = size
        context = int(clip.get("context_length", context))
        tokenizer = CLIPTokenizer.train(train.corpus(), vocab_size=int(clip.get("vocab_size", 256)),
                                        context_length=context)
        loss = str(clip.get("loss", "clip"))
        siglip = loss == "siglip"
        text = text_config(str(clip.get("text", "clip_text_tiny")), vocab_size=tokenizer.vocab_size,
                           context_length=context, **dict(clip.get("text_overrides", {})))
        image_overrides = {**opts, "image_size": size, "in_channels": int(train[0]["image"].shape[0])}
        config = CLIPConfig(image_model=cfg.model.name, image_overrides=image_overrides, text=text,
                            embed_dim=int(clip.get("embed_dim", 64)),
                            init_logit_scale=float(clip.get("init_logit_scale", 10.0 if siglip else 1 / 0.07)),
                            logit_bias=float(clip.get("init_logit_bias", -10.0)) if siglip else None,
                            itm_depth=int(clip.get("itm_depth", default_itm)), itm_heads=int(clip.get("itm_heads", 2)),
                            itm_image_pos=bool(clip.get("itm_image_pos", False)))
        model = CLIP(config)
        model.itm_lr_scale = float(clip.get("itm_lr_scale", 1.0))
        itm_epochs = int(clip.get("itm_epochs", 0))
        if itm_epochs and model.itm is None:
            raise ValueError(f"itm_epochs: {itm_epochs} trains the image-text matching head, but this model has none; "
                             "set itm_depth >= 1")
        if itm_epochs >= int(cfg.epochs):
            raise ValueError(f"itm_epochs ({itm_epochs}) must be fewer than epochs ({cfg.epochs}): the towers train "
                             "contrastively before the ITM phase freezes them")
        if itm_epochs and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("itm_epochs is not supported under DDP: the frozen towers get no gradients; "
                             "train the ITM phase in one process")
        model.pretrained_cfg = {"task": "clip", "input_size": [train[0]["image"].shape[0], size, size],
                                "mean": list(train.mean), "std": list(train.std), "crop_pct": 1.0,
                                "interpolation": "bilinear", "dataset": dataset, "tokenizer": tokenizer.to_dict(),
                                "templates": list(DIGIT_TEMPLATES) if dataset == "digits" else ["{}"]}
        if dataset == "digit_scenes":
            model.pretrained_cfg["scenes"] = {"canvas_size": size, "digit_size": list(dsize), "converse": converse}
        task = cls(tokenizer, train.mean, train.std, loss=loss, duplicate_aware=bool(clip.get("duplicate_aware", True)),
                   itm_weight=float(clip.get("itm_weight", 1.0)), itm_top_k=int(clip.get("itm_top_k", 10)),
                   prompts=prompts, augment=augment, itm_fusion=float(clip.get("itm_fusion", 1.0)),
                   swap_negatives=bool(clip.get("swap_negatives", True)), itm_epochs=itm_epochs,
                   itm_hard_negatives=int(clip.get("itm_hard_negatives", 4)),
                   itm_shifted_negatives=int(clip.get("itm_shifted_negatives", 2)),
                   itm_residual=bool(clip.get("itm_residual", False)),
                   swap_contrastive=bool(clip.get("swap_contrastive", False)))
        return TaskSetup(task, model, train, val, test)


__all__ = ["CLIPSection", "CLIPTask", "CLIP_DIGITS_RECIPE", "CLIPEvalMetrics"]
