"""The artifacts register tokens remove (Darcet et al., 2024, "Vision Transformers Need Registers").

Large ViTs trained long enough recycle a few low-information background patches as storage for
global information: those patch tokens get a much higher norm than the rest at the output of
the model, and the class token's attention map concentrates on them. Register tokens
(``reg_tokens=R``) give the model R extra tokens for that, and the artifacts go away. This
module measures both symptoms on any vitlab model through the backbone contract and the
attention capture the explainability tools use (:func:`~vitlab.evaluation.interpretation.capture_layers`,
:func:`~vitlab.evaluation.interpretation.feature_points`):

* :func:`token_norms` / :func:`outlier_stats`: the L2 norm of every token of the last block's
  output (before the final norm, as in the paper's Fig. 3), patch tokens and prefix tokens
  apart, and the share of patch tokens above an outlier threshold;
* :func:`attention_shares` / :func:`cls_attention_stats`: where the class token's attention in
  the last block goes (itself, the registers, the patches) and how concentrated its patch
  attention is (mass on the top 1% of patches, entropy);
* :func:`register_report` bundles both for one model and :func:`plot_register_comparison`
  draws a model without and one with registers side by side.

The outlier threshold. Darcet et al. cut at an absolute norm (150 for DINOv2 ViT-g) read off a
clearly bimodal histogram; absolute norms depend on the model's width and training, so the
default here is relative to the distribution itself: ``median + k * 1.4826 * MAD`` (k = 3), the
robust form of ``mean + 3 std`` (for a normal distribution the two agree; 0.13% of tokens lie
above). The robust form is used because the outliers themselves inflate the mean and the
standard deviation: with a tenth of the tokens at ten times the typical norm, ``mean + 3 std``
reaches their norm and flags none of them. Either relative cut also flags the tail of a
distribution that is merely wide or bimodal without any artifact (on digits: empty background
patches against stroke patches), so read ``outlier_share`` with ``max_over_median`` and the
histogram: artifacts show as a separate mode far out (``max_over_median`` well above 2). ``threshold="std"`` gives ``mean + k std``; a number is an absolute cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..components.layout import Segment
from .figures import save_figure
from .interpretation import capture_layers, eval_mode, feature_points
from .layouts import require_attention

__all__ = [
    "RegisterReport", "TokenNorms", "attention_shares", "cls_attention_stats", "outlier_stats", "outlier_threshold",
    "plot_register_comparison", "register_report", "report_table", "token_norms",
]

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class TokenNorms:
    """L2 norms of one block's output tokens.

    Attributes:
        patch: (B, N) norms of the patch tokens, raster order.
        prefix: (B, P) norms of the prefix tokens (class, registers), in order.
        prefix_names: Names of the prefix tokens (``cls``, ``reg0`` ...).
        grid: (rows, columns) of the patch tokens.
        label: The block (``block 4``).
    """

    patch: Tensor
    prefix: Tensor
    prefix_names: list[str]
    grid: tuple[int, int]
    label: str


def token_norms(model: nn.Module, x: Tensor) -> TokenNorms:
    """Norms of the tokens the model's last block outputs, before the final norm.

    The block is the deepest feature point the explainability tools know (its module and
    prefix count come from the model's ``token_layout``), read with a forward hook.

    Args:
        model: A vitlab ViT-like model whose last feature point outputs tokens (B, P + N, C).
        x: Prepared images (B, C, H, W).

    Raises:
        ValueError: A model whose last feature point is a (B, C, H, W) map (no prefix tokens to tell apart).
    """
    size = tuple(x.shape[-2:])
    point = feature_points(model, size)[-1]
    if point.prefix is None:
        raise ValueError(f"{type(model).__name__}'s last feature point ({point.label}) outputs a map, not tokens; "
                         "token norms need a ViT-like model with a token sequence")
    names = [s.key[0] for s in model.token_layout(size).attention[-1].queries if not s.is_grid]
    seen: list[Tensor] = []
    handle = point.module.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple)
                                                                               else out))
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        handle.remove()
    tokens = seen[-1].float()  # (B, P + N, C)
    grid = point.grid.shape if point.grid is not None else None
    norms = tokens.norm(dim=-1)  # (B, P + N)
    p = point.prefix
    if grid is None or norms.shape[1] - p != grid[0] * grid[1]:
        raise ValueError(f"the output of {point.label} has {norms.shape[1]} tokens, expected {p} prefix tokens and "
                         f"a {grid} grid")
    return TokenNorms(norms[:, p:], norms[:, :p], names[:p], tuple(grid), point.label)


def outlier_threshold(norms: Tensor, threshold: str | float = "mad", k: float = 3.0) -> float:
    """The norm above which a token counts as a high-norm outlier.

    Args:
        norms: Token norms, any shape (pooled over all of them).
        threshold: ``"mad"`` (``median + k * 1.4826 * MAD``, the default, robust to the outliers
            themselves), ``"std"`` (``mean + k * std``) or an absolute norm.
        k: Spread multiplier for the relative thresholds.
    """
    v = norms.detach().float().flatten()
    if v.numel() == 0:
        raise ValueError("no token norms given")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return float(threshold)
    if threshold == "mad":
        med = v.median()
        mad = (v - med).abs().median()
        return float(med + k * MAD_TO_STD * mad)
    if threshold == "std":
        return float(v.mean() + k * v.std(unbiased=False))
    raise ValueError(f"threshold must be 'mad', 'std' or a number (an absolute norm), got {threshold!r}")


def outlier_stats(norms: Tensor, threshold: str | float = "mad", k: float = 3.0) -> dict[str, float]:
    """Summary of a token-norm distribution and its high-norm outliers.

    Returns:
        ``threshold``, ``outliers`` (count), ``outlier_share`` (fraction of tokens above),
        ``mean``, ``std``, ``median``, ``max`` and ``max_over_median`` (the largest norm over the
        median: about 1-2 without artifacts, far more with them).
    """
    v = norms.detach().float().flatten()
    cut = outlier_threshold(v, threshold, k)
    above = int((v > cut).sum())
    med = float(v.median())
    return dict(threshold=cut, outliers=above, outlier_share=above / v.numel(), mean=float(v.mean()),
                std=float(v.std(unbiased=False)), median=med, max=float(v.max()),
                max_over_median=float(v.max()) / med if med > 0 else math.inf)


def _offsets(segments: Sequence[Segment]) -> list[tuple[Segment, int]]:
    """Each segment with its first index in the sequence."""
    out, start = [], 0
    for s in segments:
        out.append((s, start))
        start += s.size
    return out


def attention_shares(probs: Tensor, queries: Sequence[Segment], keys: Sequence[Segment], query: str = "cls",
                     top_fraction: float = 0.01) -> dict[str, Any]:
    """Where one prefix token's attention goes, averaged over heads and images.

    Args:
        probs: (B, heads, N_query, N_key) attention probabilities.
        queries: The query sequence's segments (one per prefix token, one grid).
        keys: The key sequence's segments.
        query: Name of the asking prefix token (``cls``, ``reg0`` ...).
        top_fraction: The share of patches whose attention mass ``top_mass`` sums.

    Returns:
        ``to_registers``, ``to_patches``, ``to_self`` (its own key), ``to_other_prefix``: mass
        (sums to 1); ``top_mass``: the fraction of the patch attention on the top
        ``ceil(top_fraction * N)`` patches (mean over images); ``entropy`` (nats) and
        ``entropy_ratio`` (over log N: 1 is uniform) of the patch attention renormalised
        to 1; ``patch_map``: (B, rows, columns) the patch attention (not renormalised).

    Raises:
        ValueError: No such query, or a key sequence without exactly one patch grid.
    """
    q_index = {s.key[0]: start for s, start in _offsets(queries) if not s.is_grid}
    if query not in q_index:
        raise ValueError(f"no query token {query!r} in this layer; its prefix tokens are {sorted(q_index)}")
    grids = [(s, start) for s, start in _offsets(keys) if s.is_grid]
    if len(grids) != 1:
        raise ValueError(f"expected one patch grid among the keys, got {len(grids)}")
    row = probs[:, :, q_index[query]].float().mean(dim=1)  # (B, heads, N_key) -> (B, N_key)
    mass = {"reg": row.new_zeros(row.shape[0]), "self": row.new_zeros(row.shape[0]),
            "other": row.new_zeros(row.shape[0])}
    for s, start in _offsets(keys):
        if s.is_grid:
            continue
        name = s.key[0]
        kind = "self" if name == query else "reg" if name.startswith("reg") else "other"
        mass[kind] = mass[kind] + row[:, start]
    seg, start = grids[0]
    grid = seg.grid
    patch = row[:, start: start + grid.size]  # (B, N)
    to_patches = patch.sum(dim=1)
    dist = patch / to_patches.clamp_min(1e-12)[:, None]  # (B, N), rows sum to 1
    top = max(1, math.ceil(top_fraction * grid.size))
    top_mass = dist.topk(top, dim=1).values.sum(dim=1)
    entropy = -torch.special.xlogy(dist, dist).sum(dim=1)
    n = grid.size
    return dict(
        to_registers=float(mass["reg"].mean()), to_patches=float(to_patches.mean()),
        to_self=float(mass["self"].mean()), to_other_prefix=float(mass["other"].mean()),
        top_mass=float(top_mass.mean()), top_patches=top, entropy=float(entropy.mean()),
        entropy_ratio=float(entropy.mean()) / math.log(n) if n > 1 else 0.0,
        patch_map=patch.reshape(patch.shape[0], *grid.shape),  # (B, N) -> (B, rows, columns)
    )


def cls_attention_stats(model: nn.Module, x: Tensor, query: str = "cls", layer: int = -1,
                        top_fraction: float = 0.01) -> dict[str, Any]:
    """:func:`attention_shares` of ``query``'s attention in one attention layer (default: the last).

    The attention is recorded with the explainability tools' capture (explicit path, eval mode).

    Raises:
        ValueError: A model without attention, or without the query token (a mean-pooled model
            has no ``cls``: ask a register, ``query="reg0"``).
    """
    require_attention(model)
    layers, _ = capture_layers(model, x)
    chosen = layers[layer]
    out = attention_shares(chosen.probs, chosen.queries, chosen.keys, query, top_fraction)
    out["layer"] = chosen.label
    return out


@dataclass
class RegisterReport:
    """The artifact metrics of one model on one batch (see :func:`register_report`)."""

    name: str
    num_registers: int
    norms: TokenNorms
    outliers: dict[str, float]
    attention: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The numbers (no tensors but the prefix tokens' mean norms), for JSON."""
        prefix = {n: float(self.norms.prefix[:, i].mean()) for i, n in enumerate(self.norms.prefix_names)}
        att = {k: v for k, v in self.attention.items() if k != "patch_map"}
        return dict(name=self.name, registers=self.num_registers, patch_norms=self.outliers,
                    prefix_norms=prefix, cls_attention=att, **self.extra)


def register_report(model: nn.Module, x: Tensor, name: str = "model", threshold: str | float = "mad",
                    k: float = 3.0, query: str = "cls", top_fraction: float = 0.01) -> RegisterReport:
    """Token norms, their outliers and the class token's attention of ``model`` on ``x``.

    Args:
        model: A vitlab ViT-like model (with or without ``reg_tokens``).
        x: Prepared images (B, C, H, W).
        name: Label in plots and reports.
        threshold, k: See :func:`outlier_threshold`.
        query, top_fraction: See :func:`attention_shares`.
    """
    norms = token_norms(model, x)
    registers = sum(1 for n in norms.prefix_names if n.startswith("reg"))
    return RegisterReport(name, registers, norms, outlier_stats(norms.patch, threshold, k),
                          cls_attention_stats(model, x, query, top_fraction=top_fraction))


def _pyplot() -> Any:
    from ..tasks.plots import _pyplot as plt

    return plt()


def plot_register_comparison(reports: Sequence[RegisterReport], image_index: int = 0,
                             images: Tensor | None = None, save_to: str | Path | None = None,
                             title: str = "Register tokens and the high-norm artifacts") -> Any:
    """Norm histograms and class-token attention maps of models side by side.

    Row 1: the patch-token norm histograms of all models overlaid (log count), each model's
    outlier threshold as a dashed line, and a bar chart of the class token's attention mass
    (to itself, the registers, the patches). Row 2: each model's class-token attention over
    the patches of image ``image_index`` (with ``images``, the image itself first).

    Args:
        reports: One :class:`RegisterReport` per model (e.g. without and with registers).
        image_index: Which image of the batch the attention maps show.
        images: The (B, C, H, W) batch, to draw the image next to the maps (min-max scaled).
        save_to: Write a PNG there (the figure is closed); else return the figure.
        title: Figure title.

    Returns:
        The figure, or the path written with ``save_to``.
    """
    if not reports:
        raise ValueError("give at least one RegisterReport")
    plt = _pyplot()
    cols = max(2, len(reports) + (images is not None))
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.5), squeeze=False)
    fig.suptitle(title)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = max(float(r.norms.patch.max()) for r in reports)
    bins = torch.linspace(0, top * 1.02, 41).tolist()
    for i, r in enumerate(reports):
        c = colors[i % len(colors)]
        ax.hist(r.norms.patch.flatten().tolist(), bins=bins, alpha=0.5, color=c,
                label=f"{r.name}: {100 * r.outliers['outlier_share']:.2f}% outliers")
        ax.axvline(r.outliers["threshold"], color=c, linestyle="--", label=f"{r.name} threshold")
    ax.set_yscale("log")
    ax.set_xlabel(f"patch token L2 norm ({reports[0].norms.label} output)")
    ax.set_ylabel("tokens (log)")
    ax.set_title("patch token norms")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    parts = (("to_self", "class token"), ("to_registers", "registers"), ("to_patches", "patches"))
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(parts))]
        ax.bar(xs, [r.attention[k] for k, _ in parts], width, color=colors[i % len(colors)], label=r.name)
    ax.set_xticks(range(len(parts)), [p for _, p in parts])
    ax.set_ylim(0, 1)
    ax.set_xlabel("attention target")
    ax.set_ylabel("class-token attention mass")
    ax.set_title(f"class-token attention ({reports[0].attention.get('layer', 'last block')})")
    ax.legend(fontsize=7)
    for ax in axes[0][2:]:
        ax.axis("off")
    row = list(axes[1])
    if images is not None:
        img = images[image_index].detach().float()
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
        ax = row.pop(0)
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        ax.set_title(f"input image {image_index}")
        ax.set_xlabel("pixel column")
        ax.set_ylabel("pixel row")
    for ax, r in zip(row, reports):
        m = r.attention["patch_map"][image_index]
        im = ax.imshow(m.numpy(), cmap="inferno")
        fig.colorbar(im, ax=ax, fraction=0.046, label="attention")
        ax.set_title(f"{r.name}: cls -> patches\n(top {r.attention['top_patches']} patch: "
                     f"{100 * r.attention['top_mass']:.1f}%, entropy {r.attention['entropy_ratio']:.2f} of max)",
                     fontsize=9)
        ax.set_xlabel("patch column")
        ax.set_ylabel("patch row")
    for ax in row[len(reports):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, save_to) if save_to is not None else fig


def report_table(reports: Mapping[str, RegisterReport] | Sequence[RegisterReport]) -> str:
    """A markdown table of the main numbers of each report."""
    items = list(reports.values()) if isinstance(reports, Mapping) else list(reports)
    lines = ["| model | registers | patch norm median | max/median | outlier share | cls->registers | "
             "cls->patches | top-1% patch mass | entropy / max |", "|---|---|---|---|---|---|---|---|---|"]
    for r in items:
        o, a = r.outliers, r.attention
        lines.append(f"| {r.name} | {r.num_registers} | {o['median']:.2f} | {o['max_over_median']:.2f} | "
                     f"{100 * o['outlier_share']:.2f}% | {a['to_registers']:.3f} | {a['to_patches']:.3f} | "
                     f"{100 * a['top_mass']:.1f}% | {a['entropy_ratio']:.3f} |")
    return "\n".join(lines)

