"""SIGINT (Ctrl-C) and SIGTERM (kill, timeout, docker stop) end ``python -m src predict`` and ``fit`` cleanly
(issue 26 item 4): exit status 130 / 143, no traceback, a results file of complete lines only, the record
counts and the exact command that resumes; that command then finishes the run.

Each case starts ``python -m src`` itself (the signal handlers are the process's) on the tiny random Llama of
``conftest.write_tiny_predict_config``; the helpers come from tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, write_tiny_predict_config
from test_faults import ENV, assert_every_record_once, record_lines

from src.lit.interrupts import resume_command

LIMIT = 30  # prompts; at 48 new tokens each the run decodes for a few seconds after ~10 s of start-up
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_predict_config(tmp_path_factory.mktemp("tiny"), LIMIT, new_tokens=NEW_TOKENS)


def start(args: list[str], script: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "src"]
    return subprocess.Popen([*command, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_for(ready, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            done = finish(process)
            pytest.fail(f"the run ended (exit {done.returncode}) before the signal:\n{done.stderr[-3000:]}")
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)


def has_a_record(path: Path) -> bool:
    return path.is_file() and b"\n" in path.read_bytes()


def stop_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_clean_stop(result: subprocess.CompletedProcess, signum: int) -> str:
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 128 + signum, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    return stop_line(result)


def assert_complete_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]  # every line is a whole record


def run_printed_command(line: str) -> subprocess.CompletedProcess:
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:4] == ["python", "-m", "src", "predict"], command
    return subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_predict_between_prompts_and_the_printed_command_resumes(tiny, tmp_path, signum):
    output = tmp_path / "results.jsonl"
    # --resume false on the command line: the printed command must say true, once
    process = start(["predict", "--config", str(tiny), "--output", str(output), "--resume", "false"])
    wait_for(lambda: has_a_record(output), process)
    process.send_signal(signum)
    result = finish(process)
    line = assert_clean_stop(result, signum)

    records = assert_complete_lines(output)
    prompts = len({r["prompt_id"] for r in records})
    assert 0 < prompts < LIMIT and len(records) == 2 * prompts  # whole prompts only: both methods' records
    name = signal.Signals(signum).name
    assert line.startswith(f"stopped by {name} after {prompts} of {LIMIT} prompts, {LIMIT - prompts} prompts left; "
                           "resume with: python -m src predict "), line
    assert line.endswith(f"--output {output} --resume true") and line.count("--resume") == 1, line
    assert f"wrote {len(records)} records ({len(records)} ok) to {output}" in result.stdout
    assert "speedup" in result.stdout  # the summary table, as after a complete run

    resumed = run_printed_command(line)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(records)} already done" in resumed.stdout
    assert_every_record_once(output, LIMIT)  # every line parses; check_results --strict accepts the file
    assert output.read_text(encoding="utf-8").startswith("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                 for r in records))


SIGNALS_IN_A_WRITE = """\
import os, signal, sys, threading
from pathlib import Path
sys.path.insert(0, {root!r})
from src.lit import results

original = results.ResultsWriter.on_predict_batch_end
real_open = Path.open


def handle_pending_signals():
    pass  # entering a Python function runs the handlers of the signals received so far


class SignalledMidLine:
    # The first line of the second prompt: half of it reaches the file, then Ctrl-C twice, then the rest.
    def __init__(self, handle):
        self.handle, self.armed = handle, True

    def write(self, text):
        if not self.armed:
            return self.handle.write(text)
        self.armed = False
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        for _ in range(2):  # to this thread (the main one: no other thread takes it), each handled before the next
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            handle_pending_signals()
        return self.handle.write(text[len(text) // 2:])

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def on_predict_batch_end(self, trainer, *args, **kwargs):
    if self.prompts_done != 1:
        return original(self, trainer, *args, **kwargs)
    Path.open = lambda path, mode="r", *a, **k: (
        SignalledMidLine(real_open(path, mode, *a, **k)) if path == self.target and "a" in mode
        else real_open(path, mode, *a, **k))
    try:
        return original(self, trainer, *args, **kwargs)
    finally:
        Path.open = real_open


results.ResultsWriter.on_predict_batch_end = on_predict_batch_end
from src.__main__ import main

sys.exit(main())
"""


def test_a_second_ctrl_c_stops_at_once_and_never_cuts_a_line(tiny, tmp_path):
    """Both signals arrive in the middle of a record's line: the line (and its prompt's other record) is finished,
    then the second signal stops the run at once (no summary table: that waits for the end of the loop)."""
    script = tmp_path / "signals_in_a_write.py"
    script.write_text(SIGNALS_IN_A_WRITE.format(root=str(ROOT)))
    output = tmp_path / "results.jsonl"
    result = finish(start(["predict", "--config", str(tiny), "--output", str(output)], script=script))
    line = assert_clean_stop(result, signal.SIGINT)
    assert len(assert_complete_lines(output)) == 4  # the two prompts' records, each line whole
    assert line.startswith(f"stopped by a second SIGINT after 2 of {LIMIT} prompts"), line
    assert line.endswith(f"--output {output} --resume true"), line
    assert "SIGINT: stopping after the prompt in flight" in result.stderr
    assert f"wrote 4 records (4 ok) to {output}" in result.stdout and "speedup" not in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_python_imports_is_one_line(tmp_path, signum):
    output = tmp_path / "never.jsonl"
    args = ["predict", "--config", "configs/baseline.yaml", "--output", str(output)]
    process = start(args)
    time.sleep(1.5)  # torch and Lightning take several seconds to import
    process.send_signal(signum)
    result = finish(process)
    line = assert_clean_stop(result, signum)
    assert [text for text in result.stderr.splitlines() if text.strip()] == [line]
    assert line == (f"stopped by {signal.Signals(signum).name} before predict started; rerun with: "
                    f"{shlex.join(['python', '-m', 'src', *args, '--resume', 'true'])}")
    assert not output.exists()


def test_sigterm_stops_fit_and_says_the_feature_store_continues(tmp_path):
    """An EAGLE fit on the tiny Llama: SIGTERM once its feature store holds rows (the head is then training)."""
    import yaml

    model_dir = yaml.safe_load(write_tiny_predict_config(tmp_path, 1).read_text())["model"]["init_args"]["target"][
        "name_or_path"]
    conversations = tmp_path / "train.jsonl"
    conversations.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}."})
                                     + "\n" for i in range(20)))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps({"question_id": 0, "category": "t", "turns": ["Hello there."]}) + "\n")
    store = tmp_path / "features"
    args = [
        "fit", "--config", "configs/eagle1.yaml", "--model.init_args.target.name_or_path", model_dir,
        "--model.init_args.draft.name_or_path", model_dir, "--model.init_args.head_path", str(tmp_path / "head"),
        "--model.init_args.top_tokens", "512", "--data.init_args.train_sources", f"[{conversations}]",
        "--data.init_args.train_limit", "null", "--data.init_args.self_distill_path", "null",
        "--data.init_args.self_distill_prompts", "0", "--data.init_args.store_dir", str(store),
        "--data.init_args.val_fraction", "0.3", "--data.init_args.path", str(evaluation), "--data.init_args.limit",
        "1", "--trainer.max_epochs", "1000", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ]
    process = start(args)
    wait_for(lambda: (store / "items.jsonl").is_file() and (store / "items.jsonl").stat().st_size > 0, process)
    process.send_signal(signal.SIGTERM)
    line = assert_clean_stop(finish(process), signal.SIGTERM)
    assert line == (f"stopped by SIGTERM during fit: the EAGLE feature store {store} keeps what was done and the same "
                    f"command continues it (training starts over); rerun: {shlex.join(['python', '-m', 'src', *args])}")
    assert len(record_lines(store / "items.jsonl")) > 0


def test_the_resume_command_replaces_any_resume_value():
    base = ["predict", "--config", "a b.yaml", "--resume_as_new_config", "true"]
    expected = "python -m src predict --config 'a b.yaml' --resume_as_new_config true --resume true"
    assert resume_command(base, resume=True) == expected
    assert resume_command([*base[:3], "--resume", "false", *base[3:]], resume=True) == expected
    assert resume_command([*base, "--resume=False"], resume=True) == expected
    assert resume_command(["fit", "--resume", "x"], resume=False) == "python -m src fit --resume x"
