"""Statistics: every aggregate of src.results.schema per (method, category), with bootstrap CIs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from src.results.schema import Totals, add_baseline_ratios


def number_field(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def percentile_ci(statistic: Callable[..., np.ndarray], sizes: Sequence[int], seed: int,
                  resamples: int) -> tuple[float, float] | None:
    """The documented bootstrap: one index matrix per sample size, drawn in order from a fresh generator."""
    if min(sizes) < 2:
        return None
    rng = np.random.default_rng(seed)
    indices = [rng.integers(0, n, size=(resamples, n)) for n in sizes]
    low, high = np.percentile(statistic(*indices), [2.5, 97.5])
    return float(low), float(high)


def speedup_stats(records: list[dict[str, Any]], seed: int, resamples: int):
    speedups = [v for v in (number_field(r, "speedup") for r in records) if v is not None and v > 0]
    if not speedups:
        return None, None
    logs = np.log(np.array(speedups))
    ci = percentile_ci(lambda idx: logs[idx].mean(axis=1), [len(logs)], seed, resamples)
    return math.exp(logs.mean()), (math.exp(ci[0]), math.exp(ci[1])) if ci else None


def group_stats(records: list[dict[str, Any]], seed: int, resamples: int) -> dict[str, Any]:
    """Every aggregate of :mod:`src.results.schema` over the group (the same code the console and wandb use), plus the
    bootstrap CI of the speedup and the per-request spread of tokens per call."""
    values = Totals(records).aggregate()
    ok = [r for r in records if r["status"] == "ok"]
    speedup, ci = speedup_stats(ok, seed, resamples)
    per_call = [r["new_tokens"] / r["target_calls"] for r in ok  # per request: the pooled figure's parts
                if number_field(r, "new_tokens") is not None and number_field(r, "target_calls")]
    values.update(speedup_ci=ci, tokens_per_call_percentiles=(
        tuple(float(x) for x in np.percentile(per_call, [10, 50, 90])) if per_call else None))
    return values


def natural_key(text: str) -> list:
    # re.split with a group alternates str, int, str...: lists compare position by position safely
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


def method_of(label: str) -> str:
    """The method key of a row label (``speculative #2`` -> ``speculative``; method keys hold no space)."""
    return label.split(" #")[0]


def method_order(records: list[dict[str, Any]]) -> list[str]:
    """The baseline first (the reference), then the others in natural order (k=2 before k=16, #2 before
    #10)."""
    return sorted({r["method"] for r in records}, key=lambda m: (method_of(m) != "baseline", natural_key(m)))


def _category(record: dict[str, Any]) -> str:
    return str(record.get("category") or "(none)")


def stats_by_method_category(records, seed, resamples) -> dict[tuple[str, str], dict[str, Any]]:
    """``(method, category) -> stats``, with an ``all`` category per method; in table order. ``throughput_ratio``
    is against the (first) baseline row of the same category."""
    table = {}
    methods = method_order(records)
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        for category in sorted({_category(r) for r in mine}, key=natural_key):
            table[method, category] = group_stats([r for r in mine if _category(r) == category], seed, resamples)
        table[method, "all"] = group_stats(mine, seed, resamples)
    baseline = next((m for m in methods if method_of(m) == "baseline"), None)
    return add_baseline_ratios(table, lambda key: (baseline, key[1]))
