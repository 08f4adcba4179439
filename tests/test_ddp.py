"""Data-parallel predict (``--trainer.devices 2 --trainer.strategy ddp`` on CPU with gloo): the prompts are sharded
over the ranks, every rank writes its part file, rank 0 merges them into ``--output``, and the records are exactly
those of a one-process run; ``--resume true`` skips what is done, including what a killed run left in part
files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, dataset_file, write_tiny_predict_config

from src.errors import OutputExistsError
from src.jsonl import read_records
from src.results.files import check_output_path, merge_parts, part_files, part_path

LIMIT = 5  # odd: the two ranks get 3 and 2 prompts (Lightning's predict sampler does not pad)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """Baseline + speculative (k=2, the same tiny weights in bf16 as the draft), 5 MT-Bench prompts, 6 tokens."""
    return write_tiny_predict_config(tmp_path_factory.mktemp("ddp"), LIMIT)


DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")


def predict(config: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "src", "predict", "--config", str(config), "--output", str(output), *extra]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def by_key(records: list[dict]) -> dict[tuple[str, str], dict]:
    keys = [(r["prompt_id"], r["method"]) for r in records]
    assert len(keys) == len(set(keys)), "a (prompt, method) is in the file twice"
    return dict(zip(keys, records))


def check_strict(path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "src.tools.check_results", str(path), "--strict"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.fixture(scope="module")
def runs(config_file, tmp_path_factory) -> dict:
    """The same predict with one process and with two (ddp, a CSVLogger for the reduced metrics)."""
    folder = tmp_path_factory.mktemp("runs")
    started = time.monotonic()
    single, merged = folder / "single.jsonl", folder / "ddp.jsonl"
    predict(config_file, single)
    csv = ("--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(folder))
    result = predict(config_file, merged, *DDP, *csv)
    print(f"one-process + ddp predict: {time.monotonic() - started:.0f} s")
    return {"single": single, "merged": merged, "stdout": result.stdout, "folder": folder}


def test_ddp_predict_gives_the_records_of_one_process_and_resumes(config_file, runs, tmp_path):
    single, result_stdout, folder = runs["single"], runs["stdout"], runs["folder"]
    merged = tmp_path / "ddp.jsonl"
    shutil.copy(runs["merged"], merged)
    one, two = by_key(read_records(single)), by_key(read_records(merged))
    assert len(one) == 2 * LIMIT and set(one) == set(two)
    assert all(r["status"] == "ok" for r in two.values())
    assert {k: r["text"] for k, r in one.items()} == {k: r["text"] for k, r in two.items()}  # greedy: same texts
    assert all(r["matches_baseline"] for r in two.values() if r["method"] == "speculative")
    assert len({r["run_id"] for r in two.values()}) == 1  # one run id for both ranks
    prompt_order = [r["prompt_id"] for r in read_records(single)]
    assert [r["prompt_id"] for r in read_records(merged)] == prompt_order  # merged in prompt order
    assert list(runs["folder"].glob("*.part")) == []  # rank 0 deleted the part files
    check_strict(merged)
    assert result_stdout.count("wrote ") == 1 and f"wrote {2 * LIMIT} records ({2 * LIMIT} ok)" in result_stdout
    assert result_stdout.count("speculative") == 1  # the summary table, once, over all ranks
    (metrics_file,) = folder.glob("lightning_logs/version_*/metrics.csv")
    header, values = metrics_file.read_text().splitlines()[:2]
    logged = dict(zip(header.split(","), values.split(",")))
    for method in ("baseline", "speculative"):  # reduced over both ranks: every record counts
        assert float(logged[f"{method}/records"]) == LIMIT
        mean = sum(r["tokens_per_s"] for r in two.values() if r["method"] == method) / LIMIT
        assert float(logged[f"{method}/tokens_per_s_mean"]) == pytest.approx(mean)

    before = merged.read_bytes()
    resumed = predict(config_file, merged, *DDP, "--resume", "true")
    assert merged.read_bytes() == before and part_files(merged) == []
    assert f"wrote 0 records (0 ok, {2 * LIMIT} already done)" in resumed.stdout


@pytest.mark.slow
def test_resume_folds_the_part_files_of_a_killed_ddp_run(config_file, runs, tmp_path):
    """A killed run left its output with 2 records and a part file per rank (one cut mid-line): the resumed run
    merges them in first, redoes none of them, and ends with every record once."""
    records = read_records(runs["merged"])
    output = tmp_path / "killed.jsonl"
    part_path(output, 0).write_text(json.dumps(records[2]) + "\n" + json.dumps(records[3]) + "\n")
    part_path(output, 1).write_text(json.dumps(records[4]) + "\n" + '{"run_id": "x", "sta')
    with pytest.raises(OutputExistsError, match="part files"):  # without --resume the leftovers are refused
        check_output_path(output, resume=False)
    output.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    resumed = predict(config_file, output, *DDP, "--resume", "true")
    assert "5 already done" in resumed.stdout and f"wrote {2 * LIMIT - 5} records" in resumed.stdout
    final = by_key(read_records(output))
    assert set(final) == {(r["prompt_id"], r["method"]) for r in records} and part_files(output) == []
    assert {k: r["text"] for k, r in final.items()} == {(r["prompt_id"], r["method"]): r["text"] for r in records}
    check_strict(output)


def test_merge_keeps_prompt_order_and_each_ok_key_once(tmp_path):
    output = tmp_path / "out.jsonl"

    def record(prompt: str, run: str = "r", status: str = "ok") -> dict:
        return {"run_id": run, "resume_key": f"d/{prompt}/1/baseline/x", "status": status, "dataset": "d",
                "prompt_id": prompt}

    output.write_text(json.dumps(record("a", run="old")) + "\n")
    part_path(output, 0).write_text("".join(json.dumps(record(p)) + "\n" for p in ("a", "c")))
    part_path(output, 1).write_text(
        "".join(json.dumps(record(p)) + "\n" for p in ("b", "d"))
        + '{"cut\n'
        + json.dumps(record("e", status="error"))
    )
    assert [p.name for p in part_files(output)] == ["out.jsonl.rank0.part", "out.jsonl.rank1.part"]
    part_path(tmp_path / "new.jsonl", 0).touch()
    with pytest.raises(OutputExistsError, match="part files"):
        check_output_path(tmp_path / "new.jsonl", resume=False)

    order = {("d", p): i for i, p in enumerate("abcde")}
    parts = part_files(output)
    assert merge_parts(output, parts, order) == (4, 3)  # not the ok "a" again, nor the cut line
    assert [(r["prompt_id"], r["status"]) for r in read_records(output)] == [
        ("a", "ok"), ("b", "ok"), ("c", "ok"), ("d", "ok"), ("e", "error")]
    assert part_files(output) == [] and not parts[0].exists()
    merged = output.read_text()
    for rank, prompts in ((0, "ac"), (1, "bd")):  # merged again (a crash before the parts were deleted): no change
        part_path(output, rank).write_text("".join(json.dumps(record(p)) + "\n" for p in prompts))
    with part_path(output, 1).open("a") as handle:
        handle.write(json.dumps(record("e", status="error")) + "\n")
    assert merge_parts(output, part_files(output), order) == (0, 0) and output.read_text() == merged


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data.limit", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp"), "1 prompts cannot be shared"),
        (("--data.limit", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"), "spawning strategy"),
    ],
)
def test_bad_data_parallel_set_ups_are_refused_before_any_model_loads(tmp_path, monkeypatch, extra, message):
    from src.cli import cli_main
    from src.errors import InvalidParameterError

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])
    output = tmp_path / "never.jsonl"
    args = ["predict", "--config", "configs/baseline.yaml", "--data.path", str(dataset_file("mt_bench.jsonl")),
            "--trainer.accelerator", "cpu", "--output", str(output), *extra]
    with pytest.raises(InvalidParameterError, match=message):
        cli_main(args)
    assert not output.exists()


def test_judge_fit_under_ddp_matches_one_process(tmp_path):
    """``fit`` of the AutoJudge judge with two gloo processes: validation is computed on every rank's rows gathered
    (each once, whatever the sampler padded), so the exported judge's metrics match a one-process fit."""
    from test_autojudge import write_label_store

    from src.models.judge import Judge

    questions = tmp_path / "train.jsonl"
    questions.write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
        for i in range(8)
    ))
    write_label_store(tmp_path / "labels", [f"q{i}" for i in range(8)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    judges = {}
    for name, extra in (("one", ()), ("ddp", DDP)):
        judges[name] = tmp_path / f"judge-{name}"
        args = [
            sys.executable, "-m", "src", "fit", "--config", "configs/autojudge.yaml", "--data.mine_path", str(questions),
            "--data.mine_prompts", "8", "--data.store_dir", str(tmp_path / "labels"), "--data.batch_size", "8",
            "--model.judge_path", str(judges[name]), "--model.learning_rate", "0.05", "--trainer.max_epochs", "15",
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
        ]
        result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert result.stdout.count("exported judge") == 1  # rank 0 alone exports
    one, ddp = (Judge.load(judges[name]).metrics for name in ("one", "ddp"))
    assert one["val_labels"] == ddp["val_labels"] == 24  # 2 of 8 prompts x 12 mismatches, every one counted
    assert one["val_auroc"] > 0.9 and ddp["val_auroc"] > 0.9  # separable labels, learnt by both
    assert abs(one["val_auroc"] - ddp["val_auroc"]) <= 0.05
    assert ddp["val_recall_important"] >= 0.9  # the threshold was chosen on all the validation rows


def test_validation_rows_are_gathered_once_each():
    from src.lit.judge import gather_validation_rows

    scores = [torch.tensor([0.1, 0.9]), torch.tensor([0.4, 0.1])]  # row 0 repeated (a padded shard)
    labels = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])]
    rows = [torch.tensor([2, 1]), torch.tensor([0, 2])]
    got_scores, got_labels = gather_validation_rows(scores, labels, rows)
    assert got_scores.tolist() == pytest.approx([0.4, 0.9, 0.1]) and got_labels.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.slow
def test_eagle_fit_under_ddp_counts_each_validation_conversation_once(tmp_path):
    """``fit`` of the EAGLE head with two gloo processes: features built once (rank 0), validation counts gathered
    per conversation, so a conversation the distributed sampler repeats to even out the ranks is counted once.
    The head does not move (learning rate 0), so both runs export the figures of the same initial head."""
    import yaml

    predict_config = yaml.safe_load(write_tiny_predict_config(tmp_path, 1).read_text())
    model_dir = predict_config["model"]["init_args"]["target"]["name_or_path"]
    conversations = tmp_path / "train.jsonl"  # read by teacher forcing (a random model's own answers are empty)
    conversations.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}. "
                                                 f"The sum is {2 * i}.\n#### {2 * i}"}) + "\n" for i in range(23)))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps({"question_id": 0, "category": "t", "turns": ["Hello there."]}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    metrics = {}
    for name, extra in (("one", ()), ("ddp", DDP)):
        args = [
            sys.executable, "-m", "src", "fit", "--config", "configs/eagle1.yaml", "--seed_everything", "0",
            "--model.init_args.target.name_or_path", model_dir, "--model.init_args.draft.name_or_path", model_dir,
            "--model.init_args.head_path", str(tmp_path / name / "head"), "--model.init_args.top_tokens", "512",
            "--model.init_args.learning_rate", "0.0",
            "--data.init_args.train_sources", f"[{conversations}]", "--data.init_args.train_limit", "null",
            "--data.init_args.self_distill_path", "null", "--data.init_args.self_distill_prompts", "0",
            "--data.init_args.store_dir", str(tmp_path / name / "features"), "--data.init_args.val_fraction", "0.3",
            "--data.init_args.batch_size", "2", "--data.init_args.path", str(evaluation), "--data.init_args.limit", "1",
            "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra,
        ]
        result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert result.stdout.count("exported EAGLE head") == 1  # rank 0 alone exports
        metrics[name] = json.loads((tmp_path / name / "head.json").read_text())["metadata"]["metrics"]
    held_out = json.loads((tmp_path / "one" / "head.json").read_text())["metadata"]["val_conversations"]
    assert held_out % 2 == 1  # an odd validation set: the sampler pads one rank with a repeat
    assert metrics["one"]["val_positions"] > 0
    assert json.dumps(metrics["ddp"], sort_keys=True) == json.dumps(metrics["one"], sort_keys=True)  # NaN-safe
