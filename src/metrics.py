"""Per-method decoding metrics as torchmetrics ``Metric``s (summed states, so they reduce across processes).

One :class:`DecodingMetrics` per method key is updated with that method's ``ok`` / ``error`` records; the
speedup against the baseline is computed in :func:`summarize` from the per-method means, and also as the
geometric mean of per-prompt ratios (each record's ``speedup``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric

MAX_POSITIONS = 64  # per-position acceptance is tracked for the first 64 draft positions


class DecodingMetrics(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sums = (
            "records", "errors", "new_tokens", "wall_s", "tokens_per_s_sum", "target_calls", "draft_calls",
            "drafted_tokens", "accepted_tokens", "compared", "matches", "log_speedup_sum", "speedup_count",
            "tree_size_sum", "tree_depth_sum", "prune_rate_sum", "parallelism_sum", "tree_records",
            "answered", "correct", "judge_accepted", "exact_accepted_tokens", "answers_compared", "answers_agreed",
        )
        for name in sums:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("max_active_branches", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("accepted_at", default=torch.zeros(MAX_POSITIONS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("drafted_at", default=torch.zeros(MAX_POSITIONS, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, record: dict[str, Any]) -> None:
        self.records += 1
        if record.get("status") != "ok":
            self.errors += 1
            return
        self.new_tokens += record["new_tokens"]
        self.wall_s += record["wall_s"]
        self.tokens_per_s_sum += record["tokens_per_s"] or 0.0
        self.target_calls += record["target_calls"]
        self.draft_calls += record["draft_calls"]
        self.drafted_tokens += record["drafted_tokens"]
        self.accepted_tokens += record["accepted_tokens"]
        if record.get("matches_baseline") is not None:
            self.compared += 1
            self.matches += bool(record["matches_baseline"])
        if record.get("answer_correct") is not None:
            self.answered += 1
            self.correct += bool(record["answer_correct"])
        if record.get("answer_matches_baseline") is not None:
            self.answers_compared += 1
            self.answers_agreed += bool(record["answer_matches_baseline"])
        if record.get("judge_accepted") is not None:
            self.judge_accepted += record["judge_accepted"]
            self.exact_accepted_tokens += record.get("exact_accepted_tokens") or 0
        if record.get("speedup"):
            self.log_speedup_sum += math.log(record["speedup"])
            self.speedup_count += 1
        counts = record.get("accepted_counts_per_position") or []
        offered = record.get("drafted_counts_per_position") or []
        for i, (accepted, drafted) in enumerate(zip(counts[:MAX_POSITIONS], offered[:MAX_POSITIONS])):
            self.accepted_at[i] += accepted
            self.drafted_at[i] += drafted
        if record.get("tree_size_mean") is not None:
            self.tree_records += 1
            self.tree_size_sum += record["tree_size_mean"]
            self.tree_depth_sum += record.get("tree_depth_mean") or 0.0
            self.prune_rate_sum += record.get("branch_prune_rate") or 0.0
            self.parallelism_sum += record.get("effective_parallelism") or 0.0
            self.max_active_branches = torch.maximum(
                self.max_active_branches, torch.tensor(float(record.get("max_active_branches") or 0), dtype=torch.float64)
            )

    def compute(self) -> dict[str, Any]:
        ok = float(self.records - self.errors)

        def ratio(a: torch.Tensor, b: torch.Tensor | float) -> float | None:
            b = float(b)
            return float(a) / b if b else None

        positions = [ratio(a, d) for a, d in zip(self.accepted_at, self.drafted_at) if float(d) > 0]
        result = {
            "records": int(self.records),
            "errors": int(self.errors),
            "tokens_per_s": ratio(self.tokens_per_s_sum, ok),  # mean over prompts of per-prompt tokens/s
            "tokens_per_s_pooled": ratio(self.new_tokens, self.wall_s),
            "tokens_per_target_call": ratio(self.new_tokens, self.target_calls),
            "acceptance_rate": ratio(self.accepted_tokens, self.drafted_tokens),
            "accepted_per_position": positions,
            "matches_baseline_rate": ratio(self.matches, self.compared),
            "accuracy": ratio(self.correct, self.answered),
            "answer_agreement": ratio(self.answers_agreed, self.answers_compared),  # final answer == baseline's
            "speedup_geomean": math.exp(float(self.log_speedup_sum) / float(self.speedup_count))
            if float(self.speedup_count)
            else None,
        }
        if float(self.tree_records):
            result.update(
                tree_size_mean=ratio(self.tree_size_sum, self.tree_records),
                tree_depth_mean=ratio(self.tree_depth_sum, self.tree_records),
                branch_prune_rate=ratio(self.prune_rate_sum, self.tree_records),
                effective_parallelism=ratio(self.parallelism_sum, self.tree_records),
                max_active_branches=int(self.max_active_branches),
            )
        if float(self.judge_accepted) or float(self.exact_accepted_tokens):
            result.update(
                judge_accepted=int(self.judge_accepted),
                # of the accepted drafts, the share only the judge let through (exact decoding would have stopped)
                judge_accepted_share=ratio(self.judge_accepted, self.accepted_tokens),
            )
        return result


def summarize(per_method: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add ``speedup`` (mean tokens/s over the baseline's mean tokens/s) to each method's computed metrics."""
    baseline = per_method.get("baseline", {}).get("tokens_per_s")
    for values in per_method.values():
        values["speedup"] = values["tokens_per_s"] / baseline if baseline and values["tokens_per_s"] else None
    return per_method


def format_summary_table(per_method: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one line per method."""

    def cell(value: Any, spec: str) -> str:
        width = int(spec.split(".")[0])
        return f"{'-':>{width}}" if value is None else format(value, spec)

    name_width = max([28, *(len(name) for name in per_method)])
    with_accuracy = any(values.get("accuracy") is not None for values in per_method.values())
    header = f"{'method':<{name_width}} {'tok/s':>8} {'speedup':>8} {'geo':>6} {'tok/call':>8} {'accept':>7} {'=base':>6}"
    header += f" {'acc':>6} {'=ans':>6} {'errors':>6}" if with_accuracy else f" {'errors':>6}"
    lines = [header, "-" * len(header)]
    for name, values in per_method.items():
        match = values["matches_baseline_rate"]
        lines.append(
            f"{name:<{name_width}} {cell(values['tokens_per_s'], '8.2f')} {cell(values['speedup'], '8.2f')} "
            f"{cell(values['speedup_geomean'], '6.2f')} {cell(values['tokens_per_target_call'], '8.2f')} "
            f"{cell(values['acceptance_rate'], '7.1%')} {cell(match, '6.0%')}"
            + (f" {cell(values.get('accuracy'), '6.0%')} {cell(values.get('answer_agreement'), '6.0%')}"
               if with_accuracy else "")
            + f" {values['errors']:>6d}"
        )
    return "\n".join(lines)
