"""The buffered KV cache: in-place appends, rollbacks as views, tree compaction, and the same logits as a plain
DynamicCache on a tiny random Llama."""

from __future__ import annotations

import torch
from conftest import build_tiny_llama
from transformers import DynamicCache

from src.decoding import kv
from src.decoding.base import model_logits
from src.decoding.kv import BufferedLayer, cache_length, keep_cache_positions, new_cache, truncate_cache


def entries(n: int, start: int = 0) -> torch.Tensor:
    """(1, 2, n, 3) keys whose every value is its position: easy to read back."""
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 3).clone()


def positions(layer) -> list[int]:
    return [round(v) for v in layer.keys[0, 1, :, 2].tolist()]


def test_appends_write_in_place_until_the_buffer_is_full(monkeypatch):
    monkeypatch.setattr(kv, "MIN_CAPACITY", 8)
    layer = BufferedLayer()
    layer.update(entries(3), entries(3))
    buffer = layer.key_buffer
    assert buffer.shape[-2] == 8 and positions(layer) == [0, 1, 2]
    layer.update(entries(4, 3), entries(4, 3))
    assert layer.key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()
    assert positions(layer) == list(range(7))
    layer.update(entries(5, 7), entries(5, 7))  # 12 > 8: a new buffer of twice the need, old entries copied
    assert layer.key_buffer is not buffer and layer.key_buffer.shape[-2] == 24
    assert positions(layer) == list(range(12)) and torch.equal(layer.values, layer.keys)


def test_rollback_is_a_view_and_later_appends_overwrite_the_rejected_entries():
    cache = new_cache()
    cache.update(entries(5), entries(5), 0)
    layer = cache.layers[0]
    assert isinstance(layer, BufferedLayer)
    truncate_cache(cache, 2)
    assert cache_length(cache) == 2 and layer.keys.data_ptr() == layer.key_buffer.data_ptr()
    cache.update(entries(2, 40), entries(2, 40), 0)
    assert positions(layer) == [0, 1, 40, 41]


def test_tree_compaction_keeps_the_path_right_after_the_prefix_in_the_same_buffer():
    cache = new_cache()
    cache.update(entries(9), entries(9), 0)  # prefix 0..3, tree nodes 4..8
    buffer = cache.layers[0].key_buffer
    keep_cache_positions(cache, 4, torch.tensor([3, 0, 4]))  # nodes in path order, not sorted
    assert positions(cache.layers[0]) == [0, 1, 2, 3, 7, 4, 8]
    assert cache.layers[0].key_buffer is buffer
    cache.update(entries(1, 50), entries(1, 50), 0)
    assert positions(cache.layers[0]) == [0, 1, 2, 3, 7, 4, 8, 50]


def test_entries_set_from_outside_the_buffer_are_copied_in_at_the_next_update():
    layer = BufferedLayer()
    layer.update(entries(3), entries(3))
    layer.keys, layer.values = entries(2, 10), entries(2, 10)  # e.g. a gather that built new tensors
    layer.update(entries(1, 20), entries(1, 20))
    assert positions(layer) == [10, 11, 20] and layer.keys.data_ptr() == layer.key_buffer.data_ptr()


def test_written_under_inference_mode_rolled_back_outside_it():
    cache = new_cache()
    with torch.inference_mode():
        cache.update(entries(6), entries(6), 0)
    keep_cache_positions(cache, 2, torch.tensor([1, 3]))
    assert positions(cache.layers[0]) == [0, 1, 3, 5]


@torch.inference_mode()
def test_same_logits_as_a_plain_dynamic_cache_through_appends_and_rollbacks():
    model = build_tiny_llama(seed=3)
    generator = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 128, (1, n), generator=generator) for n in (300, 4, 1, 7, 2)]  # 300: past capacity
    buffered, plain = new_cache(), DynamicCache()
    for i, ids in enumerate(steps):
        ours, theirs = model_logits(model, ids, buffered), model_logits(model, ids, plain)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        if i % 2:  # reject the last entry, as after a partly accepted chain
            truncate_cache(buffered, cache_length(buffered) - 1)
            truncate_cache(plain, cache_length(plain) - 1)
    assert cache_length(buffered) == cache_length(plain)
