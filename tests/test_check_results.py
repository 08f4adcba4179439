"""check_results: a valid file passes, a corrupted copy fails with line-numbered problems."""

from __future__ import annotations

import json

import pytest

from src.results.check import main

SYSTEM = {k: "x" for k in ("git_sha", "hostname", "python", "torch", "transformers", "lightning", "device",
                           "gpu_name", "gpu_driver", "cuda", "cpu", "timestamp")} | {"num_threads": 2}


def ok_record(method: str, prompt_id: str, **overrides) -> dict:
    record = {
        "run_id": "r1", "resume_key": f"mt_bench/{prompt_id}/1/{method}/abc", "status": "ok", "error": None,
        "method": method, "dataset": "mt_bench", "prompt_id": prompt_id, "category": "writing", "turn": 1,
        "new_tokens": 8, "prefill_s": 0.1, "decode_s": 0.7, "wall_s": 0.8, "tokens_per_s": 10.0,
        "target_calls": 4, "draft_calls": 12, "tokens_per_target_call": 2.0, "drafted_tokens": 6,
        "accepted_tokens": 4, "acceptance_rate": 4 / 6, "accepted_per_position": [1.0, 0.5], "speedup": 1.2,
        "matches_baseline": True, "first_divergence": None, "text": "hello", "params": {"k": 2},
        "target": {"name": "t"}, "draft": {"name": "d"}, "system": SYSTEM,
    }
    return record | overrides


def write(path, records, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(path)


def test_valid_file_passes_strict(tmp_path, capsys):
    path = write(tmp_path / "r.jsonl", [ok_record("speculative", "1"), ok_record("speculative", "2")])
    assert main([path, "--strict"]) == 0
    assert "speculative: 2 ok, 0 error" in capsys.readouterr().out


def test_corrupted_file_fails_with_line_numbers(tmp_path, capsys):
    records = [
        ok_record("speculative", "1"),
        ok_record("speculative", "2", acceptance_rate=1.5),
        ok_record("speculative", "3", status="done"),
        {k: v for k, v in ok_record("speculative", "4").items() if k != "tokens_per_s"},
    ]
    path = write(tmp_path / "r.jsonl", records, tail='{"run_id": "r1", "stat')
    assert main([path]) == 1
    out = capsys.readouterr().out
    assert ":2: acceptance_rate=1.5 should be in [0, 1]" in out
    assert ":3: status='done'" in out
    assert ":4: missing field 'tokens_per_s'" in out
    assert ":5: not valid JSON" in out


def test_strict_catches_inconsistent_counts(tmp_path, capsys):
    bad = ok_record("speculative", "1", accepted_tokens=9, tokens_per_target_call=3.0)
    path = write(tmp_path / "r.jsonl", [bad, ok_record("speculative", "1")])
    assert main([path]) == 0  # types and ranges are fine
    assert main([path, "--strict"]) == 1
    out = capsys.readouterr().out
    assert "accepted_tokens=9 exceeds drafted_tokens=6" in out
    assert "tokens_per_target_call=3.0 != new_tokens/target_calls=2" in out
    assert "already ok on line 1" in out


def test_real_run_file_passes_strict(tmp_path):
    """A file written by the predict pipeline itself (baseline on the embedded model) passes --strict."""
    import pytest
    from conftest import ROOT, dataset_file

    if not (ROOT / "configs" / "baseline.yaml").is_file():
        pytest.skip("configs missing")
    from src.cli import cli_main

    output = tmp_path / "real.jsonl"
    cli_main(["predict", "--config", str(ROOT / "configs" / "baseline.yaml"), "--data.path",
              str(dataset_file("mt_bench.jsonl")), "--data.limit", "1", "--model.max_new_tokens", "4",
              "--output", str(output), "--trainer.enable_progress_bar", "false"])
    assert main([str(output), "--strict"]) == 0


def test_strict_checks_autojudge_fields(tmp_path, capsys):
    good = ok_record("autojudge[threshold=0.5]", "1", judge_accepted=1, exact_accepted_tokens=3, answer="7",
                     answer_correct=True)
    bad = ok_record("autojudge[threshold=0.5]", "2", judge_accepted=3, exact_accepted_tokens=3, answer="7",
                    answer_correct=True)
    missing = ok_record("autojudge[threshold=0.5]", "3", judge_accepted=0)
    mistyped = ok_record("autojudge[threshold=0.5]", "4", judge_accepted=0, exact_accepted_tokens=0, answer="7",
                         answer_correct="yes")
    path = write(tmp_path / "r.jsonl", [good, bad, missing, mistyped])
    assert main([path, "--strict"]) == 1
    out = capsys.readouterr().out
    assert ":1:" not in out
    assert "judge_accepted=3 + exact_accepted_tokens=3 exceeds accepted_tokens=4" in out
    assert "answer_correct='yes'" in out
    assert "missing autojudge[threshold=0.5] field 'answer_correct'" in out


def with_fingerprint(record: dict, **changes) -> dict:
    fingerprint = {"method": record["method"], "params": record["params"], "target": {"name_or_path": "t"},
                   "draft": None, "prompt": {"chat_template": True}, "files": {}} | changes
    return record | {"fingerprint": fingerprint, "fingerprint_id": "0123456789"}


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b'{"text": "caf\xe9"}\n'],
                         ids=["binary", "latin-1"])
def test_binary_or_non_utf8_file_is_one_line_error(tmp_path, capsys, content):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {path} is not a UTF-8 text file (binary?): pass a results JSONL "
                            "written by python -m src predict\n")
    assert captured.out == ""


def test_missing_file_or_directory_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: results file {tmp_path / 'nope.jsonl'} does not exist\n"
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: results file {tmp_path} is not a file\n"


def test_line_separators_inside_strings_do_not_split_records(tmp_path):
    """predict writes ensure_ascii=False: U+2028 or \\x1c in a text stays raw inside its JSON line."""
    record = ok_record("speculative", "1", text="a\u2028b\x1cc\u0085d")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main([str(path), "--strict"]) == 0


def test_fingerprint_fields_are_optional_but_typed(tmp_path, capsys):
    records = [
        with_fingerprint(ok_record("speculative", "1")),
        ok_record("speculative", "2"),  # an older record: neither field
        with_fingerprint(ok_record("speculative", "3")) | {"fingerprint_id": 12345},
        with_fingerprint(ok_record("speculative", "4")) | {"fingerprint": "abc"},
        with_fingerprint(ok_record("speculative", "5")) | {"fingerprint_id": "XYZ"},
        {k: v for k, v in with_fingerprint(ok_record("speculative", "6")).items() if k != "fingerprint_id"},
    ]
    path = write(tmp_path / "r.jsonl", records)
    assert main([path]) == 1
    out = capsys.readouterr().out
    assert ":1:" not in out and ":2:" not in out
    assert ":3: fingerprint_id=12345 should be str" in out
    assert ":4: fingerprint='abc' should be dict" in out
    assert ":5: fingerprint_id='XYZ' should be 10 lowercase hex characters" in out
    assert ":6: fingerprint without fingerprint_id: a record carries both or neither" in out


def test_strict_checks_the_fingerprint_against_the_record(tmp_path, capsys):
    good = with_fingerprint(ok_record("speculative", "1"))
    without_files = {k: v for k, v in good["fingerprint"].items() if k != "files"}
    records = [
        good,
        with_fingerprint(ok_record("speculative", "2")),  # same id, same fingerprint: fine
        with_fingerprint(ok_record("speculative", "3"), params={"k": 8}),
        good | {"resume_key": "x", "fingerprint": without_files},
        with_fingerprint(ok_record("speculative", "5")) | {"fingerprint_id": "abcdefabcd"},
    ]
    path = write(tmp_path / "r.jsonl", records)
    assert main([path]) == 0  # types are fine
    assert main([path, "--strict"]) == 1
    out = capsys.readouterr().out
    assert ":1:" not in out and ":2:" not in out
    assert ":3: fingerprint.params={'k': 8} != params={'k': 2}" in out
    assert ":3: fingerprint_id '0123456789' has another fingerprint on line 1" in out
    assert ":4: fingerprint lacks ['files']" in out
    assert ":5: fingerprint_id 'abcdefabcd', but the same fingerprint on line 1 has '0123456789'" in out
