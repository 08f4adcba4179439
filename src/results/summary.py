"""The console summary of a predict run: each method's aggregates (:func:`src.results.schema.aggregate`, computed
by :class:`src.lit.metrics.DecodingMetrics`) with ``throughput_ratio`` against the baseline, as a plain-text table."""

from __future__ import annotations

from typing import Any

from src.results.schema import add_baseline_ratios


def summarize(per_method: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add ``throughput_ratio`` (throughput over the baseline's) to each method's computed metrics."""
    return add_baseline_ratios(per_method, lambda method: "baseline")


def format_summary_table(per_method: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one line per method, then a legend line (the aggregates differ and are easy to
    misread: a ratio of means is not a mean of ratios)."""

    def cell(value: Any, spec: str) -> str:
        width = int(spec.split(".")[0])
        return f"{'-':>{width}}" if value is None else format(value, spec)

    name_width = max([28, *(len(name) for name in per_method)])
    with_accuracy = any(values.get("accuracy") is not None for values in per_method.values())
    header = (f"{'method':<{name_width}} {'tok/s':>8} {'x base':>6} {'speedup':>7} {'pred':>7} {'tok/call':>8} "
              f"{'accept':>7} {'=base':>6}")
    header += f" {'acc':>6} {'=ans':>6} {'errors':>6}" if with_accuracy else f" {'errors':>6}"
    lines = [header, "-" * len(header)]
    for name, values in per_method.items():
        match = values["matches_baseline_rate"]
        lines.append(
            f"{name:<{name_width}} {cell(values['throughput'], '8.2f')} {cell(values['throughput_ratio'], '6.2f')} "
            f"{cell(values['speedup'], '7.2f')} {cell(values.get('predicted_throughput'), '7.2f')} "
            f"{cell(values['tokens_per_target_call'], '8.2f')} "
            f"{cell(values['acceptance_rate'], '7.1%')} {cell(match, '6.0%')}"
            + (f" {cell(values.get('accuracy'), '6.0%')} {cell(values.get('answer_agreement'), '6.0%')}"
               if with_accuracy else "")
            + f" {values['errors']:>6d}"
        )
    lines.append("tok/s: total new tokens / total time (throughput); x base: tok/s / the baseline's tok/s; speedup: "
                 "geometric mean of per-prompt speedups; pred: tok/s the cost profile predicts (src/results/schema.py)")
    return "\n".join(lines)
