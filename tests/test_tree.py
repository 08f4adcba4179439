"""Draft-tree bookkeeping, tree attention masks, and tree logits == sequential per-path logits (tiny Llama)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.decoding.base import model_logits
from src.decoding.kv import cache_length, keep_cache_positions, new_cache
from src.decoding.tree import (
    DraftTree,
    attention_mask,
    draft_round_visibility,
    tree_position_ids,
    verify_visibility,
)


def log(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in probs]])


def small_tree() -> DraftTree:
    """root(7) -> a(10, .6), b(11, .3); a -> c(12, .5), d(13, .4); c -> e(14, .9)   (ids 1..5 in that order)."""
    tree = DraftTree(16)
    tree.reset(7, depth_cap=8)
    tree.add_children(torch.tensor([0]), torch.tensor([[10, 11]]), log(0.6, 0.3))
    tree.expanded[0] = True
    tree.add_children(torch.tensor([1]), torch.tensor([[12, 13]]), log(0.5, 0.4))
    tree.expanded[1] = True
    tree.add_children(torch.tensor([3]), torch.tensor([[14]]), log(0.9))
    tree.expanded[3] = True
    return tree


PARENTS = [-1, 0, 0, 1, 1, 3]
DEPTHS = [0, 1, 1, 2, 2, 3]


def test_add_children_writes_parents_depths_scores_ancestors():
    tree = small_tree()
    assert tree.size == 6
    assert tree.parents[:6].tolist() == PARENTS
    assert tree.depths[:6].tolist() == DEPTHS
    expected = [0.0, math.log(0.6), math.log(0.3), math.log(0.3), math.log(0.24), math.log(0.27)]
    assert torch.allclose(tree.scores[:6], torch.tensor(expected, dtype=torch.float64))
    for node in range(6):
        path, j = set(), node
        while j >= 0:
            path.add(j)
            j = PARENTS[j]
        assert set(tree.ancestors[node, :6].nonzero().squeeze(1).tolist()) == path
    assert tree.node_ids().tolist() == [1, 2, 3, 4, 5]
    assert tree.depth() == 3
    assert tree.leaves() == 3  # b, d, e
    assert tree.child_index(tree.node_ids()) == {(0, 10): 1, (0, 11): 2, (1, 12): 3, (1, 13): 4, (3, 14): 5}


def test_zero_probability_children_and_min_prob_are_dropped():
    tree = DraftTree(8)
    tree.reset(0, depth_cap=4)
    ids, proposed = tree.add_children(torch.tensor([0]), torch.tensor([[1, 2, 3]]), log(0.5, 0.01, 0.0))
    assert proposed == 2 and ids.tolist() == [1, 2]
    tree.reset(0, depth_cap=4)
    ids, proposed = tree.add_children(torch.tensor([0]), torch.tensor([[1, 2, 3]]), log(0.5, 0.01, 0.0), min_prob=0.1)
    assert proposed == 2 and ids.tolist() == [1]


def test_prune_keeps_best_budget_closed_under_ancestors():
    tree = small_tree()  # scores: a .6, b .3, c .3, d .24, e .27
    tree.prune_to_budget(3)
    assert tree.node_ids().tolist() == [1, 2, 3]  # a, b, c; b and c tie at .3: the older (b) ranks first
    tree = small_tree()
    tree.prune_to_budget(2)
    assert tree.node_ids().tolist() == [1, 2]


def test_prune_ties_keep_parent_before_child():
    # q = 1 children score exactly like their parent: the parent (older) must survive, never the child alone.
    tree = DraftTree(8)
    tree.reset(0, depth_cap=4)
    tree.add_children(torch.tensor([0]), torch.tensor([[1, 2]]), log(0.5, 0.5))
    tree.add_children(torch.tensor([2]), torch.tensor([[3]]), log(1.0))
    tree.prune_to_budget(2)
    assert tree.node_ids().tolist() == [1, 2]
    tree.prune_to_budget(1)
    assert tree.node_ids().tolist() == [1]


def test_frontier_orders_by_score_and_respects_depth_cap_and_stop_tokens():
    tree = DraftTree(16)
    tree.reset(0, depth_cap=2, stop_tokens=torch.tensor([99]))
    assert tree.frontier(4).tolist() == [0]
    tree.add_children(torch.tensor([0]), torch.tensor([[99, 5, 6]]), log(0.5, 0.2, 0.3))
    tree.expanded[0] = True
    assert tree.frontier(4).tolist() == [3, 2]  # 99 (EOS) is never expanded
    assert tree.frontier(1).tolist() == [3]
    tree.add_children(torch.tensor([3]), torch.tensor([[7]]), log(0.9))
    tree.expanded[3] = True
    assert tree.frontier(4).tolist() == [2]  # node 4 sits at the depth cap
    tree.reset(0, depth_cap=0)
    assert tree.frontier(4).tolist() == []


def test_reset_reuses_storage():
    tree = small_tree()
    tree.reset(3, depth_cap=8)
    assert tree.size == 1 and tree.node_ids().numel() == 0 and tree.depth() == 0 and tree.leaves() == 0
    tree.add_children(torch.tensor([0]), torch.tensor([[4]]), log(0.5))
    assert tree.ancestors[1, :6].tolist() == [True, True, False, False, False, False]


def test_masks_and_positions():
    tree = small_tree()
    nodes = tree.node_ids()
    assert tree_position_ids(tree, nodes, root_position=9).tolist() == [10, 10, 11, 11, 12]

    visible = verify_visibility(tree, nodes, chain_len=2)  # chain = [x, root], then a b c d e
    assert visible.shape == (7, 7)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],  # a
            [1, 1, 0, 1, 0, 0, 0],  # b
            [1, 1, 1, 0, 1, 0, 0],  # c
            [1, 1, 1, 0, 0, 1, 0],  # d
            [1, 1, 1, 0, 1, 0, 1],  # e
        ],
        dtype=torch.bool,
    )
    assert torch.equal(visible, expected)
    mask = attention_mask(5, visible, "cpu")
    assert mask.shape == (1, 1, 7, 12) and mask.dtype == torch.bool
    assert mask[0, 0, :, :5].all() and torch.equal(mask[0, 0, :, 5:], expected)

    # Growth round: cache = prefix, then a and c (expanded); batch = d, e sees its ancestors among them.
    round_visible = draft_round_visibility(tree, torch.tensor([4, 5]), slots=torch.tensor([1, 3]))
    assert round_visible.tolist() == [[True, False, True, False], [True, True, False, True]]


# ------------------------------------------------------------------------------------------- tiny Llama


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def sequential_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def path_tokens(tree: DraftTree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(int(tree.tokens[node]))
        node = int(tree.parents[node])
    return path[::-1]


@pytest.mark.parametrize("chain_len", [1, 3])
def test_verify_forward_matches_sequential_paths(tiny_llama, chain_len):
    """One forward over (uncached chain ending at the root) + tree == each root-to-node path run sequentially."""
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1)).tolist()[0]
    cached = len(prompt) - chain_len
    tree = small_tree()
    tree.tokens[0] = prompt[-1]
    nodes = tree.node_ids()
    cache = new_cache()
    with torch.inference_mode():
        model_logits(tiny_llama, torch.tensor([prompt[:cached]]), cache)
        inputs = torch.cat([torch.tensor(prompt[cached:]), tree.tokens[nodes]])[None]
        positions = torch.cat([torch.arange(cached, len(prompt)), tree_position_ids(tree, nodes, len(prompt) - 1)])
        mask = attention_mask(cached, verify_visibility(tree, nodes, chain_len), "cpu")
        logits = model_logits(tiny_llama, inputs, cache, positions[None], mask)[0, chain_len - 1 :]
    assert torch.allclose(logits[0], sequential_logits(tiny_llama, prompt), atol=1e-4)
    for row, node in enumerate(nodes.tolist(), start=1):
        expected = sequential_logits(tiny_llama, prompt + path_tokens(tree, node)[1:])
        assert torch.allclose(logits[row], expected, atol=1e-4), f"node {node}"
    assert cache_length(cache) == len(prompt) + nodes.numel()

    # Keep prefix + path root -> a -> c -> e; the next token's logits equal a sequential decode's.
    keep_cache_positions(cache, len(prompt), torch.tensor([0, 2, 4]))  # rows of a, c, e among the nodes
    assert cache_length(cache) == len(prompt) + 3
    with torch.inference_mode():
        following = model_logits(tiny_llama, torch.tensor([[55]]), cache)[0, -1]
    assert torch.allclose(following, sequential_logits(tiny_llama, prompt + [10, 12, 14, 55]), atol=1e-4)


def test_growth_rounds_with_cached_tree_nodes_match_sequential(tiny_llama):
    """Draft-side rounds: expanded nodes' KV entries stay in the cache and later batches attend to them."""
    prompt = [3, 17, 40, 8, 99]
    tree = small_tree()
    tree.tokens[0] = prompt[-1]
    root_position = len(prompt) - 1
    cache = new_cache()
    slots = torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        model_logits(tiny_llama, torch.tensor([prompt]), cache)  # prefix + root
        for batch in (torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([5])):
            mask = attention_mask(root_position + 1, draft_round_visibility(tree, batch, slots), "cpu")
            positions = tree_position_ids(tree, batch, root_position)[None]
            logits = model_logits(tiny_llama, tree.tokens[batch][None], cache, positions, mask)[0]
            slots = torch.cat([slots, batch])
            for row, node in enumerate(batch.tolist()):
                expected = sequential_logits(tiny_llama, prompt + path_tokens(tree, node)[1:])
                assert torch.allclose(logits[row], expected, atol=1e-4), f"node {node}"
    assert cache_length(cache) == len(prompt) + 5


def test_tree_forward_bf16_close_to_sequential(tiny_llama):
    model = LlamaForCausalLM(tiny_llama.config).eval()
    model.load_state_dict(tiny_llama.state_dict())
    model = model.to(torch.bfloat16)
    prompt = [5, 6, 7, 8]
    tree = small_tree()
    tree.tokens[0] = prompt[-1]
    nodes = tree.node_ids()
    cache = new_cache()
    with torch.inference_mode():
        model_logits(model, torch.tensor([prompt[:-1]]), cache)
        inputs = torch.cat([torch.tensor(prompt[-1:]), tree.tokens[nodes]])[None]
        positions = torch.cat([torch.tensor([3]), tree_position_ids(tree, nodes, 3)])[None]
        mask = attention_mask(3, verify_visibility(tree, nodes, 1), "cpu")
        logits = model_logits(model, inputs, cache, positions, mask)[0].float()
    for row, node in enumerate(nodes.tolist(), start=1):
        expected = sequential_logits(model, prompt + path_tokens(tree, node)[1:]).float()
        assert torch.allclose(logits[row], expected, atol=2e-2), f"node {node}"
