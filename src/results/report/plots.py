"""Plots (PNG bytes via matplotlib's Agg canvas) and the blocks that carry them."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from src.results.report.blocks import Block, Plot, fmt, fmt_ci, fmt_pct
from src.results.report.stats import method_of, method_order, natural_key, number_field, percentile_ci
from src.results.schema import method_family, missing_optional

PLOT_NAMES = ("speedup", "time_split", "acceptance_per_position", "specexec_tree", "tokens_per_call_vs_tokens_per_s",
              "autojudge_accuracy")
# Record fields added after the first results files; an older file lacks them and the report says so. The three
# arrived in one version, and today's writer gives every ok record a time split: a record with ``target_s`` is
# new enough for the other two, so their absence there is no sign of age (see _predates).
NEWER_FIELDS = {"target_s": "time split", "predicted_target_s": "cost-profile prediction",
                "divergence_class": "near-tie check"}
LOSSY_FAMILIES = ("autojudge",)  # off the baseline by design: the near-tie check never classes them


def _figure(width: float = 8.0, height: float = 4.5):
    # Figure + FigureCanvasAgg instead of pyplot: no global backend state, no GUI, safe inside tests
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _style(i: int) -> dict[str, str]:
    # the default cycle has 10 colours: past 10 methods the marker shape tells them apart
    return {"color": f"C{i % 10}", "marker": "osD^v<>"[i // 10 % 7]}


def _legend_below(axes) -> None:
    # method keys are long (specexec[budget=...]): a legend under the axes never hides data
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=7, frameon=False)


def plot_speedup(stats) -> bytes | None:
    methods = [m for m in dict.fromkeys(m for m, _ in stats) if m != "baseline"
               and any(s["speedup"] for (m2, _), s in stats.items() if m2 == m)]
    if not methods:
        return None
    categories = sorted({c for _, c in stats if c != "all"}, key=natural_key) + ["all"]
    figure, axes = _figure(max(8.0, 1.2 * len(categories)))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        bars = [(x, stats[method, c]) for x, c in enumerate(categories)
                if (method, c) in stats and stats[method, c]["speedup"]]
        heights = [s["speedup"] for _, s in bars]
        errors = [[s["speedup"] - s["speedup_ci"][0] if s["speedup_ci"] else 0 for _, s in bars],
                  [s["speedup_ci"][1] - s["speedup"] if s["speedup_ci"] else 0 for _, s in bars]]
        axes.bar([x - 0.4 + width * (i + 0.5) for x, _ in bars], heights, width, yerr=errors, capsize=2,
                 label=method, color=_style(i)["color"], hatch="//" if i // 10 % 2 else None)
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    axes.set_ylabel("speedup vs baseline (geomean, 95% CI)")
    axes.set_ylim(bottom=0)  # a ratio axis from zero: a truncated one inflates small differences
    axes.set_title("Speedup by method and category")
    _legend_below(axes)
    return _png(figure)


def acceptance_curve(ok: list[dict[str, Any]]) -> list[float]:
    """Pooled counts when every record carries them (exact), else the mean of the per-record rates."""
    with_counts = [r for r in ok if isinstance(r.get("accepted_counts_per_position"), list)
                   and isinstance(r.get("drafted_counts_per_position"), list)]
    if with_counts and len(with_counts) == len(ok):
        columns = [(r["accepted_counts_per_position"], r["drafted_counts_per_position"]) for r in ok]
    else:  # a rate counts once per record that drafted at that position
        rates = [r.get("accepted_per_position") or [] for r in ok]
        columns = [([v or 0.0 for v in row], [0 if v is None else 1 for v in row]) for row in rates]
    length = max((len(d) for _, d in columns), default=0)
    accepted, drafted = np.zeros(length), np.zeros(length)
    for a, d in columns:
        accepted[: len(a)] += np.asarray(a, dtype=float)
        drafted[: len(d)] += np.asarray(d, dtype=float)
    return [a / d if d else math.nan for a, d in zip(accepted, drafted)]


def plot_acceptance(records: list[dict[str, Any]]) -> bytes | None:
    curves = {}
    for method in method_order(records):
        curve = acceptance_curve([r for r in records if r["method"] == method and r["status"] == "ok"])
        if any(not math.isnan(v) for v in curve):
            curves[method] = curve
    if not curves:
        return None
    figure, axes = _figure()
    for i, (method, curve) in enumerate(curves.items()):
        axes.plot(range(1, len(curve) + 1), curve, markersize=3, label=method, **_style(i))
    axes.set_xlabel("draft position")
    axes.set_ylabel("acceptance rate")
    axes.set_ylim(0, 1.05)
    axes.set_title("Acceptance per draft position")
    _legend_below(axes)
    return _png(figure)


def plot_specexec_tree(records: list[dict[str, Any]]) -> bytes | None:
    points: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        size, accepted, calls = number_field(r, "tree_size_mean"), number_field(r, "accepted_tokens"), number_field(r, "target_calls")
        if r["status"] == "ok" and size is not None and accepted is not None and calls:
            points.setdefault(r["method"], []).append((size, accepted / calls))
    if not points:
        return None
    figure, axes = _figure()
    for i, method in enumerate(sorted(points, key=natural_key)):
        xs, ys = zip(*points[method])
        axes.scatter(xs, ys, s=14, alpha=0.7, label=method, **_style(i))
    axes.set_xlabel("mean tree size (tokens per verification)")
    axes.set_ylabel("accepted tokens per target call")
    axes.set_ylim(bottom=0)
    axes.set_title("SpecExec: tree size vs accepted tokens per target call (one point per prompt)")
    _legend_below(axes)
    return _png(figure)


def plot_tradeoff(stats) -> bytes | None:
    points = [(m, s["tokens_per_target_call"], s["throughput"]) for (m, c), s in stats.items()
              if c == "all" and s["tokens_per_target_call"] is not None and s["throughput"] is not None]
    if not points:
        return None
    figure, axes = _figure()
    for i, (method, x, y) in enumerate(points):  # the legend names the points: labels on them would overlap
        axes.scatter([x], [y], s=30, label=method, **_style(i))
    axes.set_xlabel("tokens per target call")
    axes.set_ylabel("tokens/s (throughput: total tokens / total time)")
    axes.set_xlim(left=0)  # both axes are rates: from zero, so distances between points are honest
    axes.set_ylim(bottom=0)
    axes.set_title("Tokens per target call vs tokens/s, per method configuration")
    _legend_below(axes)
    return _png(figure)


def _threshold(records: list[dict[str, Any]], method: str) -> float | None:
    for r in records:
        if r["method"] == method and isinstance(r.get("params"), dict):
            value = r["params"].get("threshold")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def plot_autojudge(records: list[dict[str, Any]], stats) -> bytes | None:
    points = sorted(((_threshold(records, m), s["tokens_per_target_call"], s["accuracy"], m)
                     for (m, c), s in stats.items() if c == "all" and m.startswith("autojudge")
                     and s["accuracy"] is not None and s["tokens_per_target_call"] is not None),
                    key=lambda p: (p[0] is None, p[0] or 0.0, natural_key(p[3])))
    if not points:
        return None
    figure, axes = _figure()
    axes.plot([p[1] for p in points], [100 * p[2] for p in points], marker="o", label="autojudge")
    for threshold, x, accuracy, method in points:
        label = f"t={threshold:g}" if threshold is not None else method
        axes.annotate(label, (x, 100 * accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for method, category in stats:  # a baseline split into configurations draws one line per configuration
        baseline = stats[method, category]["accuracy"]
        if category == "all" and method_of(method) == "baseline" and baseline is not None:
            axes.axhline(100 * baseline, color="grey", linestyle="--", label=f"{method} accuracy")
    axes.set_xlabel("tokens per target call")
    axes.set_ylabel("accuracy (%)")
    axes.set_xlim(left=0)  # tokens per target call is a rate: from zero
    axes.set_title("AutoJudge: accuracy vs tokens per target call over thresholds")
    _legend_below(axes)
    return _png(figure)


def autojudge_blocks(records: list[dict[str, Any]], level: int, seed: int, resamples: int) -> list[Block]:
    """The paper's trade-off: per method (a row per AutoJudge threshold), tokens per target call, answer agreement
    with the baseline and accuracy against the gold answer, each with a bootstrap CI over prompts."""
    methods = [m for m in method_order(records) if method_of(m).startswith("autojudge")]
    if not methods:
        return []
    rows = []
    for method in [m for m in method_order(records) if not method_of(m).startswith("autojudge")] + methods:
        ok = [r for r in records if r["method"] == method and r["status"] == "ok"]
        calls = [(r["new_tokens"], r["target_calls"]) for r in ok
                 if number_field(r, "new_tokens") is not None and number_field(r, "target_calls")]
        if not calls:
            continue
        tokens, per = np.array([c[0] for c in calls], float), np.array([c[1] for c in calls], float)
        per_call = tokens.sum() / per.sum()
        per_call_ci = percentile_ci(lambda idx, t=tokens, c=per: t[idx].sum(1) / c[idx].sum(1), [len(tokens)], seed,
                                    resamples)
        shares = []
        for key in ("answer_matches_baseline", "answer_correct"):
            hits = np.array([float(r[key]) for r in ok if isinstance(r.get(key), bool)])
            ci = percentile_ci(lambda idx, h=hits: h[idx].mean(1), [len(hits)], seed, resamples) if len(hits) else None
            shares.append((float(hits.mean()) if len(hits) else None, ci))
        threshold = _threshold(records, method)
        shown = "-" if not method_of(method).startswith("autojudge") else (
            "fit-time" if threshold is None else f"{threshold:g}")
        rows.append([method, shown, str(len(ok)), fmt_ci(per_call, per_call_ci)]
                    + [fmt_ci(*share) if share[0] is not None else "-" for share in shares])
    header = ["method", "threshold", "prompts", "tok/call [95% CI]", "answer = baseline's [95% CI]",
              "accuracy [95% CI]"]
    legend = (f"AutoJudge trade-off: tok/call = total new tokens / total target calls; answer = baseline's: share "
              f"of prompts whose final answer equals the baseline's (the target's own); accuracy: share equal to the "
              f"gold answer; 95% percentile bootstrap CIs over prompts ({resamples} resamples, seed {seed}). A "
              f"lossless method's row is the threshold-0 end of the curve (every mismatch important).")
    return [("h", level, "AutoJudge: tokens per call vs answer quality"), ("table", header, rows), ("p", legend)]


def plot_time_split(stats) -> bytes | None:
    """One stacked bar per method: the shares of its decoding time inside target forwards, inside the drafter, and
    elsewhere (sampling, acceptance, cache rollback, Python)."""
    rows = [(m, s) for (m, c), s in stats.items() if c == "all" and s.get("target_share") is not None]
    if not rows:
        return None
    figure, axes = _figure(height=max(2.5, 0.45 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    for name, color in (("target", "#4c72b0"), ("draft", "#dd8452"), ("other", "#8c8c8c")):
        shares = np.array([100 * (s[f"{name}_share"] or 0.0) for _, s in rows])
        axes.barh(range(len(rows)), shares, left=left, color=color, label=name)
        left += shares
    axes.set_yticks(range(len(rows)), [m for m, _ in rows])
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("share of decoding time (%)")
    axes.set_title("Where the time goes: target forwards, drafter, everything else")
    _legend_below(axes)
    return _png(figure)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def time_blocks(stats, records: list[dict[str, Any]], level: int) -> list[Block]:
    """Predicted vs observed tokens/s, the time split, and what-if speedups (against the baseline's tok/s)."""
    rows = [(m, s) for (m, c), s in stats.items() if c == "all"]
    if not any(s.get("target_share") is not None for _, s in rows):
        return []

    def base(s: dict[str, Any]) -> float | None:  # the tok/s of the baseline of the row's own configuration
        return stats[s["baseline_row"], "all"]["throughput"] if s.get("baseline_row") else None
    header = ["method", "tok/s", "predicted tok/s", "unexplained", "target", "draft", "other",
              "x base", "x base, free drafter", "x base, no harness overhead", "x base, every draft accepted"]
    table = [[m, fmt(s["throughput"], ".2f"), fmt(s["predicted_throughput"], ".2f"), fmt_pct(s["unexplained_share"]),
              fmt_pct(s["target_share"]), fmt_pct(s["draft_share"]), fmt_pct(s["other_share"]),
              fmt(s["throughput_ratio"], ".3f"), fmt(_ratio(s["throughput_free_draft"], base(s)), ".3f"),
              fmt(_ratio(s["throughput_no_overhead"], base(s)), ".3f"),
              fmt(_ratio(s["throughput_perfect_acceptance"], base(s)), ".3f")] for m, s in rows]
    legend = ("target / draft / other: shares of decoding time inside target forwards (hooks), inside the drafter "
              "(draft forwards, head steps, lookups, tree growth) and the rest (sampling, acceptance, cache "
              "rollback, Python); predicted tok/s: the run's cost profile (target latency per forward size, draft "
              "latency or drafter step) applied to the records' forward counts; unexplained: 1 - predicted / "
              "observed time; x base: tok/s over the tok/s of the baseline of the same configuration (as in the "
              "summary); what-if columns: the same ratio if the drafter cost nothing, if nothing but forwards and "
              "drafting took time, or if every draft were accepted at the same cost per target call.")
    profile = next((r["cost_profile"] for r in records if isinstance(r.get("cost_profile"), dict)), None)
    blocks: list[Block] = [("h", level, "Where the time goes"), ("table", header, table), ("p", legend)]
    if profile:
        shown = ", ".join(f"{n}: {ms:.1f}" for n, ms in list(profile.get("target_ms", {}).items())[:10])
        blocks.append(("p", f"Cost profile (context {profile.get('context')} tokens): target ms per forward of n "
                            f"tokens {shown}; drafter ms per proposed token {profile.get('drafter_ms') or '-'}."))
    return blocks


def _predates(name: str, record: dict[str, Any]) -> bool:
    """Whether an ok record lacks the newer field ``name`` because it is older: today's writer would have given
    it one. The near-tie check classes only a lossless method's turn-1 output that is off the baseline's (equal
    outputs and later turns carry no ``divergence_class``); a run without a cost profile carries no prediction."""
    if name in record:
        return False
    if name == "divergence_class":
        return (record.get("turn") == 1 and record.get("matches_baseline") is False
                and method_family(method_of(str(record["method"]))) not in LOSSY_FAMILIES)
    return "target_s" not in record


def missing_fields_blocks(records: list[dict[str, Any]]) -> list[Block]:
    """Notes on the newer fields no record carries: written before sp-samp recorded them (their columns then
    show '-'), or, for the prediction, by a run that measured no cost profile."""
    ok = [r for r in records if r.get("status") == "ok"]
    missing = missing_optional(ok, NEWER_FIELDS)
    older = [name for name in missing if any(_predates(name, r) for r in ok)]
    blocks: list[Block] = []
    if older:
        names = ", ".join(f"{NEWER_FIELDS[name]} (`{name}`)" for name in older)
        blocks.append(("p", f"These records were written before sp-samp recorded: {names}; those figures show '-'."))
    if "predicted_target_s" in missing and "predicted_target_s" not in older:
        blocks.append(("p", "These records carry no cost-profile prediction (`predicted_target_s`): their run "
                            "measured no cost profile (`model.cost_profile: false`, or the measurement failed); "
                            "predicted tok/s shows '-'."))
    return blocks


def plot_blocks(records, stats, level: int, prefix: str) -> list[Block]:
    makers = {
        "speedup": ("Speedup by method and category", lambda: plot_speedup(stats),
                    "no record with a speedup (a run without the baseline?)"),
        "time_split": ("Where the time goes", lambda: plot_time_split(stats),
                       "no record with a time split (written before sp-samp recorded one)"),
        "acceptance_per_position": ("Acceptance per draft position", lambda: plot_acceptance(records),
                                    "no drafted tokens in any record"),
        "specexec_tree": ("SpecExec tree size vs accepted tokens per target call",
                          lambda: plot_specexec_tree(records), "no SpecExec record with tree_size_mean"),
        "tokens_per_call_vs_tokens_per_s": ("Tokens per target call vs tokens/s", lambda: plot_tradeoff(stats),
                                            "no method with both tokens/s and tokens per target call"),
        "autojudge_accuracy": ("AutoJudge accuracy vs tokens per target call",
                               lambda: plot_autojudge(records, stats),
                               "no autojudge method with answer_correct set"),
    }
    blocks: list[Block] = [("h", level, "Plots")]
    for name, (title, make, reason) in makers.items():
        png = make()
        blocks.append(("img", Plot(f"{prefix}{name}.png", title, png)) if png else ("p", f"{title}: skipped, {reason}."))
    return blocks
