"""The one definition of every result-record field and every aggregate sp-samp reports.

A *record* is one JSONL line of ``python -m src predict``: one (prompt, turn, method). :data:`FIELDS` declares
each field once: name, JSON types, unit, meaning, and who carries it (every record, ``ok`` records, or the
records of one method). Records are built (:mod:`src.results.records`), validated (:mod:`src.results.check`),
summarized (:class:`Totals` -> :func:`aggregate`, used by the console table, the torchmetrics / wandb logging and
``src.report``) and documented (``python -m src.results.schema`` prints the table of fields and aggregates) from here.

Aggregates over a group of records (one method, or one method x category) have one name per definition:

- ``throughput``: total new tokens / total decoding time (prefill + decode) of the group, tokens/s;
- ``tokens_per_s_mean``: mean over records of each record's ``tokens_per_s``;
- ``speedup``: geometric mean over records of each record's ``speedup`` (its tokens/s over the baseline's on the
  same prompt and turn); per-prompt ratios, so a long prompt does not outweigh a short one;
- ``throughput_ratio``: the group's ``throughput`` over the baseline group's ``throughput`` (same category):
  ratio of totals, so long outputs weigh more. The two differ when prompts differ in length or speedup;
  both are printed under their own names, never one under the other's name.

Speculation counters under vLLM's names (its per-request ``metrics.speculative_decoding`` object and its
``vllm:spec_decode_*`` counters), where they mean the same thing for one record:

- ``acceptance_histogram`` = vLLM's ``acceptance_histogram`` (index j: verify steps that accepted exactly j draft
  tokens); its sum = ``num_spec_steps`` (``num_drafts`` summed over requests). Ours also counts a cycle that
  offered no draft (a prompt-lookup miss) in h[0]: a target step is a cycle here whether or not it verified
  anything;
- ``drafted_tokens`` = ``num_draft_tokens``; ``accepted_tokens`` = ``num_accepted_draft_tokens``
  (``num_accepted_tokens``); ``acceptance_rate`` = ``draft_acceptance_rate`` (a fraction, not vLLM's log %);
- vLLM's ``mean_acceptance_length`` = 1 + accepted_tokens / sum(acceptance_histogram) (the bonus token
  included) = sum((i + 1) h[i]) / sum(h[i]), the mean of Spec-Bench's ``accept_lengths``;
- ``accepted_counts_per_position`` = ``num_accepted_tokens_per_pos``. vLLM's per-position acceptance rate divides
  it by all verify steps; our ``accepted_per_position`` divides by ``drafted_counts_per_position``, the cycles
  that offered that position (equal for a fixed chain length).

No Lightning or torch import: ``check_results`` and ``src.report`` run without them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NUMBER = (int, float)
NULL = (type(None),)


@dataclass(frozen=True)
class Field:
    """One record field. ``carrier``: ``common`` (every record), ``ok`` (ok records), ``optional`` (may be absent:
    files written before it existed, or only some runs), or a method name (that method's ok records)."""

    name: str
    types: tuple[type, ...]
    unit: str
    meaning: str
    carrier: str = "ok"


FIELDS: tuple[Field, ...] = (
    # ---- every record
    Field("run_id", (str,), "", "id of the predict run that wrote the record", "common"),
    Field("resume_key", (str,), "", "dataset/prompt_id/turn/method/fingerprint_id[/prompt_sha]: a resumed run "
          "skips ok keys (records before prompt_sha end at fingerprint_id)", "common"),
    Field("status", (str,), "", "'ok' or 'error'", "common"),
    Field("method", (str,), "", "method key, e.g. speculative[k=4] (unique within a run)", "common"),
    Field("dataset", (str,), "", "prompt file stem or hub id", "common"),
    Field("prompt_id", (str,), "", "prompt id within the dataset", "common"),
    Field("category", (str,), "", "prompt category (MT-Bench / Spec-Bench / task)", "common"),
    Field("turn", (int,), "", "turn number, from 1", "common"),
    Field("prompt_sha", (str,), "", "12-hex SHA-1 of the prompt's user turns up to this one (JSON list): an edited "
          "prompt is decoded again on --resume; absent in records written before it", "optional"),
    Field("params", (dict,), "", "method parameters + max_new_tokens, sampling settings, seed", "common"),
    Field("auto_choice", (dict,), "", "what `auto` resolved to at run start (src.lit.auto): values {k | budget, "
          "max_depth}, draft {dtype, quantization} or null, predicted_speedup, calibration_speedup, "
          "calibration_tokens; params carry the chosen values, the fingerprint keeps `auto`", "optional"),
    Field("target", (dict,), "", "target model identity: name, source, dtype, device, quantization", "common"),
    Field("system", (dict,), "", "machine and library versions (git sha, torch, device, threads, ...)", "common"),
    Field("prompt_tokens", (int,), "tokens", "prompt length after the chat template and truncation", "optional"),
    Field("draft", (dict,) + NULL, "", "draft model identity, null for methods without one", "optional"),
    Field("fingerprint", (dict,), "", "everything that identifies the configuration (hashed input files too; "
          "precision: the trainer's autocast precision, only when one was set)",
          "optional"),
    Field("fingerprint_id", (str,), "", "10-hex hash of fingerprint", "optional"),
    Field("error", (dict,) + NULL, "", "error records: {type, message, traceback}; ok records: null", "optional"),
    # ---- ok records: output
    Field("new_tokens", (int,), "tokens", "tokens generated (prompt excluded)"),
    Field("stopped_by", (str,), "", "'eos' or 'max_new_tokens'", "optional"),
    Field("text", (str,), "", "the decoded answer"),
    Field("tokens", (list,), "ids", "the generated token ids", "optional"),
    Field("prompt_truncated_tokens", (int,), "tokens", "prompt tokens dropped by max_prompt_tokens", "optional"),
    # ---- ok records: time
    Field("prefill_s", NUMBER, "s", "time to the first emitted tokens (a draft method's first cycle)"),
    Field("decode_s", NUMBER, "s", "time after the prefill"),
    Field("wall_s", NUMBER, "s", "prefill_s + decode_s"),
    Field("tokens_per_s", NUMBER + NULL, "tok/s", "new_tokens / wall_s"),
    Field("target_s", NUMBER, "s", "time inside target forwards (hooks on the target model)", "optional"),
    Field("draft_s", NUMBER, "s", "time inside the drafter: draft-model forwards, head steps, lookups, tree "
          "growth", "optional"),
    Field("other_s", NUMBER, "s", "wall_s - target_s - draft_s: sampling, acceptance, cache rollback, Python",
          "optional"),
    Field("target_forward_sizes", (dict,), "", "{tokens read by one target forward: forwards}", "optional"),
    Field("draft_forward_sizes", (dict,), "", "{tokens read by one draft-model forward: forwards}", "optional"),
    Field("predicted_target_s", NUMBER + NULL, "s", "cost profile: sum over target forwards of T(n)", "optional"),
    Field("predicted_draft_s", NUMBER + NULL, "s", "cost profile: draft forwards' D(n), or drafter steps x S",
          "optional"),
    Field("predicted_tokens_per_s", NUMBER + NULL, "tok/s", "new_tokens / (predicted_target_s + predicted_draft_s)",
          "optional"),
    Field("cost_profile", (dict,), "", "the run's measured latencies (src.decoding.profile.CostProfile)",
          "optional"),
    Field("unexplained_share", NUMBER + NULL, "", "1 - predicted time / wall_s: what the cost model leaves out",
          "optional"),
    # ---- ok records: speculation counters
    Field("target_calls", (int,), "calls", "target forwards (prefill included)"),
    Field("draft_calls", (int,), "calls", "draft forwards / drafter steps"),
    Field("tokens_per_target_call", NUMBER + NULL, "tok/call", "new_tokens / target_calls"),
    Field("drafted_tokens", (int,), "tokens", "draft tokens offered along the verified path, all cycles"),
    Field("accepted_tokens", (int,), "tokens", "of drafted_tokens, those kept"),
    Field("acceptance_rate", NUMBER + NULL, "", "accepted_tokens / drafted_tokens"),
    Field("accepted_per_position", (list,), "", "per draft position i: cycles accepting it / cycles offering it"),
    Field("accepted_counts_per_position", (list,), "cycles", "numerators of accepted_per_position", "optional"),
    Field("drafted_counts_per_position", (list,), "cycles", "denominators of accepted_per_position", "optional"),
    Field("acceptance_histogram", (list,), "cycles", "h[i]: verification cycles that accepted exactly i draft "
          "tokens (cycles without a draft count in h[0]); [] without cycles (the baseline)", "optional"),
    # ---- ok records: against the baseline on the same prompt and turn
    Field("speedup", NUMBER + NULL, "x", "tokens_per_s / the baseline record's tokens_per_s"),
    Field("matches_baseline", (bool,) + NULL, "", "greedy runs: tokens equal the baseline's"),
    Field("first_divergence", (int,) + NULL, "index", "first token index that differs from the baseline's"),
    Field("divergence_margin", NUMBER, "logit", "lossless method off the baseline (turn 1): the target's top-1 "
          "minus top-2 logit after the baseline's tokens before first_divergence", "optional"),
    Field("divergence_tolerance", NUMBER, "logit", "largest margin called a near tie for the target's dtype",
          "optional"),
    Field("divergence_class", (str,), "", "'near_tie' (margin <= tolerance: rounding can flip the argmax) or "
          "'mismatch' (a real difference: a bug in a lossless method)", "optional"),
    # ---- tasks with a final answer (GSM8K), and every AutoJudge record
    Field("answer", (str,) + NULL, "", "final answer extracted from text", "optional"),
    Field("answer_correct", (bool,) + NULL, "", "answer equals the gold answer (null: no gold)", "optional"),
    Field("answer_matches_baseline", (bool,), "", "answer equals the baseline's answer", "optional"),
    # ---- SpecExec (per-iteration lists, then their summaries)
    *(Field(name, (list,), unit, meaning, "specexec") for name, unit, meaning in (
        ("tree_size", "nodes", "per iteration: draft nodes verified"),
        ("tree_depth", "nodes", "per iteration: depth of the tree"),
        ("draft_forwards", "calls", "per iteration: draft forwards to grow the tree"),
        ("accepted_length", "tokens", "per iteration: tree tokens accepted"),
        ("leaves", "nodes", "per iteration: leaves (active branches)"),
        ("candidates_generated", "nodes", "per iteration: children scored"),
        ("candidates_kept", "nodes", "per iteration: children kept in the tree"),
    )),
    Field("tree_size_mean", NUMBER + NULL, "nodes", "mean tree_size", "specexec"),
    Field("tree_depth_mean", NUMBER + NULL, "nodes", "mean tree_depth", "specexec"),
    Field("max_active_branches", (int,), "nodes", "max leaves", "specexec"),
    Field("branch_prune_rate", NUMBER, "", "(generated - kept) / generated candidates", "specexec"),
    Field("effective_parallelism", NUMBER + NULL, "tokens", "mean tokens scored per target forward", "specexec"),
    # ---- AutoJudge
    Field("judge_accepted", (int,), "tokens", "mismatching draft tokens the judge let through", "autojudge"),
    Field("exact_accepted_tokens", (int,), "tokens", "draft tokens accepted before each cycle's first mismatch",
          "autojudge"),
    Field("accepted_per_cycle_mean", NUMBER + NULL, "tokens", "AutoJudge: accepted_tokens / cycles", "optional"),
    Field("exact_accepted_per_cycle_mean", NUMBER + NULL, "tokens", "AutoJudge: exact_accepted_tokens / cycles",
          "optional"),
)
FIELD_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
if len(FIELD_BY_NAME) != len(FIELDS):  # pragma: no cover - a declaration error, caught on import
    raise RuntimeError("src.results.schema.FIELDS declares a field twice")


def fields_of(carrier: str) -> dict[str, tuple[type, ...]]:
    """``name -> JSON types`` of the fields one carrier must have."""
    return {f.name: f.types for f in FIELDS if f.carrier == carrier}


# Fields every ok record of a method family must have: its own, plus the final answer AutoJudge is judged by.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "specexec": tuple(f.name for f in FIELDS if f.carrier == "specexec"),
    "autojudge": tuple(f.name for f in FIELDS if f.carrier == "autojudge") + ("answer", "answer_correct"),
}


def method_family(method_key: str) -> str:
    """``specexec[budget=16]+prompt_lookup`` -> ``specexec`` (the name method-specific fields are declared by)."""
    return re.split(r"[\[+]", method_key)[0]


def undeclared(record: Mapping[str, Any]) -> list[str]:
    """Keys of a record no :data:`FIELDS` entry declares (a test keeps the writers honest)."""
    return [key for key in record if key not in FIELD_BY_NAME]


def missing_optional(records: Iterable[Mapping[str, Any]], names: Iterable[str]) -> list[str]:
    """Of ``names``, those no ok record carries: an older file; readers note them instead of failing."""
    ok = [r for r in records if r.get("status") == "ok"]
    return [name for name in names if ok and not any(name in r for r in ok)]


# ---------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class Aggregate:
    name: str
    unit: str
    meaning: str


AGGREGATES: tuple[Aggregate, ...] = (
    Aggregate("records", "", "records of the group (ok and error)"),
    Aggregate("errors", "", "error records"),
    Aggregate("prompts", "", "ok records: one per (prompt, turn)"),
    Aggregate("throughput", "tok/s", "sum new_tokens / sum wall_s"),
    Aggregate("tokens_per_s_mean", "tok/s", "mean of per-record tokens_per_s"),
    Aggregate("speedup", "x", "geometric mean of per-record speedup (vs the baseline on the same prompt)"),
    Aggregate("throughput_ratio", "x", "throughput / the baseline's throughput (same category)"),
    Aggregate("tokens_per_target_call", "tok/call", "sum new_tokens / sum target_calls"),
    Aggregate("acceptance_rate", "", "sum accepted_tokens / sum drafted_tokens"),
    Aggregate("accepted_per_position", "", "per draft position: sum accepted counts / sum drafted counts"),
    Aggregate("matches_baseline_rate", "", "share of matches_baseline true (records where it is not null)"),
    Aggregate("near_ties", "", "records off the baseline at a near tie (divergence_class near_tie)"),
    Aggregate("mismatches", "", "records off the baseline with a real difference (divergence_class mismatch)"),
    Aggregate("accuracy", "", "share of answer_correct true (records where it is not null)"),
    Aggregate("answer_agreement", "", "share of answer_matches_baseline true"),
    Aggregate("target_share", "", "sum target_s / sum wall_s (records with a time split)"),
    Aggregate("draft_share", "", "sum draft_s / sum wall_s (records with a time split)"),
    Aggregate("other_share", "", "sum other_s / sum wall_s (records with a time split)"),
    Aggregate("predicted_throughput", "tok/s", "sum new_tokens / sum (predicted_target_s + predicted_draft_s), "
              "records with a prediction"),
    Aggregate("unexplained_share", "", "1 - sum predicted time / sum wall_s, records with a prediction"),
    Aggregate("throughput_free_draft", "tok/s", "what-if: sum new_tokens / sum (wall_s - draft_s)"),
    Aggregate("throughput_no_overhead", "tok/s", "what-if: sum new_tokens / sum (target_s + draft_s)"),
    Aggregate("throughput_perfect_acceptance", "tok/s", "what-if, every draft accepted at the same cost per call: "
              "(sum target_calls + sum drafted_tokens) / sum wall_s"),
    Aggregate("tree_size_mean", "nodes", "mean of per-record tree_size_mean (SpecExec)"),
    Aggregate("tree_depth_mean", "nodes", "mean of per-record tree_depth_mean (SpecExec)"),
    Aggregate("branch_prune_rate", "", "mean of per-record branch_prune_rate (SpecExec)"),
    Aggregate("effective_parallelism", "tokens", "mean of per-record effective_parallelism (SpecExec)"),
    Aggregate("max_active_branches", "nodes", "max of per-record max_active_branches (SpecExec)"),
    Aggregate("judge_accepted", "tokens", "sum judge_accepted (AutoJudge)"),
    Aggregate("judge_accepted_share", "", "sum judge_accepted / sum accepted_tokens (AutoJudge)"),
)
AGGREGATE_BY_NAME: dict[str, Aggregate] = {a.name: a for a in AGGREGATES}

# Summed counters: name -> what one ok record adds. Sums reduce across processes (torchmetrics "sum").
SUMS = (
    "records", "errors", "ok", "new_tokens", "wall_s", "tokens_per_s_sum", "target_calls", "drafted_tokens",
    "accepted_tokens", "speedup_log_sum", "speedup_count", "compared", "matches", "answered", "correct",
    "answers_compared", "answers_agreed", "near_ties", "mismatches", "split_wall_s", "split_new_tokens", "target_s", "draft_s", "other_s",
    "split_target_calls", "split_drafted_tokens", "predicted_wall_s", "predicted_new_tokens", "predicted_s",
    "tree_records",
    "tree_size_sum", "tree_depth_sum", "prune_rate_sum", "parallelism_sum", "judge_accepted",
    "exact_accepted_tokens",
)
MAXED = ("max_active_branches",)  # reduced with max
MAX_POSITIONS = 64  # per-position acceptance is tracked for the first 64 draft positions


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, NUMBER) or not math.isfinite(value):
        return None
    return float(value)


def contributions(record: Mapping[str, Any]) -> tuple[dict[str, float], list[float], list[float]]:
    """What one record adds to the sums of its group: (sums, accepted per position, drafted per position)."""
    sums = dict.fromkeys(SUMS + MAXED, 0.0)
    sums["records"] = 1.0
    if record.get("status") != "ok":
        sums["errors"] = 1.0
        return sums, [], []
    sums["ok"] = 1.0
    for name in ("new_tokens", "wall_s", "target_calls", "drafted_tokens", "accepted_tokens"):
        sums[name] = _number(record.get(name)) or 0.0
    sums["tokens_per_s_sum"] = _number(record.get("tokens_per_s")) or 0.0
    speedup = _number(record.get("speedup"))
    if speedup and speedup > 0:
        sums["speedup_log_sum"], sums["speedup_count"] = math.log(speedup), 1.0
    divergence = record.get("divergence_class")
    sums["near_ties"], sums["mismatches"] = float(divergence == "near_tie"), float(divergence == "mismatch")
    for flag, count, hit in (("matches_baseline", "compared", "matches"), ("answer_correct", "answered", "correct"),
                             ("answer_matches_baseline", "answers_compared", "answers_agreed")):
        if isinstance(record.get(flag), bool):
            sums[count], sums[hit] = 1.0, float(record[flag])
    if all(_number(record.get(name)) is not None for name in ("target_s", "draft_s", "other_s")):
        sums["split_wall_s"], sums["split_new_tokens"] = sums["wall_s"], sums["new_tokens"]
        sums["split_target_calls"], sums["split_drafted_tokens"] = sums["target_calls"], sums["drafted_tokens"]
        for name in ("target_s", "draft_s", "other_s"):
            sums[name] = float(record[name])
    predicted = [_number(record.get(name)) for name in ("predicted_target_s", "predicted_draft_s")]
    if None not in predicted:
        sums["predicted_wall_s"], sums["predicted_new_tokens"] = sums["wall_s"], sums["new_tokens"]
        sums["predicted_s"] = sum(predicted)
    if _number(record.get("tree_size_mean")) is not None:
        sums["tree_records"] = 1.0
        sums["tree_size_sum"] = float(record["tree_size_mean"])
        sums["tree_depth_sum"] = _number(record.get("tree_depth_mean")) or 0.0
        sums["prune_rate_sum"] = _number(record.get("branch_prune_rate")) or 0.0
        sums["parallelism_sum"] = _number(record.get("effective_parallelism")) or 0.0
        sums["max_active_branches"] = _number(record.get("max_active_branches")) or 0.0
    if _number(record.get("judge_accepted")) is not None:
        sums["judge_accepted"] = float(record["judge_accepted"])
        sums["exact_accepted_tokens"] = _number(record.get("exact_accepted_tokens")) or 0.0
    accepted = [float(v) for v in (record.get("accepted_counts_per_position") or [])][:MAX_POSITIONS]
    drafted = [float(v) for v in (record.get("drafted_counts_per_position") or [])][:MAX_POSITIONS]
    return sums, accepted, drafted


class Totals:
    """Sums of a group of records in plain Python (the report and the tests); :class:`src.lit.metrics.DecodingMetrics`
    keeps the same sums as torchmetrics states. Both hand them to :func:`aggregate`."""

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self.sums = dict.fromkeys(SUMS + MAXED, 0.0)
        self.accepted_at = [0.0] * MAX_POSITIONS
        self.drafted_at = [0.0] * MAX_POSITIONS
        for record in records:
            self.add(record)

    def add(self, record: Mapping[str, Any]) -> None:
        sums, accepted, drafted = contributions(record)
        for name, value in sums.items():
            self.sums[name] = max(self.sums[name], value) if name in MAXED else self.sums[name] + value
        for i, (a, d) in enumerate(zip(accepted, drafted)):
            self.accepted_at[i] += a
            self.drafted_at[i] += d

    def aggregate(self) -> dict[str, Any]:
        return aggregate(self.sums, self.accepted_at, self.drafted_at)


def _safe(top: float, bottom: float) -> float | None:
    return top / bottom if bottom > 0 else None


def aggregate(sums: Mapping[str, float], accepted_at: Iterable[float] = (), drafted_at: Iterable[float] = ()
              ) -> dict[str, Any]:
    """Every aggregate of :data:`AGGREGATES` but ``throughput_ratio`` (see :func:`add_baseline_ratios`) from the
    summed counters; None where the group has nothing to compute it from."""

    def ratio(top: str, bottom: str) -> float | None:
        return sums[top] / sums[bottom] if sums[bottom] else None

    values: dict[str, Any] = {
        "records": int(sums["records"]), "errors": int(sums["errors"]), "prompts": int(sums["ok"]),
        "throughput": ratio("new_tokens", "wall_s"),
        "tokens_per_s_mean": ratio("tokens_per_s_sum", "ok"),
        "speedup": math.exp(sums["speedup_log_sum"] / sums["speedup_count"]) if sums["speedup_count"] else None,
        "throughput_ratio": None,
        "tokens_per_target_call": ratio("new_tokens", "target_calls"),
        "acceptance_rate": ratio("accepted_tokens", "drafted_tokens"),
        "accepted_per_position": [a / d for a, d in zip(accepted_at, drafted_at) if d > 0],
        "matches_baseline_rate": ratio("matches", "compared"),
        "near_ties": int(sums["near_ties"]),
        "mismatches": int(sums["mismatches"]),
        "accuracy": ratio("correct", "answered"),
        "answer_agreement": ratio("answers_agreed", "answers_compared"),
        "target_share": ratio("target_s", "split_wall_s"),
        "draft_share": ratio("draft_s", "split_wall_s"),
        "other_share": ratio("other_s", "split_wall_s"),
        "predicted_throughput": ratio("predicted_new_tokens", "predicted_s"),
        "unexplained_share": 1 - sums["predicted_s"] / sums["predicted_wall_s"] if sums["predicted_wall_s"] else None,
        "throughput_free_draft": _safe(sums["split_new_tokens"], sums["split_wall_s"] - sums["draft_s"]),
        "throughput_no_overhead": _safe(sums["split_new_tokens"], sums["target_s"] + sums["draft_s"]),
        "throughput_perfect_acceptance": _safe(sums["split_target_calls"] + sums["split_drafted_tokens"],
                                               sums["split_wall_s"]),
    }
    if sums["tree_records"]:
        values.update(tree_size_mean=ratio("tree_size_sum", "tree_records"),
                      tree_depth_mean=ratio("tree_depth_sum", "tree_records"),
                      branch_prune_rate=ratio("prune_rate_sum", "tree_records"),
                      effective_parallelism=ratio("parallelism_sum", "tree_records"),
                      max_active_branches=int(sums["max_active_branches"]))
    if sums["judge_accepted"] or sums["exact_accepted_tokens"]:
        values.update(judge_accepted=int(sums["judge_accepted"]),
                      judge_accepted_share=ratio("judge_accepted", "accepted_tokens"))
    return values


def add_baseline_ratios(groups: dict[Any, dict[str, Any]], baseline_of) -> dict[Any, dict[str, Any]]:
    """Fill ``throughput_ratio`` of each group from ``baseline_of(key)``: the key of its baseline group (None: no
    baseline, the ratio stays None)."""
    for key, values in groups.items():
        base = groups.get(baseline_of(key))
        if base and base.get("throughput") and values.get("throughput"):
            values["throughput_ratio"] = values["throughput"] / base["throughput"]
    return groups


def describe() -> str:
    """Markdown tables of every field and aggregate (``python -m src.results.schema``; the README links it)."""
    lines = ["| field | carried by | type | unit | meaning |", "|---|---|---|---|---|"]
    for f in FIELDS:
        types = " or ".join("null" if t is type(None) else t.__name__ for t in f.types)
        lines.append(f"| `{f.name}` | {f.carrier} | {types} | {f.unit} | {f.meaning} |")
    lines += ["", "| aggregate | unit | definition |", "|---|---|---|"]
    lines += [f"| `{a.name}` | {a.unit} | {a.meaning} |" for a in AGGREGATES]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
