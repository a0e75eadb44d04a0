"""Patch embeddings and position encodings.

Patch embeddings: :class:`PatchEmbed` (convolution with kernel = stride = patch, or
overlapping with stride < kernel) and :class:`LinearPatchEmbed` (the paper's linear map of
flattened patches; same output as the conv form on the same weights).

Position encodings: learned (:class:`LearnedPosEmbed`, resampled by
:func:`interpolate_pos_embed` on forward and on load), fixed 2-D sin-cos (:func:`sincos_2d_pos_embed`) and relative
position bias (:class:`RelativePositionBias`, resampled by :func:`resample_relative_position_table`
the way timm's Swin checkpoint filter does it) and decomposed relative position (:class:`DecomposedRelPos`,
MViTv2 / ViTDet: per-axis tables looked up by the queries, resized linearly by :func:`resize_rel_pos`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair is returned as a tuple."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a convolution.

    With ``stride`` left at the patch size this is ViT's patch embedding (non-overlapping
    patches). With ``stride < patch_size`` it is the overlapping embedding of PVT v2 and
    convolutional stems (padding ``patch_size // 2`` by default).

    Args:
        patch_size: Kernel size.
        in_channels: Image channels.
        dim: Token width.
        stride: Convolution stride; the patch size by default.
        padding: Convolution padding; 0 for non-overlapping, ``patch_size // 2`` otherwise.
        norm_layer: Optional norm applied to the tokens.
        bias: Convolution bias.
        pad_input: Pad the image on the right/bottom to a multiple of the stride (non-
            overlapping case). When False, a size that is not a multiple raises ValueError.

    Forward returns ``(tokens, grid)``: tokens (B, H' * W', dim) and the grid (H', W').
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] = 16,
        in_channels: int = 3,
        dim: int = 768,
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        pad_input: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride) if stride is not None else self.patch_size
        self.overlapping = self.stride != self.patch_size
        if padding is None:
            padding = (self.patch_size[0] // 2, self.patch_size[1] // 2) if self.overlapping else 0
        self.padding = to_2tuple(padding)
        self.in_channels = in_channels
        self.dim = dim
        self.pad_input = pad_input
        self.proj = nn.Conv2d(in_channels, dim, self.patch_size, self.stride, self.padding, bias=bias)
        self.norm = norm_layer(dim) if norm_layer is not None else nn.Identity()

    def check_input(self, x: Tensor) -> Tensor:
        """Validate (B, C, H, W) input and pad it to a multiple of the stride if allowed."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channel(s), got {c} (input shape {tuple(x.shape)}); "
                f"build the model with in_channels={c} or convert the images"
            )
        ph, pw = self.patch_size
        # The convolution's own zero padding counts: a 3x3 stride-2 kernel with padding 1
        # turns a 2x2 map into 1x1 (PVT v2's last downsampling).
        if h + 2 * self.padding[0] < ph or w + 2 * self.padding[1] < pw:
            raise ValueError(f"image size {h}x{w} is smaller than one patch ({ph}x{pw})")
        if not self.overlapping:
            rh, rw = (-h) % ph, (-w) % pw
            if rh or rw:
                if not self.pad_input:
                    raise ValueError(
                        f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}; "
                        f"resize to e.g. {h + rh}x{w + rw} or build the model with pad_input=True"
                    )
                x = F.pad(x, (0, rw, 0, rh))
        return x

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an image size (after padding)."""
        out = []
        for s, k, st, p in zip(image_size, self.patch_size, self.stride, self.padding):
            if not self.overlapping:
                s = s + (-s) % k
            out.append((s + 2 * p - k) // st + 1)
        return out[0], out[1]

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, dim, H', W') for already validated input."""
        return self.proj(x)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.embed(self.check_input(x))  # (B, dim, H', W')
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, dim, H', W') -> (B, H'W', dim)
        return self.norm(x), grid


class LinearPatchEmbed(PatchEmbed):
    """The ViT paper's form: flatten each P x P patch to a vector, then one linear map.

    ``proj`` is an ``nn.Linear(C * P * P, dim)`` whose input is ordered (channel, row,
    column), so a conv patch embedding's weight reshaped to (dim, C * P * P) gives the same
    output. Conv-shaped weights in a state dict (timm, HF) are reshaped on load.
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] = 16,
        in_channels: int = 3,
        dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
        pad_input: bool = True,
    ) -> None:
        super().__init__(patch_size, in_channels, dim, norm_layer=norm_layer, bias=bias, pad_input=pad_input)
        ph, pw = self.patch_size
        self.proj = nn.Linear(in_channels * ph * pw, dim, bias=bias)  # type: ignore[assignment]
        self._register_load_state_dict_pre_hook(self._conv_weight_to_linear)

    def _conv_weight_to_linear(self, state_dict, prefix, *args) -> None:
        key = prefix + "proj.weight"
        w = state_dict.get(key)
        if w is not None and w.ndim == 4:
            state_dict[key] = w.reshape(w.shape[0], -1)  # (dim, C, P, P) -> (dim, C*P*P)

    def embed(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        # (B, C, gh*ph, gw*pw) -> (B, gh, gw, C, ph, pw) -> (B, gh*gw, C*ph*pw)
        patches = x.view(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        tokens = self.proj(patches)  # (B, gh*gw, dim)
        return tokens.transpose(1, 2).reshape(b, self.dim, gh, gw)  # -> (B, dim, gh, gw)


def sincos_2d_pos_embed(dim: int, grid: tuple[int, int], temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine position encoding, (gh * gw, dim), rows in raster order.

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y) (x = column, y = row)
    at frequencies ``10000^(-i / (dim / 4))``, the channel order of MAE's fixed encoding.
    ``dim`` must be divisible by 4.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position encoding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ang_y = y.flatten()[:, None] * omega[None, :]  # (gh*gw, dim/4)
    ang_x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([ang_x.sin(), ang_x.cos(), ang_y.sin(), ang_y.cos()], dim=1)


def interpolate_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample a learned position embedding (1, P + gh * gw, C) to a new grid.

    The first ``num_prefix_tokens`` rows (class / distillation tokens) are kept; the grid
    rows are resampled with ``mode`` interpolation. ``old_grid`` defaults to a square grid.
    """
    if pos_embed.ndim != 3:
        raise ValueError(f"expected a position embedding of shape (1, N, C), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(f"cannot infer the grid of a position embedding with {n} grid tokens; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not match {n} grid tokens")
    new_grid = to_2tuple(new_grid)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    c = pos_embed.shape[-1]
    dtype = pos_embed.dtype
    # (1, gh*gw, C) -> (1, C, gh, gw)
    g = grid_tokens.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=new_grid, mode=mode, antialias=antialias, align_corners=False)
    # (1, C, gh', gw') -> (1, gh'*gw', C)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(dtype)
    return torch.cat([prefix, g], dim=1)


class LearnedPosEmbed(nn.Module):
    """A learned position embedding (1, P + gh * gw, C) that resamples on forward and on load.

    The first ``num_prefix_tokens`` rows (class / distillation tokens) are kept as they are; the
    grid rows are laid out for ``grid`` and resampled bicubically (:func:`interpolate_pos_embed`)
    for any other token grid, on forward and when a checkpoint made for another (square) grid
    is loaded.

    The state-dict key layout is timm's: the tensor is saved and loaded under the module's own
    name (``pos_embed``, ``pos_embed1``, ``pos_embed_0``), not ``pos_embed.weight``, so timm and
    official checkpoints load unconverted. The parameter itself is ``weight``
    (``named_parameters()`` gives ``pos_embed.weight``). torch hands a child module only the keys
    under ``name.``, so the model holding this module routes the key to it with
    :meth:`route_state_dict_keys` in a load pre-hook (every :class:`~vitlab.models.Backbone` does).

    Args:
        grid: The token grid (gh, gw) the stored rows are laid out for.
        dim: Embedding width C.
        num_prefix_tokens: P, the rows before the grid rows.

    The parameter starts at zero; the model initialises it (``init_weights``) where its init
    scheme says, so the random-number order of every family's init stays as it was.
    """

    def __init__(self, grid: int | tuple[int, int], dim: int, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.grid = to_2tuple(grid)
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.weight = nn.Parameter(torch.zeros(1, num_prefix_tokens + self.grid[0] * self.grid[1], dim))

    def init_weights(self, std: float = 0.02) -> None:
        """Truncated normal init (timm's, std 0.02)."""
        nn.init.trunc_normal_(self.weight, std=std)

    def forward(self, grid: tuple[int, int] | None = None) -> Tensor:
        """The embedding (1, P + h * w, C) for a token grid (h, w), resampled (bicubic) if it is new."""
        grid = self.grid if grid is None else to_2tuple(grid)
        if grid == self.grid:
            return self.weight
        return interpolate_pos_embed(self.weight, grid, self.num_prefix_tokens, old_grid=self.grid)

    def fit(self, tensor: Tensor) -> Tensor:
        """A checkpoint's embedding resampled to this module's grid where that is what it needs.

        An embedding on another square grid with the same width is resampled bicubically. When the
        checkpoint has up to two prefix rows more than this module (a class / distillation
        position loaded into a model without those tokens, e.g. a plain ViT or MAE checkpoint in a
        ``class_token=False`` ViTDet backbone), this module's first P prefix rows are kept and the
        extra ones dropped. Anything else (equal shape, another width, no square grid) is returned
        as it is, for the loader's shape-mismatch report.
        """
        own = self.weight.shape
        if tensor.shape == own or tensor.ndim != 3 or tensor.shape[-1] != own[-1]:
            return tensor
        p = self.num_prefix_tokens
        # Prefix rows the checkpoint has beyond ours: none first, then a class / distillation row.
        # Unambiguous: g*g + 1 and g*g + 2 are never squares for g > 0.
        for extra in range(3):
            n = tensor.shape[1] - p - extra
            if n > 0 and math.isqrt(n) ** 2 == n:
                if extra:
                    tensor = torch.cat([tensor[:, :p], tensor[:, p + extra :]], dim=1)  # (1, P + n, C)
                return interpolate_pos_embed(tensor, self.grid, p)
        return tensor

    @staticmethod
    def route_state_dict_keys(model: nn.Module, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Load pre-hook of a model holding these modules: ``name`` -> ``name.weight``, in place.

        ``load_state_dict`` gives a child module only the keys that start with its name and a
        dot, so the flat key ``pos_embed`` would never reach it; the holder renames it first.
        """
        for name, module in model.named_modules():
            if isinstance(module, LearnedPosEmbed) and name:
                key = prefix + name
                if key in state_dict and key + ".weight" not in state_dict:
                    state_dict[key + ".weight"] = state_dict.pop(key)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix[:-1]] = self.weight if keep_vars else self.weight.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key, inner = prefix[:-1], prefix + "weight"
        value = state_dict.get(inner, state_dict.get(key))
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != inner)
        if value is None:
            if strict:
                missing_keys.append(key)
            return
        if not torch.overrides.is_tensor_like(value):
            error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                              f"object from checkpoint but received {type(value)}")
            return
        value = self.fit(value)
        if value.shape != self.weight.shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                              f"checkpoint, the shape in current model is {tuple(self.weight.shape)}.")
            return
        if local_metadata.get("assign_to_params_buffers", False):
            self.weight = nn.Parameter(value.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        else:
            with torch.no_grad():
                self.weight.copy_(value)


def relative_position_index(window: tuple[int, int]) -> Tensor:
    """(N, N) index into a ((2wh - 1) * (2ww - 1))-row bias table for every token pair."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), in [-(w-1), w-1]
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    return rel[:, :, 0] * (2 * ww - 1) + rel[:, :, 1]


def _geometric_offsets(src: int, dst: int) -> list[float]:
    """Where the ``src`` offsets of a table axis (``-(src // 2) .. src // 2``) sit on the target axis.

    Offsets 0 and +-1 stay in place; the gaps further out grow by a ratio ``q`` (found by
    bisection in [1.01, 1.5]) so that the outermost offset lands near the target's outermost
    one, ``dst // 2``. This is BEiT's and timm's rule for relative position bias tables: near
    offsets, which matter most, keep their values; far ones are stretched (or, when shrinking,
    the central offsets are kept almost unchanged).
    """
    n = src // 2
    lo, hi = 1.01, 1.5
    q = lo
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q**n) / (1.0 - q) > dst // 2:  # 1 + q + ... + q^(n-1): the outermost position
            hi = q
        else:
            lo = q
    positions, cur = [], 1.0
    for i in range(n):
        positions.append(cur)
        cur += q ** (i + 1)
    return [-p for p in reversed(positions)] + [0.0] + positions


def _linear_weights(points: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Piecewise-linear interpolation on increasing, unevenly spaced ``points`` at ``x``.

    Returns (left index, right index, left weight, right weight) per ``x``; outside the
    points the value of the nearest end point is taken (no extrapolation).
    """
    right = torch.bucketize(x, points).clamp(max=len(points) - 1)
    left = (right - 1).clamp(min=0)
    d_left = (x - points[left]).clamp(min=0)
    d_right = (points[right] - x).clamp(min=0)
    on_point = (d_left == 0) & (d_right == 0)  # only at the clamped ends: both indices equal
    d_left = torch.where(on_point, torch.ones_like(d_left), d_left)
    d_right = torch.where(on_point, torch.ones_like(d_right), d_right)
    total = d_left + d_right
    return left, right, d_right / total, d_left / total


def resample_relative_position_table(
    table: Tensor, new_window: tuple[int, int], old_window: tuple[int, int] | None = None
) -> Tensor:
    """Resample a relative position bias table ((2wh-1)(2ww-1), heads) to a new window.

    The method is timm's (``timm.layers.resize_rel_pos_bias_table``, what timm's Swin
    checkpoint filter uses, itself from BEiT): the source offsets of each axis are placed on
    the target axis with geometrically growing gaps (:func:`_geometric_offsets`) and the
    table is interpolated bilinearly on that uneven grid, holding the edge values beyond it.
    A checkpoint resized here therefore matches the same checkpoint loaded by timm.

    Args:
        table: The bias table, rows in (dy, dx) raster order, one column per head.
        new_window: The window (wh, ww) to resample to.
        old_window: The window the table was made for; a square window when None.

    Returns:
        The ((2wh'-1)(2ww'-1), heads) table (the input itself when the windows are equal).

    Raises:
        ValueError: ``old_window`` is None and the row count is not that of a square window,
            or ``old_window`` does not match the row count.
    """
    rows, heads = table.shape
    if old_window is None:
        side = int(math.isqrt(rows))
        if side * side != rows or side % 2 == 0:
            raise ValueError(f"cannot infer the window of a bias table with {rows} rows; pass old_window")
        old_window = ((side + 1) // 2, (side + 1) // 2)
    old = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    if old[0] * old[1] != rows:
        raise ValueError(f"a bias table for window {tuple(old_window)} has {old[0] * old[1]} rows, got {rows}")
    new_window = to_2tuple(new_window)
    new = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if old == new:
        return table
    # (rows, heads) -> (heads, 2wh-1, 2ww-1)
    t = table.T.reshape(heads, old[0], old[1]).float().cpu()
    axes = []
    for src, dst in zip(old, new):
        points = torch.tensor(_geometric_offsets(src, dst), dtype=torch.float32)
        targets = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float32)
        axes.append(_linear_weights(points, targets))
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = axes
    out = torch.zeros(heads, new[0], new[1])
    for yi, wy in ((y0, wy0), (y1, wy1)):
        for xi, wx in ((x0, wx0), (x1, wx1)):
            out += t[:, yi][:, :, xi] * (wy[:, None] * wx[None, :])  # (heads, 2wh'-1, 2ww'-1)
    # (heads, 2wh'-1, 2ww'-1) -> (rows', heads)
    return out.reshape(heads, -1).T.contiguous().to(device=table.device, dtype=table.dtype)


class RelativePositionBias(nn.Module):
    """Learned relative position bias for attention inside a window (Swin).

    Holds a table of ``(2wh - 1) * (2ww - 1)`` rows by ``heads``; :meth:`forward` returns the
    (heads, N, N) bias for a window (a smaller window uses the central part of the table).
    """

    def __init__(self, window: int | tuple[int, int], heads: int) -> None:
        super().__init__()
        self.window = to_2tuple(window)
        self.heads = heads
        wh, ww = self.window
        self.table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer("index", relative_position_index(self.window), persistent=False)

    def forward(self, window: tuple[int, int] | None = None) -> Tensor:
        window = self.window if window is None else to_2tuple(window)
        if window == self.window:
            index, table = self.index, self.table
        else:
            if window[0] > self.window[0] or window[1] > self.window[1]:
                raise ValueError(f"window {window} is larger than the bias table's window {self.window}")
            # Keep only the table rows of offsets that fit in the smaller window.
            wh, ww = self.window
            full = self.table.view(2 * wh - 1, 2 * ww - 1, self.heads)
            oh, ow = wh - window[0], ww - window[1]
            table = full[oh : oh + 2 * window[0] - 1, ow : ow + 2 * window[1] - 1].reshape(-1, self.heads)
            index = relative_position_index(window).to(table.device)
        n = window[0] * window[1]
        return table[index.reshape(-1)].view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """Resize a per-axis relative position table (L, C) to (length, C) by linear interpolation.

    ``align_corners=False``, as detectron2's / Hugging Face VitDet's ``get_rel_pos`` resizes
    a table made for another token grid; the input itself when the length is already right.
    """
    if table.shape[0] == length:
        return table
    # (L, C) -> (1, C, L) -> (1, C, length) -> (length, C)
    out = F.interpolate(table.T.unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return out[0].T.to(table.dtype)


def rel_pos_lookup(table: Tensor, q_size: int, k_size: int) -> Tensor:
    """Embeddings (q_size, k_size, C) of every (query, key) offset along one axis.

    The table is first resized to ``2 * max(q_size, k_size) - 1`` rows (:func:`resize_rel_pos`);
    when queries and keys have different lengths the shorter axis' coordinates are stretched
    (MViTv2's rule, for pooled keys).
    """
    table = resize_rel_pos(table, 2 * max(q_size, k_size) - 1)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)  # (q_size, k_size), >= 0
    return table[index.long()]


class DecomposedRelPos(nn.Module):
    """Decomposed relative position (MViTv2, ViTDet): a learned bias from the queries, per axis.

    For a query at (i, j) and a key at (i', j') the attention logit gets
    ``q . R_h[i - i'] + q . R_w[j - j']`` (the unscaled query), with ``R_h`` and ``R_w`` tables
    ``rel_pos_h`` (2 * sh - 1, head_dim) and ``rel_pos_w`` (2 * sw - 1, head_dim) made for a
    token grid (sh, sw): the window of window attention, the token grid of global attention.
    On another grid the tables are resized linearly (:func:`rel_pos_lookup`). Both start at zero
    (detectron2's ``rel_pos_zero_init``).

    Args:
        size: The grid (sh, sw) the tables are made for.
        head_dim: Per-head width of the queries.
    """

    def __init__(self, size: int | tuple[int, int], head_dim: int) -> None:
        super().__init__()
        self.size = to_2tuple(size)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.size[1] - 1, head_dim))

    def forward(self, q: Tensor, q_grid: tuple[int, int], k_grid: tuple[int, int] | None = None) -> Tensor:
        """Additive logits bias (B, heads, Nq, Nk) for queries (B, heads, Nq, d) on ``q_grid``.

        Keys lie on ``k_grid`` (``q_grid`` when None); Nq and Nk are the grids' token counts.
        """
        qh, qw = q_grid
        kh, kw = k_grid if k_grid is not None else q_grid
        b, heads, n, d = q.shape
        if n != qh * qw:
            raise ValueError(f"DecomposedRelPos got {n} queries for a {qh}x{qw} grid")
        rh = rel_pos_lookup(self.rel_pos_h, qh, kh).to(q.dtype)  # (qh, kh, d)
        rw = rel_pos_lookup(self.rel_pos_w, qw, kw).to(q.dtype)  # (qw, kw, d)
        r_q = q.reshape(b, heads, qh, qw, d)  # (B, heads, qh*qw, d) -> (B, heads, qh, qw, d)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # (B, heads, qh, qw, kh)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # (B, heads, qh, qw, kw)
        bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, heads, qh, qw, kh, kw)
        return bias.reshape(b, heads, qh * qw, kh * kw)  # -> (B, heads, Nq, Nk)

    def extra_repr(self) -> str:
        return f"size={self.size}, head_dim={self.rel_pos_h.shape[1]}"
