"""Time split (target / draft / other), the cost profile and its predictions, and the record schema they feed."""

from __future__ import annotations

import time

import pytest
import torch

from src.decoding import Baseline, SpecExec, SpeculativeSampling
from src.decoding.drafters import PromptLookup
from src.decoding.profile import (
    CostProfile,
    forward_latency,
    interpolate,
    measure_profile,
    predict,
    profile_sizes,
)
from src.decoding.sampling import SamplingConfig
from src.decoding.timing import drafting, timed_generate
from src.results.check import check_record
from src.results.records import ok_record
from src.results.schema import undeclared

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingConfig()
PROMPT = torch.tensor([[1, 5, 9, 33, 5, 9, 33, 12]])
METHODS = {
    "baseline": Baseline,
    "speculative": lambda: SpeculativeSampling(k=4),
    "specexec": lambda: SpecExec(budget=8, max_depth=4),
    "lookup": lambda: SpeculativeSampling(k=3, drafter=PromptLookup()),
}


def run(method, pair, new_tokens=12):
    target, draft = pair
    return timed_generate(method, target, draft, PROMPT, new_tokens, GREEDY, {2})


@pytest.mark.parametrize("name", list(METHODS))
def test_split_adds_up_and_counts_every_forward(llama_pair, name):
    generation = run(METHODS[name](), llama_pair)
    stats, extra = generation.stats, generation.stats.extra
    wall = stats.prefill_s + stats.decode_s
    assert min(extra["target_s"], extra["draft_s"], extra["other_s"]) >= 0
    assert extra["target_s"] + extra["draft_s"] + extra["other_s"] == pytest.approx(wall, rel=1e-9)
    assert extra["target_s"] > 0
    assert sum(extra["target_forward_sizes"].values()) == stats.target_calls
    if name == "speculative":  # every draft forward went through the hooks
        assert sum(extra["draft_forward_sizes"].values()) == stats.draft_calls > 0
        assert extra["draft_s"] > 0
    if name in ("baseline", "lookup"):
        assert extra["draft_forward_sizes"] == {}
    if name == "baseline":
        assert extra["draft_s"] == 0 and set(extra["target_forward_sizes"]) == {str(PROMPT.shape[1]), "1"}


def test_timing_changes_no_output(llama_pair):
    target, draft = llama_pair
    for name, make in METHODS.items():
        plain = make().generate(target, draft, PROMPT, 12, GREEDY, {2}).tokens
        assert run(make(), llama_pair).tokens == plain, name


class SlowLookup(PromptLookup):
    """A drafter that spends 20 ms per proposal: its time must land in draft_s, not in other_s."""

    def propose(self, sequence, k, sampling, generator, stop_below=0.0):
        time.sleep(0.02)
        return super().propose(sequence, k, sampling, generator, stop_below)


def test_drafter_time_is_draft_time(llama_pair):
    generation = run(SpeculativeSampling(k=3, drafter=SlowLookup()), llama_pair)
    extra, calls = generation.stats.extra, generation.stats.target_calls
    assert extra["draft_s"] >= 0.02 * calls
    assert extra["other_s"] < 0.01 * calls  # the sleeps are not "other"


def test_slow_target_forwards_are_target_time(llama_pair):
    target, draft = llama_pair
    handle = target.register_forward_hook(lambda *args: time.sleep(0.01))
    try:
        generation = run(Baseline(), llama_pair)
    finally:
        handle.remove()
    assert generation.stats.extra["target_s"] >= 0.01 * generation.stats.target_calls
    assert generation.stats.extra["other_s"] < 0.005 * generation.stats.target_calls


def test_drafting_without_a_split_is_a_no_op():
    with drafting():
        pass  # no active split: nothing to record, nothing raised


# ---------------------------------------------------------------- cost profile


def test_interpolate_and_sizes():
    table = {1: 10.0, 2: 14.0, 4: 20.0}
    assert interpolate(table, 2) == 14.0
    assert interpolate(table, 3) == pytest.approx(17.0)
    assert interpolate(table, 6) == pytest.approx(26.0)  # extrapolated from the last two
    assert interpolate({8: 16.0}, 4) == pytest.approx(8.0)
    assert profile_sizes(5, 40) == [1, 2, 3, 4, 5, 10, 20, 40]
    assert profile_sizes(1, 1) == [1]


def test_forward_latency_measures_each_size(llama_pair):
    latency = forward_latency(llama_pair[0], PROMPT, [1, 3, 8], repeats=1)
    assert sorted(latency) == [1, 3, 8] and all(ms > 0 for ms in latency.values())


def test_measure_profile_prices_model_free_drafters(llama_pair):
    target, draft = llama_pair
    profile = measure_profile(target, draft, [PromptLookup()], PROMPT, largest_verify=3, longest_prompt=8,
                              vocab=128)
    assert sorted(profile.target_ms) == [1, 2, 3, 6, 8] == sorted(profile.draft_ms)
    assert set(profile.drafter_ms) == {"prompt_lookup"} and profile.drafter_ms["prompt_lookup"] >= 0
    assert CostProfile.from_json(profile.to_json()).target_ms.keys() == profile.target_ms.keys()


def test_predict_applies_the_formula():
    profile = CostProfile(context=100, target_ms={1: 50.0, 5: 100.0, 64: 400.0}, draft_ms={1: 10.0},
                          drafter_ms={"eagle": 4.0})
    record = {"new_tokens": 20, "wall_s": 2.0, "draft_calls": 30, "drafted_tokens": 40,
              "target_forward_sizes": {"64": 1, "5": 9}, "draft_forward_sizes": {"1": 30}}
    chain = predict(record, profile)
    assert chain["predicted_target_s"] == pytest.approx(0.4 + 0.9)
    assert chain["predicted_draft_s"] == pytest.approx(0.3)
    assert chain["predicted_tokens_per_s"] == pytest.approx(20 / 1.6)
    assert chain["unexplained_share"] == pytest.approx(1 - 1.6 / 2.0)
    head = predict(record, profile, drafter="eagle")
    assert head["predicted_draft_s"] == pytest.approx(30 * 0.004)
    assert predict({"new_tokens": 3, "wall_s": 1.0}, profile)["predicted_tokens_per_s"] is None  # older record


# ---------------------------------------------------------------- records


@pytest.mark.parametrize("name", list(METHODS))
def test_records_declare_every_field_and_validate(llama_pair, name):
    common = {"run_id": "r", "resume_key": "k", "method": name, "dataset": "d", "prompt_id": "1", "category": "c",
              "turn": 1, "params": {}, "target": {}, "system": {}}
    generation = run(METHODS[name](), llama_pair)
    record = ok_record(common, generation, "text")
    profile = CostProfile(context=8, target_ms={1: 1.0, 16: 2.0}, draft_ms={1: 0.5})
    record.update(predict(record, profile), cost_profile=profile.to_json())
    assert undeclared(record) == []
    assert [p for p in check_record(record, strict=False)] == []
    record["other_s"] += 1.0  # the split no longer adds up
    assert any("!= wall_s" in p for p in check_record(record, strict=True))
