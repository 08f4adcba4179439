"""Issue 27, the tools and the loaders: every mistake is one line on stderr with exit status 2, found before the
work it would spoil (tune checks --out, its config and --ks before loading models or calibrating), and library
noise (argparse's usage block, hub retries, bitsandbytes' import line) stays out. In-process but for the one
import that must be a fresh interpreter's."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_faults import ENV

from src.errors import InvalidParameterError, MissingInputError
from src.models import loading
from src.models.spec import ModelSpec
from src.tools import tune

SPECULATIVE_CONFIG = ROOT / "configs" / "speculative.yaml"


def one_error_line(err: str, expected: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Tune must refuse before any model loads: loading fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("tune loaded the models before checking its arguments")

    monkeypatch.setattr(tune.Tuner, "load", refuse)


# ---- item 8 / 14: tune ------------------------------------------------------------------------------------------

def test_tune_refuses_its_input_config_as_out(tmp_path, capsys, monkeypatch):
    config = tmp_path / "speculative.yaml"
    shutil.copy(SPECULATIVE_CONFIG, config)
    monkeypatch.setattr(tune, "Tuner", lambda *a: pytest.fail("tune read the config before checking --out"))
    assert tune.main(["--config", str(config), "--out", str(config)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {config} is the input config")
    assert config.read_text() == SPECULATIVE_CONFIG.read_text()  # comments and all


def test_tune_refuses_a_folder_as_out_before_calibrating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune, "Tuner", lambda *a: pytest.fail("tune read the config before checking --out"))
    assert tune.main(["--config", str(SPECULATIVE_CONFIG), "--out", str(tmp_path)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {tmp_path} is a folder: give a file name")


def test_tune_refuses_ks_above_the_methods_max_k(tmp_path, capsys, no_loading):
    out = tmp_path / "tuned.yaml"
    assert tune.main(["--config", str(SPECULATIVE_CONFIG), "--ks", "4", "20", "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "--ks 20: above the max_k=16 of the speculative method")
    assert not out.exists()


@pytest.mark.parametrize("content, expected", [
    ("- a\n- b\n", "is not a predict config (a mapping with model: / data: sections; it holds a list)"),
    ('{"question_id": 1, "turns": ["a"]}\n{"question_id": 2, "turns": ["b"]}\n', "is not valid YAML (line 2)"),
    ("model:\n  class_path: src.lit.module.DecodingModule\n  init_args:\n    bogus_key: 1\n",
     "--model.bogus_key is not an option of src.lit.module.DecodingModule"),
], ids=["yaml-list", "jsonl", "unknown-key"])
def test_tune_refuses_a_config_that_is_not_a_predict_config(tmp_path, capsys, no_loading, content, expected):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    assert tune.main(["--config", str(config), "--out", str(tmp_path / "out.yaml")]) == 2
    one_error_line(capsys.readouterr().err, expected)


# ---- item 15: argument errors are one line; --help keeps its usage ------------------------------------------------

def _tool_mains():
    from src.results.check import main as check_results
    from src.results.report.cli import main as report
    from src.tools.spec_bench_export import main as spec_bench_export

    return {"check_results": (check_results, []), "report": (report, ["r.jsonl"]),
            "tune": (tune.main, ["--config", "x.yaml", "--prompts", "zero"]),
            "spec_bench_export": (spec_bench_export, ["r.jsonl"])}


@pytest.mark.parametrize("tool", ["check_results", "report", "tune", "spec_bench_export"])
def test_argument_errors_are_one_line_and_help_keeps_the_usage(tool, capsys):
    main, argv = _tool_mains()[tool]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    line = one_error_line(capsys.readouterr().err, "error: ")
    assert "usage:" not in line and line.endswith("--help`")
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out


# ---- item 13: `methods` takes no arguments ----------------------------------------------------------------------

def test_methods_refuses_unknown_arguments(capsys):
    from src.__main__ import main

    assert main(["methods", "--bogus", "x"]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "`methods` takes no arguments, got --bogus x")
    assert captured.out == ""


# ---- item 14: devices and tokenizers --------------------------------------------------------------------------

@pytest.mark.parametrize("device, gpus, expected", [
    ("cuda", 0, "this machine has no GPU"), ("cuda:3", 1, "this machine has 1 GPU(s) (cuda:0..cuda:0)"),
    ("gpu", 0, "is not a device"),
])
def test_a_device_the_machine_lacks_is_refused_before_loading(tmp_path, monkeypatch, device, gpus, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    missing = str(tmp_path / "not-there")  # a path error would come first if the device were checked later
    for load in (loading.load_tokenizer, loading.load_model):
        with pytest.raises(InvalidParameterError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load(ModelSpec(name_or_path=missing, device=device))


def test_a_model_folder_without_a_tokenizer_names_the_folder_and_the_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": 100, "hidden_size": 16, '
                                        '"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}')
    with pytest.raises(MissingInputError) as error:
        loading.load_tokenizer(ModelSpec(name_or_path=str(folder), device="cpu"))
    message = str(error.value)
    assert message.startswith(f"model folder {folder} has no tokenizer: none of tokenizer.json, tokenizer.model")
    assert "['config.json']" in message and "\n" not in message


def test_hub_retry_lines_stay_out_of_an_unreachable_model(monkeypatch):
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    hub_logger = logging.getLogger(loading.HUB_RETRY_LOGGERS[0])
    hub_logger.addHandler(handler)

    def unreachable(*args):  # what huggingface_hub does offline: a warning per retry, then transformers' OSError
        for retry in range(1, 6):
            logging.getLogger("huggingface_hub.utils._http").warning(f"Retrying in 1s [Retry {retry}/5].")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading, "_load_tokenizer", unreachable)
    try:
        with pytest.raises(MissingInputError, match="cannot load 'someone/some-model'"):
            loading.load_tokenizer(ModelSpec(name_or_path="someone/some-model", device="cpu"))
    finally:
        hub_logger.removeHandler(handler)
    assert seen == []


def test_bitsandbytes_imports_without_its_kernel_line():
    pytest.importorskip("bitsandbytes")
    code = "from src.models.quantize import import_bitsandbytes; import_bitsandbytes(); import bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# ---- item 16: the unknown-method message names the methods -----------------------------------------------------

def test_unknown_method_message_names_every_method():
    from src.cli_errors import explain_parse_error

    report = ('Parser key "model":\n  Problem with given class_path \'src.lit.module.DecodingModule\':\n'
              '    Parser key "methods":\n      Expected a dot import path string: src.decoding.nope.Foo\n')
    message = explain_parse_error(report)
    assert "<property" not in message
    for listed in ("speculative (src.decoding.speculative.SpeculativeSampling)",
                   "specexec (src.decoding.specexec.SpecExec)"):
        assert listed in message, message
