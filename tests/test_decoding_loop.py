"""The shared decoding loop and the declared drafter capabilities.

- ``GenerationState`` (the prologue / epilogue every ``generate`` shares): emission stops right after an EOS, the
  stop test, the stop reason, the counters, the prefill / decode clocks;
- drafters say what they can do (class attributes read by the verifiers, never their type): a new drafter that
  declares a capability is served through it, one that declares none is refused naming it;
- one parameter check (``src.errors.check_positive_int``) and ``k`` refused the same strict way by every chain
  method.
"""

from __future__ import annotations

import pytest
import torch
from conftest import method_key, recorded
from toy import ToyLM

from src.decoding import Baseline, SamplingConfig, SpecExec, SpeculativeSampling
from src.decoding.autojudge import AutoJudge
from src.decoding.base import GenerationState
from src.decoding.drafters import (
    Drafter,
    ModelDrafter,
    ModelGrowth,
    PromptLookup,
    Proposal,
    greedy_token,
    widen,
)
from src.decoding.eagle import EagleDrafter
from src.decoding.kv import new_cache
from src.decoding.stats import GenerationStats
from src.decoding.timing import timed_stage
from src.decoding.token_map import TokenMap
from src.decoding.tree import TreeGrowth
from src.errors import InvalidParameterError, check_positive_int, is_positive_int

GREEDY = SamplingConfig()
pytestmark = pytest.mark.usefixtures("one_thread")


def generate(method, target, draft, prompt, max_new_tokens, sampling=GREEDY, eos=()):
    return method.generate(target, draft, torch.tensor([prompt]), max_new_tokens, sampling, set(eos), None)


# ---------------------------------------------------------------- GenerationState


def test_state_emits_up_to_an_eos_and_ends_the_generation():
    state = GenerationState(torch.tensor([[4, 5]]), max_new_tokens=6, eos_token_ids={9})
    state.emit([1, 2])
    assert (state.sequence, state.room, state.done) == ([4, 5, 1, 2], 4, False)
    state.emit([3, 9, 7])  # 7 follows the EOS: never generated
    assert state.sequence == [4, 5, 1, 2, 3, 9] and state.done
    generation = state.result()
    assert (generation.tokens, generation.stopped_by) == ([1, 2, 3, 9], "eos")


def test_state_stops_at_the_budget_and_counts_cycles():
    state = GenerationState(torch.tensor([[4]]), max_new_tokens=3, eos_token_ids=set())
    state.emit([1, 2, 3])
    state.record_cycle(draft_forwards=2, drafted=2, accepted=1)
    state.record_cycle(draft_forwards=0, drafted=0, accepted=0)
    assert state.done and state.room == 0 and state.result().stopped_by == "max_new_tokens"
    stats = state.stats
    assert (stats.target_calls, stats.draft_calls, stats.accepted_per_step) == (2, 2, [1, 0])
    assert (stats.drafted_per_position, stats.accepted_per_position) == ([1, 1], [1])


def test_state_checks_the_generate_arguments():
    with pytest.raises(InvalidParameterError, match="max_new_tokens=0"):
        GenerationState(torch.tensor([[1]]), 0, set())
    with pytest.raises(InvalidParameterError, match=r"\(1, prompt_len>0\)"):
        GenerationState(torch.tensor([[1], [2]]), 4, set())


def test_timed_stages_fill_their_own_field():
    stats = GenerationStats()
    with timed_stage(stats, "prefill", torch.device("cpu")):
        sum(range(10000))
    assert stats.prefill_s > 0 and stats.decode_s == 0
    with timed_stage(stats, "decode", torch.device("cpu")):
        pass
    assert stats.decode_s >= 0
    with pytest.raises(ValueError, match="stage='total'"), timed_stage(stats, "total", torch.device("cpu")):
        pass


@pytest.mark.parametrize("method", [Baseline(), SpeculativeSampling(2), SpecExec(budget=6, max_depth=3)],
                         ids=["baseline", "speculative", "specexec"])
def test_every_method_stops_right_after_an_eos_with_both_stages_timed(method):
    target = ToyLM(vocab_size=20, seed=0)
    draft = target.perturbed(noise=0.5, seed=1)
    free = generate(method, target, draft, [3, 4, 5], 30)
    eos = free.tokens[4]  # a token the method emits: with it as the EOS, the output ends there
    cut = generate(method, target, draft, [3, 4, 5], 30, eos={eos})
    assert cut.tokens == free.tokens[: free.tokens.index(eos) + 1] and cut.stopped_by == "eos"
    assert free.stopped_by == "max_new_tokens" and len(free.tokens) == 30
    assert cut.stats.prefill_s > 0 and cut.stats.decode_s >= 0


# ---------------------------------------------------------------- declared capabilities


def test_the_drafters_declare_what_they_do(tmp_path):
    TokenMap.from_counts(torch.arange(16, 0, -1), "toy", []).save(tmp_path / "map.json")
    restricted = ModelDrafter(top_tokens=4, token_map=str(tmp_path / "map.json"))
    lookup, model = PromptLookup(), ModelDrafter()
    declared = {
        "lookup": (lookup.proposes_chains, lookup.offers_continuations, lookup.grows_trees, lookup.needs_draft_model),
        "model": (model.proposes_chains, model.offers_continuations, model.grows_trees, model.needs_draft_model),
        "eagle": (EagleDrafter.proposes_chains, EagleDrafter.offers_continuations, EagleDrafter.grows_trees,
                  EagleDrafter.needs_draft_model),
    }
    assert declared == {"lookup": (True, True, False, False), "model": (True, False, True, True),
                        "eagle": (True, False, True, False)}
    assert issubclass(EagleDrafter, TreeGrowth) and issubclass(ModelGrowth, TreeGrowth)
    assert lookup.tree_refusal() is None and model.tree_refusal() is None
    assert not restricted.grows_trees and "top_tokens restricts a chain drafter" in restricted.tree_refusal()
    with pytest.raises(InvalidParameterError, match="top_tokens restricts a chain drafter"):
        SpecExec(drafter=restricted)


def test_an_undeclared_capability_names_itself():
    class Bare(Drafter):
        name = "bare"
        proposes_chains = False

        def begin(self, draft_model, vocab, device, target=None):
            return None

    bare = Bare()
    for call, capability in ((lambda: bare.propose([1], 2, GREEDY, None), "proposes_chains"),
                             (lambda: bare.continuations([1], 2), "offers_continuations"),
                             (lambda: bare.tree_growth(None, 8, torch.device("cpu")), "grows_trees")):
        with pytest.raises(NotImplementedError, match=f"'bare'.*{capability} is False"):
            call()
    with pytest.raises(InvalidParameterError, match="'bare' proposes no chain"):
        SpeculativeSampling(drafter=bare)
    with pytest.raises(InvalidParameterError, match="'bare' has no tree form"):
        SpecExec(drafter=bare)


class FixedBranches(Drafter):
    """Declares continuations (no draft model): two fixed branches, whatever the sequence."""

    name = "fixed"
    offers_continuations = True
    max_branches = 2

    def begin(self, draft_model, vocab, device, target=None):
        self.device = device

    def propose(self, sequence, k, sampling, generator, stop_below=0.0):
        return Proposal(torch.tensor(self.continuations(sequence, k, 1)[0], device=self.device), None, 0)

    def continuations(self, sequence, depth, limit=None):
        return [[3, 7, 1, 2][:depth], [5, 5, 5][:depth]][: limit or self.max_branches]


class GrowsOnTheDraft(Drafter):
    """Declares best-first growth on the draft model without being the plain draft-model drafter."""

    name = "grower"
    needs_draft_model = True
    grows_trees = True

    def begin(self, draft_model, vocab, device, target=None):
        return None

    def tree_growth(self, draft_model, vocab, device, target=None):
        return ModelGrowth(draft_model, new_cache(), vocab, device)


def test_verifiers_read_the_declarations_not_the_type():
    """A new drafter is served through what it declares: continuations become a trie, a growth grows the tree;
    greedy output is the baseline's either way, under the drafter's own method key."""
    target = ToyLM(vocab_size=20, seed=0)
    draft = target.perturbed(noise=0.5, seed=1)
    expected = generate(Baseline(), target, None, [3, 4, 5], 24).tokens
    branches = SpecExec(budget=6, max_depth=4, drafter=FixedBranches())
    assert generate(branches, target, None, [3, 4, 5], 24).tokens == expected
    assert method_key(branches) == "specexec+fixed" and not branches.needs_draft
    assert recorded(branches) == {"budget": 6, "max_depth": 4, "drafter": "fixed"}
    grown = SpecExec(budget=6, max_depth=4, drafter=GrowsOnTheDraft())
    generation = generate(grown, target, draft, [3, 4, 5], 24)
    assert generation.tokens == expected and generation.stats.draft_calls > 0
    assert method_key(grown) == "specexec+grower" and grown.needs_draft and grown.params()["drafter"] == "grower"
    # the same growth as the draft-model drafter's own, tree for tree
    plain = generate(SpecExec(budget=6, max_depth=4), target, draft, [3, 4, 5], 24)
    assert generation.stats.extra["tree_size"] == plain.stats.extra["tree_size"]
    with pytest.raises(InvalidParameterError, match="max_branches=2 is a tree option"):
        SpeculativeSampling(drafter=FixedBranches())


def test_subset_logits_are_widened_and_argmaxed_one_way():
    ids = torch.tensor([1, 4, 6])
    logits = torch.tensor([0.5, 2.0, 2.0])  # a tie between ids 4 and 6
    wide = widen(logits, 8, ids)
    assert wide.tolist() == [float("-inf"), 0.5, float("-inf"), float("-inf"), 2.0, float("-inf"), 2.0, float("-inf")]
    assert widen(logits[None].repeat(2, 1), 8, ids).tolist() == [wide.tolist()] * 2  # rows alike (a tree batch)
    assert greedy_token(logits, 8, ids).tolist() == [4] == wide.argmax(-1, keepdim=True).tolist()
    full = torch.tensor([0.0, 3.0, 1.0, 9.0])  # a padded output: id 3 is outside the shared vocabulary
    assert widen(full, 3, None).tolist() == [0.0, 3.0, 1.0] and greedy_token(full, 3, None).tolist() == [1]


# ---------------------------------------------------------------- parameter checks


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "3", None])
def test_positive_int_check_names_the_value_and_the_fix(value):
    assert not is_positive_int(value)
    with pytest.raises(InvalidParameterError, match=f"^budget={value!r} is invalid: use an integer >= 1$"):
        check_positive_int("budget", value)


def test_positive_int_check_accepts_ints_from_the_minimum():
    assert is_positive_int(1) and is_positive_int(5, minimum=5) and not is_positive_int(4, minimum=5)
    check_positive_int("max_k", 8, "use an integer >= k (4)", minimum=4)
    with pytest.raises(InvalidParameterError, match=r"max_k=3 is invalid: use an integer >= k \(4\)"):
        check_positive_int("max_k", 3, "use an integer >= k (4)", minimum=4)


@pytest.mark.parametrize("build", [SpeculativeSampling, AutoJudge], ids=["speculative", "autojudge"])
@pytest.mark.parametrize("k", [0, True, 2.0])
def test_k_is_checked_the_same_strict_way_by_every_chain_method(build, k):
    with pytest.raises(InvalidParameterError, match=f"k={k!r} is invalid: use k >= 1 draft tokens per target call"):
        build(k=k)
