"""``bench_vs_hf.py``'s figures and table: per pass and configuration from the run records, then the mean and the
min-max spread over the passes, printed above and in the table (see ``bench_vs_hf.py`` for the columns)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from harness import Record
from vs_hf_rows import REFERENCE, Config

LATENCY_SIZES = (1, 32, 64)  # tokens of the target forwards timed above the table
LATENCY_REPEATS = 5


# ------------------------------------------------------------------------------------------------ figures


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def tokens_per_second(records: list[Record]) -> float:
    return sum(len(r.tokens) for r in records) / sum(r.wall_s for r in records)


def pass_figures(records: list[Record], config: Config) -> dict[str, float | None]:
    tokens = sum(len(r.tokens) for r in records)
    target_calls = sum(r.target_calls for r in records)
    method_s = sum(r.method_s or 0.0 for r in records)
    forward_s = sum(r.forward_s for r in records)
    return {
        "tok_s": tokens_per_second(records),
        "tok_per_call": tokens / target_calls if target_calls else None,
        "draft_per_call": sum(r.draft_calls for r in records) / target_calls if config.drafts else None,
        "overhead": 1 - forward_s / method_s if config.ours and method_s else None,
    }


def spread(values: list[float | None]) -> dict[str, float] | None:
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def differing_prompts(passes: list[dict], key: str, eos: set[int]) -> int:
    """Prompts whose output differs from the reference (HF generate of the same pass) in any pass."""
    count = len(passes[0][key])
    return sum(
        any(cut_at_eos(p[key][i].tokens, eos) != cut_at_eos(p[REFERENCE][i].tokens, eos) for p in passes)
        for i in range(count)
    )


def build_row(config: Config, passes: list[dict], eos: set[int]) -> dict[str, Any]:
    per_pass = [pass_figures(p[config.key], config) for p in passes]
    if config.pair is not None:
        for figures, pass_records in zip(per_pass, passes):
            figures["ratio"] = figures["tok_s"] / tokens_per_second(pass_records[config.pair])
    records = [r for p in passes for r in p[config.key]]
    gpu_peaks = [r.gpu_mb for r in records if r.gpu_mb is not None]
    differing = differing_prompts(passes, config.key, eos)
    return {
        "method": config.method,
        "params": config.params,
        **{name: spread([f.get(name) for f in per_pass]) for name in
           ("tok_s", "tok_per_call", "draft_per_call", "ratio", "overhead")},
        "identical": differing == 0,
        "prompts_differing": differing,
        "prompts": len(passes[0][config.key]),
        "peak_rss_mb": records[-1].rss_mb,  # after the configuration's last run
        "peak_gpu_mb": max(gpu_peaks) if gpu_peaks else None,
        "passes": per_pass,
    }


def build_rows(configs: list[Config], passes: list[dict], eos: set[int]) -> list[dict[str, Any]]:
    return [build_row(config, passes, eos) for config in configs]


# ------------------------------------------------------------------------------------------------ report


def show(value: dict[str, float] | None, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    mean, low, high = (value[name] * scale for name in ("mean", "min", "max"))
    text = f"{mean:.{digits}f}{suffix}"
    if f"{low:.{digits}f}" != f"{high:.{digits}f}":
        text += f" ({low:.{digits}f}-{high:.{digits}f})"
    return text


def table_cells(row: dict[str, Any]) -> list[str]:
    if row["method"] == REFERENCE:
        identical = "ref"
    else:
        identical = "yes" if row["identical"] else f"no ({row['prompts_differing']}/{row['prompts']})"
    cells = [
        row["method"],
        row["params"] or "-",
        show(row["tok_s"], 1),
        show(row["tok_per_call"], 2),
        show(row["draft_per_call"], 2),
        show(row["ratio"], 2),
        identical,
        show(row["overhead"], 1, 100, "%"),
        f"{row['peak_rss_mb']:.0f}",
    ]
    if row["peak_gpu_mb"] is not None:
        cells.append(f"{row['peak_gpu_mb']:.0f}")
    return cells


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["method", "params", "tok/s", "tok/call", "draft/call", "ours/HF", "identical", "overhead",
              "peak RSS MB"]
    if rows and rows[0]["peak_gpu_mb"] is not None:
        header.append("peak GPU MB")
    lines = [header, *map(table_cells, rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([render(header), "  ".join("-" * w for w in widths), *map(render, lines[1:])])


def describe_model(info: dict[str, Any] | None) -> str:
    if info is None:
        return "none (no configuration needs one)"
    quantization = "" if info["quantization"] == "none" else f" {info['quantization']}"
    return f"{info['name']} ({info['dtype']}{quantization}, {info['device']})"


def print_report(report: dict[str, Any]) -> None:
    machine, run = report["machine"], report["run"]
    gpu = f", GPU {machine['gpu_name']}" if machine["gpu_name"] else ""
    average = machine["load_average"]
    load = f", load average {average:.1f} before the run" if average is not None else ""
    print(f"machine: {machine['cpu']} ({machine['cores']} cores{load}), torch threads {machine['num_threads']}, "
          f"torch {machine['torch']}, transformers {machine['transformers']}{gpu}")
    models = report["models"]
    if models.get("drafts"):
        drafts = "drafts " + ", ".join(f"{kind} = {describe_model(info)}" for kind, info in models["drafts"].items())
    else:
        drafts = f"draft {describe_model(models['draft'])}"
    print(f"pair: target {describe_model(models['target'])}; {drafts}; loaded in {models['load_s']:.1f} s")
    lengths = run["prompt_tokens"]
    print(f"run: {run['prompts']} first turns of {Path(run['data']).name} ({', '.join(run['categories'])}; "
          f"{min(lengths)}-{max(lengths)} prompt tokens, mean {statistics.mean(lengths):.0f}), "
          f"max_new_tokens {run['max_new_tokens']}, greedy, {run['repeat']} interleaved pass(es) after one "
          "warm-up per configuration")
    latency = ", ".join(f"{size} tok {ms:.1f} ms" for size, ms in report["target_forward_ms"].items())
    print(f"target forward latency (median of {LATENCY_REPEATS}, after the first prompt): {latency}")
    one_token = report["target_forward_ms"][1]
    for head, ms in report.get("eagle_draft_ms_per_token", {}).items():
        print(f"EAGLE head {head}: {ms:.2f} ms per proposed token = {100 * ms / one_token:.1f}% of a 1-token target "
              "forward")
    for line in draft_cost_lines(report.get("draft_cost") or {}):
        print(line)
    resident = report.get("resident_mb") or []
    if len(resident) > 1:
        print(f"resident memory after the warm-up and after each pass: {', '.join(f'{mb:.0f}' for mb in resident)} MB "
              f"(growth {resident[-1] - resident[0]:+.0f} MB)")
    print()
    print(format_table(report["rows"]))


def draft_cost_lines(costs: dict[str, dict[str, Any]]) -> list[str]:
    """One line per draft kind: its 1-token forward against the target's, its ms per proposed token and its greedy
    agreement with the target's own tokens (see bench_vs_hf.draft_costs)."""
    return [
        f"draft {kind}: 1-token forward {cost['forward_ms']:.2f} ms = "
        f"{100 * cost['forward_ms'] / cost['target_forward_ms']:.1f}% of the target's, "
        f"{cost['step_ms']:.2f} ms per proposed token; greedy agreement {cost['agreement']:.3f} "
        f"({cost['agreed_tokens']}/{cost['tokens']} of the target's greedy tokens, teacher-forced)"
        for kind, cost in costs.items()
    ]


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
