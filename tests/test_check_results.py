"""check_results: a valid file passes, a corrupted copy fails with line-numbered problems."""

from __future__ import annotations

import json

from src.tools.check_results import main

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
                    answer_correct="yes")
    missing = ok_record("autojudge[threshold=0.5]", "3", judge_accepted=0)
    path = write(tmp_path / "r.jsonl", [good, bad, missing])
    assert main([path, "--strict"]) == 1
    out = capsys.readouterr().out
    assert ":1:" not in out
    assert "judge_accepted=3 + exact_accepted_tokens=3 exceeds accepted_tokens=4" in out
    assert "answer_correct='yes'" in out
    assert "missing autojudge[threshold=0.5] field 'answer_correct'" in out
