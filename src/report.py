"""Summarise results JSONL files into a Markdown and a self-contained HTML report with PNG plots.

    python -m src.report RESULTS.jsonl [MORE.jsonl ...] --out DIR [--seed 0] [--bootstrap 2000]
    python -m src.report RESULTS.jsonl --merge-configs --out DIR
    python -m src.report A.jsonl B.jsonl --compare --out DIR

Writes ``DIR/report.md`` (tables, links to the PNGs next to it), ``DIR/report.html`` (the same with the
plots embedded as data URIs: it opens without a server) and ``DIR/*.png``. Several files are merged into
one report; with ``--compare`` and exactly two files each file gets its own section (A, B) and a
comparison section gives B/A per method. Malformed lines (a run killed mid-write) and error records are
counted and listed, never dropped silently. A binary or non-UTF-8 input is refused (exit status 2).

Within a section (all files, or one side of ``--compare``):

- duplicates: a record with the same (run_id, resume_key, status) as an earlier one (a file appended twice,
  the same file passed twice) counts once; a warning on stderr and the Input list name their lines. Records
  without a run_id or resume_key are never dropped.
- configurations: records of one method whose settings differ are not pooled silently. The settings are the
  record's ``fingerprint`` (grouped by ``fingerprint_id``); a method with records written before fingerprints
  is compared on ``params`` and the target's and draft's name, dtype and quantization instead. A method with
  several configurations gets one row per configuration, ``<method> #1``, ``#2``... in file order, and a note
  under the summary table lists the fields that differ (dotted keys, ``target.dtype: float32 vs bfloat16``).
  ``--merge-configs`` pools them in one row as before, and the note says which fields differ. ``--compare``
  splits each side on its own and pairs rows by label.

Definitions (a "prompt" is one ``ok`` record: one (dataset, prompt_id, turn) of one method):

- every aggregate (tok/s = ``throughput``, x base = ``throughput_ratio``, speedup, tokens per call, acceptance,
  "= base", accuracy, time shares, predicted tok/s, what-if figures) is :func:`src.schema.aggregate`, the same
  code the console table and wandb use; ``python -m src.schema`` prints every definition. In short:
  tok/s = sum ``new_tokens`` / sum ``wall_s``; speedup = geometric mean over prompts of ``speedup`` (tokens/s
  over the baseline's on the same prompt+turn); x base = tok/s over the baseline's tok/s (same category).
- 95% confidence intervals are percentile bootstraps over prompts: ``rng = numpy.random.default_rng(seed)``,
  fresh for every statistic (a number does not depend on what else the report holds), one draw
  ``idx = rng.integers(0, n, size=(resamples, n))``, the statistic on every row of ``idx`` (speedup: the mean
  of the log speedups), then ``numpy.percentile(values, [2.5, 97.5])`` (linear interpolation), exponentiated
  for the speedup. No interval with fewer than 2 prompts.
- compare: per row (method or configuration), the B/A ratio of mean tokens/s and of tokens per target call.
  Records are paired by (dataset, prompt_id, turn) (the last ok record of a key wins); with >= 2 pairs only
  the pairs count and one index matrix resamples them, otherwise A and B are resampled independently (A's
  matrix drawn first, then B's, from the same generator). "within noise" when the ratio's CI contains 1.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from src.schema import Totals, add_baseline_ratios, missing_optional
from src.tools.check_results import UnreadableFileError, jsonl_lines, read_text

PLOT_NAMES = ("speedup", "time_split", "acceptance_per_position", "specexec_tree", "tokens_per_call_vs_tokens_per_s",
              "autojudge_accuracy")
# Record fields added after the first results files; an older file lacks them and the report says so.
NEWER_FIELDS = {"target_s": "time split", "predicted_target_s": "cost-profile prediction",
                "divergence_class": "near-tie check"}
MAX_LISTED = 20  # error records / malformed lines listed one by one; the rest is counted
TABLE_HEADER = ["method", "category", "prompts", "tok/s", "x base", "speedup [95% CI]", "predicted tok/s",
                "tok/call", "tok/call p10 / p50 / p90", "accept", "= base", "near ties / mismatches", "accuracy",
                "= base answer", "errors"]


# --- reading ---------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """One results file: its usable records (each tagged with ``_file``/``_line``) and its malformed lines."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)


def read_results(path: Path) -> Loaded:
    """Raises UnreadableFileError for a binary or non-UTF-8 file: replacing its bytes would invent records."""
    loaded = Loaded(path)
    for line_number, line in enumerate(jsonl_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        record, problem = _parse_line(line)
        if problem:
            loaded.malformed.append((line_number, problem))
        else:
            loaded.records.append(record | {"_file": str(path), "_line": line_number})
    return loaded


def _parse_line(line: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg}; a truncated line?)"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("method"), str) or record.get("status") not in ("ok", "error"):
        # without a method and a status the record cannot be placed in any row
        return None, "no method or no status 'ok'/'error'"
    return record, None


# --- sections: duplicates dropped, configurations split --------------------------------------------------

@dataclass
class Config:
    """One configuration (settings) of a method within a section."""

    key: str  # fingerprint_id, or the derived signature of records written before fingerprints
    fields: dict[str, Any]  # flattened settings ("target.dtype": "float32")
    label: str = ""  # its row label: the method key, or "<method> #<n>" when the method is split
    records: int = 0


@dataclass
class Section:
    """The records of one report section (all files, or one side of --compare)."""

    loaded: list[Loaded]
    records: list[dict[str, Any]]  # deduplicated; "method" holds the row label
    duplicate_lines: list[list[int]]  # per file of ``loaded``: lines of records counted once already
    configs: dict[str, list[Config]]  # method key -> its configurations, first seen first
    merged: bool  # --merge-configs: one row per method whatever its configurations


def drop_duplicates(loaded: list[Loaded]) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Records after the first with the same (run_id, resume_key, status) - a file appended twice, or the same
    file passed twice - are dropped; returns (kept records, per file the lines dropped)."""
    seen: set[tuple[str, str, str]] = set()
    kept, dropped = [], []
    for one in loaded:
        dropped.append([])
        for record in one.records:
            identity = (record.get("run_id"), record.get("resume_key"), record["status"])
            if not all(isinstance(part, str) for part in identity):
                kept.append(record)  # without both ids a record cannot be told from a rerun: keep it
            elif identity in seen:
                dropped[-1].append(record["_line"])
            else:
                seen.add(identity)
                kept.append(record)
    return kept, dropped


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys (``{"target": {"dtype": x}}`` -> ``{"target.dtype": x}``); other values,
    empty dicts included, are leaves."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _model_settings(info: Any) -> dict[str, Any] | None:
    if not isinstance(info, dict):
        return None
    return {key: info.get(key) for key in ("name", "dtype", "quantization")}


def settings_of(record: dict[str, Any], legacy: bool) -> tuple[str, dict[str, Any]]:
    """(grouping key, flattened settings): the record's fingerprint, or with ``legacy`` (a method some of
    whose records predate fingerprints) its params and the target's / draft's name, dtype and quantization."""
    if legacy:
        fields = flatten({"params": record.get("params"), "target": _model_settings(record.get("target")),
                          "draft": _model_settings(record.get("draft"))})
        return json.dumps(fields, sort_keys=True, default=str), fields
    fingerprint = record.get("fingerprint") if isinstance(record.get("fingerprint"), dict) else {}
    return record["fingerprint_id"], {"fingerprint_id": record["fingerprint_id"]} | flatten(fingerprint)


def split_configs(records: list[dict[str, Any]], merge: bool) -> tuple[list, dict[str, list[Config]]]:
    """Copies of ``records`` whose "method" is their configuration's row label, and method -> configs."""
    # a method compares on what all its records carry: the fingerprint, unless one of them has none
    legacy = {r["method"] for r in records if not isinstance(r.get("fingerprint_id"), str)}
    configs: dict[str, dict[str, Config]] = {}
    keys = []
    for record in records:
        key, fields = settings_of(record, record["method"] in legacy)
        config = configs.setdefault(record["method"], {}).setdefault(key, Config(key, fields))
        config.records += 1
        keys.append(key)
    for method, found in configs.items():
        for number, config in enumerate(found.values(), start=1):
            config.label = f"{method} #{number}" if len(found) > 1 and not merge else method
    labelled = [r | {"method": configs[r["method"]][key].label} for r, key in zip(records, keys)]
    return labelled, {method: list(found.values()) for method, found in configs.items()}


def make_section(loaded: list[Loaded], merge: bool) -> Section:
    kept, duplicate_lines = drop_duplicates(loaded)
    records, configs = split_configs(kept, merge)
    return Section(loaded, records, duplicate_lines, configs, merge)


_ABSENT = object()  # a settings field one configuration lacks


def _settings_value(value: Any, limit: int = 40) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differing_fields(configs: list[Config]) -> list[str]:
    """``field: value1 vs value2`` (configuration order) for each settings field that differs between them."""
    lines = []
    for key in dict.fromkeys(k for config in configs for k in config.fields):
        values = [config.fields.get(key, _ABSENT) for config in configs]
        # compared in full: the values shown are shortened
        if len({None if v is _ABSENT else json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            lines.append(f"{key}: " + " vs ".join(_settings_value(v) for v in values))
    return lines


def duplicate_warning(section: Section) -> str | None:
    pairs = [(one, lines) for one, lines in zip(section.loaded, section.duplicate_lines) if lines]
    if not pairs:
        return None
    count = sum(len(lines) for _, lines in pairs)
    listed = "; ".join(f"{one.path} lines {_line_list(lines)}" for one, lines in pairs)
    return f"warning: {count} duplicated records (same run_id, resume_key) counted once: {listed}"


def _line_list(lines: list[int]) -> str:
    more = len(lines) - MAX_LISTED
    return ", ".join(map(str, lines[:MAX_LISTED])) + (f" and {more} more" if more > 0 else "")


# --- statistics ------------------------------------------------------------------------------------------

def _num(record: dict[str, Any], key: str) -> float | None:
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
    speedups = [v for v in (_num(r, "speedup") for r in records) if v is not None and v > 0]
    if not speedups:
        return None, None
    logs = np.log(np.array(speedups))
    ci = percentile_ci(lambda idx: logs[idx].mean(axis=1), [len(logs)], seed, resamples)
    return math.exp(logs.mean()), (math.exp(ci[0]), math.exp(ci[1])) if ci else None


def group_stats(records: list[dict[str, Any]], seed: int, resamples: int) -> dict[str, Any]:
    """Every aggregate of :mod:`src.schema` over the group (the same code the console and wandb use), plus the
    bootstrap CI of the speedup and the per-request spread of tokens per call."""
    values = Totals(records).aggregate()
    ok = [r for r in records if r["status"] == "ok"]
    speedup, ci = speedup_stats(ok, seed, resamples)
    per_call = [r["new_tokens"] / r["target_calls"] for r in ok  # per request: the pooled figure's parts
                if _num(r, "new_tokens") is not None and _num(r, "target_calls")]
    values.update(speedup_ci=ci, tokens_per_call_percentiles=(
        tuple(float(x) for x in np.percentile(per_call, [10, 50, 90])) if per_call else None))
    return values


def _natural_key(text: str) -> list:
    # re.split with a group alternates str, int, str...: lists compare position by position safely
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


def method_of(label: str) -> str:
    """The method key of a row label (``speculative #2`` -> ``speculative``; method keys hold no space)."""
    return label.split(" #")[0]


def method_order(records: list[dict[str, Any]]) -> list[str]:
    """The baseline first (the reference), then the others in natural order (k=2 before k=16, #2 before
    #10)."""
    return sorted({r["method"] for r in records}, key=lambda m: (method_of(m) != "baseline", _natural_key(m)))


def _category(record: dict[str, Any]) -> str:
    return str(record.get("category") or "(none)")


def stats_by_method_category(records, seed, resamples) -> dict[tuple[str, str], dict[str, Any]]:
    """``(method, category) -> stats``, with an ``all`` category per method; in table order. ``throughput_ratio``
    is against the (first) baseline row of the same category."""
    table = {}
    methods = method_order(records)
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        for category in sorted({_category(r) for r in mine}, key=_natural_key):
            table[method, category] = group_stats([r for r in mine if _category(r) == category], seed, resamples)
        table[method, "all"] = group_stats(mine, seed, resamples)
    baseline = next((m for m in methods if method_of(m) == "baseline"), None)
    return add_baseline_ratios(table, lambda key: (baseline, key[1]))


# --- formatting ------------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def fmt_ci(point: float | None, ci: tuple[float, float] | None) -> str:
    if point is None:
        return "-"
    return f"{point:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{point:.3f}"


def _percentiles(values: tuple[float, ...] | None) -> str:
    return "-" if values is None else " / ".join(f"{v:.2f}" for v in values)


def summary_rows(stats: dict[tuple[str, str], dict[str, Any]]) -> list[list[str]]:
    return [
        [method, category, str(s["prompts"]), fmt(s["throughput"], ".2f"), fmt(s["throughput_ratio"], ".3f"),
         fmt_ci(s["speedup"], s["speedup_ci"]), fmt(s["predicted_throughput"], ".2f"),
         fmt(s["tokens_per_target_call"], ".3f"), _percentiles(s["tokens_per_call_percentiles"]),
         fmt_pct(s["acceptance_rate"]), fmt_pct(s["matches_baseline_rate"]), f"{s['near_ties']} / {s['mismatches']}",
         fmt_pct(s["accuracy"]), fmt_pct(s["answer_agreement"]), str(s["errors"])]
        for (method, category), s in stats.items()
    ]


# --- report blocks: one structure rendered to both Markdown and HTML -------------------------------------

@dataclass
class Plot:
    name: str  # file name in DIR
    title: str
    png: bytes


Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("list", items) | ("img", Plot)


def system_blocks(records: list[dict[str, Any]], level: int) -> list[Block]:
    header = ["run_id", "file", "host", "device", "gpu / cpu", "python", "torch", "transformers", "lightning",
              "git sha", "timestamps"]
    runs: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        runs.setdefault(str(record.get("run_id") or "(none)"), []).append(record)
    rows = [_system_row(run_id, mine) for run_id, mine in runs.items()]
    return [("h", level, "Runs"), ("table", header, rows)]


def _system_row(run_id: str, records: list[dict[str, Any]]) -> list[str]:
    system = next((r["system"] for r in records if isinstance(r.get("system"), dict)), {})

    def get(key: str) -> str:
        value = system.get(key)
        return "-" if value in (None, "") else str(value)

    processor = get("gpu_name") if system.get("gpu_name") else get("cpu")
    if system.get("num_threads"):
        processor += f" ({system['num_threads']} threads)"
    stamps = sorted(str(r["system"]["timestamp"]) for r in records
                    if isinstance(r.get("system"), dict) and r["system"].get("timestamp"))
    span = "-" if not stamps else stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} .. {stamps[-1]}"
    files = ", ".join(sorted({Path(r["_file"]).name for r in records}))
    return [run_id, files, get("hostname"), get("device"), processor, get("python"), get("torch"),
            get("transformers"), get("lightning"), get("git_sha")[:12], span]


def input_blocks(section: Section, level: int) -> list[Block]:
    items = []
    for one, duplicates in zip(section.loaded, section.duplicate_lines):
        ok = sum(r["status"] == "ok" for r in one.records)
        text = (f"`{one.path}`: {len(one.records)} records ({ok} ok, {len(one.records) - ok} error), "
                f"{len(one.malformed)} malformed line(s)")
        if duplicates:
            text += (f", {len(duplicates)} duplicated record(s) (same run_id, resume_key and status as an "
                     f"earlier one) counted once: lines {_line_list(duplicates)}")
        if one.malformed:
            listed = "; ".join(f"line {n}: {why}" for n, why in one.malformed[:MAX_LISTED])
            more = len(one.malformed) - MAX_LISTED
            text += f" - {listed}" + (f"; and {more} more" if more > 0 else "")
        items.append(text)
    return [("h", level, "Input"), ("list", items)]


def summary_blocks(stats, section: Section, level: int, seed: int, resamples: int) -> list[Block]:
    legend = (f"prompts: ok records, one per (prompt, turn); tok/s: total new tokens / total time (throughput); "
              f"x base: tok/s / the baseline's tok/s in the same category (a ratio of totals: long outputs weigh "
              f"more); speedup: geometric mean of per-prompt speedups against the baseline (each prompt weighs the "
              f"same), 95% percentile bootstrap CI over prompts ({resamples} resamples, seed {seed}); predicted "
              f"tok/s: what the run's cost profile predicts from the records' forward counts (src.decoding.profile); "
              f"tok/call: tokens per target call (pooled), and its 10th/50th/90th percentile over prompts; accept: "
              f"accepted / drafted tokens (pooled); = base: share of outputs equal to the baseline's; near ties / "
              f"mismatches: outputs off the baseline's where the target's top-2 logits were within the dtype's "
              f"rounding (near tie) or not (mismatch: a bug in a lossless method); "
              f"accuracy: share of answer_correct; = base answer: share of final answers equal to the "
              f"baseline's on the same prompt (answer_matches_baseline); errors: error records; -: not applicable.")
    return ([("h", level, "Summary by method and category"), ("table", TABLE_HEADER, summary_rows(stats))]
            + config_blocks(section) + [("p", legend)])


def config_blocks(section: Section) -> list[Block]:
    """What differs between the configurations of each method that has several (split or pooled)."""
    several = {method: configs for method, configs in section.configs.items() if len(configs) > 1}
    if not several:
        return []
    items = []
    for method in sorted(several, key=_natural_key):
        configs = several[method]
        differences = "; ".join(differing_fields(configs))
        if section.merged:
            counts = " + ".join(str(c.records) for c in configs)
            items.append(f"`{method}`: {len(configs)} configurations ({counts} records) pooled in one row "
                         f"despite differing in {differences}")
        else:
            rows = ", ".join(f"{c.label} ({c.records} records)" for c in configs)
            items.append(f"`{method}`: {rows} differ in {differences}")
    note = ("Settings differ within a method: pooled by `--merge-configs`." if section.merged else
            "Settings differ within a method: one row per configuration (#1, #2, ... in file order); "
            "`--merge-configs` pools them.")
    return [("p", note + " Fields compared: the records' fingerprint, or params and target/draft name, dtype "
                  "and quantization for methods with records written before fingerprints."), ("list", items)]


def error_blocks(records: list[dict[str, Any]], level: int) -> list[Block]:
    errors = [r for r in records if r["status"] == "error"]
    if not errors:
        return []
    items = [_error_line(r) for r in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        items.append(f"... and {len(errors) - MAX_LISTED} more error records")
    return [("h", level, f"Errors ({len(errors)})"), ("list", items)]


def _error_line(record: dict[str, Any]) -> str:
    error = record.get("error") if isinstance(record.get("error"), dict) else {}
    message = str(error.get("message") or "").strip().splitlines()
    return (f"{Path(record['_file']).name}:{record['_line']} {record['method']} prompt {record.get('prompt_id')} "
            f"turn {record.get('turn')}: {error.get('type', '?')}: {message[0] if message else ''}")


# --- plots -----------------------------------------------------------------------------------------------

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
    categories = sorted({c for _, c in stats if c != "all"}, key=_natural_key) + ["all"]
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
        size, accepted, calls = _num(r, "tree_size_mean"), _num(r, "accepted_tokens"), _num(r, "target_calls")
        if r["status"] == "ok" and size is not None and accepted is not None and calls:
            points.setdefault(r["method"], []).append((size, accepted / calls))
    if not points:
        return None
    figure, axes = _figure()
    for i, method in enumerate(sorted(points, key=_natural_key)):
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
                    key=lambda p: (p[0] is None, p[0] or 0.0, _natural_key(p[3])))
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
                 if _num(r, "new_tokens") is not None and _num(r, "target_calls")]
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
    base = next((s["throughput"] for m, s in rows if method_of(m) == "baseline"), None)
    if not any(s.get("target_share") is not None for _, s in rows):
        return []
    header = ["method", "tok/s", "predicted tok/s", "unexplained", "target", "draft", "other",
              "x base", "x base, free drafter", "x base, no harness overhead", "x base, every draft accepted"]
    table = [[m, fmt(s["throughput"], ".2f"), fmt(s["predicted_throughput"], ".2f"), fmt_pct(s["unexplained_share"]),
              fmt_pct(s["target_share"]), fmt_pct(s["draft_share"]), fmt_pct(s["other_share"]),
              fmt(s["throughput_ratio"], ".3f"), fmt(_ratio(s["throughput_free_draft"], base), ".3f"),
              fmt(_ratio(s["throughput_no_overhead"], base), ".3f"),
              fmt(_ratio(s["throughput_perfect_acceptance"], base), ".3f")] for m, s in rows]
    legend = ("target / draft / other: shares of decoding time inside target forwards (hooks), inside the drafter "
              "(draft forwards, head steps, lookups, tree growth) and the rest (sampling, acceptance, cache "
              "rollback, Python); predicted tok/s: the run's cost profile (target latency per forward size, draft "
              "latency or drafter step) applied to the records' forward counts; unexplained: 1 - predicted / "
              "observed time; what-if columns: tok/s over the baseline's tok/s if the drafter cost nothing, if "
              "nothing but forwards and drafting took time, or if every draft were accepted at the same cost per "
              "target call.")
    profile = next((r["cost_profile"] for r in records if isinstance(r.get("cost_profile"), dict)), None)
    blocks: list[Block] = [("h", level, "Where the time goes"), ("table", header, table), ("p", legend)]
    if profile:
        shown = ", ".join(f"{n}: {ms:.1f}" for n, ms in list(profile.get("target_ms", {}).items())[:10])
        blocks.append(("p", f"Cost profile (context {profile.get('context')} tokens): target ms per forward of n "
                            f"tokens {shown}; drafter ms per proposed token {profile.get('drafter_ms') or '-'}."))
    return blocks


def missing_fields_blocks(records: list[dict[str, Any]]) -> list[Block]:
    """A note naming the newer fields an older results file lacks (their columns then show '-')."""
    missing = missing_optional(records, NEWER_FIELDS)
    if not missing:
        return []
    names = ", ".join(f"{NEWER_FIELDS[name]} (`{name}`)" for name in missing)
    return [("p", f"These records were written before sp-samp recorded: {names}; those figures show '-'.")]


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


# --- comparison ------------------------------------------------------------------------------------------

def _by_key(records: list[dict[str, Any]], method: str) -> dict[tuple, dict[str, Any]]:
    """``(dataset, prompt_id, turn) -> record`` of the usable ok records of ``method`` (the last one wins)."""
    usable = {}
    for r in records:
        if (r["method"] == method and r["status"] == "ok" and _num(r, "tokens_per_s") is not None
                and _num(r, "new_tokens") is not None and (_num(r, "target_calls") or 0) > 0):
            usable[str(r.get("dataset")), str(r.get("prompt_id")), str(r.get("turn"))] = r
    return usable


def _columns(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array([_num(r, k) for r in records]) for k in ("tokens_per_s", "new_tokens", "target_calls"))


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
            blocks.append(("p", f"Only in {side}: " + ", ".join(sorted(only, key=_natural_key)) + "."))
    if any(method_of(m) != m for m in a_methods | b_methods):
        blocks.append(("p", "Rows `method #n` are configurations of a method split within one side; A and B "
                            "pair by row label: each side's summary says which settings its configurations "
                            "differ in."))
    return blocks


# --- assembling and rendering ----------------------------------------------------------------------------

def section_blocks(section: Section, level: int, prefix: str, seed: int, resamples: int) -> list[Block]:
    records = section.records
    stats = stats_by_method_category(records, seed, resamples)
    return (system_blocks(records, level) + input_blocks(section, level) + missing_fields_blocks(records)
            + summary_blocks(stats, section, level, seed, resamples) + time_blocks(stats, records, level + 1)
            + autojudge_blocks(records, level + 1, seed, resamples)
            + error_blocks(records, level) + plot_blocks(records, stats, level, prefix))


def build_report(sections: list[Section], compare: bool, seed: int, resamples: int) -> list[Block]:
    """One section (all files merged), or with ``compare`` two (A, B) and their comparison."""
    if not compare:
        (section,) = sections
        paths = ", ".join(f"`{one.path}`" for one in section.loaded)
        intro = ("p", f"Generated by `python -m src.report` from {paths}.")
        return [("h", 1, "sp-samp report"), intro] + section_blocks(section, 2, "", seed, resamples)
    a, b = sections
    a_path, b_path = a.loaded[0].path, b.loaded[0].path
    blocks: list[Block] = [("h", 1, "sp-samp report: A vs B"), ("p", f"A = `{a_path}`, B = `{b_path}`.")]
    blocks += comparison_blocks(a, b, 2, seed, resamples)
    for label, section in (("A", a), ("B", b)):
        blocks += [("h", 2, f"{label}: {section.loaded[0].path}")]
        blocks += section_blocks(section, 3, f"{label.lower()}_", seed, resamples)
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"{'#' * block[1]} {block[2]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            lines = ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block[2]]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[1].title}]({block[1].name})")
    return "\n\n".join(out) + "\n"


def _html_text(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(blocks: list[Block]) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_html_text(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_html_text(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(block[1].png).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(block[1].title)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(block[1].title)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3}")
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>sp-samp report</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_outputs(blocks: list[Block], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = [block[1] for block in blocks if block[0] == "img"]
    written = []
    for plot in plots:
        (out / plot.name).write_bytes(plot.png)
        written.append(out / plot.name)
    # a plot skipped now must not leave last run's PNG next to this report
    for stale in {f"{p}{n}.png" for p in ("", "a_", "b_") for n in PLOT_NAMES} - {p.name for p in plots}:
        (out / stale).unlink(missing_ok=True)
    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(render_html(blocks), encoding="utf-8")
    return [out / "report.md", out / "report.html", *written]


# --- command line ----------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} should be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="results JSONL file(s)")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md, report.html and PNGs")
    parser.add_argument("--compare", action="store_true", help="two files: report each and their B/A ratios")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--bootstrap", type=_positive_int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--merge-configs", action="store_true",
                        help="pool the records of a method whose settings differ into one row (default: one "
                             "row per configuration, labelled 'method #n')")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> str | None:
    for path in args.paths:
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            return (f"results file {path} {what}: run `make predict` (writes datasets/results.jsonl) or pass "
                    f"the path of an existing results JSONL")
    if args.compare and len(args.paths) != 2:
        return f"--compare needs exactly two results files (A B), got {len(args.paths)}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_inputs(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        loaded = [read_results(path) for path in args.paths]
    except UnreadableFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not any(one.records for one in loaded):
        print("warning: no usable record in the input; the report only counts malformed lines", file=sys.stderr)
    groups = [[one] for one in loaded] if args.compare else [loaded]  # duplicates count within a side only
    sections = [make_section(group, args.merge_configs) for group in groups]
    for warning in filter(None, map(duplicate_warning, sections)):
        print(warning, file=sys.stderr)
    blocks = build_report(sections, args.compare, args.seed, args.bootstrap)
    try:
        written = write_outputs(blocks, args.out)
    except OSError as error:
        print(f"error: cannot write the report to {args.out} ({error.strerror}): choose another --out",
              file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
