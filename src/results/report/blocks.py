"""Report blocks (one structure rendered to both Markdown and HTML) and number formatting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.results.report.sections import MAX_LISTED, Section, differing_fields, line_list
from src.results.report.stats import natural_key

TABLE_HEADER = ["method", "category", "prompts", "tok/s", "x base", "speedup [95% CI]", "predicted tok/s",
                "tok/call", "tok/call p10 / p50 / p90", "accept", "= base", "near ties / mismatches", "accuracy",
                "= base answer", "errors"]


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
                     f"earlier one) counted once: lines {line_list(duplicates)}")
        if one.malformed:
            listed = "; ".join(f"line {n}: {why}" for n, why in one.malformed[:MAX_LISTED])
            more = len(one.malformed) - MAX_LISTED
            text += f" - {listed}" + (f"; and {more} more" if more > 0 else "")
        items.append(text)
    return [("h", level, "Input"), ("list", items)]


def summary_blocks(stats, section: Section, level: int, seed: int, resamples: int) -> list[Block]:
    legend = (f"prompts: ok records, one per (prompt, turn); tok/s: total new tokens / total time (throughput); "
              f"x base: tok/s / the tok/s of the baseline of the same configuration (same target, prompt "
              f"formatting and sampling; the method's own settings aside) in the same category (a ratio of totals: "
              f"long outputs weigh more); speedup: geometric mean of per-prompt speedups against the baseline (each prompt weighs the "
              f"same), 95% percentile bootstrap CI over prompts ({resamples} resamples, seed {seed}); predicted "
              f"tok/s: what the run's cost profile predicts from the records' forward counts (src.decoding.profile); "
              f"tok/call: tokens per target call (pooled), and its 10th/50th/90th percentile over prompts; accept: "
              f"accepted / drafted tokens (pooled); = base: share of outputs equal to the baseline's; near ties / "
              f"mismatches: outputs off the baseline's where the target's top-2 logits were within the dtype's "
              f"rounding (near tie) or not (mismatch: a bug in a lossless method); "
              f"accuracy: share of answer_correct; = base answer: share of final answers equal to the "
              f"baseline's on the same prompt (answer_matches_baseline); errors: error records; -: not applicable.")
    return ([("h", level, "Summary by method and category"), ("table", TABLE_HEADER, summary_rows(stats))]
            + config_blocks(section) + unmatched_baseline_blocks(stats) + [("p", legend)])


def unmatched_baseline_blocks(stats) -> list[Block]:
    """A note naming the rows whose x base is "-" because no baseline of their configuration is in the input."""
    unmatched = [method for (method, category), s in stats.items() if category == "all" and not s["baseline_row"]]
    if not unmatched:
        return []
    return [("p", "No baseline of the same configuration (target, prompt formatting, sampling) in the input for "
                  + ", ".join(f"`{m}`" for m in unmatched) + ": their x base is `-` (a ratio against another "
                  "configuration's baseline would compare different runs); run the baseline with their settings.")]


def config_blocks(section: Section) -> list[Block]:
    """What differs between the configurations of each method that has several (split or pooled)."""
    several = {method: configs for method, configs in section.configs.items() if len(configs) > 1}
    if not several:
        return []
    items = []
    for method in sorted(several, key=natural_key):
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
