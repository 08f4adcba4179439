"""Drafters: prompt lookup proposes what HF's prompt lookup proposes, its tree form is well-formed, and both
verifiers stay lossless with it (greedy equals Baseline on tiny Llama and on the embedded SmolLM2; sampling
reproduces the toy target's exact law, and a rule that trusts looked-up tokens fails the same check).

A looked-up chain is a deterministic proposal (one-hot q): speculative sampling accepts x with probability
p(x) and otherwise samples from p with x removed; SpecExec walks the tree of looked-up branches by drawing
from p. Neither needs a draft model, so every ``generate`` here runs with ``draft=None``.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import chat_input_ids, dataset_file, method_key, recorded
from toy import ToyLM
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from src.decoding import Baseline, SamplingConfig, SpecExec, SpeculativeSampling
from src.decoding.drafters import Drafter, ModelDrafter, PromptLookup, Proposal
from src.decoding.sampling import make_generator, next_token, sample
from src.errors import InvalidParameterError
from src.results.records import first_divergence

GREEDY = SamplingConfig()
ALPHA = 1e-3  # exactness: the G-test must not reject at this level
CPU = torch.device("cpu")


def generate(method, target, prompt, max_new_tokens, sampling=GREEDY, generator=None, eos=()):
    """``method.generate`` without a draft model (every method here drafts by lookup)."""
    input_ids = torch.tensor([list(prompt)])
    return method.generate(target, None, input_ids, max_new_tokens, sampling, set(eos), generator)


# ---------------------------------------------------------------- the chain lookup equals HF's


def random_sequences(count: int, seed: int):
    """``count`` sequences of 2..60 tokens over 5..8 ids (small vocabularies: n-gram matches are frequent)."""
    rng = random.Random(seed)
    for _ in range(count):
        vocab = rng.randint(5, 8)
        yield [rng.randrange(vocab) for _ in range(rng.randint(2, 60))]


def hf_candidates(sequence: list[int], k: int, max_ngram: int) -> list[int]:
    """The tokens transformers' prompt-lookup candidate generator appends to ``sequence`` ([] when none)."""
    generator = PromptLookupCandidateGenerator(
        num_output_tokens=k, max_matching_ngram_size=max_ngram, max_length=10**6
    )
    candidates, _ = generator.get_candidates(torch.tensor([sequence]))
    return candidates[0, len(sequence) :].tolist()


@pytest.mark.parametrize("max_ngram", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_chain_lookup_equals_hf_prompt_lookup(k, max_ngram):
    """On random sequences PromptLookup(max_ngram, min_ngram=1) proposes exactly HF's candidates (nothing when
    HF finds no match), and a proposal costs no forward and carries no q."""
    drafter = PromptLookup(max_ngram=max_ngram, min_ngram=1)
    drafter.begin(None, 8, CPU)
    outcomes = Counter()
    for sequence in random_sequences(150, seed=100 * k + max_ngram):
        expected = hf_candidates(sequence, k, max_ngram)
        proposal = drafter.propose(sequence, k, GREEDY, None)
        assert proposal.tokens.tolist() == expected, f"sequence {sequence}"
        assert proposal.tokens.dtype == torch.long and proposal.q is None and proposal.forwards == 0
        outcomes["match" if expected else "none"] += 1
    assert outcomes["match"] and outcomes["none"]  # both cases were compared


def test_lookup_never_proposes_a_token_the_target_cannot_score():
    """Ids at or above the target's vocabulary (here 5) never reach the verifier."""
    drafter = PromptLookup(max_ngram=2)
    drafter.begin(None, 5, CPU)
    sequence = [1, 2, 7, 3, 9, 1, 2]
    assert drafter.continuations(sequence, 4, limit=1) == [[7, 3, 9, 1]]  # the raw lookup holds 7 and 9
    assert all(token < 5 for token in drafter.propose(sequence, 4, GREEDY, None).tokens.tolist())


# ---------------------------------------------------------------- the tree form


def brute_force_branches(sequence, depth, max_ngram, min_ngram, limit):
    """The specification, spelled out: the distinct continuations (<= depth tokens, in order of first
    occurrence) of every earlier occurrence of the longest suffix n-gram in [min_ngram, max_ngram] that has
    one."""
    end = len(sequence)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= end:
            continue
        starts = [i for i in range(end - n) if sequence[i : i + n] == sequence[end - n :]]
        branches: list[list[int]] = []
        for start in starts:
            if sequence[start + n : start + n + depth] not in branches:
                branches.append(sequence[start + n : start + n + depth])
        if branches:
            return branches[:limit]
    return []


@pytest.mark.parametrize(
    ("max_ngram", "min_ngram", "max_branches", "depth"),
    [(3, 1, 4, 3), (2, 1, 2, 1), (4, 2, 3, 6), (1, 1, 8, 2), (3, 3, 5, 4)],
)
def test_continuations_are_distinct_longest_ngram_earliest_first(max_ngram, min_ngram, max_branches, depth):
    """Branches are distinct, non-empty, at most ``depth`` long, at most ``max_branches`` of them, all from
    the longest matching n-gram, earliest match first (checked against a brute-force spelling of the rule)."""
    drafter = PromptLookup(max_ngram=max_ngram, min_ngram=min_ngram, max_branches=max_branches)
    several = 0
    for sequence in random_sequences(200, seed=7 * max_ngram + depth):
        branches = drafter.continuations(sequence, depth)
        assert len(branches) <= max_branches
        assert all(1 <= len(branch) <= depth for branch in branches)
        assert len({tuple(branch) for branch in branches}) == len(branches)
        assert branches == brute_force_branches(sequence, depth, max_ngram, min_ngram, max_branches), sequence
        assert drafter.continuations(sequence, depth, limit=1) == branches[:1]
        several += len(branches) > 1
    assert several or max_branches == 1  # sibling branches were produced and checked


def test_continuations_by_hand():
    """Known outputs: a 3-gram match beats 2-gram ones, siblings keep first-occurrence order and are
    deduplicated, max_branches / min_ngram / depth cut as documented, nothing runs past the end of the
    sequence."""
    sequence = [1, 2, 3, 9, 1, 2, 4, 1, 2, 3, 7, 1, 2]  # "1 2" at 0, 4, 7 (and as the suffix)
    assert PromptLookup(3, max_branches=3).continuations(sequence, 3) == [[3, 9, 1], [4, 1, 2], [3, 7, 1]]
    assert PromptLookup(3, max_branches=2).continuations(sequence, 3) == [[3, 9, 1], [4, 1, 2]]
    assert PromptLookup(3, max_branches=3).continuations(sequence, 1) == [[3], [4]]  # [3] only once
    assert PromptLookup(3, max_branches=3).continuations(sequence, 0) == []
    longest = [5, 1, 2, 6, 3, 1, 2, 8, 3, 1, 2]  # the 3-gram "3 1 2" at 4; the 2-gram "1 2" also at 1
    assert PromptLookup(3, max_branches=3).continuations(longest, 3) == [[8, 3, 1]]
    assert PromptLookup(2, max_branches=3).continuations(longest, 3) == [[6, 3, 1], [8, 3, 1]]
    unigram = [5, 6, 5, 7, 5]  # only the last token matches earlier
    assert PromptLookup(3, max_branches=3).continuations(unigram, 2) == [[6, 5], [7, 5]]
    assert PromptLookup(3, min_ngram=2, max_branches=3).continuations(unigram, 2) == []
    assert PromptLookup(3).continuations([1, 2, 1], 5) == [[2, 1]]
    drafter = PromptLookup(3, max_branches=3)
    drafter.begin(None, 16, CPU)
    assert drafter.propose(sequence, 3, GREEDY, None).tokens.tolist() == [3, 9, 1]  # the first branch


# ---------------------------------------------------------------- greedy: equal to Baseline on tiny Llama


def repeated_block_prompt() -> list[int]:
    """BOS + a random 7-token block three times + its start: the text copies itself, as lookups need."""
    rng = random.Random(3)
    block = [rng.randrange(3, 128) for _ in range(7)]
    return [1, *block * 3, *block[:3]]


LLAMA_PROMPTS = [[1, 5, 9, 5, 9, 5, 9, 33], repeated_block_prompt()]
LOOKUP_METHODS = {
    **{f"speculative-k{k}": SpeculativeSampling(k, drafter=PromptLookup()) for k in (1, 3, 8)},
    **{
        f"specexec-b{budget}-branches{branches}": SpecExec(
            budget=budget, max_depth=6, drafter=PromptLookup(max_branches=branches)
        )
        for budget in (4, 16)
        for branches in (1, 3)
    },
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(LOOKUP_METHODS))
def test_greedy_equals_baseline_on_tiny_llama(llama_pair, name):
    """Token for token Baseline's greedy output, with looked-up tokens accepted (fewer target forwards than
    tokens) and no draft forward at all."""
    target, _ = llama_pair
    method = LOOKUP_METHODS[name]
    accepted = 0
    for prompt in LLAMA_PROMPTS:
        expected = generate(Baseline(), target, prompt, 32).tokens
        generation = generate(method, target, prompt, 32)
        assert generation.tokens == expected, f"prompt {prompt}"
        stats = generation.stats
        assert stats.draft_calls == 0
        assert len(generation.tokens) == stats.accepted_tokens + stats.target_calls
        accepted += stats.accepted_tokens
    assert accepted > 0  # the lookups really proposed tokens that the target agreed with


# ---------------------------------------------------------------- sampling: exactly the target law

SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9)
# ToyLM(20, seed=0) greedily cycles through 16 4 4 17 12 11 14 19; after "16 4" it draws 4 / 9 with
# p ~ 0.43 / 0.18, after "4 4" 17 / 7 with p ~ 0.71 / 0.29. The prompt's last 2-gram "16 4" occurs three times
# before (then 4 17 12 / 4 7 13 / 9 8 6), its last 3-gram "2 16 4" never: the chain looks up 4 17 12, the tree
# (budget 6) is 4 -> {17 -> 12, 7 -> 13}, 9. Lookups are thus often rejected and often accepted, on every
# branch.
LOOKUP_PROMPT = (16, 4, 4, 17, 12, 3, 16, 4, 4, 7, 13, 5, 16, 4, 9, 8, 6, 2, 16, 4)
N_SAMPLES = 20_000


def toy_target() -> ToyLM:
    return ToyLM(vocab_size=20, seed=0)


def lookup_window(method, target, start, n_samples, seed=0):
    """Empirical law of generated tokens [start, start + 3) of (start + 3)-token generations from
    LOOKUP_PROMPT, the exact law, and the generations' statistics."""
    generator = make_generator(seed)
    counts: Counter = Counter()
    runs = []
    for _ in range(n_samples):
        generation = generate(method, target, LOOKUP_PROMPT, start + 3, SAMPLING, generator)
        assert len(generation.tokens) == start + 3
        counts[tuple(generation.tokens[start:])] += 1
        runs.append(generation)
    return counts, target.exact_window(list(LOOKUP_PROMPT), start, 3, SAMPLING), runs


class TrustLookups(SpeculativeSampling):
    """WRONG on purpose: a looked-up token (q None) is taken with probability 1, then the bonus comes from
    p."""

    def accept(self, drafts, p, q, sampling, generator):
        if q is not None or sampling.greedy:
            return super().accept(drafts, p, q, sampling, generator)
        return drafts.numel(), int(sample(p[drafts.numel()], generator))


class FollowFirstBranch(SpecExec):
    """WRONG on purpose: descends to the first drafted child of each node without drawing from p."""

    @staticmethod
    def _walk_tree(tree, nodes, logits, sampling, generator, eos_token_ids):
        first_child: dict[int, int] = {}
        for (parent, _), child in tree.child_index(nodes).items():
            first_child[parent] = min(child, first_child.get(parent, child))
        node, emitted, accepted = 0, [], []
        while node in first_child and not (emitted and emitted[-1] in eos_token_ids):
            node = first_child[node]
            accepted.append(node)
            emitted.append(tree.tokens[node])
        if not (emitted and emitted[-1] in eos_token_ids):
            row = nodes.index(node) + 1 if node else 0
            emitted.append(next_token(logits[row], sampling, generator))
        return emitted, accepted


def chain_method(k: int, cls=SpeculativeSampling):
    return cls(k, drafter=PromptLookup(max_ngram=2, min_ngram=1))


def tree_method(cls=SpecExec):
    return cls(budget=6, max_depth=3, drafter=PromptLookup(max_branches=3))


@pytest.mark.usefixtures("one_thread")
def test_lookup_chain_sampling_is_exact(goodness_of_fit):
    """k = 3 (window [2, 5): the deepest looked-up position, the bonus and the next cycle) matches the
    target's law, and the run did propose lookups that were sometimes accepted, sometimes rejected."""
    counts, exact, runs = lookup_window(chain_method(3), toy_target(), 2, N_SAMPLES)
    drafted = sum(run.stats.drafted_tokens for run in runs)
    accepted = sum(run.stats.accepted_tokens for run in runs)
    full = sum(run.stats.accepted_per_step[0] == 3 for run in runs)  # the whole first chain kept
    assert 0.1 * drafted < accepted < 0.9 * drafted and 0 < full < len(runs)
    assert all(run.stats.draft_calls == 0 for run in runs)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.usefixtures("one_thread")
def test_lookup_tree_sampling_is_exact(goodness_of_fit):
    """SpecExec over three looked-up branches (budget 6, depth 3; window [1, 4)) matches the target's law, and
    the walk accepted tokens off the first branch as well as on it, and left the tree early too."""
    counts, exact, runs = lookup_window(tree_method(), toy_target(), 1, N_SAMPLES)
    first_branch = PromptLookup(max_branches=3).continuations(list(LOOKUP_PROMPT), 3)[0]
    paths = Counter()
    for run in runs:
        taken = run.tokens[: run.stats.accepted_per_step[0]]
        paths["first" if taken == first_branch[: len(taken)] else "other"] += bool(taken)
        paths["rejected"] += len(taken) < 3
    assert runs[0].stats.extra["tree_size"][0] == 6 and runs[0].stats.extra["leaves"][0] == 3
    assert paths["first"] and paths["other"] and paths["rejected"], paths
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("max_ngram", [1, 3])
def test_lookup_chain_sampling_is_exact_grid(goodness_of_fit, k, max_ngram):
    """The chain stays exact for other chain lengths and n-gram sizes (window [k - 1, k + 2))."""
    method = SpeculativeSampling(k, drafter=PromptLookup(max_ngram=max_ngram))
    counts, exact, _ = lookup_window(method, toy_target(), k - 1, N_SAMPLES)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("budget", "max_depth", "branches"), [(1, 1, 1), (3, 2, 2), (16, 4, 4)])
def test_lookup_tree_sampling_is_exact_grid(goodness_of_fit, budget, max_depth, branches):
    """The tree stays exact for other budgets, depths and branch counts (window [1, 4))."""
    method = SpecExec(budget=budget, max_depth=max_depth, drafter=PromptLookup(max_branches=branches))
    counts, exact, _ = lookup_window(method, toy_target(), 1, N_SAMPLES)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.usefixtures("one_thread")
def test_trusting_lookups_fails_the_check(goodness_of_fit):
    """Teeth: accepting every looked-up token is caught by the same check with a fifth of the samples."""
    counts, exact, _ = lookup_window(chain_method(3, TrustLookups), toy_target(), 2, N_SAMPLES // 5)
    assert goodness_of_fit(counts, exact) < 1e-6


@pytest.mark.usefixtures("one_thread")
def test_following_the_first_branch_fails_the_check(goodness_of_fit):
    """Teeth: a tree walk that takes the first branch instead of drawing from p is caught with a fifth of the
    samples."""
    counts, exact, _ = lookup_window(tree_method(FollowFirstBranch), toy_target(), 1, N_SAMPLES // 5)
    assert goodness_of_fit(counts, exact) < 1e-6


# ---------------------------------------------------------------- parameters, method keys, draft requirements


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: PromptLookup(min_ngram=3, max_ngram=2), "min_ngram=3"),
        (lambda: PromptLookup(min_ngram=0), "min_ngram=0"),
        (lambda: PromptLookup(max_ngram=0), "max_ngram=0"),
        (lambda: PromptLookup(max_branches=0), "max_branches=0"),
        (lambda: SpeculativeSampling(k=0, drafter=PromptLookup()), "k=0"),
        (lambda: SpeculativeSampling(drafter=PromptLookup(max_branches=2)), "max_branches=2"),
        (
            lambda: SpeculativeSampling(confidence_threshold=0.4, drafter=PromptLookup()),
            "confidence_threshold=0.4",
        ),
    ],
    ids=["min>max", "min0", "max0", "branches0", "k0", "tree-option-on-chain", "threshold-without-model"],
)
def test_bad_parameters_are_named(build, named):
    """Each inconsistent setting raises InvalidParameterError naming the offending value."""
    with pytest.raises(InvalidParameterError, match=named):
        build()


def test_specexec_refuses_a_drafter_without_tree_form():
    """SpecExec needs branches: a chain-only drafter is refused, naming it."""

    class ChainOnly(Drafter):
        name = "chain_only"

        def begin(self, draft_model, vocab, device, target=None):
            return None

        def propose(self, sequence, k, sampling, generator, stop_below=0.0):
            return Proposal(torch.empty(0, dtype=torch.long), None, 0)

    with pytest.raises(InvalidParameterError, match="chain_only"):
        SpecExec(drafter=ChainOnly())


def test_method_keys_and_params():
    """Lookup methods get their own keys and record the drafter; draft-model defaults keep theirs
    unchanged."""
    chain, tree = SpeculativeSampling(drafter=PromptLookup()), SpecExec(drafter=PromptLookup(max_branches=3))
    assert (method_key(chain), method_key(tree)) == ("speculative+prompt_lookup", "specexec+prompt_lookup")
    assert not chain.needs_draft and not tree.needs_draft
    assert recorded(chain) == {"k": 4, "drafter": "prompt_lookup", "max_ngram": 3, "min_ngram": 1}
    assert recorded(tree) == {
        "budget": 32, "max_depth": 8, "drafter": "prompt_lookup", "max_ngram": 3, "min_ngram": 1,
        "max_branches": 3,
    }
    for method in (SpeculativeSampling(), SpeculativeSampling(drafter=ModelDrafter())):
        assert method_key(method) == "speculative" and method.needs_draft and recorded(method) == {"k": 4}
    for method in (SpecExec(), SpecExec(drafter=ModelDrafter())):
        assert method_key(method) == "specexec" and method.needs_draft
        assert recorded(method) == {
            "budget": 32, "max_depth": 8, "max_beams": 8, "max_branch_width": 8, "prune_threshold": 0.0
        }


@pytest.mark.parametrize(
    "method",
    [SpeculativeSampling(drafter=ModelDrafter()), SpecExec(drafter=ModelDrafter())],
    ids=["chain", "tree"],
)
def test_draft_model_drafter_needs_a_draft(method):
    """Without model.draft a draft-model method is refused when configured and when generating, naming the
    draft."""
    from src.lit.module import DecodingModule

    with pytest.raises(InvalidParameterError, match="model.draft"):
        DecodingModule(methods=[method])
    with pytest.raises(InvalidParameterError, match="draft"):
        generate(method, toy_target(), [1, 2], 4)


def test_lookup_methods_need_no_draft():
    """A module of lookup methods is fine without model.draft, under their own method keys."""
    from src.lit.module import DecodingModule

    module = DecodingModule(
        methods=[SpeculativeSampling(drafter=PromptLookup()), SpecExec(drafter=PromptLookup(max_branches=2))]
    )
    assert module.method_keys == ["speculative+prompt_lookup", "specexec+prompt_lookup"]


# ---------------------------------------------------------------- greedy: equal to Baseline on SmolLM2

EMBEDDED_METHODS = {
    "speculative-k8": SpeculativeSampling(k=8, drafter=PromptLookup(3)),
    "specexec-b32": SpecExec(budget=32, max_depth=8, drafter=PromptLookup(3, max_branches=4)),
}


def spread(prompts, categories: list[str], count: int):
    """``count`` prompts taken round-robin over ``categories`` (first of each, then second of each, ...)."""
    by_category = [[p for p in prompts if p.category == category] for category in categories]
    picked = [group[i] for i in range(count) for group in by_category if i < len(group)]
    return picked[:count]


def embedded_cases(mt_bench: int, spec_bench: int):
    """(label, first-turn text) of MT-Bench prompts (copy-friendly categories first) and of Spec-Bench's
    summarization and rag prompts."""
    from src.data.prompts import read_prompt_file

    mt = read_prompt_file(dataset_file("mt_bench.jsonl"))
    spec = read_prompt_file(dataset_file("spec_bench.jsonl"))
    mt_order = ["extraction", "coding", *sorted({p.category for p in mt} - {"extraction", "coding"})]
    chosen = spread(mt, mt_order, mt_bench) + spread(spec, ["summarization", "rag"], spec_bench)
    return [(f"{p.dataset}:{p.category}:{p.prompt_id}", p.turns[0]) for p in chosen]


def logit_margin(model, input_ids: torch.Tensor, tokens: list[int], index: int) -> float:
    """Target's top-1 minus top-2 logit before generated token ``index`` (a near-tie flips legitimately)."""
    context = torch.tensor([input_ids[0].tolist() + tokens[:index]])
    with torch.inference_mode():
        top = model(context).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def check_embedded_greedy(embedded_target, cases, new_tokens: int) -> None:
    """Every lookup method reproduces Baseline's greedy tokens on every case; some lookups were accepted."""
    model, tokenizer = embedded_target.model, embedded_target.tokenizer
    eos = {tokenizer.eos_token_id}
    failures, accepted = [], Counter()
    for label, text in cases:
        input_ids = chat_input_ids(tokenizer, text)
        expected = Baseline().generate(model, None, input_ids, new_tokens, GREEDY, eos).tokens
        for name, method in EMBEDDED_METHODS.items():
            generation = method.generate(model, None, input_ids, new_tokens, GREEDY, eos)
            assert generation.stats.draft_calls == 0
            accepted[name] += generation.stats.accepted_tokens
            index = first_divergence(generation.tokens, expected)
            if index is not None:
                margin = logit_margin(model, input_ids, expected, index)
                failures.append(
                    f"{name} on {label}: first divergence at token {index}, "
                    f"target top-2 logit margin {margin:.2e}"
                )
    assert not failures, "\n".join(failures)
    assert all(accepted[name] > 0 for name in EMBEDDED_METHODS), accepted


def test_embedded_greedy_equals_baseline(embedded_target):
    """SmolLM2 (fp32): 2 MT-Bench + 2 Spec-Bench (summarization, rag) prompts, 48 tokens, both lookup
    methods."""
    check_embedded_greedy(embedded_target, embedded_cases(mt_bench=2, spec_bench=2), new_tokens=48)


@pytest.mark.slow
def test_embedded_greedy_equals_baseline_full(embedded_target):
    """SmolLM2 (fp32): 10 MT-Bench + 10 Spec-Bench (5 summarization, 5 rag) prompts, 128 tokens."""
    check_embedded_greedy(embedded_target, embedded_cases(mt_bench=10, spec_bench=10), new_tokens=128)
