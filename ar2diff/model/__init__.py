"""Model side of the conversion: load/build HF models, add [MASK], the TiDAR layout and mask, adapters, TidarLM."""

from ar2diff.model.attention import attention_mask_for, block_mask, can_attend, dense_mask, mask_mod
from ar2diff.model.layout import TidarLayout, TokenMeta, build_tidar_layout, causal_meta, positions_from_docs
from ar2diff.model.loading import SUPPORTED_MODEL_TYPES, build_model, load_model
from ar2diff.model.mask_token import MASK_TOKEN, add_mask_token
from ar2diff.model.tidar import TidarLM, TidarLogits

__all__ = [
    "MASK_TOKEN", "SUPPORTED_MODEL_TYPES", "TidarLM", "TidarLayout", "TidarLogits", "TokenMeta", "add_mask_token",
    "attention_mask_for", "block_mask", "build_model", "build_tidar_layout", "can_attend", "causal_meta",
    "dense_mask", "load_model", "mask_mod", "positions_from_docs",
]
