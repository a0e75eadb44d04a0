"""Building blocks shared by every vitlab model family."""

from .attention import (
    Attention,
    AttentionBase,
    AttentionCapture,
    AttentionRecord,
    CrossAttention,
    WindowAttention,
    capture_attention,
    explicit_attention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from .embeddings import (
    LearnedPosEmbed,
    LinearPatchEmbed,
    PatchEmbed,
    RelativePositionBias,
    interpolate_pos_embed,
    relative_position_index,
    resample_relative_position_table,
    sincos_2d_pos_embed,
    to_2tuple,
)
from .layers import ACT_LAYERS, Block, QuickGELU, DropPath, LayerScale, Mlp, checkpoint_seq, drop_path, drop_path_rates, tokens_to_map
from .tome import ToMeState, apply_tome, remove_tome, tome, tome_state, unmerge_tokens
# Not the context managers ``evit`` / ``sparse_attention``: they would shadow their modules'
# names on the package (``vitlab.components.evit`` must stay the module).
from .evit import EViTState, apply_evit, evit_state, remove_evit
from .sparse_attention import SparseAttentionState, apply_sparse_attention, remove_sparse_attention, sparse_attention_state
from .layout import AttentionLayout, FeatureLayout, Segment, SegmentKey, TokenGrid, TokenLayout, square_cell

__all__ = [
    "Attention", "AttentionBase", "AttentionCapture", "AttentionRecord", "CrossAttention", "WindowAttention",
    "capture_attention", "explicit_attention", "shifted_window_mask", "window_partition", "window_reverse",
    "LinearPatchEmbed", "PatchEmbed", "RelativePositionBias", "interpolate_pos_embed", "relative_position_index",
    "resample_relative_position_table", "sincos_2d_pos_embed", "to_2tuple",
    "LearnedPosEmbed",
    "ACT_LAYERS", "QuickGELU", "Block", "DropPath", "LayerScale", "Mlp", "checkpoint_seq", "drop_path", "drop_path_rates", "tokens_to_map",
    "ToMeState", "apply_tome", "remove_tome", "tome", "tome_state", "unmerge_tokens",
    "EViTState", "apply_evit", "evit_state", "remove_evit",
    "SparseAttentionState", "apply_sparse_attention", "remove_sparse_attention", "sparse_attention_state",
    "AttentionLayout", "FeatureLayout", "Segment", "SegmentKey", "TokenGrid", "TokenLayout", "square_cell",
]
