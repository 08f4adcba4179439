"""Draft-tree bookkeeping, tree attention masks, and tree logits == sequential per-path logits (tiny Llama)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.decoding.base import model_logits
from src.decoding.kv import cache_length, keep_cache_positions, new_cache
from src.decoding.tree import DraftTree, growth_mask, tree_position_ids, verify_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread is much faster on 2 cores


def logs(*probs: float) -> list[list[float]]:
    return [[math.log(p) if p > 0 else -math.inf for p in probs]]


def small_tree(root_token: int = 7) -> DraftTree:
    """root -> a(10, .6), b(11, .35); a -> c(12, .5), d(13, .4); c -> e(14, .9)   (ids 1..5 in that order)."""
    tree = DraftTree(16)
    tree.reset(root_token, depth_cap=8)
    tree.add_children([0], [[10, 11]], logs(0.6, 0.35))
    tree.add_children([1], [[12, 13]], logs(0.5, 0.4))
    tree.add_children([3], [[14]], logs(0.9))
    return tree


PARENTS = [-1, 0, 0, 1, 1, 3]
DEPTHS = [0, 1, 1, 2, 2, 3]


def test_add_children_writes_parents_depths_scores_ancestors():
    tree = small_tree()
    assert tree.size == 6
    assert tree.parents == PARENTS and tree.depths == DEPTHS
    expected = [0.0, math.log(0.6), math.log(0.35), math.log(0.3), math.log(0.24), math.log(0.27)]
    assert tree.scores == pytest.approx(expected)
    for node in range(6):
        path, j = set(), node
        while j >= 0:
            path.add(j)
            j = PARENTS[j]
        assert set(tree.ancestors[node, :6].nonzero().squeeze(1).tolist()) == path
    assert tree.node_ids() == [1, 2, 3, 4, 5]
    assert tree.depth() == 3
    assert tree.leaves() == 3  # b, d, e
    assert tree.child_index(tree.node_ids()) == {(0, 10): 1, (0, 11): 2, (1, 12): 3, (1, 13): 4, (3, 14): 5}
    assert tree.path(5) == [7, 10, 12, 14]


def test_zero_probability_children_and_min_prob_are_dropped():
    tree = DraftTree(8)
    tree.reset(0, depth_cap=4)
    ids, proposed = tree.add_children([0], [[1, 2, 3]], logs(0.5, 0.01, 0.0))
    assert proposed == 2 and ids == [1, 2]
    tree.reset(0, depth_cap=4)
    ids, proposed = tree.add_children([0], [[1, 2, 3]], logs(0.5, 0.01, 0.0), min_prob=0.1)
    assert proposed == 2 and ids == [1]


def test_prune_keeps_best_budget_closed_under_ancestors():
    tree = small_tree()  # cumulative q: a .6, b .35, c .3, d .24, e .27
    tree.prune_to_budget(4)
    assert tree.node_ids() == [1, 2, 3, 5]  # d goes first
    tree.prune_to_budget(3)
    assert tree.node_ids() == [1, 2, 3]  # then e
    tree.prune_to_budget(2)
    assert tree.node_ids() == [1, 2]
    assert tree.alive == [True, True, True, False, False, False]


def test_prune_ties_keep_parent_before_child():
    # q = 1 children score exactly like their parent: the parent (older) must survive, never the child alone.
    tree = DraftTree(8)
    tree.reset(0, depth_cap=4)
    tree.add_children([0], [[1, 2]], logs(0.5, 0.5))
    tree.add_children([2], [[3]], logs(1.0))
    tree.prune_to_budget(2)
    assert tree.node_ids() == [1, 2]
    tree.prune_to_budget(1)
    assert tree.node_ids() == [1]


def test_add_children_with_budget_skips_losers_and_drops_the_displaced():
    tree = DraftTree(2)  # capacity grows as needed
    tree.reset(0, depth_cap=4)
    kept, proposed = tree.add_children([0], [[1, 2, 3]], logs(0.5, 0.3, 0.2), budget=2)
    assert (kept, proposed) == ([1, 2], 3) and tree.size == 3  # token 3 (.2) ranked last: never created
    kept, _ = tree.add_children([1], [[4, 5]], logs(0.8, 0.1), budget=2)  # 4: .4 displaces 2 (.3); 5: .05 out
    assert kept == [3] and tree.node_ids() == [1, 3] and tree.alive == [True, True, False, True]
    assert tree.capacity >= tree.size and tree.ancestors[3, :4].tolist() == [True, True, False, True]


@pytest.mark.parametrize("seed", range(5))
def test_streaming_budget_equals_prune_after_adding(seed):
    """add_children(budget) keeps exactly the best `budget` paths that unlimited growth + pruning keeps."""
    rng = torch.Generator().manual_seed(seed)
    streamed, pruned = DraftTree(4), DraftTree(4)
    for tree in (streamed, pruned):
        tree.reset(0, depth_cap=5)
    for _ in range(5):
        batch_streamed, batch_pruned = streamed.pop_frontier(3), pruned.pop_frontier(3)
        assert [streamed.path(n) for n in batch_streamed] == [pruned.path(n) for n in batch_pruned]
        if not batch_streamed:
            break
        probs = torch.rand(len(batch_streamed), 4, generator=rng).softmax(-1)
        tokens = torch.randperm(20, generator=rng)[:4].repeat(len(batch_streamed), 1).tolist()
        logq = probs.double().log().tolist()
        streamed.add_children(batch_streamed, tokens, logq, budget=6)
        pruned.add_children(batch_pruned, tokens, logq)
        pruned.prune_to_budget(6)
        assert sorted(streamed.path(n) for n in streamed.node_ids()) == sorted(
            pruned.path(n) for n in pruned.node_ids()
        )


def test_frontier_best_first_with_depth_cap_stop_tokens_and_pruned_nodes():
    tree = DraftTree(16)
    tree.reset(0, depth_cap=2, stop_tokens={99})
    assert tree.pop_frontier(4) == [0]
    assert tree.pop_frontier(4) == []  # popped nodes are expanded: never offered again
    tree.add_children([0], [[99, 5, 6, 8]], logs(0.4, 0.2, 0.3, 0.1))
    assert tree.pop_frontier(2) == [3, 2]  # 99 (EOS) is never expanded
    tree.add_children([3], [[7]], logs(0.9))  # node 5 sits at the depth cap: not open
    tree.prune_to_budget(4)  # drops 8 (node 4, .1)
    assert tree.pop_frontier(4) == []
    tree.reset(0, depth_cap=0)
    assert tree.pop_frontier(4) == []


def test_can_improve_when_open_nodes_may_outrank_the_worst_kept():
    tree = DraftTree(16)
    tree.reset(0, depth_cap=4)
    tree.pop_frontier(1)
    tree.add_children([0], [[1, 2]], logs(0.6, 0.4))
    assert tree.can_improve(budget=3)  # not full
    assert tree.can_improve(budget=2)  # full, but node 1 (.6) outranks the worst kept (node 2, .4)
    tree.pop_frontier(1)  # node 1 expanded: node 2 is both the best open and the worst kept
    assert not tree.can_improve(budget=2)
    tree.pop_frontier(1)
    assert not tree.can_improve(budget=8)  # nothing open


def test_reset_reuses_storage():
    tree = small_tree()
    tree.reset(3, depth_cap=8)
    assert tree.size == 1 and tree.node_ids() == [] and tree.depth() == 0 and tree.leaves() == 0
    tree.add_children([0], [[4]], logs(0.5))
    assert tree.ancestors[1, :6].tolist() == [True, True, False, False, False, False]


def test_masks_and_positions():
    tree = small_tree()
    nodes = tree.node_ids()
    assert tree_position_ids(tree, nodes, root_position=9) == [10, 10, 11, 11, 12]

    mask = verify_mask(tree, nodes, chain_len=2, cached_len=5)  # chain = [x, root], then a b c d e
    assert mask.shape == (1, 1, 7, 12) and mask.dtype == torch.bool
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
    assert mask[0, 0, :, :5].all() and torch.equal(mask[0, 0, :, 5:], expected)
    assert torch.equal(
        verify_mask(tree, [], chain_len=1, cached_len=3), torch.ones(1, 1, 1, 4, dtype=torch.bool)
    )

    # Growth round: cache = prefix (4), then a and c (expanded); batch d, e sees its ancestors among them.
    mask = growth_mask(tree, [4, 5], [1, 3], prefix_len=4)
    assert mask.shape == (1, 1, 2, 8) and mask[0, 0, :, :4].all()
    assert mask[0, 0, :, 4:].tolist() == [[True, False, True, False], [True, True, False, True]]
    mask = growth_mask(tree, [1, 2], [], prefix_len=3)  # first round after the root: no slots yet
    assert mask[0, 0].tolist() == [[True] * 3 + [True, False], [True] * 3 + [False, True]]


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


@pytest.mark.parametrize("chain_len", [1, 3])
def test_verify_forward_matches_sequential_paths(tiny_llama, chain_len):
    """One forward over (uncached chain ending at the root) + tree == each root-to-node path run sequentially."""
    prompt = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    cached = len(prompt) - chain_len
    tree = small_tree(root_token=prompt[-1])
    nodes = tree.node_ids()
    cache = new_cache()
    with torch.inference_mode():
        model_logits(tiny_llama, torch.tensor([prompt[:cached]]), cache)
        inputs = torch.tensor([prompt[cached:] + [tree.tokens[node] for node in nodes]])
        positions = torch.tensor(
            [list(range(cached, len(prompt))) + tree_position_ids(tree, nodes, len(prompt) - 1)]
        )
        mask = verify_mask(tree, nodes, chain_len, cached)
        logits = model_logits(tiny_llama, inputs, cache, positions, mask)[0, chain_len - 1 :]
    assert torch.allclose(logits[0], sequential_logits(tiny_llama, prompt), atol=1e-4)
    for row, node in enumerate(nodes, start=1):
        expected = sequential_logits(tiny_llama, prompt + tree.path(node)[1:])
        assert torch.allclose(logits[row], expected, atol=1e-4), f"node {node}"
    assert cache_length(cache) == len(prompt) + len(nodes)

    # Keep prefix + path root -> a -> c -> e; the next token's logits equal a sequential decode's.
    keep_cache_positions(cache, len(prompt), torch.tensor([0, 2, 4]))  # rows of a, c, e among the nodes
    assert cache_length(cache) == len(prompt) + 3
    with torch.inference_mode():
        following = model_logits(tiny_llama, torch.tensor([[55]]), cache)[0, -1]
    assert torch.allclose(following, sequential_logits(tiny_llama, prompt + [10, 12, 14, 55]), atol=1e-4)


def test_growth_rounds_with_cached_tree_nodes_match_sequential(tiny_llama):
    """Draft-side rounds: expanded nodes' KV entries stay in the cache and later batches attend to them."""
    prompt = [3, 17, 40, 8, 99]
    tree = small_tree(root_token=prompt[-1])
    root_position = len(prompt) - 1
    cache = new_cache()
    slots: list[int] = []
    with torch.inference_mode():
        model_logits(tiny_llama, torch.tensor([prompt]), cache)  # prefix + root
        for batch in ([1, 2], [3, 4], [5]):
            mask = growth_mask(tree, batch, slots, root_position + 1)
            positions = torch.tensor([tree_position_ids(tree, batch, root_position)])
            logits = model_logits(
                tiny_llama, torch.tensor([[tree.tokens[n] for n in batch]]), cache, positions, mask
            )[0]
            slots += batch
            for row, node in enumerate(batch):
                expected = sequential_logits(tiny_llama, prompt + tree.path(node)[1:])
                assert torch.allclose(logits[row], expected, atol=1e-4), f"node {node}"
    assert cache_length(cache) == len(prompt) + 5


def test_tree_forward_bf16_close_to_sequential(tiny_llama):
    model = LlamaForCausalLM(tiny_llama.config).eval()
    model.load_state_dict(tiny_llama.state_dict())
    model = model.to(torch.bfloat16)
    prompt = [5, 6, 7, 8]
    tree = small_tree(root_token=prompt[-1])
    nodes = tree.node_ids()
    cache = new_cache()
    with torch.inference_mode():
        model_logits(model, torch.tensor([prompt[:-1]]), cache)
        inputs = torch.tensor([prompt[-1:] + [tree.tokens[node] for node in nodes]])
        positions = torch.tensor([[3] + tree_position_ids(tree, nodes, 3)])
        logits = model_logits(model, inputs, cache, positions, verify_mask(tree, nodes, 1, 3))[0].float()
    for row, node in enumerate(nodes, start=1):
        expected = sequential_logits(model, prompt + tree.path(node)[1:]).float()
        assert torch.allclose(logits[row], expected, atol=2e-2), f"node {node}"
