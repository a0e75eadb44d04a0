"""What every vitlab backbone shares: the contract's plumbing, not any architecture."""

from __future__ import annotations

import dataclasses
import re
from abc import ABCMeta, abstractmethod
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from ..components import LearnedPosEmbed, TokenLayout, checkpoint_seq, tokens_to_map

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def pretrained_cfg(
    input_size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    crop_pct: float = 0.9,
    interpolation: str = "bicubic",
    hub_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Preprocessing and weight-source metadata that travels with a model and its checkpoints."""
    return dict(
        input_size=input_size, mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
        interpolation=interpolation, hub_id=hub_id, **extra,
    )


def init_linears(module: nn.Module, std: float = 0.02) -> None:
    """timm's default init of every ``nn.Linear`` in ``module``: truncated normal weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def classifier_head(in_features: int, num_classes: int) -> nn.Module:
    """A fresh linear classifier (initialised like :func:`init_linears`), or Identity for 0 classes."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes == 0:
        return nn.Identity()
    head = nn.Linear(in_features, num_classes)
    init_linears(head)
    return head


def resolve_indices(indices: int | Sequence[int] | None, n: int) -> list[int]:
    """Block indices for ``forward_intermediates``: None = all, an int k = the last k, else a list.

    Negative indices count from the end. Raises ValueError on an index out of range.
    """
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"asked for the last {indices} blocks but the model has {n}")
        return list(range(n - indices, n))
    out = []
    for i in indices:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"block index {i} is out of range for a model with {n} blocks (valid: {-n}..{n - 1})")
        out.append(j)
    return sorted(set(out))


def config_errors(
    config: Any,
    positive: Sequence[str] = (),
    rates: Sequence[str] = (),
    checks: Sequence[tuple[bool, str]] = (),
) -> list[str]:
    """Every problem with a model config's values, as messages (the one validation helper).

    Args:
        config: The config dataclass (its ``__post_init__`` calls this).
        positive: Fields that must be > 0 (a tuple field: every entry).
        rates: Fields that must lie in [0, 1) (dropout and drop-path rates).
        checks: Family-specific ``(ok, message)`` pairs; a message is kept where ``ok`` is False.

    ``num_classes`` must be >= 0 in every config.
    """
    errors = []
    for name in positive:
        v = getattr(config, name)
        if any(x <= 0 for x in (v if isinstance(v, (tuple, list)) else (v,))):
            errors.append(f"{name} must be positive, got {v}")
    if getattr(config, "num_classes", 0) < 0:
        errors.append(f"num_classes must be >= 0, got {config.num_classes}")
    for name in rates:
        if not 0.0 <= getattr(config, name) < 1.0:
            errors.append(f"{name} must be in [0, 1), got {getattr(config, name)}")
    errors += [message for ok, message in checks if not ok]
    return errors


def raise_config_errors(config: Any, errors: Sequence[str]) -> None:
    """Raise one ValueError naming the config class and every problem, when there are any."""
    if errors:
        raise ValueError(f"invalid {type(config).__name__}: " + "; ".join(errors))


def check_config(
    config: Any,
    positive: Sequence[str] = (),
    rates: Sequence[str] = (),
    checks: Sequence[tuple[bool, str]] = (),
) -> None:
    """:func:`config_errors` then :func:`raise_config_errors`."""
    raise_config_errors(config, config_errors(config, positive, rates, checks))


@runtime_checkable
class BackboneConfig(Protocol):
    """What every model config has (each family's frozen dataclass adds its own fields)."""

    image_size: Any  # int or (H, W); stored as (H, W)
    in_channels: int
    num_classes: int


#: ``group_matcher()`` data: ``stem`` (regex) and ``blocks``, a list of ``(regex, key)``;
#: see :func:`resolve_layer_ids`.
GroupMatcher = dict[str, Any]
OutputFormat = Literal["NCHW", "NLC"]
#: What ``collect_intermediates`` returns: final features (or None) and one map (B, C, h, w) per index.
IntermediateResult = tuple[Tensor | None, list[Tensor]]


def map_on_path(tokens: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """Split tokens into a feature map and tokens rebuilt from that map, to continue the forward with.

    The rebuilt tokens are ``[prefix tokens, map flattened back]``: the same values (a pure
    reshape and concatenation), but everything computed from them downstream, the final
    features and logits included, depends on the returned map tensor, so gradients of the
    logits with respect to the map exist (Grad-CAM, dense tasks).

    Args:
        tokens: (B, P + h*w, C) tokens, prefix tokens first.
        grid: The token grid (h, w).
        num_prefix_tokens: P.

    Returns:
        ``(tokens (B, P + h*w, C) rebuilt from the map, map (B, C, h, w))``.
    """
    fmap = tokens_to_map(tokens, grid, num_prefix_tokens)  # (B, P + h*w, C) -> (B, C, h, w)
    grid_tokens = fmap.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
    if num_prefix_tokens:
        return torch.cat([tokens[:, :num_prefix_tokens], grid_tokens], dim=1), fmap  # (B, P + h*w, C)
    return grid_tokens, fmap


class MapTap:
    """Collects ``collect_intermediates``' maps while the forward continues through them.

    Call it on the tokens after every block (or stage) with that point's ``feature_info``
    index; for a requested index it returns tokens rebuilt from the map (:func:`map_on_path`),
    otherwise the tokens unchanged.

    Args:
        take: The requested ``feature_info`` indices.
        norm: For an index, the norm to apply to the returned map's tokens (``norm=True``), or
            None. A normed map is a side branch: the forward continues with the un-normed tokens,
            so gradients flow through the maps only with ``norm=False``.
    """

    def __init__(self, take: Sequence[int], norm: Any = None) -> None:
        self.take = list(take)
        self.norm = norm
        self.maps: dict[int, Tensor] = {}

    def __call__(self, index: int, tokens: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
        if index not in self.take:
            return tokens
        tokens, fmap = map_on_path(tokens, tuple(grid), num_prefix_tokens)
        norm = self.norm(index) if self.norm is not None else None
        self.maps[index] = fmap if norm is None else tokens_to_map(norm(tokens), tuple(grid), num_prefix_tokens)
        return tokens

    def result(self) -> list[Tensor]:
        """The maps in ``take`` order."""
        return [self.maps[i] for i in self.take]


def resolve_layer_ids(names: Sequence[str], matcher: GroupMatcher) -> tuple[dict[str, int], int]:
    """Depth ids for layer-wise lr decay from a model's ``group_matcher()`` (the one resolver).

    A parameter matching ``matcher["stem"]`` gets id 0. Otherwise the first ``(regex, key)`` of
    ``matcher["blocks"]`` that matches gives it the sort key ``key + groups``: the fixed tuple
    ``key`` followed by the regex's captured integers (a group that did not take part counts
    as 0); shorter keys are padded with zeros, so ``(s,)`` (a stage's embedding) ties with
    ``(s, 0)`` (its first block). The distinct sort keys, in order, get ids 1, 2, ...; parameters no regex matches
    (final norm, pooling norm, pre-logits, classifier) get the last id.

    Returns:
        ``{name: id}`` and the number of ids.
    """
    stem = re.compile(matcher["stem"]) if matcher.get("stem") else None
    rules = [(re.compile(rx), tuple(key or ())) for rx, key in matcher.get("blocks", ())]
    keys: dict[str, tuple[int, ...] | None] = {}
    for name in names:
        if stem is not None and stem.match(name):
            keys[name] = ()
            continue
        keys[name] = None
        for rx, key in rules:
            m = rx.match(name)
            if m:
                keys[name] = key + tuple(int(g) if g is not None else 0 for g in m.groups())
                break
    width = max((len(k) for k in keys.values() if k), default=0)
    padded = {n: None if k is None else k + (0,) * (width - len(k)) for n, k in keys.items()}  # (s,) ties (s, 0)
    order = sorted({k for n, k in padded.items() if keys[n]})
    rank = {k: i + 1 for i, k in enumerate(order)}
    last = len(order) + 1
    ids = {n: 0 if keys[n] == () else (rank[k] if k is not None else last) for n, k in padded.items()}
    return ids, last + 1


def _route_pos_embed_keys(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load pre-hook of every backbone (see :meth:`LearnedPosEmbed.route_state_dict_keys`)."""
    LearnedPosEmbed.route_state_dict_keys(module, state_dict, prefix)


class Backbone(nn.Module, metaclass=ABCMeta):
    """Abstract base class of every registered model: the backbone contract (DESIGN.md section 3).

    A family implements ``forward_features``, ``forward_head``, ``collect_intermediates``,
    ``group_matcher`` and ``token_layout`` and sets ``config``, ``num_features`` and
    ``feature_info``. This class supplies ``forward``, the classifier (``get_classifier``,
    ``reset_classifier``), grad checkpointing (``set_grad_checkpointing``, ``run_checkpointed``),
    ``no_weight_decay``, the layer ids resolved from ``group_matcher``, ``forward_intermediates``
    (index resolution and output format around the family's ``collect_intermediates``) and the
    checkpoint adaptation hook.
    """

    family: str = ""
    #: The task a checkpoint of this model is loaded for (``meta["task"]``).
    task: str = "classification"
    #: Parameter names (or last name parts) excluded from weight decay besides norms and biases.
    no_weight_decay_names: tuple[str, ...] = ()
    #: Attributes holding the classifier(s) that ``reset_classifier`` replaces.
    classifier_names: tuple[str, ...] = ("head",)
    #: Attributes of every module ``forward_head`` uses (pooling norm, pre-logits, classifiers).
    head_names: tuple[str, ...] = ("head",)

    config: BackboneConfig
    num_features: int
    feature_info: list[dict[str, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.pretrained_cfg: dict[str, Any] = pretrained_cfg()
        self.model_name: str | None = None
        # learned position embeddings keep timm's flat keys (``pos_embed``): route them to their module
        self.register_load_state_dict_pre_hook(_route_pos_embed_keys)

    # ----------------------------------------------------------------- the family's part
    @abstractmethod
    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, N, C) or a map (B, C, h, w), before pooling.

        Args:
            x: Images.
            mask: (B, N) booleans marking patches to hide (MAE / SimMIM); None for none.
        """

    @abstractmethod
    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``forward_features``' output -> logits (or the pooled pre-logit features)."""

    @abstractmethod
    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """The family's part of :meth:`forward_intermediates`.

        Args:
            x: Images (B, C, H, W).
            take: Sorted ``feature_info`` indices to return.
            norm: Apply the final norm to the returned maps (where it fits their width).
            stop_early: Stop after the deepest index in ``take`` (the final features are not needed).

        Returns:
            The final features (``forward_features``' output; None when ``stop_early``) and, per
            index in ``take``, its map (B, C, h, w). Each map (without ``norm``) lies on the
            forward path: the computation after it, the final features included, takes its
            input from the map tensor itself (see :class:`MapTap`), so the logits
            ``forward_head(final)`` can be differentiated with respect to it.
        """

    @abstractmethod
    def group_matcher(self) -> GroupMatcher:
        """Layer groups as data (see :func:`resolve_layer_ids`): ``stem`` and ``blocks`` regexes."""

    @abstractmethod
    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """Where the tokens of every attention layer and feature map lie on an image of this size."""

    # ----------------------------------------------------------------- shared plumbing
    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits."""
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def run_checkpointed(self, fn: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``fn(x, *args, **kwargs)``, under activation checkpointing when it is on and training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_seq(fn, x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: every learned position embedding
        (:class:`~vitlab.components.LearnedPosEmbed`) and ``no_weight_decay_names`` (tokens, tables)."""
        names = {n for n, _ in self.named_parameters()}
        skip = {n for n in names if n.split(".")[-1] in self.no_weight_decay_names or n in self.no_weight_decay_names}
        return skip | {f"{m}.weight" for m, module in self.named_modules() if isinstance(module, LearnedPosEmbed)}

    def get_classifier(self) -> nn.Module:
        """The classifier: the head module, or (several heads) a ModuleDict of them by attribute."""
        if len(self.classifier_names) == 1:
            return getattr(self, self.classifier_names[0])
        return nn.ModuleDict({n: getattr(self, n) for n in self.classifier_names})

    def new_classifier(self, name: str, num_classes: int) -> nn.Module:
        """A fresh classifier for attribute ``name`` (default: linear from ``num_features``)."""
        return classifier_head(self.num_features, num_classes)

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        """Replace the classifier(s) with fresh ones for ``num_classes`` outputs (0: no head).

        Args:
            num_classes: New number of outputs.
            pool: Optionally a new read-out (``"cls"`` or ``"mean"``) for families with a ``pool`` field.

        Raises:
            ValueError: A negative ``num_classes`` or a read-out the model cannot use.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        changes: dict[str, Any] = dict(num_classes=num_classes)
        if pool is not None:
            if not hasattr(self.config, "pool"):
                raise ValueError(f"{type(self).__name__} has no choice of read-out; reset_classifier takes no pool")
            changes["pool"] = pool
        self.config = dataclasses.replace(self.config, **changes)  # validated by the config
        ref = next(self.parameters(), None)
        for name in self.classifier_names:
            head = self.new_classifier(name, num_classes)
            setattr(self, name, head.to(ref.device, ref.dtype) if ref is not None else head)

    def head_parameter_names(self) -> list[str]:
        """Names of the parameters ``forward_head`` uses (trained even with a frozen backbone)."""
        owned = {id(p) for n in self.head_names if getattr(self, n, None) is not None
                 for p in getattr(self, n).parameters()}
        return [n for n, p in self.named_parameters() if id(p) in owned]

    def layer_ids(self) -> dict[str, int]:
        """Parameter name -> depth id for layer-wise lr decay (0: stem, last: norm and head)."""
        return resolve_layer_ids([n for n, _ in self.named_parameters()], self.group_matcher())[0]

    @property
    def num_layer_ids(self) -> int:
        """Number of depth ids: stem, every block group, then the final norm and head."""
        return resolve_layer_ids([n for n, _ in self.named_parameters()], self.group_matcher())[1]

    def layer_id(self, name: str) -> int:
        """Depth id of one parameter (see :meth:`layer_ids`)."""
        ids = self.layer_ids()
        if name not in ids:
            ids, _ = resolve_layer_ids([*ids, name], self.group_matcher())
        return ids[name]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: OutputFormat = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Feature maps at the chosen ``feature_info`` indices and the final features.

        Args:
            x: Images (B, C, H, W).
            indices: None for every index, k for the last k, or a list (negative from the end).
            norm: Apply the final norm to the returned maps (where it fits their width).
            output_fmt: ``"NCHW"`` maps (B, C, h, w) or ``"NLC"`` grid tokens (B, h*w, C).
            intermediates_only: Return only the list of maps (and stop after the deepest one).

        Returns:
            The maps, or ``(forward_features(x), maps)`` unless ``intermediates_only``. With
            ``norm=False`` every map is on the forward path: ``forward_head(final)`` depends on
            the ``"NCHW"`` map tensors themselves, so ``torch.autograd.grad(score, maps)`` works
            (Grad-CAM).
            Normed maps (``norm=True``) are side branches with no gradient from the logits.

        Raises:
            ValueError: An index out of range or an unknown ``output_fmt``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = resolve_indices(indices, len(self.feature_info))
        final, found = self.collect_intermediates(x, take, norm, stop_early=intermediates_only)
        maps = []
        for fmap in found:
            # (B, C, h, w) -> (B, h*w, C)
            maps.append(fmap if output_fmt == "NCHW" else fmap.flatten(2).transpose(1, 2))
        if intermediates_only:
            return maps
        assert final is not None
        return final, maps

    def reject_mask(self, mask: Tensor | None) -> None:
        """Raise the one clear error of a family that does not take a patch mask yet."""
        if mask is not None:
            from .registry import list_families  # here: the registry imports this module

            # SimMIM: families whose config has a mask token (the MAE task's rule); MAE: the other
            # families whose forward_features takes the mask (does not call reject_mask)
            families = list_families()
            simmim = sorted(f for f, (_, c) in families.items() if "mask_token" in {x.name for x in dataclasses.fields(c)})
            mae = sorted(f for f, (m, _) in families.items()
                         if f not in simmim and "reject_mask" not in m.forward_features.__code__.co_names)
            raise ValueError(
                f"{type(self).__name__} (family {self.family!r}) cannot be pre-trained by masked image modelling: "
                f"MAE needs a plain ViT family ({', '.join(mae)}), SimMIM a hierarchical family with a mask token "
                f"({', '.join(simmim)}); choose a model of one of those families (`vitlab models` lists them)"
            )

    @classmethod
    def tiny_overrides(cls, config: Any) -> dict[str, Any]:
        """Config overrides that shrink a variant for fast tests while keeping its structure."""
        return {}

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Make a checkpoint in vitlab's key layout fit this model (the input dict is not modified).

        Here: every learned position embedding made for another grid is resampled to this model's
        (:meth:`~vitlab.components.LearnedPosEmbed.fit`, what loading does too), so a shape check
        before loading sees the fitted tensor. Families add their own (Swin: bias tables).
        """
        out = None
        for name, module in self.named_modules():
            if isinstance(module, LearnedPosEmbed) and name in state_dict:
                fitted = module.fit(state_dict[name])
                if fitted is not state_dict[name]:
                    out = dict(state_dict) if out is None else out
                    out[name] = fitted
        return state_dict if out is None else out

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
