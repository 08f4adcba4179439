"""Where the time goes, and how well the cost model predicts it: run ``python -m src predict`` on a config (by
default configs/cost_model.yaml: baseline, speculative k=4/8, SpecExec budget 16/32, 10 MT-Bench prompts, 64
tokens) and print, per method, observed vs predicted tokens/s, the time split and the what-if speedups.

    python benchmarks/bench_cost_model.py                            # run the config, then print
    python benchmarks/bench_cost_model.py --results FILE.jsonl       # print from an existing results file
    python benchmarks/bench_cost_model.py -- --data.limit 4          # extra arguments for python -m src predict

Figures (one definition each, src/schema.py): ``throughput`` = sum new tokens / sum wall_s; ``predicted`` = the
same over the cost model's time (sum of T(n) over the target's forwards + the draft's D(n) or the drafter's
steps); ``split`` = target_s + draft_s + other_s over wall_s (1 by construction: other_s is the remainder) and
``measured`` = target_s + draft_s (what the hooks measured) over wall_s; what-if speedups are against the
baseline's throughput.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.results.schema import Totals, add_baseline_ratios  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cost_model.yaml")
    parser.add_argument("--results", type=Path, default=None,
                        help="print from this results file instead of running predict")
    parser.add_argument("extra", nargs="*", help="after --: more arguments for python -m src predict")
    return parser.parse_args(argv)


def run_predict(config: str, extra: list[str]) -> Path:
    out = ROOT / "artifacts" / "bench" / f"cost_model_{time.strftime('%Y%m%d_%H%M%S')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "src", "predict", "--config", config, "--output", str(out), *extra]
    print("running:", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return out


def read(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: results file {path} does not exist: run without --results, or pass a file "
                         "written by python -m src predict")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in records))
    groups = {m: Totals(r for r in records if r["method"] == m).aggregate() for m in methods}
    add_baseline_ratios(groups, lambda key: "baseline")
    base = groups.get("baseline", {}).get("throughput")
    gaps = {m: max((abs(r["target_s"] + r["draft_s"] + r["other_s"] - r["wall_s"]) / r["wall_s"]
                    for r in records if r["method"] == m and r.get("status") == "ok" and "target_s" in r),
                   default=None) for m in methods}
    header = (f"{'method':<34} {'tok/s':>6} {'pred':>6} {'pred/obs':>8} {'target':>7} {'draft':>6} {'other':>6} "
              f"{'split':>6} {'unexpl':>7} {'x base':>6} {'free draft':>10} {'no overhead':>11} {'perfect acc':>11}")
    lines = [header, "-" * len(header)]
    for method, g in groups.items():
        ratio = g["predicted_throughput"] / g["throughput"] if g["predicted_throughput"] and g["throughput"] else None

        def whatif(name: str, g: dict = g) -> str:
            return fmt(g[name] / base if g[name] and base else None, "10.2f")

        lines.append(
            f"{method:<34} {fmt(g['throughput'], '6.2f')} {fmt(g['predicted_throughput'], '6.2f')} "
            f"{fmt(ratio, '8.3f')} {fmt(g['target_share'], '7.1%')} {fmt(g['draft_share'], '6.1%')} "
            f"{fmt(g['other_share'], '6.1%')} {fmt(gaps[method], '6.0e')} {fmt(g['unexplained_share'], '7.1%')} "
            f"{fmt(g['throughput_ratio'], '6.2f')} {whatif('throughput_free_draft')} "
            f"{whatif('throughput_no_overhead'):>11} {whatif('throughput_perfect_acceptance'):>11}")
    return "\n".join(lines)


def profile_lines(records: list[dict]) -> list[str]:
    profile = next((r["cost_profile"] for r in records if r.get("cost_profile")), None)
    if profile is None:
        return ["no cost profile in these records (cost_profile: false, or an older file)"]
    target = ", ".join(f"{n}: {ms:.1f}" for n, ms in list(profile["target_ms"].items())[:12])
    lines = [f"cost profile (context {profile['context']} tokens, measured in {profile['measured_s']:.1f} s), "
             f"target ms per forward of n tokens: {target}"]
    if profile.get("draft_ms"):
        lines.append("draft ms: " + ", ".join(f"{n}: {ms:.1f}" for n, ms in list(profile["draft_ms"].items())[:12]))
    for name, ms in (profile.get("drafter_ms") or {}).items():
        lines.append(f"drafter {name}: {ms:.2f} ms per proposed token")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = args.results or run_predict(args.config, args.extra)
    records = [r for r in read(path) if r.get("status") == "ok"]
    print(f"results: {path} ({len(records)} ok records)")
    print("\n".join(profile_lines(records)))
    print()
    print(table(records))
    print("\ntok/s: sum new tokens / sum wall_s; pred: the same over the cost model's time; target/draft/other: "
          "shares of wall_s; split: max |target_s + draft_s + other_s - wall_s| / wall_s over records; unexpl: "
          "1 - predicted / observed time; x base: throughput / the baseline's; what-if columns: that throughput "
          "/ the baseline's, with a free drafter, without harness overhead, with every draft accepted")


if __name__ == "__main__":
    main()
