"""The whole predict pipeline on the embedded pair: contract fields, offline wandb summary, kill + resume,
seeded reruns, and the progress bar's running speedup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, dataset_file

from src.lit.progress import RunningSpeedup
from src.results.check import main as check_results
from src.tools.wandb_offline import read_offline_runs

CONTRACT = (
    "run_id", "resume_key", "status", "error", "method", "dataset", "prompt_id", "category", "turn", "new_tokens",
    "prefill_s", "decode_s", "wall_s", "tokens_per_s", "target_calls", "draft_calls", "tokens_per_target_call",
    "drafted_tokens", "accepted_tokens", "acceptance_rate", "accepted_per_position", "speedup", "matches_baseline",
    "first_divergence", "text", "params", "target", "draft", "system",
)
SPECEXEC_FIELDS = ("tree_size_mean", "tree_depth_mean", "max_active_branches", "branch_prune_rate", "effective_parallelism")


@pytest.fixture(autouse=True)
def _run_from_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def predict_args(config: str, output, limit: int, new_tokens: int, *extra: str) -> list[str]:
    return ["predict", "--config", config, "--data.path", str(dataset_file("mt_bench.jsonl")), "--data.limit",
            str(limit), "--model.max_new_tokens", str(new_tokens), "--output", str(output), *extra]


def test_running_speedup_is_the_geometric_mean_per_method():
    running = RunningSpeedup()
    running.update([{"method": "baseline", "status": "ok", "speedup": 1.0},
                    {"method": "speculative", "status": "ok", "speedup": 2.0}])
    running.update([{"method": "speculative", "status": "ok", "speedup": 0.5},
                    {"method": "specexec", "status": "error"}])
    assert running.postfix() == "specexec !1, speculative 1.00x"


def test_all_methods_write_contract_records_and_an_offline_wandb_summary(tmp_path, capsys):
    from src.cli import cli_main

    output = tmp_path / "all.jsonl"
    cli_main(predict_args("configs/all.yaml", output, 2, 8, "--trainer.logger.init_args.save_dir", str(tmp_path),
                          "--trainer.enable_progress_bar", "false"))
    printed = capsys.readouterr().out
    assert "tok/call" in printed and "wrote 6 records (6 ok)" in printed

    records = read_records(output)
    assert sorted(r["method"] for r in records) == ["baseline"] * 2 + ["specexec"] * 2 + ["speculative"] * 2
    for record in records:
        missing = [name for name in CONTRACT if name not in record]
        assert not missing, f"{record['method']}: missing {missing}"
        assert record["status"] == "ok" and record["matches_baseline"] is True
    for record in (r for r in records if r["method"] == "specexec"):
        assert all(record[name] is not None for name in SPECEXEC_FIELDS)
    assert check_results([str(output), "--strict"]) == 0

    runs = read_offline_runs(tmp_path / "wandb")
    run = next(r for r in runs if r.job_type == "compare")
    assert run.project == "sp-samp" and run.group == "all"
    assert {"plots/speedup", "plots/acceptance_per_position"} <= run.summary.keys()  # the report's plots as images
    per_method = {r.job_type: r for r in runs if r.job_type != "compare"}
    assert set(per_method) == {"baseline", "speculative", "specexec"}  # one run per method, same group
    assert all(r.group == "all" for r in per_method.values())
    assert per_method["speculative"].summary["tokens_per_target_call"] == run.summary["speculative/tokens_per_target_call"]
    assert per_method["specexec"].config["budget"] == 16
    for method in ("baseline", "speculative", "specexec"):
        assert run.summary[f"{method}/records"] == 2
        assert run.summary[f"{method}/tokens_per_target_call"] > 0
    assert run.summary["baseline/tokens_per_target_call"] == 1.0
    assert run.summary["speculative/speedup"] > 0 and run.summary["specexec/tree_size_mean"] > 0
    assert run.summary["records"]["nrows"] == 6  # the per-prompt wandb.Table
    assert run.config["model"]["init_args"]["max_new_tokens"] == 8  # the resolved config


# Slow (two SmolLM2 processes, ~100 s of CPU): tests/test_faults.py's kill -9 in the middle of a record write
# checks the same (a cut line moved aside and named, "N already done", every record once, --strict) on the tiny
# model in the default suite.
@pytest.mark.slow
def test_a_killed_run_resumes_with_every_record_once(tmp_path):
    output = tmp_path / "killed.jsonl"
    args = predict_args("configs/baseline.yaml", output, 6, 24, "--trainer.enable_progress_bar", "false")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "src", *args], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_file() and len(output.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(read_records(output))
    assert process.returncode == -signal.SIGKILL and 2 <= done_before < 6, "the run was not killed midway"

    with output.open("a") as handle:  # as if the kill had cut a record in half
        handle.write('{"run_id": "x", "status": "o')
    resumed = subprocess.run([sys.executable, "-m", "src", *args, "--resume", "true"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} already done" in resumed.stdout

    records = read_records(output)  # every line parses: the cut line was moved aside, named in a warning
    assert (tmp_path / "killed.jsonl.corrupt").read_text() == '{"run_id": "x", "status": "o\n'
    assert "killed.jsonl.corrupt" in resumed.stderr
    keys = [r["resume_key"] for r in records]
    assert len(keys) == len(set(keys)) == 6 and all(r["status"] == "ok" for r in records)
    assert check_results([str(output), "--strict"]) == 0


def fixed_speculative_config(folder) -> str:
    """configs/speculative.yaml with k 4 and the bf16 copy as draft instead of its run-start choices: a choice made
    by measurement may differ between two runs, and with sampling another k draws other tokens."""
    text = (ROOT / "configs" / "speculative.yaml").read_text()
    fixed = text.replace("k: auto", "k: 4").replace("      quantization: auto", "      dtype: bfloat16")
    assert fixed.count("auto") == text.count("auto") - 2
    path = folder / "speculative-fixed.yaml"
    path.write_text(fixed)
    return str(path)


def test_seeded_sampling_reruns_give_identical_texts(tmp_path):
    from src.cli import cli_main

    texts = []
    config = fixed_speculative_config(tmp_path)
    for name in ("first.jsonl", "second.jsonl"):
        output = tmp_path / name
        cli_main(predict_args(config, output, 2, 12, "--model.temperature", "0.9",
                              "--model.seed", "5", "--model.cost_profile", "false",
                              "--trainer.enable_progress_bar", "false"))
        records = read_records(output)
        assert all(r["status"] == "ok" and r["matches_baseline"] is None for r in records)
        texts.append({(r["prompt_id"], r["method"]): r["text"] for r in records})
    assert texts[0] == texts[1] and len(texts[0]) == 4


def test_autojudge_predict_on_the_embedded_pair_with_a_judge_file(tmp_path):
    """configs/autojudge.yaml with a bf16 draft and a hand-made judge for that pair: every method writes valid
    records with answers checked against the synthetic problems' gold answers; a judge for another pair is refused."""
    import torch

    from src.cli import cli_main
    from src.models.judge import Judge, JudgeHead

    target = {"name": "embedded:smollm2-135m-instruct", "dtype": "float32", "quantization": "none"}
    draft = {**target, "dtype": "bfloat16"}
    head = JudgeHead(2 * 576)
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.fill_(-5.0)  # P(important) ~ 0.007, below every configured threshold: all mismatches pass
    Judge(head, 0.5, "draft+target", target, draft).save(tmp_path / "judge")
    output = tmp_path / "aj.jsonl"
    args = ["predict", "--config", "configs/autojudge.yaml", "--data.path", "synthetic:arithmetic:test",
            "--data.limit", "1", "--model.max_new_tokens", "12",
            "--model.draft.dtype", "bfloat16", "--model.draft.quantization", "none",
            "--model.judge_path", str(tmp_path / "judge"), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--output", str(output)]
    cli_main(args)
    records = {r["method"]: r for r in read_records(output)}
    assert set(records) == {"baseline", "speculative", "autojudge[threshold=None]", "autojudge[threshold=0.5]"}
    assert all(r["status"] == "ok" and "answer_correct" in r for r in records.values()), [r.get("error") for r in records.values()]
    let_through = records["autojudge[threshold=0.5]"]
    assert let_through["judge_accepted"] <= let_through["accepted_tokens"] - let_through["exact_accepted_tokens"]
    assert let_through["accepted_tokens"] == let_through["drafted_tokens"]  # nothing is important to this judge
    assert check_results([str(output), "--strict"]) == 0

    Judge(head, 0.5, "draft+target", target, {**draft, "dtype": "float16"}).save(tmp_path / "other")
    with pytest.raises(ValueError, match="trained for draft"):
        cli_main(args[:-1] + [str(tmp_path / "other.jsonl"), "--model.judge_path", str(tmp_path / "other")])


@pytest.mark.slow
def test_autojudge_fit_mines_the_embedded_pair_resumably(tmp_path, monkeypatch):
    """fit on the embedded pair (the config's NF4 draft) and the built-in arithmetic problems: a group of problems
    is mined into the store, too few labels stop the fit in one line, and a second fit with one more problem
    mines only that one."""
    from src.cli import cli_main
    from src.data.mining import LabelStore
    from src.errors import MissingInputError

    monkeypatch.chdir(ROOT)
    store = tmp_path / "labels"
    args = ["fit", "--config", "configs/autojudge.yaml", "--data.mine_path", "synthetic:arithmetic",
            "--data.mine_max_new_tokens", "128", "--data.mine_group", "2", "--data.store_dir", str(store),
            "--model.judge_path", str(tmp_path / "judge"), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(MissingInputError, match="split has .* important and .* unimportant labels|holds no labels"):
        cli_main(args + ["--data.mine_prompts", "3"])
    first = LabelStore(store).finished_prompts()
    assert len(first) == 3 and LabelStore(store).meta()["mining"] == "forks/2"
    labels = LabelStore(store).load()
    assert len(labels) == sum(row["mismatches"] for row in first.values()) and labels.stats is not None
    with pytest.raises(MissingInputError):
        cli_main(args + ["--data.mine_prompts", "4"])
    second = LabelStore(store).finished_prompts()
    assert len(second) == 4 and all(second[p]["seconds"] == first[p]["seconds"] for p in first)
