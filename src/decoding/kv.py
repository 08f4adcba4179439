"""KV-cache handling: the single place where caches are created, rolled back and compacted.

Every method keeps one ``DynamicCache`` per model holding exactly the tokens it has *committed*
(prompt + accepted output). Speculation appends entries for tokens that may be rejected; after each
verification the cache is brought back to the committed tokens with :func:`truncate_cache` (a chain of
drafts) or :func:`keep_cache_positions` (a tree of drafts, whose accepted path is scattered).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def _layers(cache: DynamicCache):
    """(keys, values) holders of each layer, across transformers versions."""
    if hasattr(cache, "layers"):
        return cache.layers
    raise TypeError(f"unsupported cache type {type(cache).__name__}: sp-samp needs transformers >= 4.56")


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Roll the cache back so it holds exactly the first ``length`` positions (no-op when shorter)."""
    if length < 0:
        raise ValueError(f"cannot truncate a cache to a negative length ({length})")
    for layer in _layers(cache):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        # keys / values: (batch, kv_heads, seq, head_dim)
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def keep_cache_positions(cache: DynamicCache, start: int, keep: torch.Tensor) -> None:
    """Keep positions ``[0, start)`` plus ``start + keep`` (in that order) and drop everything else.

    Used after a tree verification: the cache holds prefix (``start`` entries) followed by every tree
    node in node order; only the accepted root-to-leaf path survives. Gathering its entries with
    ``index_select`` and writing them right after the prefix makes the cache contiguous again, so the
    entry for the i-th accepted token sits at position ``start + i``, exactly where a sequential decode
    would have put it (positions were computed as prefix + depth, so no rotary re-encoding is needed).
    """
    keep = keep.to(torch.long)
    for layer in _layers(cache):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        index = keep.to(layer.keys.device) + start
        kept_keys = layer.keys.index_select(-2, index)
        kept_values = layer.values.index_select(-2, index)
        layer.keys = torch.cat([layer.keys[..., :start, :], kept_keys], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], kept_values], dim=-2)
