"""One definition per number: the console table, wandb and the report print the same value for the same name on
the same records; the record contract is declared once (src/schema.py) and renaming a field fails here."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_report import rich_records

from src.decoding import SpecExec, SpeculativeSampling
from src.decoding.drafters import PromptLookup
from src.decoding.sampling import SamplingConfig
from src.lit.metrics import DecodingMetrics
from src.lit.reporting import TABLE_COLUMNS, MetricsReporter
from src.report import main as report_main
from src.results.check import check_record
from src.results.records import acceptance_histogram, classify_divergence, near_tie_tolerance, ok_record
from src.results.report.stats import stats_by_method_category
from src.results.schema import AGGREGATES, FIELD_BY_NAME, FIELDS, METHOD_FIELDS, Totals, describe, fields_of
from src.results.summary import format_summary_table, summarize

# The record contract scripts depend on. Renaming or dropping one of these is a breaking change: update the
# schema, every reader, the README and this list together.
CONTRACT = {
    "common": ["run_id", "resume_key", "status", "method", "dataset", "prompt_id", "category", "turn", "params",
               "target", "system"],
    "ok": ["new_tokens", "text", "prefill_s", "decode_s", "wall_s", "tokens_per_s", "target_calls", "draft_calls",
           "tokens_per_target_call", "drafted_tokens", "accepted_tokens", "acceptance_rate",
           "accepted_per_position", "speedup", "matches_baseline", "first_divergence"],
}


def test_contract_names_are_declared_once():
    for carrier, names in CONTRACT.items():
        assert list(fields_of(carrier)) == names
    assert len(FIELD_BY_NAME) == len(FIELDS)
    assert set(TABLE_COLUMNS) <= FIELD_BY_NAME.keys()  # the wandb table shows declared fields only
    for names in METHOD_FIELDS.values():
        assert set(names) <= FIELD_BY_NAME.keys()
    text = describe()
    assert all(f"`{f.name}`" in text for f in FIELDS) and all(f"`{a.name}`" in text for a in AGGREGATES)


class Capture:
    """A logger that keeps what MetricsReporter logs."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_hyperparams(self, params) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)

    def save(self) -> None:
        pass


def console_values(records) -> dict[str, dict]:
    metrics: dict[str, DecodingMetrics] = {}
    for record in records:
        metrics.setdefault(record["method"], DecodingMetrics()).update(record)
    return summarize({method: metric.compute() for method, metric in metrics.items()})


def test_console_wandb_and_report_agree(tmp_path):
    records = rich_records()
    console = console_values(records)
    report = stats_by_method_category(records, seed=0, resamples=50)
    reporter = MetricsReporter()
    reporter.summary = console
    logger = Capture()
    reporter._report(SimpleNamespace(loggers=[logger]))
    compared = 0
    for method, values in console.items():
        for aggregate in AGGREGATES:
            name = aggregate.name
            if name not in values:
                continue
            mine, theirs = values[name], report[method, "all"].get(name)
            if isinstance(mine, float) and isinstance(theirs, float):
                assert mine == pytest.approx(theirs, rel=1e-12), (method, name)
                assert logger.metrics[f"{method}/{name}"] == mine
                compared += 1
            else:
                assert mine == theirs, (method, name)
    assert compared > 20
    # the console table prints these values, under the names the legend explains
    table = format_summary_table(console)
    line = next(row for row in table.splitlines() if row.startswith("speculative "))
    assert f"{console['speculative']['throughput']:.2f}" in line and f"{console['speculative']['speedup']:.2f}" in line
    # ... and the report prints the same figures in its table
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert report_main([str(path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| speculative | all | 4 | {console['speculative']['throughput']:.2f} | " in md


def test_speedup_and_throughput_ratio_are_different_numbers():
    # two prompts: 2x faster on a short one, 1x on a long one
    records = [
        {"status": "ok", "method": "baseline", "new_tokens": 10, "wall_s": 1.0, "target_calls": 10},
        {"status": "ok", "method": "baseline", "new_tokens": 100, "wall_s": 10.0, "target_calls": 100},
        {"status": "ok", "method": "fast", "new_tokens": 10, "wall_s": 0.5, "target_calls": 5, "speedup": 2.0},
        {"status": "ok", "method": "fast", "new_tokens": 100, "wall_s": 10.0, "target_calls": 50, "speedup": 1.0},
    ]
    values = console_values(records)["fast"]
    assert values["speedup"] == pytest.approx(math.sqrt(2.0))  # per-prompt: each prompt weighs the same
    assert values["throughput_ratio"] == pytest.approx((110 / 10.5) / (110 / 11.0))  # totals: long one weighs more


def test_time_split_aggregates_and_what_ifs():
    records = [{"status": "ok", "method": "m", "new_tokens": 20, "wall_s": 2.0, "target_calls": 5, "drafted_tokens": 15,
                "target_s": 1.2, "draft_s": 0.6, "other_s": 0.2, "predicted_target_s": 1.0, "predicted_draft_s": 0.6}]
    values = Totals(records).aggregate()
    assert (values["target_share"], values["draft_share"], values["other_share"]) == pytest.approx((0.6, 0.3, 0.1))
    assert values["predicted_throughput"] == pytest.approx(20 / 1.6)
    assert values["unexplained_share"] == pytest.approx(0.2)
    assert values["throughput_free_draft"] == pytest.approx(20 / 1.4)
    assert values["throughput_no_overhead"] == pytest.approx(20 / 1.8)
    assert values["throughput_perfect_acceptance"] == pytest.approx((5 + 15) / 2.0)


def test_near_tie_or_mismatch():
    assert near_tie_tolerance("float32", "none") < near_tie_tolerance("float16", None) < near_tie_tolerance("bfloat16", None)
    assert near_tie_tolerance("float32", "bnb-4bit") == near_tie_tolerance("bfloat16", None)
    tie, real = {"first_divergence": 7}, {"first_divergence": 3}
    classify_divergence(tie, 0.0004, near_tie_tolerance("float32", "none"))
    classify_divergence(real, 2.5, near_tie_tolerance("float32", "none"))
    assert tie["divergence_class"] == "near_tie" and real["divergence_class"] == "mismatch"
    values = Totals([{"status": "ok", **tie}, {"status": "ok", **real}]).aggregate()
    assert (values["near_ties"], values["mismatches"]) == (1, 1)


def test_strict_check_fails_on_mismatch_only(tmp_path):
    from test_check_results import ok_record

    tie = ok_record("speculative", "1", matches_baseline=False, first_divergence=4)
    classify_divergence(tie, 1e-5, 1e-3)
    real = ok_record("speculative", "2", matches_baseline=False, first_divergence=4)
    classify_divergence(real, 3.0, 1e-3)
    assert not [p for p in check_record(tie, strict=True) if "mismatch" in p]
    assert any("a mismatch, not a near tie" in p for p in check_record(real, strict=True))


def test_older_files_get_a_note_not_a_crash(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rich_records()))  # no time split, no prediction
    assert report_main([str(path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "written before sp-samp recorded: time split (`target_s`)" in md
    assert "Where the time goes: skipped" in md


@pytest.mark.parametrize("make", [lambda: SpeculativeSampling(k=3), lambda: SpecExec(budget=8, max_depth=4),
                                  lambda: SpeculativeSampling(k=3, drafter=PromptLookup())],
                         ids=["speculative", "specexec", "prompt_lookup"])
def test_acceptance_histogram_agrees_with_the_other_counters(llama_pair, one_thread, make):
    target, draft = llama_pair
    prompt = torch.tensor([[1, 5, 9, 33, 5, 9, 33, 12]])
    generation = make().generate(target, draft, prompt, 24, SamplingConfig(), {2})
    stats = generation.stats
    record = ok_record({"method": "m", "status": "ok"}, generation, "text")
    histogram = record["acceptance_histogram"]
    assert sum(histogram) == len(stats.accepted_per_step) > 0  # one count per verification cycle
    assert sum(i * count for i, count in enumerate(histogram)) == record["accepted_tokens"]
    # cycles accepting at least j + 1 drafts are the cycles that accepted draft position j
    assert [sum(histogram[j + 1:]) for j in range(len(histogram) - 1)] == record["accepted_counts_per_position"]
    if isinstance(make(), SpeculativeSampling):
        assert sum(histogram) == record["target_calls"]


def test_acceptance_histogram_counts_cycles_by_accepted_drafts():
    assert acceptance_histogram([2, 0, 4, 2, 0, 0]) == [3, 0, 2, 0, 1]
    assert acceptance_histogram([]) == []  # the baseline verifies nothing
    vllm_example = [39, 1, 0, 3]  # vLLM's documented per-request example: mean_acceptance_length 1.2326
    steps, accepted = sum(vllm_example), sum(i * n for i, n in enumerate(vllm_example))
    assert 1 + accepted / steps == pytest.approx(1.2325581395348837)
