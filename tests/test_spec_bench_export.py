"""Spec-Bench export: the answer files carry Spec-Bench's fields, and Spec-Bench's speed.py / equal.py formulas
(re-implemented here from their source) on the exported files give our own figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import ok_record

from src.results.report.reading import read_results
from src.results.report.sections import make_section
from src.results.schema import Totals
from src.tools.spec_bench_export import main

TARGET = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "float32", "quantization": "none"}
BASE_NAME = "SmolLM2-135M-Instruct-baseline-float32-temp-0.0"
SPEC = "speculative[k=3]"
SPEC_NAME = "SmolLM2-135M-Instruct-speculative-k-3-float32-temp-0.0"


def record(method: str, prompt_id: str, turn: int, wall_s: float, histogram: list[int] | None = None,
           new_tokens: int = 0, **overrides) -> dict:
    """An ok record whose counters agree with each other: a draft method's from its acceptance histogram, the
    baseline's from ``new_tokens``; its text has one word per token (the tokenizer of :func:`words` counts them)."""
    if histogram is not None:
        new_tokens = sum((i + 1) * n for i, n in enumerate(histogram))
        counters = {"acceptance_histogram": histogram, "target_calls": sum(histogram),
                    "accepted_tokens": sum(i * n for i, n in enumerate(histogram)), "drafted_tokens": 3 * sum(histogram)}
    else:
        counters = {"acceptance_histogram": [], "target_calls": new_tokens, "accepted_tokens": 0, "drafted_tokens": 0}
    fields = {"turn": turn, "new_tokens": new_tokens, "wall_s": wall_s, "tokens_per_s": new_tokens / wall_s,
              "text": " ".join(f"w{prompt_id}.{turn}.{i}" for i in range(new_tokens)), "target": TARGET,
              "params": {"k": 3, "temperature": 0.0} if histogram is not None else {"temperature": 0.0},
              "resume_key": f"mt_bench/{prompt_id}/{turn}/{method}/abc", **counters}
    return ok_record(method, prompt_id, **fields | overrides)


def words(text: str) -> int:
    """speed.py's baseline token count, ``len(tokenizer(text).input_ids) - 1``, for a tokenizer that adds a BOS
    and reads one token per word."""
    return len([1] + text.split()) - 1


# prompt -> per turn: (baseline new_tokens, baseline wall_s, speculative histogram, speculative wall_s)
TWO_TURNS = {
    "1": [(12, 1.2, [1, 1, 2, 1], 0.5), (8, 0.9, [2, 0, 2], 0.6)],
    "2": [(10, 1.0, [3, 1, 0, 1], 0.7), (9, 0.8, [1, 2], 0.4)],
    "10": [(6, 0.5, [0, 0, 1, 1], 0.2), (11, 1.1, [2, 2, 2], 0.9)],
}


def two_turn_records() -> list[dict]:
    records = []
    for prompt, turns in TWO_TURNS.items():
        for turn, (base_tokens, base_wall, histogram, spec_wall) in enumerate(turns, start=1):
            records.append(record("baseline", prompt, turn, base_wall, new_tokens=base_tokens))
            records.append(record(SPEC, prompt, turn, spec_wall, histogram))
    # prompt 3: the speculative turn 2 failed, so neither file may list it (equal.py pairs lines by position)
    records += [record("baseline", "3", 1, 0.4, new_tokens=4), record("baseline", "3", 2, 0.4, new_tokens=4),
                record(SPEC, "3", 1, 0.3, [1, 1])]
    records.append({**records[-1], "turn": 2, "status": "error", "error": {"type": "E", "message": "m",
                                                                           "traceback": ""}})
    return records


def export(tmp_path, records, *extra) -> tuple[int, dict]:
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "spec_bench"
    status = main([str(path), "--out", str(out), *extra])
    files = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(out.glob("*.jsonl"))}
    return status, files


def speed_py(method_lines: list[dict], base_lines: list[dict]) -> tuple[float, float, float, float]:
    """Spec-Bench evaluation/speed.py's figures (task "overall"): tokens/s, baseline tokens/s, speedup, mean
    accepted tokens."""
    speeds = [sum(d["choices"][0]["new_tokens"]) / sum(d["choices"][0]["wall_time"]) for d in method_lines]
    accept_lengths = [n for d in method_lines for n in d["choices"][0]["accept_lengths"]]
    base_speeds = [sum(words(text) for text in d["choices"][0]["turns"]) / sum(d["choices"][0]["wall_time"])
                   for d in base_lines]
    return (np.mean(speeds), np.mean(base_speeds), np.mean(speeds) / np.mean(base_speeds), np.mean(accept_lengths))


def equal_py(lines_a: list[dict], lines_b: list[dict]) -> bool:
    """Spec-Bench evaluation/equal.py: str(turns) of each line, compared line by line."""
    return all(str(a["choices"][0]["turns"]) == str(b["choices"][0]["turns"]) for a, b in zip(lines_a, lines_b))


def test_answer_lines_have_spec_bench_fields(tmp_path, capsys):
    status, files = export(tmp_path, two_turn_records())
    assert status == 0
    assert sorted(files) == [BASE_NAME, SPEC_NAME]
    assert "1 question(s) left out of every file" in capsys.readouterr().err
    for name, lines in files.items():
        assert [line["question_id"] for line in lines] == [1, 2, 10]  # Spec-Bench's order: sorted ints
        for line in lines:
            assert set(line) == {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
            assert line["model_id"] == name and line["category"] == "writing" and len(line["answer_id"]) == 22
            (choice,) = line["choices"]
            assert set(choice) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
            assert choice["index"] == 0
            assert all(len(choice[key]) == 2 for key in ("turns", "decoding_steps", "new_tokens", "wall_time"))
    first = files[SPEC_NAME][0]["choices"][0]
    (*_, w1), (*_, w2) = TWO_TURNS["1"]
    assert first["new_tokens"] == [13, 8] and first["wall_time"] == [w1, w2] and first["decoding_steps"] == [5, 4]
    assert first["accept_lengths"] == [1, 2, 3, 3, 4] + [1, 1, 3, 3]  # each turn's histogram expanded, in order
    assert first["turns"][0].split()[0] == "w1.1.0" and first["turns"][1].split()[0] == "w1.2.0"
    assert files[BASE_NAME][0]["choices"][0]["accept_lengths"] == [1] * 20  # Spec-Bench's baseline convention
    assert equal_py(files[BASE_NAME], files[SPEC_NAME]) is False  # other texts (one word per token)
    assert equal_py(files[SPEC_NAME], files[SPEC_NAME])


def test_speed_py_on_the_export_gives_our_figures(tmp_path):
    records = two_turn_records()
    _, files = export(tmp_path, records)
    tokens_per_s, base_tokens_per_s, speedup, mean_accepted = speed_py(files[SPEC_NAME], files[BASE_NAME])

    def per_question(method: str) -> float:  # our records, the left-out prompt 3 excluded
        mine = [[r for r in records if r["method"] == method and r["prompt_id"] == p] for p in TWO_TURNS]
        return np.mean([sum(r["new_tokens"] for r in rs) / sum(r["wall_s"] for r in rs) for rs in mine])

    assert tokens_per_s == pytest.approx(per_question(SPEC))
    assert base_tokens_per_s == pytest.approx(per_question("baseline"))
    assert speedup == pytest.approx(per_question(SPEC) / per_question("baseline"))
    spec = [r for r in records if r["method"] == SPEC and r["prompt_id"] != "3"]
    cycles = sum(sum(r["acceptance_histogram"]) for r in spec)
    # vLLM's mean_acceptance_length over the same cycles: 1 + accepted drafts per verification
    assert mean_accepted == pytest.approx(1 + sum(r["accepted_tokens"] for r in spec) / cycles)
    assert speed_py(files[BASE_NAME], files[BASE_NAME])[3] == 1.0


def test_one_turn_speed_py_tokens_per_s_is_our_tokens_per_s_mean(tmp_path):
    records = [r for r in two_turn_records() if r["turn"] == 1]  # prompt 3 complete now
    _, files = export(tmp_path, records)
    tokens_per_s, base_tokens_per_s, speedup, _ = speed_py(files[SPEC_NAME], files[BASE_NAME])
    ours = {m: Totals([r for r in records if r["method"] == m]).aggregate()["tokens_per_s_mean"]
            for m in ("baseline", SPEC)}
    assert [line["question_id"] for line in files[SPEC_NAME]] == [1, 2, 3, 10]
    assert (tokens_per_s, base_tokens_per_s) == (pytest.approx(ours[SPEC]), pytest.approx(ours["baseline"]))
    assert speedup == pytest.approx(ours[SPEC] / ours["baseline"])


def test_configurations_get_files_named_apart_as_the_report_numbers_them(tmp_path):
    records = [r | {"fingerprint_id": f"{r['method'][0]}" * 10, "fingerprint": {"method": r["method"]}}
               for r in two_turn_records() if r["turn"] == 1]
    bf16 = {**TARGET, "dtype": "bfloat16"}
    records += [r | {"fingerprint_id": "c" * 10, "fingerprint": {"method": SPEC, "target": bf16},
                     "target": bf16, "wall_s": 0.25, "resume_key": r["resume_key"] + "-bf16"}
                for r in records if r["method"] == SPEC]
    status, files = export(tmp_path, records)
    assert status == 0
    report_rows = {r["method"] for r in make_section([read_results(tmp_path / "results.jsonl")], False).records}
    assert report_rows == {"baseline", f"{SPEC} #1", f"{SPEC} #2"}
    first, second = SPEC_NAME.replace("k-3", "k-3-config1"), SPEC_NAME.replace("k-3", "k-3-config2")
    assert sorted(files) == [BASE_NAME, first, second.replace("float32", "bfloat16")]
    # each configuration's file holds its own records only
    assert [line["choices"][0]["wall_time"] for line in files[second.replace("float32", "bfloat16")]] == [[0.25]] * 4
    assert [line["choices"][0]["wall_time"] for line in files[first]] == [[0.5], [0.7], [0.3], [0.2]]


def test_older_records_without_histogram_export_empty_accept_lengths(tmp_path, capsys):
    records = [{k: v for k, v in r.items() if k != "acceptance_histogram"} for r in two_turn_records()
               if r["turn"] == 1]
    status, files = export(tmp_path, records)
    assert status == 0
    assert all(line["choices"][0]["accept_lengths"] == [] for line in files[SPEC_NAME])
    assert files[BASE_NAME][0]["choices"][0]["accept_lengths"] == [1] * 12  # the baseline needs no histogram
    assert f"{SPEC}: 4 question(s) with records written before sp-samp recorded acceptance_histogram" in (
        capsys.readouterr().err)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_input_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "missing.jsonl does not exist: pass the path of a results JSONL" in one_line_error(capsys)
    errors_only = tmp_path / "errors.jsonl"
    errors_only.write_text(json.dumps({**record("baseline", "1", 1, 1.0, new_tokens=2), "status": "error"}) + "\n")
    assert main([str(errors_only), "--out", str(out)]) == 2
    assert "holds no ok record: nothing to export" in one_line_error(capsys)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main([str(errors_only), "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file: give a folder" in one_line_error(capsys)
    assert not out.exists()


def test_several_datasets_need_dataset(tmp_path, capsys):
    records = [r for r in two_turn_records() if r["turn"] == 1]
    records += [r | {"dataset": "gsm8k", "resume_key": r["resume_key"].replace("mt_bench", "gsm8k")} for r in records]
    status, files = export(tmp_path, records)
    assert status == 2 and files == {}
    assert "holds 2 datasets (gsm8k, mt_bench): Spec-Bench keeps one question set per folder; pass --dataset" in (
        one_line_error(capsys))
    status, _ = export(tmp_path, records, "--dataset", "humaneval")
    assert status == 2 and "use one of gsm8k, mt_bench" in one_line_error(capsys)
    status, files = export(tmp_path, records, "--dataset", "gsm8k")
    assert status == 0 and len(files[SPEC_NAME]) == 4
