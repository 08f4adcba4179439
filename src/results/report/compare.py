"""A/B comparison of two sections: B/A ratios per row with paired bootstrap CIs."""

from __future__ import annotations

from typing import Any

import numpy as np

from src.results.report.blocks import Block, fmt, fmt_ci
from src.results.report.sections import Section, prompt_key
from src.results.report.stats import method_of, method_order, natural_key, number_field, percentile_ci


def _by_key(records: list[dict[str, Any]], method: str) -> dict[tuple, dict[str, Any]]:
    """``(dataset, prompt_id, turn, prompt_sha) -> record`` of the usable ok records of ``method`` (the last one
    wins): a prompt file edited between the two sides pairs only its unchanged prompts (records written before
    prompt_sha pair on the rest)."""
    usable = {}
    for r in records:
        if (r["method"] == method and r["status"] == "ok" and number_field(r, "tokens_per_s") is not None
                and number_field(r, "new_tokens") is not None and (number_field(r, "target_calls") or 0) > 0):
            usable[prompt_key(r) + (str(r.get("prompt_sha")),)] = r
    return usable


def _columns(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array([number_field(r, k) for r in records]) for k in ("tokens_per_s", "new_tokens", "target_calls"))


def compare_method(a_records, b_records, method: str, seed: int, resamples: int) -> dict[str, Any]:
    a, b = _by_key(a_records, method), _by_key(b_records, method)
    keys = sorted(a.keys() & b.keys())
    paired = len(keys) >= 2
    a_list, b_list = ([a[k] for k in keys], [b[k] for k in keys]) if paired else (list(a.values()), list(b.values()))
    (at, an, ac), (bt, bn, bc) = _columns(a_list), _columns(b_list)

    def speed(ia, ib):
        return bt[ib].mean(axis=1) / at[ia].mean(axis=1)

    def per_call(ia, ib):
        return (bn[ib].sum(axis=1) / bc[ib].sum(axis=1)) / (an[ia].sum(axis=1) / ac[ia].sum(axis=1))

    def ratio_with_ci(point_a, point_b, statistic):
        if not point_a or point_b is None:
            return None, None
        if paired:  # one index matrix resamples the pairs: both sides see the same prompts
            return point_b / point_a, percentile_ci(lambda i: statistic(i, i), [len(keys)], seed, resamples)
        return point_b / point_a, percentile_ci(statistic, [len(a_list), len(b_list)], seed, resamples)

    speeds, per_calls = (_safe_mean(at), _safe_mean(bt)), (_safe_ratio(an, ac), _safe_ratio(bn, bc))
    return {"pairing": f"paired n={len(keys)}" if paired else f"unpaired {len(a_list)}/{len(b_list)}",
            "tokens_per_s": speeds, "tokens_per_target_call": per_calls,
            "tokens_per_s_ratio": ratio_with_ci(*speeds, speed),
            "tokens_per_target_call_ratio": ratio_with_ci(*per_calls, per_call)}


def _safe_mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _safe_ratio(top: np.ndarray, bottom: np.ndarray) -> float | None:
    return float(top.sum() / bottom.sum()) if len(bottom) and bottom.sum() > 0 else None


def verdict(point: float | None, ci: tuple[float, float] | None) -> str:
    if point is None:
        return "-"
    if ci is None:
        return "too few prompts"
    if ci[0] <= 1.0 <= ci[1]:
        return "within noise"
    return "B higher" if ci[0] > 1.0 else "B lower"


def comparison_blocks(a_section: Section, b_section: Section, level: int, seed: int,
                      resamples: int) -> list[Block]:
    header = ["method", "pairing", "tok/s A", "tok/s B", "B/A [95% CI]", "tok/s verdict", "tok/call A",
              "tok/call B", "B/A [95% CI]", "tok/call verdict"]
    a, b = a_section.records, b_section.records
    a_methods, b_methods = set(method_order(a)), set(method_order(b))
    rows = []
    for method in method_order([r for r in a if r["method"] in b_methods]):
        c = compare_method(a, b, method, seed, resamples)
        speed, per_call = c["tokens_per_s_ratio"], c["tokens_per_target_call_ratio"]
        rows.append([method, c["pairing"], fmt(c["tokens_per_s"][0], ".2f"), fmt(c["tokens_per_s"][1], ".2f"),
                     fmt_ci(*speed), verdict(*speed), fmt(c["tokens_per_target_call"][0], ".3f"),
                     fmt(c["tokens_per_target_call"][1], ".3f"), fmt_ci(*per_call), verdict(*per_call)])
    blocks: list[Block] = [("h", level, "Comparison: B / A"), ("table", header, rows), ("p", (
        f"Ratios of B over A per method; prompts paired by (dataset, prompt_id, turn) when at least 2 pairs exist. "
        f"95% percentile bootstrap CI over prompts ({resamples} resamples, seed {seed}); within noise when the "
        f"CI contains 1."))]
    for side, only in (("A", a_methods - b_methods), ("B", b_methods - a_methods)):
        if only:
            blocks.append(("p", f"Only in {side}: " + ", ".join(sorted(only, key=natural_key)) + "."))
    if any(method_of(m) != m for m in a_methods | b_methods):
        blocks.append(("p", "Rows `method #n` are configurations of a method split within one side; A and B "
                            "pair by row label: each side's summary says which settings its configurations "
                            "differ in."))
    return blocks
