"""The toy trigram model: closed-form logits, real cache use, tree masks, and exact laws of generated tokens."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from toy import ToyLM

from src.decoding.base import model_logits
from src.decoding.kv import keep_cache_positions, new_cache, truncate_cache
from src.decoding.sampling import SamplingConfig, logits_to_probs

SAMPLINGS = [SamplingConfig(), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9, top_k=8)]
PREFIX = [3, 7, 1]
# A draft tree after PREFIX, in creation order: (token, parent node or -1 for the prefix end).
TREE = [(4, -1), (9, -1), (2, 0), (5, 1), (6, 2), (4, 0), (11, 3)]


def cached_ids(cache) -> list[int]:
    return [round(v) for v in cache.layers[0].keys.view(-1).tolist()]


def tree_inputs(cached: int, mask_kind: str = "bool") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (1, n), position_ids (1, n), 4D mask (1, 1, n, cached + n) of TREE after ``cached`` tokens."""
    n = len(TREE)
    visible = torch.eye(n, dtype=torch.bool)  # (n, n): ancestors and self
    depth = [0] * n
    for i, (_, parent) in enumerate(TREE):
        if parent >= 0:
            visible[i] |= visible[parent]
            depth[i] = depth[parent] + 1
    mask = torch.cat([torch.ones(n, cached, dtype=torch.bool), visible], dim=1)[None, None]
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    input_ids = torch.tensor([[token for token, _ in TREE]])
    position_ids = torch.tensor([[cached + d for d in depth]])
    return input_ids, position_ids, mask


def path_to(node: int) -> list[int]:
    """Tokens from the first tree level down to ``node``."""
    path = []
    while node >= 0:
        path.append(TREE[node][0])
        node = TREE[node][1]
    return path[::-1]


def test_logits_are_the_closed_form():
    model = ToyLM(vocab_size=20, seed=3)
    sequence = [5, 0, 19, 5, 5, 12, 7]
    cache = new_cache()
    # One prefill over a prefix, then one token at a time: every position matches exact_next_*.
    logits = [model_logits(model, torch.tensor([sequence[:3]]), cache)[0]]
    logits += [model_logits(model, torch.tensor([[token]]), cache)[0] for token in sequence[3:]]
    logits = torch.cat(logits)  # (len, vocab)
    assert logits.shape == (len(sequence), 20) and logits.dtype == torch.float32
    for i in range(len(sequence)):
        context = sequence[: i + 1]
        assert torch.equal(logits[i], model.exact_next_logits(context))
        for sampling in SAMPLINGS:
            assert torch.equal(logits_to_probs(logits[i], sampling), model.exact_next_probs(context, sampling))
    assert model.calls == 1 + len(sequence) - 3
    assert cached_ids(cache) == sequence


def test_trigram_depends_on_exactly_two_tokens():
    model = ToyLM(seed=0)
    assert torch.equal(model.exact_next_logits([9, 4, 2]), model.exact_next_logits([1, 4, 2]))
    assert not torch.equal(model.exact_next_logits([4, 2]), model.exact_next_logits([5, 2]))
    assert not torch.equal(model.exact_next_logits([2]), model.exact_next_logits([4, 2]))  # no previous token


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_tree_mask_matches_sequential_paths(mask_kind):
    model = ToyLM(seed=1)
    cache = new_cache()
    model_logits(model, torch.tensor([PREFIX]), cache)
    input_ids, position_ids, mask = tree_inputs(len(PREFIX), mask_kind)
    logits = model_logits(model, input_ids, cache, position_ids=position_ids, attention_mask=mask)[0]
    for node in range(len(TREE)):
        sequential = model_logits(model, torch.tensor([PREFIX + path_to(node)]), new_cache())[0, -1]
        assert torch.equal(logits[node], sequential), f"node {node}"
    assert cached_ids(cache) == PREFIX + [token for token, _ in TREE]  # the cache holds every node


def test_wrong_tree_mask_or_positions_are_caught():
    model = ToyLM(seed=1)
    cache = new_cache()
    model_logits(model, torch.tensor([PREFIX]), cache)
    input_ids, position_ids, mask = tree_inputs(len(PREFIX))
    right = model_logits(model, input_ids, cache, position_ids=position_ids, attention_mask=mask)[0]
    truncate_cache(cache, len(PREFIX))
    # Node 3 (child of node 1) wrongly also sees node 2, a later sibling branch: its previous token changes.
    wrong = mask.clone()
    wrong[0, 0, 3, len(PREFIX) + 2] = True
    logits = model_logits(model, input_ids, cache, attention_mask=wrong)[0]
    assert not torch.equal(logits[3], right[3]) and torch.equal(logits[:3], right[:3])
    truncate_cache(cache, len(PREFIX))
    with pytest.raises(ValueError, match="position_ids"):  # it also sees one position too many
        model_logits(model, input_ids, cache, position_ids=position_ids, attention_mask=wrong)
    truncate_cache(cache, len(PREFIX))
    with pytest.raises(ValueError, match="position_ids"):
        model_logits(model, input_ids, cache, position_ids=position_ids + 1, attention_mask=mask)
    truncate_cache(cache, len(PREFIX))
    future = mask.clone()
    future[0, 0, 0, len(PREFIX) + 1] = True
    with pytest.raises(ValueError, match="later position"):
        model_logits(model, input_ids, cache, attention_mask=future)


def test_keep_cache_positions_then_decode_equals_sequential():
    model = ToyLM(seed=2)
    cache = new_cache()
    model_logits(model, torch.tensor([PREFIX]), cache)
    input_ids, position_ids, mask = tree_inputs(len(PREFIX))
    model_logits(model, input_ids, cache, position_ids=position_ids, attention_mask=mask)
    # Accept the path 0 -> 2 -> 4 (tokens 4, 2, 6): the cache becomes PREFIX + path, contiguous.
    keep_cache_positions(cache, len(PREFIX), torch.tensor([0, 2, 4]))
    assert cached_ids(cache) == PREFIX + [4, 2, 6]
    next_logits = model_logits(model, torch.tensor([[8]]), cache)[0, -1]
    assert torch.equal(next_logits, model.exact_next_logits(PREFIX + [4, 2, 6, 8]))


def test_truncate_cache_rolls_back():
    model = ToyLM(seed=2)
    cache = new_cache()
    model_logits(model, torch.tensor([[1, 2, 3, 4, 5, 6]]), cache)
    truncate_cache(cache, 4)
    assert cached_ids(cache) == [1, 2, 3, 4]
    logits = model_logits(model, torch.tensor([[9, 10]]), cache)[0]
    assert torch.equal(logits[0], model.exact_next_logits([1, 2, 3, 4, 9]))
    assert torch.equal(logits[1], model.exact_next_logits([1, 2, 3, 4, 9, 10]))
    # A cache rolled back one position too far gives different logits: the toy really reads its cache.
    truncate_cache(cache, 3)
    assert not torch.equal(model_logits(model, torch.tensor([[9]]), cache)[0, -1], logits[0])


def test_variants_are_deterministic():
    target = ToyLM(seed=5)
    assert torch.equal(ToyLM(seed=5).table, target.table) and not torch.equal(ToyLM(seed=6).table, target.table)
    draft = target.perturbed(noise=0.5, seed=1)
    assert torch.equal(draft.table, target.perturbed(noise=0.5, seed=1).table)
    assert not torch.equal(draft.table, target.table)
    twin = target.copy()
    model_logits(target, torch.tensor([[1]]), new_cache())
    assert torch.equal(twin.table, target.table) and twin.calls == 0 and target.calls == 1


def test_padded_vocab_has_zero_probability():
    model = ToyLM(vocab_size=20, pad_vocab=4, eos_token_id=19)
    logits = model_logits(model, torch.tensor([[1, 2]]), new_cache())
    assert logits.shape == (1, 2, 24) and model.config.vocab_size == 24
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0))
    assert torch.all(probs[..., 20:] == 0)
    assert model.generation_config.eos_token_id == 19


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="eos_token_id=20"):
        ToyLM(vocab_size=20, eos_token_id=20)
    with pytest.raises(ValueError, match="n=4"):
        ToyLM().exact_joint([1], 4, SamplingConfig())


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_exact_joint_is_the_chain_rule(sampling):
    model = ToyLM(vocab_size=6, seed=4)
    prompt = [2, 5]
    joint = model.exact_joint(prompt, 3, sampling)
    assert sum(joint.values()) == pytest.approx(1.0, abs=1e-12)
    for (a, b, c), prob in list(joint.items())[:50]:
        chain = (
            model.exact_next_probs(prompt, sampling)[a]
            * model.exact_next_probs(prompt + [a], sampling)[b]
            * model.exact_next_probs(prompt + [a, b], sampling)[c]
        )
        assert prob == pytest.approx(float(chain), rel=1e-5)
    # The Markov-chain window law agrees at start 0 and with the marginal of a later window.
    window = model.exact_window(prompt, 0, 3, sampling)
    assert set(window) == set(joint) and all(window[s] == pytest.approx(joint[s], abs=1e-12) for s in joint)
    marginal = defaultdict(float)
    for sequence, prob in joint.items():
        marginal[sequence[1:]] += prob
    later = model.exact_window(prompt, 1, 2, sampling)
    assert set(later) == set(marginal) and all(later[s] == pytest.approx(marginal[s], abs=1e-12) for s in later)


def test_exact_joint_stops_at_eos():
    model = ToyLM(vocab_size=6, seed=4)
    sampling = SamplingConfig(temperature=1.0)
    joint = model.exact_joint([2, 5], 3, sampling, eos_token_ids={0})
    assert sum(joint.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(0 not in sequence[:-1] for sequence in joint)
    assert all(len(sequence) == 3 or sequence[-1] == 0 for sequence in joint)
    assert joint[(0,)] == pytest.approx(float(model.exact_next_probs([2, 5], sampling)[0]))
