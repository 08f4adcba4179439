"""Prompt files and the numerics a result is keyed by (issue 27 items 1, 2, 3, 10, 13, 14, 17): a prompt file a
run cannot trust is refused in one line naming file and line; a record's resume key ends in its prompt text's hash;
an autocast precision is in the fingerprint and a precision that does nothing is refused; a budget or prompt
beyond the model's context is refused or recorded as an error. In-process (``cli_main``) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, write_tiny_predict_config
from test_faults import record_lines

from src.data.prompts import read_prompt_file
from src.errors import InvalidParameterError, MalformedInputError, MissingInputError, OutputExistsError


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def mt_bench_row(question_id: int, text: str, category: str = "writing") -> dict:
    return {"question_id": question_id, "category": category, "turns": [text]}


# ---- reading a prompt file ------------------------------------------------------------------------------------

def test_duplicate_ids_are_refused_naming_both_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [mt_bench_row(1, "a"), mt_bench_row(2, "b"), mt_bench_row(1, "c")])
    with pytest.raises(MalformedInputError, match=r"p.jsonl:3: prompt id '1' is already used at .*p.jsonl:1"):
        read_prompt_file(path)


@pytest.mark.parametrize("turns", [[""], ["first", "  "]])
def test_an_empty_turn_is_refused_with_its_prompt_id(tmp_path, turns):
    path = write_lines(tmp_path / "p.jsonl", [{"question_id": 7, "category": "x", "turns": turns}])
    with pytest.raises(MalformedInputError, match=rf"p.jsonl:1: .*turn {len(turns)} of prompt '7' is empty"):
        read_prompt_file(path)


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps(mt_bench_row(1, "ok")).encode() + b'\n{"question_id": 2, "turns": ["\xff"]}\n')
    with pytest.raises(MalformedInputError, match=r"p.jsonl:2: not UTF-8 text \(byte 0xff at column 31\)"):
        read_prompt_file(path)


def test_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(mt_bench_row(1, "hello")).encode() + b"\n")
    assert read_prompt_file(path)[0].turns == ["hello"]


def test_a_folder_is_called_a_folder(tmp_path):
    with pytest.raises(MissingInputError, match="is a folder: pass the .jsonl file inside it"):
        read_prompt_file(tmp_path)


@pytest.mark.parametrize("seed", [-5, 2**32])
def test_a_seed_out_of_range_names_the_range(seed, capsys, monkeypatch):
    from src.__main__ import main
    from src.lit.module import DecodingModule

    message = f"seed={seed} is invalid: use an integer from 0 to 4294967295"
    with pytest.raises(InvalidParameterError, match=message):
        DecodingModule(seed=seed)
    monkeypatch.chdir(Path(__file__).parents[1])  # the command line: one line, before Lightning's seed_everything
    assert main(["predict", "--config", "configs/baseline.yaml", "--model.seed", str(seed)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"


# ---- runs on the tiny model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_predict_config(tmp_path_factory.mktemp("tiny"), limit=2, new_tokens=3)


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])


def test_an_edited_prompt_is_decoded_again_and_older_records_still_resume(tiny, tmp_path, in_root):
    from src.cli import cli_main

    prompts = write_lines(tmp_path / "p.jsonl", [mt_bench_row(1, "Say hi."), mt_bench_row(2, "Count.", "math")])
    output = tmp_path / "r.jsonl"
    base = ["predict", "--config", str(tiny), "--data.path", str(prompts), "--output", str(output)]
    cli_main(base)
    first = record_lines(output)
    assert all(r["resume_key"].endswith("/" + r["prompt_sha"]) for r in first)

    # records written before prompt_sha existed: their keys end at the fingerprint id, and they still resume
    legacy = [{k: v for k, v in r.items() if k != "prompt_sha"} | {"resume_key": r["resume_key"].rsplit("/", 1)[0]}
              for r in first]
    output.write_text("".join(json.dumps(r) + "\n" for r in legacy), encoding="utf-8")
    cli_main([*base, "--resume", "true"])
    assert len(record_lines(output)) == len(legacy)

    # same file name and ids, prompt 1 edited: only prompt 1 is decoded again
    output.write_text("".join(json.dumps(r) + "\n" for r in first), encoding="utf-8")
    write_lines(prompts, [mt_bench_row(1, "Say bye."), mt_bench_row(2, "Count.", "math")])
    cli_main([*base, "--resume", "true"])
    added = record_lines(output)[len(first):]
    assert sorted((r["prompt_id"], r["method"]) for r in added) == [("1", "baseline"), ("1", "speculative")]


def test_autocast_precision_is_in_the_fingerprint_and_true_precisions_are_refused(tiny, tmp_path, in_root):
    from src.cli import cli_main

    output = tmp_path / "r.jsonl"
    base = ["predict", "--config", str(tiny), "--data.limit", "1", "--output", str(output)]
    cli_main(base)
    first = output.read_bytes()
    assert "precision" not in record_lines(output)[0]["fingerprint"]  # float32 runs keep their older fingerprint
    with pytest.raises(OutputExistsError, match=r"precision: None -> 'bf16-mixed'"):
        cli_main([*base, "--resume", "true", "--trainer.precision", "bf16-mixed"])
    for precision in ("bf16-true", "64-true"):
        with pytest.raises(InvalidParameterError, match=rf"--trainer.precision {precision} does not reach the models"):
            cli_main([*base, "--resume", "true", "--trainer.precision", precision])
    assert output.read_bytes() == first


def test_context_length_refuses_the_budget_and_records_a_prompt_too_long(tiny, tmp_path, in_root):
    from src.cli import cli_main

    prompts = write_lines(tmp_path / "p.jsonl", [mt_bench_row(1, "word " * 5000), mt_bench_row(2, "Hi.", "math")])
    output = tmp_path / "r.jsonl"
    base = ["predict", "--config", str(tiny), "--data.path", str(prompts), "--output", str(output)]
    cli_main(base)
    records = {(r["prompt_id"], r["method"]): r for r in record_lines(output)}
    assert {key: r["status"] for key, r in records.items()} == {
        ("1", "baseline"): "error", ("1", "speculative"): "error", ("2", "baseline"): "ok", ("2", "speculative"): "ok"}
    message = records[("1", "baseline")]["error"]["message"]
    assert "exceed the model's context of 4096 tokens: set --data.max_prompt_tokens 4093" in message
    with pytest.raises(InvalidParameterError, match="max_new_tokens=100000 does not fit the model's context of 4096"):
        cli_main([*base[:-1], str(tmp_path / "fresh.jsonl"), "--model.max_new_tokens", "100000"])
