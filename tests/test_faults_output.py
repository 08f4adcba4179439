"""What happens around the results output (issue 27 items 5, 11, 12, 14, 17): one writer at a time, no output
that is not a regular file, no "wrote" line for a file never created, a resume on a full disk in one line, and
the one line of a config that cannot run the subcommand. In-process, on the tiny model where a run is needed.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_tiny_predict_config
from test_faults import ENV, record_lines

from src.errors import OutputExistsError, OutputNotWritableError
from src.results.files import OutputLock, check_output_path, lock_path

LIMIT = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_predict_config(tmp_path_factory.mktemp("tiny"), LIMIT, new_tokens=4)


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])


def run_main(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """``python -m src``'s main in this process: (exit status, stdout, the non-blank stderr lines)."""
    from src.__main__ import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_refused(result: tuple[int, str, list[str]], expected: str) -> None:
    code, _, err = result
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (code, err)


# ---- item 12 and 17: an output that is not a regular file, or under a file ------------------------------------

def test_a_fifo_or_an_output_under_a_file_is_refused_in_one_line(tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(OutputNotWritableError, match="is not a regular file"):  # the first append blocked forever
        check_output_path(fifo, resume=False)
    with pytest.raises(OutputNotWritableError, match="is not a regular file"):
        check_output_path(fifo, resume=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(OutputNotWritableError, match=f"{a_file} is a file, not a folder"):
        check_output_path(a_file / "sub" / "results.jsonl", resume=False)


# ---- item 5: one writer per output ------------------------------------------------------------------------------

HOLDER = """\
import sys, time
from src.results.files import OutputLock
OutputLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_an_output_has_one_writer_and_a_killed_writer_frees_it(tmp_path):
    output = tmp_path / "new" / "results.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputExistsError, match=f"being written by another run \\(pid {holder.pid}\\)"):
            check_output_path(output, resume=False)  # the check before any model loads
        with pytest.raises(OutputExistsError, match=f"pid {holder.pid}"):
            OutputLock.acquire(output)
        link = tmp_path / "link.jsonl"  # another name of the same file: the same lock
        link.symlink_to(output)
        with pytest.raises(OutputExistsError, match=f"pid {holder.pid}"):
            OutputLock.acquire(link)
    finally:
        holder.send_signal(signal.SIGKILL)  # flock dies with its process: no stale lock
        holder.wait()
    lock = OutputLock.acquire(output)
    with pytest.raises(OutputExistsError, match=f"pid {os.getpid()}"):  # a second open file in one process too
        OutputLock.acquire(output)
    lock.release()
    assert not lock_path(output).exists()
    OutputLock.acquire(output).release()
    fresh = tmp_path / "a" / "b" / "results.jsonl"
    OutputLock.acquire(fresh).release()
    assert not (tmp_path / "a").exists()  # a run that wrote nothing leaves nothing, not even the folders


def test_predict_refuses_an_output_another_run_writes(tiny, tmp_path, in_root, capsys):
    output = tmp_path / "r.jsonl"
    lock = OutputLock.acquire(output)
    try:
        assert_refused(run_main(capsys, "predict", "--config", str(tiny), "--output", str(output)),
                       f"being written by another run (pid {os.getpid()})")
    finally:
        lock.release()
    assert not output.exists()
    code, out, _ = run_main(capsys, "predict", "--config", str(tiny), "--output", str(output))
    assert code == 0 and f"wrote {2 * LIMIT} records" in out
    assert not lock_path(output).exists()  # released at the end of the run


# ---- item 11: no prompt decoded ---------------------------------------------------------------------------------

def test_limit_predict_batches_0_is_refused(tiny, tmp_path, in_root, capsys):
    output = tmp_path / "none.jsonl"
    assert_refused(run_main(capsys, "predict", "--config", str(tiny), "--output", str(output),
                            "--trainer.limit_predict_batches", "0"), "--trainer.limit_predict_batches 0")
    assert not output.exists()


# ---- item 17: "already done" counts this configuration's records only; item 14: resume on a full disk ----------

def test_resume_counts_this_configurations_records_and_a_full_disk_is_one_line(tiny, tmp_path, in_root, capsys,
                                                                                monkeypatch):
    output = tmp_path / "r.jsonl"
    base = ["predict", "--config", str(tiny), "--output", str(output), "--resume", "true"]
    assert run_main(capsys, *base)[0] == 0
    code, out, _ = run_main(capsys, *base, "--resume_as_new_config", "true", "--model.max_new_tokens", "3")
    assert code == 0 and f"wrote {2 * LIMIT} records ({2 * LIMIT} ok) to" in out, out  # none of the first's
    code, out, _ = run_main(capsys, *base, "--resume_as_new_config", "true", "--model.max_new_tokens", "3")
    assert code == 0 and f"wrote 0 records (0 ok, {2 * LIMIT} already done)" in out, out

    with output.open("a", encoding="utf-8") as handle:  # a record cut by a kill: the resume must repair it
        handle.write('{"run_id": "cut", "resu')
    before = output.read_bytes()
    real_open = Path.open

    def full_disk(self, mode="r", *rest, **kwargs):
        if self.parent == tmp_path and any(flag in mode for flag in "aw"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, mode, *rest, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    assert_refused(run_main(capsys, *base), f"cannot prepare {output} for the resume ({os.strerror(errno.ENOSPC)})")
    assert output.read_bytes() == before
    monkeypatch.setattr(Path, "open", real_open)
    code, out, _ = run_main(capsys, *base)  # space freed: the cut line moves aside, nothing is redone
    assert code == 0 and "already done" in out and len(record_lines(output)) == 4 * LIMIT


# ---- item 17: a config that cannot run the subcommand -------------------------------------------------------------

def test_fit_with_a_predict_config_and_a_preset_alone_say_what_to_run(tiny, in_root, capsys):
    assert_refused(run_main(capsys, "fit", "--config", str(tiny)), "is not a training config")
    assert_refused(run_main(capsys, "predict", "--config", "configs/models/smollm2-135m.yaml"),
                   "no config names the model class_path")
