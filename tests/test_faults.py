"""What a user's mistake or a crash does to a run (issue 13): every mistake is one line on stderr with exit status
2 and no traceback; an output is never an input; a resumed run never mixes configurations; a run killed in the
middle of a record write (one process or one rank of two) or stopped by a full disk resumes with every record
exactly once and a file that ``check_results --strict`` accepts.

The command-line cases run in one subprocess that calls ``python -m src``'s ``main`` once per case with file
descriptors 1 and 2 captured (everything the process prints, logging handlers and C extensions included): a fresh
interpreter per case spent ~15 s importing torch and Lightning, 18 times. The kill and resume tests start
``python -m src`` itself. The rest run on a tiny random Llama with the real SmolLM2 tokenizer
(``conftest.write_tiny_predict_config``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, dataset_file, write_tiny_predict_config

from src.errors import OutputExistsError
from src.jsonl import read_records, repair_lines
from src.results.check import main as check_results
from src.results.files import check_is_results_file, check_output_path

LIMIT = 3
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_src(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    shown = f"exit {result.returncode}, stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert expected in lines[0], shown


def record_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_every_record_once(path: Path, limit: int) -> None:
    records = record_lines(path)  # every line parses
    keys = [(r["prompt_id"], r["method"]) for r in records]
    assert len(keys) == len(set(keys)) == 2 * limit, keys
    assert all(r["status"] == "ok" for r in records)
    assert check_results([str(path), "--strict"]) == 0


# ---- every mistake of the issue, as a user types it -----------------------------------------------------------

CASE_DRIVER = """\
import json, os, sys, tempfile
from src.__main__ import main

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    sys.stdout.flush(); sys.stderr.flush()
    for fd in (1, 2):
        os.dup2(files[fd].fileno(), fd)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException as error:  # a traceback is a failed case, not a crashed driver
        import traceback; traceback.print_exc(); code = 1
    sys.stdout.flush(); sys.stderr.flush()
    for fd in (1, 2):
        os.dup2(saved[fd], fd); os.close(saved[fd])
    out, err = [(files[fd].seek(0), files[fd].read().decode("utf-8", "replace"))[1] for fd in (1, 2)]
    results[name] = {"returncode": code, "stdout": out, "stderr": err}
print(json.dumps(results))
"""


def run_cases_in_one_process(cases: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """``python -m src``'s main on each argv, in one interpreter; each case's fds 1 and 2 are captured apart."""
    done = subprocess.run([sys.executable, "-c", CASE_DRIVER, json.dumps(cases)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    return {name: subprocess.CompletedProcess(cases[name], r["returncode"], r["stdout"], r["stderr"])
            for name, r in results.items()}


METHOD_YAML = "model:\n  init_args:\n    methods:\n      - class_path: {path}\n{init}"


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict[Path, bytes | None]]]:
    """Runs every case (two at a time); returns ``id -> (result, {file: its bytes before the run})``."""
    folder = tmp_path_factory.mktemp("cli")
    prompts = dataset_file("mt_bench.jsonl")
    prompt_copy = folder / "prompts.jsonl"
    shutil.copy(prompts, prompt_copy)
    other_jsonl = folder / "other.jsonl"
    shutil.copy(prompts, other_jsonl)
    binary = folder / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    config_copy = folder / "config.yaml"
    shutil.copy(ROOT / "configs" / "baseline.yaml", config_copy)
    yamls = {}
    for name, path, init in (
        ("k0", "src.decoding.speculative.SpeculativeSampling", "        init_args: {k: 0}\n"),
        ("budget0", "src.decoding.specexec.SpecExec", "        init_args: {budget: 0}\n"),
        ("nope", "src.decoding.nope.Nope", ""),
    ):
        yamls[name] = folder / f"{name}.yaml"
        yamls[name].write_text(METHOD_YAML.format(path=path, init=init))
    fresh = folder / "fresh.jsonl"  # must never be created by a failed run
    base = ["predict", "--config", "configs/speculative.yaml", "--data.path", str(prompts), "--data.limit", "1"]
    cases = {
        "max_new_tokens": ([*base, "--model.max_new_tokens", "0"], "max_new_tokens=0 is invalid"),
        "temperature": ([*base, "--model.temperature", "-1"], "temperature=-1"),
        "top_p": ([*base, "--model.top_p", "1.5"], "top_p=1.5"),
        "top_k": ([*base, "--model.top_k", "-1"], "top_k=-1"),
        "max_prompt_tokens": ([*base, "--data.max_prompt_tokens", "0"], "max_prompt_tokens=0"),
        "k": ([*base, "--config", str(yamls["k0"])], "k=0 is invalid"),
        "budget": ([*base, "--config", str(yamls["budget0"])], "budget=0 is invalid"),
        "categories_without_brackets": ([*base, "--data.categories", "writing"], "--data.categories '[writing]'"),
        "unknown_method": ([*base, "--config", str(yamls["nope"])],
                           "unknown method class_path 'src.decoding.nope.Nope'"),
        "unknown_option": ([*base, "--model.foo", "1"], "--model.foo is not an option"),
        "unknown_preset": ([*base, "--config", "configs/models/nope.yaml"], "does not exist: use one of"),
        "bad_trainer_value": ([*base, "--trainer.devices", "abc"], "devices"),
        "output_is_the_prompt_file": ([*base, "--data.path", str(prompt_copy), "--output", str(prompt_copy),
                                       "--resume", "true"], "is an input of this run"),
        "output_is_a_config": ([*base, "--config", str(config_copy), "--output", str(config_copy), "--resume",
                                "true"], "is an input of this run"),
        "output_is_not_a_results_file": ([*base, "--output", str(other_jsonl), "--resume", "true"],
                                         "is not a results file of sp-samp"),
        "output_is_binary": ([*base, "--output", str(binary), "--resume", "true"], "not a UTF-8 text file"),
        "missing_model": ([*base, "--model.target.name_or_path", str(folder / "no-model"), "--output", str(fresh)],
                          "does not exist"),
        "hub_without_datasets": ([*base, "--data.path", "hub:openai/gsm8k", "--output", str(fresh)],
                                 "pip install datasets"),
    }
    watched = [prompt_copy, other_jsonl, binary, config_copy, fresh]
    before = {path: path.read_bytes() if path.exists() else None for path in watched}

    argv = {name: [*args, *([] if "--output" in args else ["--output", str(fresh)])] for name, (args, _) in cases.items()}
    results = run_cases_in_one_process(argv)
    return {name: (results[name], expected, before) for name, (_, expected) in cases.items()}


CLI_CASES = ("max_new_tokens", "temperature", "top_p", "top_k", "max_prompt_tokens", "k", "budget",
             "categories_without_brackets", "unknown_method", "unknown_option", "unknown_preset", "bad_trainer_value",
             "output_is_the_prompt_file", "output_is_a_config", "output_is_not_a_results_file", "output_is_binary",
             "missing_model", "hub_without_datasets")


@pytest.mark.parametrize("case", CLI_CASES)
def test_every_mistake_is_one_line_and_touches_no_file(cli_cases, case):
    if case == "hub_without_datasets" and _hf_datasets_installed():
        pytest.skip("the Hugging Face `datasets` package is installed here")
    result, expected, before = cli_cases[case]
    assert_one_line(result, expected)
    for path, content in before.items():  # inputs unchanged, and no output file left behind
        assert (path.read_bytes() if path.exists() else None) == content, f"{path} changed"


def _hf_datasets_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("datasets")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_short_help_shows_our_options_and_methods_list_their_parameters(capsys):
    from src.__main__ import main
    from src.cli import cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--config", "configs/speculative.yaml", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--output", "--resume_as_new_config", "--model.max_new_tokens", "--data.categories",
                   "--model.target.dtype", "python -m src methods", "--help-all"):
        assert option in text
    assert len(text.splitlines()) < 150
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for parameter in ("SpeculativeSampling", "k: int | Literal['auto'] (default 4)", "budget: int | Literal['auto'] (default 32)", "judge_path"):
        assert parameter in text


# ---- output safety and repair, without a model --------------------------------------------------------------------

def test_output_checks_create_nothing_and_refuse_inputs(tmp_path):
    output = tmp_path / "sub" / "results.jsonl"
    assert check_output_path(output, resume=False) == output and not output.parent.exists()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question_id": 1, "turns": ["hi"]}\n')
    with pytest.raises(OutputExistsError, match="is an input of this run"):
        check_output_path(prompts, resume=True, inputs=[str(prompts)])
    with pytest.raises(OutputExistsError, match="not a results file"):
        check_output_path(prompts, resume=True)
    empty = tmp_path / "empty.jsonl"  # left by an earlier version's failed run: holds nothing, may be reused
    empty.touch()
    assert check_output_path(empty, resume=False) == empty


def test_cut_lines_move_to_a_side_file(tmp_path):
    path = tmp_path / "r.jsonl"
    good = [json.dumps({"run_id": "r", "resume_key": f"k{i}", "status": "ok"}) for i in range(3)]
    path.write_text(good[0] + "\n" + '{"run_id": "r", "res\n' + good[1] + "\n" + good[2] + "\n" + '{"run_id": "r", "st')
    check_is_results_file(path)
    assert repair_lines(path) == 2
    assert path.read_text() == "".join(line + "\n" for line in good)
    assert (tmp_path / "r.jsonl.corrupt").read_text() == '{"run_id": "r", "res\n{"run_id": "r", "st\n'
    assert repair_lines(path) == 0 and path.read_text() == "".join(line + "\n" for line in good)
    cut_first = tmp_path / "cut.jsonl"  # killed while writing the very first record: still ours
    cut_first.write_text('{"run_id": "r", "resume_k')
    check_is_results_file(cut_first)


# ---- runs on the tiny model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_predict_config(tmp_path_factory.mktemp("tiny"), LIMIT)


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])


def test_resume_refuses_another_configuration_and_adds_it_when_asked(tiny, tmp_path, in_root):
    from src.cli import cli_main

    output = tmp_path / "r.jsonl"
    base = ["predict", "--config", str(tiny), "--output", str(output)]
    cli_main(base)
    first = output.read_bytes()
    assert len(record_lines(output)) == 2 * LIMIT
    for extra, field in ((("--model.target.dtype", "bfloat16"), "target.dtype: 'float32' -> 'bfloat16'"),
                         (("--model.draft.dtype", "float32"), "draft.dtype"),
                         (("--data.system_prompt", "Be brief."), "prompt.system_prompt: None -> 'Be brief.'"),
                         (("--data.chat_template", "false"), "prompt.chat_template"),
                         (("--model.max_new_tokens", "5"), "params.max_new_tokens: 6 -> 5")):
        with pytest.raises(OutputExistsError, match="would mix configurations") as refused:
            cli_main([*base, "--resume", "true", *extra])
        assert field in str(refused.value) and "--resume_as_new_config true" in str(refused.value)
        assert output.read_bytes() == first
    cli_main([*base, "--resume", "true"])  # the same configuration: nothing to do
    assert output.read_bytes() == first
    cli_main([*base, "--resume", "true", "--resume_as_new_config", "true", "--model.target.dtype", "bfloat16"])
    records = record_lines(output)
    assert len(records) == 4 * LIMIT and len({r["resume_key"] for r in records}) == 4 * LIMIT
    assert {r["fingerprint"]["target"]["dtype"] for r in records} == {"float32", "bfloat16"}
    assert check_results([str(output), "--strict"]) == 0


def test_a_run_that_fails_after_the_output_check_leaves_no_file(tiny, tmp_path, in_root):
    from src.cli import cli_main
    from src.errors import MissingInputError

    extra = tmp_path / "judge.yaml"
    extra.write_text(METHOD_YAML.format(path="src.decoding.autojudge.AutoJudge",
                                        init=f"        init_args: {{judge_path: {tmp_path / 'no-judge'}}}\n"))
    output = tmp_path / "never.jsonl"
    with pytest.raises(MissingInputError):
        cli_main(["predict", "--config", str(tiny), "--config", str(extra), "--output", str(output)])
    assert not output.exists()


class FullDisk:
    """A file handle on a disk that fills up after ``state["records"]`` record writes: the next write is cut after
    40 characters and raises ENOSPC, as a real full disk may leave a partial line."""

    def __init__(self, handle, state: dict) -> None:
        self.handle, self.state = handle, state

    def write(self, text: str) -> int:
        if self.state["records"] == 0:
            self.handle.write(text[:40])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.state["records"] -= 1
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_a_full_disk_stops_with_one_line_and_keeps_what_was_written(tiny, tmp_path, in_root, monkeypatch, capsys):
    from src.__main__ import main

    output = tmp_path / "full.jsonl"
    args = ["predict", "--config", str(tiny), "--output", str(output)]
    state = {"records": 2}  # the first prompt's two records fit, the disk is full in the middle of the third
    real_open = Path.open

    def open_output(self, mode="r", *rest, **kwargs):
        handle = real_open(self, mode, *rest, **kwargs)
        return FullDisk(handle, state) if self == output and "a" in mode else handle

    monkeypatch.setattr(Path, "open", open_output)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and os.strerror(errno.ENOSPC) in err[0] and "--resume true" in err[0], err
    kept = output.read_text()
    complete, cut = kept.rsplit("\n", 1)
    assert len(complete.splitlines()) == 2 and len(cut) == 40  # two records kept, the third cut

    monkeypatch.setattr(Path, "open", real_open)  # space freed
    assert main([*args, "--resume", "true"]) == 0
    assert_every_record_once(output, LIMIT)
    assert output.read_text().startswith(complete + "\n")  # the records written before are untouched
    assert (tmp_path / "full.jsonl.corrupt").read_text() == cut + "\n"


KILLER = """\
import json, os, signal, sys
sys.path.insert(0, {root!r})
from src.lit import results

KILL_RANK, KILL_AFTER = int(os.environ["KILL_RANK"]), int(os.environ["KILL_AFTER"])
original = results.ResultsWriter.on_predict_batch_end


def cut_and_die(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
    # kill -9 in the middle of a record write: half a line reaches the file, then the process is gone
    if trainer.global_rank == KILL_RANK and self.written >= KILL_AFTER and outputs:
        line = json.dumps(outputs[0], ensure_ascii=False)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        with self.target.open("a", encoding="utf-8") as handle:
            handle.write(line[: len(line) // 2])
            handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


results.ResultsWriter.on_predict_batch_end = cut_and_die
from src.__main__ import main

sys.exit(main())
"""


def run_killed(tmp_path: Path, args: list[str], rank: int, after: int) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    env = {**ENV, "KILL_RANK": str(rank), "KILL_AFTER": str(after)}
    process = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_kill_9_in_the_middle_of_a_record_write_then_resume(tiny, tmp_path):
    output = tmp_path / "killed.jsonl"
    args = ["predict", "--config", str(tiny), "--output", str(output)]
    killed = run_killed(tmp_path, args, rank=0, after=2)  # dies while writing the second prompt's first record
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(read_records(output)) == 2 and not output.read_text().endswith("\n")
    resumed = run_src(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 already done" in resumed.stdout and "killed.jsonl.corrupt" in resumed.stderr
    assert_every_record_once(output, LIMIT)


def test_a_ddp_rank_killed_mid_run_then_resume(tmp_path):
    """Two gloo processes; rank 1 is killed -9 in the middle of writing its second prompt's first record (Lightning
    then stops rank 0). ``--resume true`` folds what both part files hold and redoes only the rest."""
    limit = 5
    config = write_tiny_predict_config(tmp_path, limit)
    output = tmp_path / "ddp.jsonl"
    args = ["predict", "--config", str(config), "--output", str(output), "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    killed = run_killed(tmp_path, args, rank=1, after=2)
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert (tmp_path / "ddp.jsonl.rank1.part").is_file()  # left by the kill
    resumed = run_src(*args, "--resume", "true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "already done" in resumed.stdout
    assert_every_record_once(output, limit)
    assert not list(tmp_path.glob("ddp.jsonl.rank*.part"))


def test_quiet_by_default_and_one_seed(tiny, tmp_path):
    output = tmp_path / "quiet.jsonl"
    wandb = ("--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline", "true",
             "--trainer.logger.save_dir", str(tmp_path), "--trainer.logger.project", "sp-samp")
    quiet = run_src("predict", "--config", str(tiny), "--output", str(output), "--model.seed", "1", *wandb)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    printed = quiet.stdout + quiet.stderr
    for noise in ("Seed set", "GPU available", "Tip:", "wandb:", "Loading weights"):
        assert noise not in printed, printed
    assert f"wrote {2 * LIMIT} records" in quiet.stdout
    verbose = run_src("predict", "--config", str(tiny), "--output", str(tmp_path / "verbose.jsonl"), "--model.seed",
                      "1", "--verbose", "true")
    assert verbose.returncode == 0 and "Seed set to 1" in verbose.stdout + verbose.stderr
