"""Speculative sampling: greedy equals Baseline token for token, sampling reproduces the target law exactly.

The exactness tests draw many short generations from the real ``SpeculativeSampling.generate`` on toy
models whose law is known in closed form, and G-test the empirical law of a window of 3 generated tokens
against it. The window ends with the bonus token of the first full draft chain (generated tokens
``[k - 1, k + 2)`` of a ``k + 2``-token generation; for k = 1 the first 3 tokens), so the deep chain
positions, the residual draws and the bonus draw are all inside it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import method_key, recorded
from toy import ToyLM

from src.decoding import Baseline, SpeculativeSampling
from src.decoding.sampling import SamplingConfig, make_generator, sample

GREEDY = SamplingConfig()
TOY_PROMPTS = [[1], [3, 4, 5], [7, 7, 7, 2, 19]]
LLAMA_PROMPTS = [[1, 5, 9, 33], [1, 100, 7], [1] + list(range(10, 60))]
ALPHA = 1e-3  # exactness: the G-test must not reject at this level

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: OpenMP wake-ups would dominate on 2 cores


class AcceptEverything(SpeculativeSampling):
    """A wrong rule: keeps every draft token (its output follows q, not p)."""

    def accept(self, drafts, p, q, sampling, generator):
        return drafts.numel(), int(sample(p[drafts.numel()], generator))


class ResampleFromTarget(SpeculativeSampling):
    """A subtly wrong rule: after a rejection samples from p instead of the residual max(0, p - q)."""

    def accept(self, drafts, p, q, sampling, generator):
        accepted, token = super().accept(drafts, p, q, sampling, generator)
        if accepted < drafts.numel():
            token = int(sample(p[accepted], generator))
        return accepted, token


def window_counts(method, target, draft, sampling, n_samples, prompt=(1, 2), seed=0):
    """Empirical law of generated tokens [k - 1, k + 2) of ``k + 2``-token generations, and the exact law."""
    k = method.k
    max_new_tokens, start = k + 2, k - 1
    input_ids = torch.tensor([list(prompt)])
    generator = make_generator(seed)
    counts: Counter = Counter()
    for _ in range(n_samples):
        tokens = method.generate(target, draft, input_ids, max_new_tokens, sampling, set(), generator).tokens
        assert len(tokens) == max_new_tokens
        counts[tuple(tokens[start : start + 3])] += 1
    return counts, target.exact_window(list(prompt), start, 3, sampling)


def check_invariants(generation, max_new_tokens, eos_token_ids=frozenset()):
    stats = generation.stats
    steps = len(stats.accepted_per_step)
    assert 1 <= len(generation.tokens) <= max_new_tokens
    assert stats.target_calls == steps  # the first cycle also encodes the prompt: no separate prefill forward
    assert stats.draft_calls == stats.drafted_tokens
    assert 0 <= stats.accepted_tokens <= stats.drafted_tokens
    assert all(a <= d for a, d in zip(stats.accepted_per_position, stats.drafted_per_position))
    if generation.stopped_by == "max_new_tokens":
        assert len(generation.tokens) == max_new_tokens == stats.accepted_tokens + steps
    else:
        assert generation.tokens[-1] in eos_token_ids
    assert not any(token in eos_token_ids for token in generation.tokens[:-1])
    assert stats.prefill_s > 0 and stats.decode_s >= 0


# ---------------------------------------------------------------- greedy: equal to Baseline


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("prompt", TOY_PROMPTS)
def test_greedy_equals_baseline_on_toy(toy_pair, k, prompt):
    target, draft = toy_pair
    input_ids = torch.tensor([prompt])
    reference = Baseline().generate(target, None, input_ids, 30, GREEDY, set())
    generation = SpeculativeSampling(k).generate(target, draft, input_ids, 30, GREEDY, set())
    assert generation.tokens == reference.tokens
    assert 0 < generation.stats.accepted_tokens < generation.stats.drafted_tokens  # both paths exercised
    check_invariants(generation, 30)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_equals_baseline_on_tiny_llama(llama_pair, k):
    target, draft = llama_pair
    for prompt in LLAMA_PROMPTS:
        input_ids = torch.tensor([prompt])
        reference = Baseline().generate(target, None, input_ids, 24, GREEDY, set())
        generation = SpeculativeSampling(k).generate(target, draft, input_ids, 24, GREEDY, set())
        assert generation.tokens == reference.tokens, f"prompt {prompt}"
        check_invariants(generation, 24)


def test_greedy_makes_no_random_draws(toy_pair):
    target, draft = toy_pair
    generator = make_generator(0)
    state = generator.get_state()
    SpeculativeSampling(3).generate(target, draft, torch.tensor([[1, 2]]), 20, GREEDY, set(), generator)
    assert torch.equal(generator.get_state(), state)


def test_different_vocab_widths_are_sliced(toy_pair):
    """A target with a wider (padded) lm_head than the draft, like Qwen2.5 7B (152064) vs 0.5B (151936)."""
    _, draft = toy_pair
    wide_target = ToyLM(vocab_size=20, seed=0, pad_vocab=7)
    input_ids = torch.tensor([[3, 4]])
    reference = Baseline().generate(wide_target, None, input_ids, 20, GREEDY, set())
    for target, other in ((wide_target, draft), (draft, wide_target)):
        generation = SpeculativeSampling(3).generate(target, other, input_ids, 20, GREEDY, set())
        if target is wide_target:
            assert generation.tokens == reference.tokens
        assert max(generation.tokens) < 20


# ---------------------------------------------------------------- sampling: exactly the target law


def test_sampling_is_exact(toy_pair, goodness_of_fit):
    target, draft = toy_pair
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    counts, exact = window_counts(SpeculativeSampling(2), target, draft, sampling, n_samples=20_000)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.7),
        SamplingConfig(temperature=1.0, top_p=0.9),
        SamplingConfig(temperature=0.7, top_p=0.9, top_k=8),
    ],
    ids=["t1", "t0.7", "t1-p0.9", "t0.7-p0.9-k8"],
)
def test_sampling_is_exact_grid(toy_pair, goodness_of_fit, sampling, k):
    target, draft = toy_pair
    counts, exact = window_counts(SpeculativeSampling(k), target, draft, sampling, n_samples=20_000)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.slow
def test_sampling_is_exact_with_eos_and_wider_target(goodness_of_fit):
    """First 3 tokens with an EOS that often ends them early, on a target wider than the draft."""
    target = ToyLM(vocab_size=20, seed=0, pad_vocab=5)
    draft = ToyLM(vocab_size=20, seed=0).perturbed(noise=1.0, seed=1)
    sampling, prompt = SamplingConfig(temperature=1.0), [1, 2]
    eos = int(target.exact_next_probs(prompt, sampling)[:20].argsort()[-3])  # likely but not the top token
    generator = make_generator(0)
    counts: Counter = Counter()
    for _ in range(20_000):
        generation = SpeculativeSampling(2).generate(target, draft, torch.tensor([prompt]), 3, sampling, {eos}, generator)
        counts[tuple(generation.tokens)] += 1
    exact = target.exact_joint(prompt, 3, sampling, eos_token_ids={eos})
    assert sum(prob for sequence, prob in exact.items() if len(sequence) < 3) > 0.05  # EOS often ends early
    assert goodness_of_fit(counts, exact) > ALPHA


def test_wrong_acceptance_rule_fails_the_check(toy_pair, goodness_of_fit):
    """Teeth: the same check rejects a method that accepts every draft token (with far fewer samples)."""
    target, draft = toy_pair
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    counts, exact = window_counts(AcceptEverything(2), target, draft, sampling, n_samples=3_000)
    assert goodness_of_fit(counts, exact) < 1e-9


@pytest.mark.slow
def test_wrong_residual_fails_the_check(toy_pair, goodness_of_fit):
    """Teeth: sampling from p instead of the residual after a rejection is also caught."""
    target, draft = toy_pair
    counts, exact = window_counts(
        ResampleFromTarget(2), target, draft, SamplingConfig(temperature=1.0), n_samples=20_000
    )
    assert goodness_of_fit(counts, exact) < 1e-6


def test_sampling_is_reproducible_per_seed(llama_pair):
    target, draft = llama_pair
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50)
    input_ids = torch.tensor([LLAMA_PROMPTS[0]])
    runs = [
        SpeculativeSampling(3).generate(target, draft, input_ids, 20, sampling, set(), make_generator(seed))
        for seed in (7, 7, 8)
    ]
    assert runs[0].tokens == runs[1].tokens and runs[0].tokens != runs[2].tokens
    for run in runs:
        check_invariants(run, 20)


# ---------------------------------------------------------------- edge cases and statistics


def test_max_new_tokens_one(toy_pair):
    target, draft = toy_pair
    input_ids = torch.tensor([[3, 4]])
    generation = SpeculativeSampling(4).generate(target, draft, input_ids, 1, GREEDY, set())
    assert generation.tokens == Baseline().generate(target, None, input_ids, 1, GREEDY, set()).tokens
    assert generation.stats.target_calls == 1 and generation.stats.drafted_tokens == 0
    assert generation.stopped_by == "max_new_tokens"


@pytest.mark.parametrize(("max_new_tokens", "target_calls", "drafted"), [(2, 1, 1), (3, 1, 2), (6, 1, 5), (7, 2, 5)])
def test_never_drafts_more_than_needed(toy_pair, max_new_tokens, target_calls, drafted):
    target, draft = toy_pair
    copy = target.copy()  # everything accepted: the call counts are deterministic
    generation = SpeculativeSampling(5).generate(target, copy, torch.tensor([[3]]), max_new_tokens, GREEDY, set())
    assert len(generation.tokens) == max_new_tokens
    assert generation.stats.target_calls == target_calls and generation.stats.drafted_tokens == drafted
    assert target.calls == target_calls and copy.calls == drafted


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=1.0)], ids=["greedy", "t1"])
@pytest.mark.parametrize("k", [1, 4])
def test_identical_draft_accepts_everything(toy_pair, sampling, k):
    target, _ = toy_pair
    max_new_tokens = 4 * (k + 1)  # 4 full cycles of k drafts + 1 bonus (the first one also encodes the prompt)
    generation = SpeculativeSampling(k).generate(
        target, target.copy(), torch.tensor([[1, 2]]), max_new_tokens, sampling, set(), make_generator(0)
    )
    stats = generation.stats
    assert stats.accepted_tokens == stats.drafted_tokens == 4 * k
    assert stats.accepted_per_step == [k] * 4 and stats.target_calls == 4
    assert generation.tokens_per_target_call == pytest.approx(k + 1)
    check_invariants(generation, max_new_tokens)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=1.0)], ids=["greedy", "t1"])
def test_eos_inside_accepted_block_stops_right_after_it(toy_pair, sampling):
    target, _ = toy_pair
    draft = target.copy()  # every draft accepted: the EOS sits inside an accepted chain
    input_ids = torch.tensor([[1, 2]])
    free = SpeculativeSampling(4).generate(target, draft, input_ids, 12, sampling, set(), make_generator(3))
    position = next(i for i in (2, 3, 1) if free.tokens.index(free.tokens[i]) == i)  # a first occurrence
    eos = free.tokens[position]
    stopped = SpeculativeSampling(4).generate(target, draft, input_ids, 12, sampling, {eos}, make_generator(3))
    assert stopped.tokens == free.tokens[: position + 1] and stopped.stopped_by == "eos"
    assert stopped.stats.target_calls == 1  # the first verification's accepted chain held the EOS
    check_invariants(stopped, 12, {eos})


def test_eos_as_first_token(toy_pair):
    target, draft = toy_pair
    input_ids = torch.tensor([[3, 4]])
    first = Baseline().generate(target, None, input_ids, 1, GREEDY, set()).tokens[0]
    generation = SpeculativeSampling(3).generate(target, draft, input_ids, 10, GREEDY, {first})
    assert generation.tokens == [first] and generation.stopped_by == "eos"
    assert generation.stats.target_calls == 1


def test_long_prompt(toy_pair, llama_pair):
    target, draft = toy_pair
    prompt = torch.tensor([[(i * 7) % 20 for i in range(400)]])
    reference = Baseline().generate(target, None, prompt, 16, GREEDY, set())
    assert SpeculativeSampling(4).generate(target, draft, prompt, 16, GREEDY, set()).tokens == reference.tokens
    llama_target, llama_draft = llama_pair
    prompt = torch.tensor([[(i * 37) % 128 for i in range(300)]])
    reference = Baseline().generate(llama_target, None, prompt, 16, GREEDY, set())
    generation = SpeculativeSampling(4).generate(llama_target, llama_draft, prompt, 16, GREEDY, set())
    assert generation.tokens == reference.tokens


@pytest.mark.parametrize("k", [1, 3, 6])
def test_stats_invariants_under_sampling(toy_pair, k):
    target, draft = toy_pair
    sampling = SamplingConfig(temperature=1.0, top_p=0.95)
    generator = make_generator(11)
    method = SpeculativeSampling(k)
    eos = {19}
    for max_new_tokens in (1, 2, 5, 17, 40):
        target.calls = draft.calls = 0
        generation = method.generate(target, draft, torch.tensor([[4, 8]]), max_new_tokens, sampling, eos, generator)
        check_invariants(generation, max_new_tokens, eos)
        assert target.calls == generation.stats.target_calls and draft.calls == generation.stats.draft_calls
        assert len(generation.stats.drafted_per_position) <= k
        assert all(accepted <= k for accepted in generation.stats.accepted_per_step)


# ---------------------------------------------------------------- parameters


def test_method_identity():
    method = SpeculativeSampling(k=3)
    assert method_key(method) == "speculative" and method.needs_draft and recorded(method) == {"k": 3}
    assert recorded(SpeculativeSampling()) == {"k": 4}


@pytest.mark.parametrize("k", [0, -2])
def test_bad_k_is_named(k):
    with pytest.raises(ValueError, match=f"k={k}"):
        SpeculativeSampling(k=k)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": -0.5}, "temperature=-0.5"), ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5")],
)
def test_bad_sampling_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_bad_generate_arguments_are_named(toy_pair):
    target, draft = toy_pair
    method = SpeculativeSampling(2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        method.generate(target, draft, torch.tensor([[1, 2]]), 0, GREEDY, set())
    with pytest.raises(ValueError, match="draft=None"):
        method.generate(target, None, torch.tensor([[1, 2]]), 5, GREEDY, set())


# ---------------------------------------------------------------- adaptive drafting (HF-style schedule, early stop)

ADAPTIVE = {"schedule": "heuristic", "max_k": 4, "confidence_threshold": 0.3}


def test_adaptive_drafting_is_exact(toy_pair, goodness_of_fit):
    """Chain lengths that follow the draft's confidence and the past acceptance keep the target law."""
    target, draft = toy_pair
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    counts, exact = window_counts(SpeculativeSampling(2, **ADAPTIVE), target, draft, sampling, n_samples=20_000)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.parametrize("options", [ADAPTIVE, {"schedule": "heuristic"}, {"confidence_threshold": 0.6}])
def test_adaptive_drafting_keeps_the_greedy_output(toy_pair, llama_pair, options):
    for (target, draft), prompt in ((toy_pair, [3, 4]), (llama_pair, LLAMA_PROMPTS[0])):
        input_ids = torch.tensor([prompt])
        reference = Baseline().generate(target, None, input_ids, 30, GREEDY, set())
        generation = SpeculativeSampling(2, **options).generate(target, draft, input_ids, 30, GREEDY, set())
        assert generation.tokens == reference.tokens
        check_invariants(generation, 30)


def test_heuristic_schedule_grows_after_full_acceptance_up_to_max_k(toy_pair):
    target, _ = toy_pair
    method = SpeculativeSampling(2, schedule="heuristic", max_k=6)
    generation = method.generate(target, target.copy(), torch.tensor([[1, 2]]), 3 + 5 + 7 + 7, GREEDY, set())
    assert generation.stats.accepted_per_step == [2, 4, 6, 6]  # +2 per fully accepted chain, capped at max_k
    assert [method.next_k(k, k, a) for k, a in ((4, 1), (1, 0), (5, 5))] == [3, 1, 6]


def test_confidence_threshold_stops_chains_early(toy_pair):
    target, draft = toy_pair
    sure = SpeculativeSampling(4, confidence_threshold=0.999).generate(
        target, draft, torch.tensor([[3, 4]]), 30, GREEDY, set())
    assert sure.stats.drafted_per_position[1:] == [0] * (len(sure.stats.drafted_per_position) - 1)
    # One draft per cycle (the toy draft is never that sure), none in a last cycle with one token left to emit.
    assert sure.stats.target_calls - 1 <= sure.stats.drafted_tokens <= sure.stats.target_calls
    plain = SpeculativeSampling(4).generate(target, draft, torch.tensor([[3, 4]]), 30, GREEDY, set())
    assert plain.stats.drafted_tokens > plain.stats.target_calls and plain.tokens == sure.tokens


def test_adaptive_parameters_are_checked_and_named():
    assert recorded(SpeculativeSampling(3, **ADAPTIVE)) == {
        "k": 3, "schedule": "heuristic", "max_k": 4, "confidence_threshold": 0.3}
    for kwargs, message in (
        ({"schedule": "linear"}, "schedule='linear'"),
        ({"k": 8, "max_k": 4}, "max_k=4"),
        ({"confidence_threshold": 1.0}, "confidence_threshold=1.0"),
    ):
        with pytest.raises(ValueError, match=message):
            SpeculativeSampling(**kwargs)
