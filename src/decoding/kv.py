"""KV-cache handling: the single place where caches are created, rolled back and compacted.

Every method keeps one cache per model holding exactly the tokens it has *committed* (prompt + accepted
output). Speculation appends entries for tokens that may be rejected; after each verification the cache is
brought back to the committed tokens with :func:`truncate_cache` (a chain of drafts) or
:func:`keep_cache_positions` (a tree of drafts, whose accepted path is scattered).

The cache is a ``DynamicCache`` whose layers write into a preallocated buffer (:class:`BufferedLayer`)
instead of concatenating: transformers' ``DynamicLayer`` copies the whole cache into a fresh tensor at every
forward (``torch.cat``), and on a CPU a fresh multi-megabyte tensor also page-faults on first touch. Measured
on the embedded SmolLM2 target with a 1,500-token context: an 8-token verification forward ~8% faster. A
rollback is then a shorter view of the same buffer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256  # positions a layer's buffer holds at first; it doubles when full


class BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` (batch, kv_heads, seq, head_dim) are views of buffers
    with room for more positions; ``update`` writes the new entries in place (capacity doubles when full).
    Anything that sets ``keys`` / ``values`` to a view of the buffers (a rollback) or to other tensors (a
    gather) stays valid: entries outside the buffers are copied into new ones at the next update."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._holds(end, key_states):
            self._reallocate(end, key_states, value_states, length)
        write(self.key_buffer, length, key_states)
        write(self.value_buffer, length, value_states)
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _holds(self, end: int, key_states: torch.Tensor) -> bool:
        """The buffers exist, fit ``end`` positions of these states and still hold the current entries."""
        buffer = self.key_buffer
        if buffer is None or buffer.shape[-2] < end or buffer.shape[:-2] != key_states.shape[:-2]:
            return False
        if self.keys.numel() == 0:
            return True
        return self.keys.data_ptr() == buffer.data_ptr() and self.values.data_ptr() == self.value_buffer.data_ptr()

    def _reallocate(self, end: int, key_states: torch.Tensor, value_states: torch.Tensor, length: int) -> None:
        capacity = max(MIN_CAPACITY, 2 * end)
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if length:
            write(keys, 0, self.keys)
            write(values, 0, self.values)
        self.key_buffer, self.value_buffer = keys, values


def write(buffer: torch.Tensor, start: int, entries: torch.Tensor) -> None:
    """buffer[..., start:start + n, :] = entries (n positions), also when the buffer was made under
    ``torch.inference_mode`` and is written outside it (a test rolling a cache back by hand)."""
    with torch.inference_mode(torch.is_inference_mode_enabled() or buffer.is_inference()):
        buffer[..., start : start + entries.shape[-2], :] = entries


def new_cache() -> DynamicCache:
    """An empty cache for any decoder-only model (its layers are created on first use)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = BufferedLayer
    return cache


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
        kept_keys = layer.keys.index_select(-2, index)  # copies: the writes below may overlap the sources
        kept_values = layer.values.index_select(-2, index)
        if isinstance(layer, BufferedLayer):  # write the path right after the prefix, in the same buffers
            end = start + kept_keys.shape[-2]
            write(layer.keys, start, kept_keys)
            write(layer.values, start, kept_values)
            layer.keys, layer.values = layer.keys[..., :end, :], layer.values[..., :end, :]
            continue
        layer.keys = torch.cat([layer.keys[..., :start, :], kept_keys], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], kept_values], dim=-2)


def keep_after_prefix(cache: DynamicCache, prefix_len: int, keep: list[int]) -> None:
    """Keep the cache's first ``prefix_len`` entries then entries prefix_len + keep[i], in that order.
    When those already follow the prefix (nothing accepted, or the first tree entries), a truncation does
    the same without gathering."""
    if keep == list(range(len(keep))):
        truncate_cache(cache, prefix_len + len(keep))
    else:
        keep_cache_positions(cache, prefix_len, torch.tensor(keep, dtype=torch.long))


def cache_entries(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), (batch, kv_heads, seq, head_dim): views of what the cache holds."""
    return [(layer.keys, layer.values) for layer in _layers(cache)]


def cache_from_entries(entries: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> DynamicCache:
    """A cache holding ``entries`` (per layer (keys, values), (batch, kv_heads, n, head_dim)) in buffers with room
    for exactly ``capacity`` positions: a batch of many rows would waste gigabytes on the usual doubling."""
    cache = new_cache()
    for keys, values in entries:
        if capacity < keys.shape[-2]:
            raise ValueError(f"capacity {capacity} is below the {keys.shape[-2]} positions given")
        layer = BufferedLayer()
        layer.lazy_initialization(keys, values)
        layer.key_buffer = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
        layer.value_buffer = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
        write(layer.key_buffer, 0, keys)
        write(layer.value_buffer, 0, values)
        layer.keys = layer.key_buffer[..., : keys.shape[-2], :]
        layer.values = layer.value_buffer[..., : values.shape[-2], :]
        cache.layers.append(layer)
    return cache


def select_cache_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep the batch rows ``rows`` (in that order) and drop the others, spare buffer capacity included."""
    for layer in _layers(cache):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        index = rows.to(layer.keys.device, torch.long)
        length = layer.keys.shape[-2]
        if isinstance(layer, BufferedLayer) and layer.key_buffer is not None:
            layer.key_buffer = layer.key_buffer.index_select(0, index)
            layer.value_buffer = layer.value_buffer.index_select(0, index)
            layer.keys, layer.values = layer.key_buffer[..., :length, :], layer.value_buffer[..., :length, :]
        else:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
