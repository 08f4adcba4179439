"""Statistics: every aggregate of src.results.schema per (method, category), with bootstrap CIs."""

from __future__ import annotations

import json
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


# the fingerprint's params that every method shares (sampling and length); the others are the method's own
SHARED_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
# fingerprint parts that belong to the method, not to what it is compared on: a baseline has no draft nor files
METHOD_OWN_PARTS = ("method", "params", "draft", "files")


Context = tuple[str | None, frozenset]  # (fingerprint form or None, {(field, value as JSON)} of the other form)


def baseline_context(record: dict[str, Any]) -> Context:
    """What a row must share with a baseline for a ratio between them to mean anything, in two forms. From the
    fingerprint: everything in it but the method's own parts (so the target, the prompt formatting and any part
    added later) plus the shared params. From the fields records carried before fingerprints: the shared params
    and the target's name, dtype and quantization, each only where the record has it."""
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    target = record.get("target") if isinstance(record.get("target"), dict) else {}
    carried = {f"params.{key}": params.get(key) for key in SHARED_PARAMS}
    carried |= {f"target.{key}": target.get(key) for key in ("name", "dtype", "quantization")}
    legacy = frozenset((key, json.dumps(value, default=str)) for key, value in carried.items() if value is not None)
    fingerprint = record.get("fingerprint")
    if not isinstance(fingerprint, dict):
        return None, legacy
    fingerprint_params = fingerprint.get("params") if isinstance(fingerprint.get("params"), dict) else {}
    shared = {key: value for key, value in fingerprint.items() if key not in METHOD_OWN_PARTS}
    shared["params"] = {key: fingerprint_params[key] for key in SHARED_PARAMS if key in fingerprint_params}
    return json.dumps(shared, sort_keys=True, default=str), legacy


def _same_context(a: Context, b: Context) -> bool:
    if a[0] is not None and b[0] is not None:
        return a[0] == b[0]
    # a record written before fingerprints: a field one of the two lacks is unknown, not a difference
    mine, theirs = dict(a[1]), dict(b[1])
    return all(mine[key] == theirs[key] for key in mine.keys() & theirs.keys())


def baseline_rows(records: list[dict[str, Any]]) -> dict[str, str | None]:
    """Row label -> the label of the baseline row of the same configuration: the first whose every record shares
    its context with every record of the row (None: none in the input; a row pooled by --merge-configs across
    contexts matches none). A baseline row is its own reference."""
    contexts: dict[str, set[Context]] = {}
    for record in records:
        contexts.setdefault(record["method"], set()).add(baseline_context(record))
    baselines = [m for m in method_order(records) if method_of(m) == "baseline"]

    def same(label: str, baseline: str) -> bool:
        return all(_same_context(a, b) for a in contexts[label] for b in contexts[baseline])

    return {label: label if label in baselines else next((b for b in baselines if same(label, b)), None)
            for label in contexts}


def stats_by_method_category(records, seed, resamples) -> dict[tuple[str, str], dict[str, Any]]:
    """``(method, category) -> stats``, with an ``all`` category per method; in table order. ``throughput_ratio``
    is against the baseline row of the same configuration (:func:`baseline_rows`) and category; ``baseline_row``
    names that row (None: no such baseline)."""
    table = {}
    matches = baseline_rows(records)
    for method in method_order(records):
        mine = [r for r in records if r["method"] == method]
        for category in sorted({_category(r) for r in mine}, key=natural_key):
            table[method, category] = group_stats([r for r in mine if _category(r) == category], seed, resamples)
        table[method, "all"] = group_stats(mine, seed, resamples)
        for category in {c for m, c in table if m == method}:
            table[method, category]["baseline_row"] = matches[method]
    return add_baseline_ratios(table, lambda key: (matches[key[0]], key[1]))
