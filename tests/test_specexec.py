"""SpecExec: greedy == baseline on tiny Llama pairs, exact sampling on toy models (with a wrong rule that must
fail the same check), edge cases, statistics and parameter errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import recorded
from toy import ToyLM

from src.decoding.baseline import Baseline
from src.decoding.sampling import SamplingConfig, logits_to_probs, sample
from src.decoding.specexec import SpecExec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread is much faster on 2 cores

GREEDY = SamplingConfig()
PROMPTS = [[5], [17, 3, 99, 4, 61], list(range(10, 70))]  # the last is longer than any tree
SHAPES = [  # (budget, max_depth, max_beams, max_branch_width)
    (32, 8, 8, 8),
    (1, 8, 8, 8),
    (4, 3, 2, 2),
    (16, 6, 1, 4),
    (64, 12, 16, 3),
]


def generate(method, target, draft, prompt, max_new_tokens, sampling=GREEDY, eos=(), generator=None):
    return method.generate(
        target, draft, torch.tensor([prompt]), max_new_tokens, sampling, set(eos), generator
    )


# ------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"budget": 0}, "budget=0"),
        ({"max_depth": 0}, "max_depth=0"),
        ({"max_beams": -1}, "max_beams=-1"),
        ({"max_branch_width": 0}, "max_branch_width=0"),
        ({"budget": 2.5}, "budget=2.5"),
        ({"prune_threshold": -0.1}, "prune_threshold=-0.1"),
        ({"prune_threshold": 1.0}, "prune_threshold=1.0"),
        ({"scoring_temperature": 0.0}, "scoring_temperature=0.0"),
    ],
)
def test_parameter_errors_name_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SpecExec(**kwargs)


def test_params_identity_and_draft_required(toy_pair):
    method = SpecExec(budget=7, max_depth=3, max_beams=2, max_branch_width=5, prune_threshold=1e-3)
    assert method.name == "specexec" and method.needs_draft
    assert recorded(method) == {
        "budget": 7,
        "max_depth": 3,
        "max_beams": 2,
        "max_branch_width": 5,
        "prune_threshold": 1e-3,
    }
    assert recorded(SpecExec(**recorded(method))) == recorded(method)
    tempered = SpecExec(scoring_temperature=0.5)
    assert recorded(tempered)["scoring_temperature"] == 0.5 and "scoring_temperature" not in recorded(SpecExec())
    with pytest.raises(ValueError, match="draft"):
        generate(method, toy_pair[0], None, [1, 2], 4)


# ------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-beams{}-w{}".format(*s))
def test_greedy_equals_baseline_on_tiny_llama(llama_pair, shape):
    target, draft = llama_pair
    budget, max_depth, max_beams, width = shape
    method = SpecExec(budget=budget, max_depth=max_depth, max_beams=max_beams, max_branch_width=width)
    for prompt in PROMPTS:
        expected = generate(Baseline(), target, None, prompt, 20).tokens
        out = generate(method, target, draft, prompt, 20)
        assert out.tokens == expected, f"prompt {prompt[:6]}..."
        assert out.stopped_by == "max_new_tokens"
        check_stats(out, method, prompt_len=len(prompt))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-beams{}-w{}".format(*s))
def test_greedy_equals_baseline_on_toy_with_eos(shape):
    target = ToyLM(vocab_size=16, seed=3, scale=3.0)
    draft = target.perturbed(noise=1.0, seed=4)
    budget, max_depth, max_beams, width = shape
    method = SpecExec(budget=budget, max_depth=max_depth, max_beams=max_beams, max_branch_width=width)
    for prompt in ([1], [2, 9, 4], list(range(16)) * 3):
        for eos in ((), (7,), (0, 11)):
            expected = generate(Baseline(), target, None, prompt, 30, eos=eos)
            out = generate(method, target, draft, prompt, 30, eos=eos)
            assert out.tokens == expected.tokens and out.stopped_by == expected.stopped_by
            check_stats(out, method, prompt_len=len(prompt), eos=eos)


def test_vocab_width_mismatch_uses_shared_ids():
    """A padded lm_head (target 16 + 5 columns, draft 16) is sliced to the shared 16 ids."""
    target = ToyLM(vocab_size=16, seed=5, scale=3.0, pad_vocab=5)
    draft = ToyLM(vocab_size=16, seed=5, scale=3.0).perturbed(noise=0.5, seed=6)
    method = SpecExec(budget=8, max_depth=4, max_beams=2, max_branch_width=3)
    for prompt in ([3], [4, 8, 15]):
        assert (
            generate(method, target, draft, prompt, 25).tokens
            == generate(Baseline(), target, None, prompt, 25).tokens
        )
        assert (
            generate(method, draft, target, prompt, 25).tokens
            == generate(Baseline(), draft, None, prompt, 25).tokens
        )


# ------------------------------------------------------------------------------------- edge cases


def test_max_new_tokens_one_runs_no_draft(toy_pair):
    target, draft = toy_pair
    out = generate(SpecExec(), target, draft, [1, 2, 3], 1)
    # One target forward over the prompt (no tree: depth cap 0); the draft never runs.
    assert out.stats.target_calls == 1 and out.stats.draft_calls == 0
    assert target.calls == 1 and draft.calls == 0
    assert out.stats.extra["tree_size"] == [0] and out.stats.extra["draft_forwards"] == [0]
    assert out.tokens == generate(Baseline(), target, None, [1, 2, 3], 1).tokens


def test_budget_one_is_a_single_draft_token(toy_pair):
    target, draft = toy_pair
    out = generate(SpecExec(budget=1), target, draft, [4, 5], 15)
    assert out.tokens == generate(Baseline(), target, None, [4, 5], 15).tokens
    assert set(out.stats.extra["tree_size"][:-1]) == {1}
    assert max(out.stats.extra["accepted_length"]) <= 1


def test_eos_inside_an_accepted_path_stops_right_there():
    target = ToyLM(vocab_size=16, seed=8, scale=4.0)
    free = generate(Baseline(), target, None, [2, 3], 12).tokens
    stop = next(i for i in range(3, 12) if free[i] not in free[:i])  # first new token from the 4th on
    eos = free[stop]
    out = generate(SpecExec(budget=16, max_depth=8), target, target.copy(), [2, 3], 12, eos=(eos,))
    assert out.tokens == free[: stop + 1] and out.stopped_by == "eos"
    # The EOS was a drafted (accepted) token: no token was drawn after leaving the tree in the last iteration.
    extra = out.stats.extra
    assert len(out.tokens) == sum(extra["accepted_length"]) + len(extra["accepted_length"]) - 1


def test_identical_draft_gives_long_acceptances():
    target = ToyLM(vocab_size=16, seed=9, scale=5.0)
    out = generate(SpecExec(budget=32, max_depth=5), target, target.copy(), [1], 60)
    assert out.tokens == generate(Baseline(), target, None, [1], 60).tokens
    accepted = out.stats.extra["accepted_length"]
    assert sum(accepted) / len(accepted) >= 4.0, accepted
    assert len(out.tokens) / out.stats.target_calls >= 5.0


def test_seeded_sampling_is_reproducible(toy_pair):
    target, draft = toy_pair
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)
    runs = [
        generate(
            SpecExec(budget=8, max_depth=3),
            target,
            draft,
            [1, 2],
            30,
            sampling,
            generator=torch.Generator().manual_seed(7),
        ).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_prune_threshold_shrinks_the_tree(toy_pair):
    target, draft = toy_pair
    full = generate(SpecExec(budget=32, max_depth=4), target, draft, [1, 2], 30)
    pruned = generate(SpecExec(budget=32, max_depth=4, prune_threshold=0.05), target, draft, [1, 2], 30)
    assert pruned.tokens == full.tokens
    assert sum(pruned.stats.extra["tree_size"]) < sum(full.stats.extra["tree_size"])
    # Every kept node has cumulative draft probability >= 0.05, so at most 1 / 0.05 nodes per depth.
    assert max(pruned.stats.extra["tree_size"]) <= 4 * 20


# ------------------------------------------------------------------------------------- statistics


def check_stats(out, method: SpecExec, prompt_len: int, eos=()) -> None:
    """Invariants of one generation's statistics."""
    stats, extra = out.stats, out.stats.extra
    iterations = len(extra["tree_size"])
    assert stats.target_calls == iterations  # the first iteration also encodes the prompt
    assert stats.draft_calls == sum(extra["draft_forwards"])
    assert len(stats.accepted_per_step) == iterations
    assert stats.accepted_per_step == extra["accepted_length"]
    assert stats.accepted_tokens == sum(extra["accepted_length"])
    assert stats.drafted_tokens == sum(extra["tree_depth"])
    # Every iteration emits its accepted tree tokens + one drawn outside the tree, except when an accepted
    # tree token is EOS (then nothing follows it).
    ended_in_tree = out.stopped_by == "eos" and len(out.tokens) == stats.accepted_tokens + iterations - 1
    assert len(out.tokens) == stats.accepted_tokens + iterations - int(ended_in_tree)
    assert not set(out.tokens[:-1]) & set(eos)
    for size, depth, forwards, accepted, leaves, generated, kept in zip(
        *(
            extra[key]
            for key in (
                "tree_size",
                "tree_depth",
                "draft_forwards",
                "accepted_length",
                "leaves",
                "candidates_generated",
                "candidates_kept",
            )
        )
    ):
        assert 0 <= accepted <= depth <= min(size, method.max_depth)
        assert size <= method.budget and kept == size <= generated
        assert forwards <= method.max_depth
        assert (leaves == 0) == (size == 0) and leaves <= size
    assert extra["max_active_branches"] == max(extra["leaves"])
    assert extra["effective_parallelism"] == pytest.approx(sum(extra["tree_size"]) / iterations + 1)
    assert extra["tree_size_mean"] == pytest.approx(sum(extra["tree_size"]) / iterations)
    assert extra["tree_depth_mean"] == pytest.approx(sum(extra["tree_depth"]) / iterations)
    assert 0.0 <= extra["branch_prune_rate"] <= 1.0


def test_stats_match_model_call_counters(toy_pair):
    target, draft = toy_pair
    method = SpecExec(budget=12, max_depth=4, max_beams=3, max_branch_width=4)
    out = generate(
        method,
        target,
        draft,
        [1, 2, 3],
        40,
        SamplingConfig(temperature=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    check_stats(out, method, prompt_len=3)
    assert out.stats.target_calls == target.calls and out.stats.draft_calls == draft.calls
    assert len(out.tokens) == 40


# ------------------------------------------------------------------------------------- exact sampling


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9)]
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-beams{}-w{}".format(*s))
def test_sampling_is_coupled_to_baseline(shape, sampling):
    """The tree consumes no randomness and the walk makes exactly one draw from p per emitted token, in order:
    with the same seed SpecExec emits exactly Baseline's tokens (the toy's logits are exact, so p is
    bit-identical). Any wrong row, path or cache entry changes p somewhere and breaks the coupling."""
    target = ToyLM(vocab_size=12, seed=21, scale=2.0, eos_token_id=11)
    draft = target.perturbed(noise=0.7, seed=22)
    budget, max_depth, max_beams, width = shape
    method = SpecExec(budget=budget, max_depth=max_depth, max_beams=max_beams, max_branch_width=width)
    for seed in range(4):
        for prompt in ([4], [1, 2, 3]):
            expected = generate(
                Baseline(), target, None, prompt, 40, sampling, {11}, torch.Generator().manual_seed(seed)
            )
            out = generate(
                method, target, draft, prompt, 40, sampling, {11}, torch.Generator().manual_seed(seed)
            )
            assert out.tokens == expected.tokens and out.stopped_by == expected.stopped_by
            check_stats(out, method, prompt_len=len(prompt), eos=(11,))


N_SAMPLES = 20_000
EXACT_PROMPT = [3]


def sampling_pair() -> tuple[ToyLM, ToyLM]:
    """An 8-token toy target with EOS = 7 and a noisy draft (acceptance well below 1)."""
    target = ToyLM(vocab_size=8, seed=11, scale=1.5, eos_token_id=7)
    return target, target.perturbed(noise=0.8, seed=12)


def first_three_counts(method, target, draft, sampling, n: int, seed: int = 0) -> Counter:
    generator = torch.Generator().manual_seed(seed)
    eos = {target.eos_token_id}
    return Counter(
        tuple(generate(method, target, draft, EXACT_PROMPT, 3, sampling, eos=eos, generator=generator).tokens)
        for _ in range(n)
    )


def exactness_pvalue(method, sampling, goodness_of_fit, n: int = N_SAMPLES) -> float:
    """G-test p-value of the first 3 generated tokens (n runs) against the target's exact joint law."""
    target, draft = sampling_pair()
    exact = target.exact_joint(EXACT_PROMPT, 3, sampling, {target.eos_token_id})
    return goodness_of_fit(first_three_counts(method, target, draft, sampling, n), exact)


def test_sampling_is_exact(goodness_of_fit):
    method = SpecExec(budget=4, max_depth=2, max_beams=2, max_branch_width=2)
    pvalue = exactness_pvalue(method, SamplingConfig(temperature=1.0), goodness_of_fit)
    assert pvalue > 1e-3


SAMPLINGS = {
    "t1.0": SamplingConfig(temperature=1.0),
    "t0.7": SamplingConfig(temperature=0.7),
    "top_p0.9": SamplingConfig(temperature=1.0, top_p=0.9),
}


@pytest.mark.slow
@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (3, 2, 1, 3), (6, 2, 3, 2), (32, 8, 8, 8)],
    ids=lambda s: "b{}-d{}-beams{}-w{}".format(*s),
)
def test_sampling_is_exact_grid(goodness_of_fit, sampling, shape):
    budget, max_depth, max_beams, width = shape
    method = SpecExec(budget=budget, max_depth=max_depth, max_beams=max_beams, max_branch_width=width)
    assert exactness_pvalue(method, sampling, goodness_of_fit) > 1e-3


class AlwaysTopChild(SpecExec):
    """WRONG on purpose: at a node with drafted children, accept the best-scored child instead of drawing from p."""

    @staticmethod
    def _walk_tree(tree, nodes, logits, sampling, generator, eos_token_ids):
        row_of = {node: row for row, node in enumerate(nodes, start=1)}
        emitted, accepted, node = [], [], 0
        while True:
            children = [child for child in nodes if tree.parents[child] == node]
            if not children:
                row = row_of.get(node, 0)
                emitted.append(int(sample(logits_to_probs(logits[row], sampling), generator)))
                return emitted, accepted
            node = max(children, key=lambda child: tree.scores[child])
            emitted.append(tree.tokens[node])
            accepted.append(node)
            if tree.tokens[node] in eos_token_ids:
                return emitted, accepted


class RedrawOnce(SpecExec):
    """WRONG on purpose: a draw that leaves the tree is redrawn once from the same p (favours drafted tokens)."""

    @staticmethod
    def _walk_tree(tree, nodes, logits, sampling, generator, eos_token_ids):
        row_of = {node: row for row, node in enumerate(nodes, start=1)}
        child_of = tree.child_index(nodes)
        emitted, accepted, node, row = [], [], 0, 0
        while True:
            probs = logits_to_probs(logits[row], sampling)
            token = int(sample(probs, generator))
            if (node, token) not in child_of:
                token = int(sample(probs, generator))
            emitted.append(token)
            child = child_of.get((node, token))
            if child is None:
                return emitted, accepted
            accepted.append(child)
            if token in eos_token_ids:
                return emitted, accepted
            node, row = child, row_of[child]


@pytest.mark.parametrize("wrong", [AlwaysTopChild, RedrawOnce])
def test_wrong_rule_fails_the_exactness_check(goodness_of_fit, wrong):
    """Teeth: the same check rejects a broken walk, even with an eighth of the samples (p ~ 1e-78 at 1000)."""
    method = wrong(budget=4, max_depth=2, max_beams=2, max_branch_width=2)
    assert exactness_pvalue(method, SamplingConfig(temperature=1.0), goodness_of_fit, n=N_SAMPLES // 8) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("wrong", [AlwaysTopChild, RedrawOnce])
def test_wrong_rule_fails_the_exactness_check_full(goodness_of_fit, wrong):
    method = wrong(budget=6, max_depth=2, max_beams=3, max_branch_width=2)
    assert exactness_pvalue(method, SamplingConfig(temperature=0.7), goodness_of_fit) < 1e-3


@pytest.mark.parametrize("wrong", [AlwaysTopChild, RedrawOnce])
def test_wrong_rule_breaks_the_coupling(wrong):
    target = ToyLM(vocab_size=12, seed=21, scale=2.0)
    draft = target.perturbed(noise=0.7, seed=22)
    sampling = SamplingConfig(temperature=1.0)
    method = wrong(budget=8, max_depth=3, max_beams=2, max_branch_width=2)
    differs = [
        generate(
            method, target, draft, [4], 40, sampling, generator=torch.Generator().manual_seed(seed)
        ).tokens
        != generate(
            Baseline(), target, None, [4], 40, sampling, generator=torch.Generator().manual_seed(seed)
        ).tokens
        for seed in range(4)
    ]
    assert all(differs)


@pytest.mark.parametrize("temperature", [None, 0.05, 1.0, 3.0])
def test_scoring_temperature_shapes_the_tree_never_the_output(llama_pair, temperature):
    """Greedy: any scoring gives the baseline's tokens; a sharper score spends the budget deeper."""
    target, draft = llama_pair
    prompt = [5, 9, 2, 7]
    reference = generate(Baseline(), target, None, prompt, 20).tokens
    out = generate(SpecExec(budget=8, max_depth=8, scoring_temperature=temperature), target, draft, prompt, 20)
    assert out.tokens == reference
    if temperature == 0.05:
        wide = generate(SpecExec(budget=8, max_depth=8, scoring_temperature=3.0), target, draft, prompt, 20)
        assert out.stats.extra["tree_depth_mean"] > wide.stats.extra["tree_depth_mean"]
    sampling = SamplingConfig(temperature=0.7)
    assert SpecExec(scoring_temperature=temperature).scoring(sampling) == (
        sampling if temperature is None else SamplingConfig(temperature=temperature))
