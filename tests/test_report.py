"""src.report on hand-made results files: numbers equal a hand computation, plots are real PNGs, the HTML
embeds them, errors and truncated lines are counted, compare mode tells a real difference from noise."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from src.report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SYSTEM = {"git_sha": "0123456789abcdef", "hostname": "testhost", "python": "3.11.7", "torch": "2.13.0",
          "transformers": "5.0", "lightning": "2.6", "device": "cpu", "gpu_name": None, "cpu": "TestCPU",
          "num_threads": 2, "timestamp": "2026-01-01T00:00:00+00:00"}


def ok_record(method: str, prompt_id: str, **overrides) -> dict:
    record = {
        "run_id": "r1", "status": "ok", "error": None, "method": method, "dataset": "mt_bench",
        "prompt_id": prompt_id, "category": "writing", "turn": 1, "new_tokens": 8, "wall_s": 0.8,
        "tokens_per_s": 10.0, "target_calls": 8, "tokens_per_target_call": 1.0, "drafted_tokens": 0,
        "accepted_tokens": 0, "acceptance_rate": None, "accepted_per_position": [], "speedup": 1.0,
        "matches_baseline": True, "params": {}, "system": SYSTEM,
    }
    record |= overrides
    if "wall_s" not in overrides:  # consistent with tokens_per_s, as a real record is
        record["wall_s"] = record["new_tokens"] / record["tokens_per_s"]
    return record


def error_record(method: str, prompt_id: str) -> dict:
    return {"run_id": "r1", "status": "error", "method": method, "dataset": "mt_bench", "prompt_id": prompt_id,
            "category": "writing", "turn": 1, "params": {}, "system": SYSTEM,
            "error": {"type": "RuntimeError", "message": "CUDA out of memory\nmore", "traceback": "..."}}


def write(path, records, tail: str = "") -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(path)


# speculative: (prompt, category, speedup, tokens/s, new_tokens, target_calls, accepted, drafted, =base, correct)
SPECULATIVE = [
    ("1", "writing", 1.0, 10.0, 10, 5, 6, 8, True, True),
    ("2", "writing", 2.0, 20.0, 12, 4, 8, 8, False, None),
    ("3", "math", 4.0, 40.0, 9, 3, 6, 9, True, False),
    ("4", "math", 2.0, 21.0, 8, 4, 4, 8, True, True),
]


def spec_records() -> list[dict]:
    return [ok_record("speculative", p, category=c, speedup=s, tokens_per_s=t, new_tokens=n, target_calls=calls,
                      accepted_tokens=a, drafted_tokens=d, matches_baseline=m, answer_correct=correct,
                      accepted_per_position=[1.0, 0.5], accepted_counts_per_position=[2, 1],
                      drafted_counts_per_position=[2, 2])
            for p, c, s, t, n, calls, a, d, m, correct in SPECULATIVE]


def rich_records() -> list[dict]:
    """Every method kind, so that every plot has data."""
    records = [ok_record("baseline", p, category=c, answer_correct=p != "3") for p, c, *_ in SPECULATIVE]
    records += spec_records()
    records += [ok_record("specexec", p, category=c, tree_size_mean=size, accepted_tokens=acc, drafted_tokens=12,
                          target_calls=3, new_tokens=acc + 3, speedup=1.5, tokens_per_s=15.0)
                for (p, c, *_), size, acc in zip(SPECULATIVE, (8.0, 16.0, 12.0, 10.0), (5, 9, 7, 6))]
    for threshold, correct in ((0.3, (True, True, False, True)), (0.6, (True, False, False, True))):
        records += [ok_record(f"autojudge[threshold={threshold}]", p, category=c, params={"threshold": threshold},
                              answer_correct=ok, speedup=1.2, tokens_per_s=12.0, new_tokens=8, target_calls=2)
                    for (p, c, *_), ok in zip(SPECULATIVE, correct)]
    return records + [error_record("speculative", "5")]


def table_row(markdown: str, method: str, category: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) > 2 and cells[0] == method and cells[1] == category:
            return cells
    raise AssertionError(f"no row {method} / {category}")


def hand_bootstrap(speedups: list[float], seed: int, resamples: int) -> tuple[float, float]:
    """The procedure of the module docstring, written out with loops."""
    n = len(speedups)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=(resamples, n))
    log_means = [sum(math.log(speedups[j]) for j in row) / n for row in rows]
    low, high = np.percentile(log_means, [2.5, 97.5])
    return math.exp(low), math.exp(high)


@pytest.fixture(scope="module")
def rich_report(tmp_path_factory):
    base = tmp_path_factory.mktemp("rich")
    path = write(base / "results.jsonl", rich_records())
    assert main([path, "--out", str(base / "report"), "--seed", "7", "--bootstrap", "500"]) == 0
    return base / "report"


def test_summary_numbers_equal_a_hand_computation(rich_report):
    md = (rich_report / "report.md").read_text()
    row = table_row(md, "speculative", "all")
    # header: method category prompts tok/s "x base" speedup predicted tok/call "tok/call p10/p50/p90" accept
    # =base "near ties / mismatches" accuracy "= base answer" errors
    throughput = (10 + 12 + 9 + 8) / (10 / 10 + 12 / 20 + 9 / 40 + 8 / 21)  # total tokens / total time
    assert row[2] == "4"
    assert row[3] == f"{throughput:.2f}"
    assert row[4] == f"{throughput / 10.0:.3f}"  # the baseline: 10 tok/s on every prompt
    low, high = hand_bootstrap([1.0, 2.0, 4.0, 2.0], seed=7, resamples=500)
    assert low < 2.0 < high
    assert row[5] == f"{2.0:.3f} [{low:.3f}, {high:.3f}]"  # geomean of 1, 2, 4, 2 = 16 ** 0.25
    assert row[6] == "-"  # no cost profile in these records
    assert row[7] == f"{(10 + 12 + 9 + 8) / (5 + 4 + 3 + 4):.3f}"
    per_call = np.percentile([10 / 5, 12 / 4, 9 / 3, 8 / 4], [10, 50, 90])
    assert row[8] == " / ".join(f"{v:.2f}" for v in per_call)
    assert row[9] == f"{100 * (6 + 8 + 6 + 4) / (8 + 8 + 9 + 8):.1f}%"
    assert row[10] == "75.0%"
    assert row[11] == "0 / 0"
    assert row[12] == f"{100 * 2 / 3:.1f}%"  # the null answer_correct is not counted
    assert row[13] == "-"  # no record carries answer_matches_baseline
    assert row[14] == "1"

    writing = table_row(md, "speculative", "writing")
    low, high = hand_bootstrap([1.0, 2.0], seed=7, resamples=500)
    assert writing[2] == "2" and writing[14] == "1"
    assert writing[5] == f"{math.sqrt(2):.3f} [{low:.3f}, {high:.3f}]"
    math_row = table_row(md, "speculative", "math")
    assert math_row[5].startswith(f"{math.sqrt(8):.3f} [") and math_row[14] == "0"
    assert table_row(md, "baseline", "all")[9] == "-"  # nothing drafted: not applicable


def test_system_metadata_and_errors_listed(rich_report):
    md = (rich_report / "report.md").read_text()
    assert "| r1 | results.jsonl | testhost | cpu | TestCPU (2 threads) | 3.11.7 | 2.13.0 |" in md
    assert "0123456789ab" in md
    assert "## Errors (1)" in md
    assert "speculative prompt 5 turn 1: RuntimeError: CUDA out of memory" in md


def test_plots_are_valid_pngs_and_embedded_in_html(rich_report):
    from matplotlib.image import imread

    pngs = sorted(rich_report.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(["speedup", "acceptance_per_position", "specexec_tree",
                                             "tokens_per_call_vs_tokens_per_s", "autojudge_accuracy"])
    md = (rich_report / "report.md").read_text()
    page = (rich_report / "report.html").read_text()
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({png.name})" in md
    assert page.count("data:image/png;base64,") == len(pngs)
    assert 'src="speedup.png"' not in page  # self-contained: no file reference
    assert "<table>" in page and "<td>speculative</td>" in page


def test_error_records_and_truncated_line_are_counted(tmp_path, capsys):
    records = [ok_record("baseline", "1"), ok_record("baseline", "2"), error_record("baseline", "3"),
               error_record("speculative", "1")]
    path = write(tmp_path / "r.jsonl", records, tail='{"run_id": "r1", "sta')
    out = tmp_path / "report"
    assert main([path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and str(out / "report.html") in printed
    md = (out / "report.md").read_text()
    assert "4 records (2 ok, 2 error), 1 malformed line(s) - line 5: not valid JSON" in md
    assert table_row(md, "baseline", "all")[14] == "1"
    speculative = table_row(md, "speculative", "all")
    assert speculative[2] == "0" and speculative[3] == "-" and speculative[14] == "1"
    # no draft, no SpecExec, no AutoJudge: those plots are skipped with a note, not written empty
    assert "SpecExec tree size vs accepted tokens per target call: skipped" in md
    assert "AutoJudge accuracy vs tokens per target call: skipped" in md
    assert not (out / "specexec_tree.png").exists() and not (out / "autojudge_accuracy.png").exists()


def compare_records(tokens_per_s: dict[str, list[float]]) -> list[dict]:
    return [ok_record(method, str(i), tokens_per_s=t) for method, values in tokens_per_s.items()
            for i, t in enumerate(values)]


def test_compare_marks_a_real_difference_and_noise(tmp_path):
    a_speed = [10.0, 12.0, 9.0, 11.0, 10.5, 9.5]
    b_spec = [t * f for t, f in zip(a_speed, (1.9, 2.1, 2.0, 1.95, 2.05, 2.0))]
    b_base = [t * f for t, f in zip(a_speed, (1.02, 0.97, 1.01, 0.99, 1.03, 0.98))]
    a = write(tmp_path / "a.jsonl", compare_records({"baseline": a_speed, "speculative": a_speed}))
    b = write(tmp_path / "b.jsonl", compare_records({"baseline": b_base, "speculative": b_spec, "specexec": a_speed}))
    out = tmp_path / "report"
    assert main([a, b, "--compare", "--out", str(out), "--bootstrap", "500"]) == 0
    md = (out / "report.md").read_text()
    comparison = md.split("## Comparison: B / A")[1].split("\n## ")[0]
    spec = table_row(comparison, "speculative", "paired n=6")
    assert spec[4].startswith(f"{sum(b_spec) / sum(a_speed):.3f} [") and spec[5] == "B higher"
    assert spec[8] == "1.000 [1.000, 1.000]" and spec[9] == "within noise"  # same tokens per call
    base = table_row(comparison, "baseline", "paired n=6")
    assert base[4].startswith(f"{sum(b_base) / sum(a_speed):.3f} [") and base[5] == "within noise"
    assert "Only in B: specexec." in comparison
    assert "## A: " in md and "## B: " in md
    assert (out / "a_speedup.png").is_file() and (out / "b_speedup.png").is_file()


def test_missing_file_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main([str(missing), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "make predict" in err
    assert not (tmp_path / "report").exists()


def test_compare_needs_two_files(tmp_path, capsys):
    path = write(tmp_path / "r.jsonl", [ok_record("baseline", "1")])
    assert main([path, "--compare", "--out", str(tmp_path / "report")]) == 2
    assert "exactly two" in capsys.readouterr().err


def test_numbers_do_not_depend_on_other_rows():
    """Each statistic draws from a fresh generator: adding a method leaves the others' intervals alone."""
    from src.results.report.stats import stats_by_method_category

    alone = stats_by_method_category(spec_records(), seed=0, resamples=200)
    mixed = stats_by_method_category(rich_records(), seed=0, resamples=200)
    assert alone["speculative", "math"]["speedup_ci"] == mixed["speculative", "math"]["speedup_ci"]


def test_compare_without_common_prompts_resamples_each_side(tmp_path):
    a = write(tmp_path / "a.jsonl", [ok_record("speculative", str(i), tokens_per_s=10.0 + i) for i in range(5)])
    b = write(tmp_path / "b.jsonl", [ok_record("speculative", f"b{i}", tokens_per_s=30.0 + i) for i in range(4)])
    out = tmp_path / "report"
    assert main([a, b, "--compare", "--out", str(out), "--bootstrap", "300"]) == 0
    row = table_row((out / "report.md").read_text(), "speculative", "unpaired 5/4")
    assert row[4].startswith(f"{31.5 / 12.0:.3f} [") and row[5] == "B higher"


# --- settings: configurations split, duplicates, unreadable input -------------------------------------------

def fingerprint(method: str = "speculative", **changes) -> dict:
    """A run fingerprint as predict writes it; ``changes`` maps dotted keys to new values."""
    fp = {"method": method, "params": {"k": 4, "max_new_tokens": 64},
          "target": {"name_or_path": "t", "revision": None, "dtype": "float32", "quantization": "none"},
          "draft": {"name_or_path": "d", "revision": None, "dtype": "float32", "quantization": "none"},
          "prompt": {"chat_template": True, "chat_template_sha": "abc", "system_prompt": None,
                     "max_prompt_tokens": None},
          "files": {}}
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = fp
        for parent in parents:
            node = node[parent]
        node[last] = value
    return fp


def fingerprinted(method: str, prompt_id: str, fp: dict, **overrides) -> dict:
    fp_id = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]
    return ok_record(method, prompt_id, params=fp["params"], fingerprint=fp, fingerprint_id=fp_id,
                     resume_key=f"mt_bench/{prompt_id}/1/{method}/{fp_id}", **overrides)


def legacy(method: str, prompt_id: str, dtype: str, **overrides) -> dict:
    """A record written before fingerprints: params plus target/draft info dicts."""
    return ok_record(method, prompt_id, params={"k": 4}, resume_key=f"{prompt_id}/{method}/{dtype}",
                     target={"name": "t", "dtype": dtype, "quantization": "none", "device": "cpu"},
                     draft={"name": "d", "dtype": "float32", "quantization": "none"}, **overrides)


def summary(markdown: str) -> str:
    return markdown.split("## Summary by method and category")[1].split("\n## ")[0]


def test_legacy_records_with_other_settings_get_their_own_rows(tmp_path):
    records = [ok_record("baseline", str(i)) for i in range(3)]
    records += [legacy("speculative", str(i), "float32", tokens_per_s=10.0 + i) for i in range(3)]
    records += [legacy("speculative", str(i), "bfloat16", tokens_per_s=40.0) for i in range(2)]
    out = tmp_path / "report"
    assert main([write(tmp_path / "r.jsonl", records), "--out", str(out)]) == 0
    md = summary((out / "report.md").read_text())
    first, second = table_row(md, "speculative #1", "all"), table_row(md, "speculative #2", "all")
    assert (first[2], first[3]) == ("3", f"{24 / (8 / 10 + 8 / 11 + 8 / 12):.2f}")  # throughput: 8 tokens each
    assert (second[2], second[3]) == ("2", "40.00")
    assert table_row(md, "baseline", "all")[2] == "3"  # one configuration: the plain method name
    with pytest.raises(AssertionError):
        table_row(md, "speculative", "all")
    assert ("`speculative`: speculative #1 (3 records), speculative #2 (2 records) differ in "
            "target.dtype: float32 vs bfloat16\n") in md
    assert "target.device" not in md  # not a legacy settings field


def test_merge_configs_pools_and_names_the_difference(tmp_path):
    records = [legacy("speculative", str(i), "float32", tokens_per_s=10.0) for i in range(3)]
    records += [legacy("speculative", str(i), "bfloat16", tokens_per_s=40.0) for i in range(2)]
    out = tmp_path / "report"
    assert main([write(tmp_path / "r.jsonl", records), "--out", str(out), "--merge-configs"]) == 0
    md = summary((out / "report.md").read_text())
    row = table_row(md, "speculative", "all")
    assert (row[2], row[3]) == ("5", f"{5 * 8 / (3 * 8 / 10 + 2 * 8 / 40):.2f}")
    assert "#1" not in md.split("Settings differ")[0]
    assert ("`speculative`: 2 configurations (3 + 2 records) pooled in one row despite differing in "
            "target.dtype: float32 vs bfloat16") in md


def test_fingerprints_decide_the_configurations(tmp_path):
    base = fingerprint()
    longer = fingerprint(**{"params.max_new_tokens": 128, "prompt.system_prompt": "Be brief."})
    records = [fingerprinted("speculative", "1", base),
               fingerprinted("speculative", "2", base, target={"name": "t", "dtype": "other"}),
               fingerprinted("speculative", "1", longer), fingerprinted("speculative", "3", base)]
    out = tmp_path / "report"
    assert main([write(tmp_path / "r.jsonl", records), "--out", str(out)]) == 0
    md = summary((out / "report.md").read_text())
    # the target info dict differs on line 2 but its fingerprint is line 1's: same configuration
    assert table_row(md, "speculative #1", "all")[2] == "3"
    assert table_row(md, "speculative #2", "all")[2] == "1"
    note = md.split("`speculative`: ")[1].splitlines()[0]
    assert note.startswith("speculative #1 (3 records), speculative #2 (1 records) differ in "
                           "fingerprint_id: ")
    assert "; params.max_new_tokens: 64 vs 128; prompt.system_prompt: null vs Be brief." in note
    assert "target" not in note


def test_legacy_and_fingerprinted_records_of_one_method_compare_on_common_fields(tmp_path):
    """A file resumed after the update: old records lack the fingerprint, the same settings are one row."""
    new = fingerprinted("speculative", "2", fingerprint(**{"params": {"k": 4}}),
                        target={"name": "t", "dtype": "float32", "quantization": "none"},
                        draft={"name": "d", "dtype": "float32", "quantization": "none"})
    records = [legacy("speculative", "1", "float32"), new, legacy("speculative", "3", "bfloat16")]
    out = tmp_path / "report"
    assert main([write(tmp_path / "r.jsonl", records), "--out", str(out)]) == 0
    md = summary((out / "report.md").read_text())
    assert table_row(md, "speculative #1", "all")[2] == "2"
    assert table_row(md, "speculative #2", "all")[2] == "1"
    assert "differ in target.dtype: float32 vs bfloat16\n" in md


def test_compare_splits_each_side_and_pairs_rows_by_label(tmp_path):
    a = [legacy("speculative", str(i), "float32", tokens_per_s=10.0) for i in range(3)]
    a += [legacy("speculative", str(i), "bfloat16", tokens_per_s=20.0) for i in range(3)]
    b = [legacy("speculative", str(i), "float32", tokens_per_s=30.0) for i in range(3)]
    b += [legacy("speculative", str(i), "bfloat16", tokens_per_s=20.0) for i in range(3)]
    b += [legacy("speculative", str(i), "float16", tokens_per_s=5.0) for i in range(2)]
    out = tmp_path / "report"
    paths = [write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b)]
    assert main([*paths, "--compare", "--out", str(out), "--bootstrap", "200"]) == 0
    md = (out / "report.md").read_text()
    comparison = md.split("## Comparison: B / A")[1].split("\n## ")[0]
    assert table_row(comparison, "speculative #1", "paired n=3")[4].startswith("3.000")
    assert table_row(comparison, "speculative #2", "paired n=3")[4].startswith("1.000")
    assert "Only in B: speculative #3." in comparison
    assert "differ in target.dtype: float32 vs bfloat16 vs float16" in md.split("## B: ")[1]


def test_duplicated_records_count_once_with_a_warning(tmp_path, capsys):
    records = [legacy("speculative", str(i), "float32") for i in range(3)]
    again = dict(records[0])
    rerun = records[1] | {"run_id": "r2"}  # another run of the same key: a real record
    # another status: a real record
    failed = records[1] | {"status": "error", "error": error_record("speculative", "1")["error"]}
    path = write(tmp_path / "r.jsonl", [*records, again, dict(records[2]), rerun, failed])
    out = tmp_path / "report"
    assert main([path, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: 2 duplicated records (same run_id, resume_key) counted once: {path} lines 4, 5\n" in err
    md = (out / "report.md").read_text()
    row = table_row(summary(md), "speculative", "all")
    assert (row[2], row[14]) == ("4", "1")
    assert "7 records (6 ok, 1 error), 0 malformed line(s), 2 duplicated record(s)" in md
    assert "counted once: lines 4, 5" in md


def test_the_same_file_twice_counts_once_but_compare_keeps_both_sides(tmp_path, capsys):
    path = write(tmp_path / "r.jsonl", [legacy("speculative", str(i), "float32") for i in range(3)])
    out = tmp_path / "report"
    assert main([path, path, "--out", str(out)]) == 0
    assert f"counted once: {path} lines 1, 2, 3\n" in capsys.readouterr().err
    assert table_row(summary((out / "report.md").read_text()), "speculative", "all")[2] == "3"
    assert main([path, path, "--compare", "--out", str(out), "--bootstrap", "100"]) == 0
    assert "duplicated" not in capsys.readouterr().err
    assert table_row((out / "report.md").read_text(), "speculative", "paired n=3")[4].startswith("1.000")


@pytest.mark.parametrize("content", [PNG_SIGNATURE + b"\x00\x00\x00\rIHDR", b'{"method": "caf\xe9"}\n'],
                         ids=["binary", "latin-1"])
def test_binary_or_non_utf8_input_is_one_line_error(tmp_path, capsys, content):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    good = write(tmp_path / "good.jsonl", [ok_record("baseline", "1")])
    for argv in ([str(bad)], [good, str(bad), "--compare"]):
        assert main([*argv, "--out", str(tmp_path / "report")]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {bad} is not a UTF-8 text file (binary?): pass a results JSONL written by "
                       "python -m src predict\n")
    assert not (tmp_path / "report").exists()


def test_directory_input_is_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"results file {tmp_path} is not a file" in err


def test_autojudge_tradeoff_table_gives_cis_per_threshold(rich_report):
    md = (rich_report / "report.md").read_text()
    assert "AutoJudge: tokens per call vs answer quality" in md
    rows = {cells[0]: cells for line in md.splitlines()
            if len(cells := [c.strip() for c in line.strip("|").split(" | ")]) == 6}
    low = rows["autojudge[threshold=0.3]"]
    assert low[1:3] == ["0.3", "4"] and low[3].startswith("4.000")  # 8 tokens / 2 calls on every prompt
    assert low[5].startswith("0.750 [") and rows["autojudge[threshold=0.6]"][5].startswith("0.500 [")
    assert rows["baseline"][1] == "-" and rows["baseline"][4] == "-"  # no answer_matches_baseline on the baseline


def todays_records(cost_profile: bool = True) -> list[dict]:
    """A baseline and a speculative record as today's writer leaves them (records.ok_record on a generation with
    a time split, then the baseline comparison): equal outputs, so no divergence_class."""
    from src.decoding.stats import Generation, GenerationStats
    from src.results.records import compare_with_baseline
    from src.results.records import ok_record as build_ok_record

    records = []
    for method, cycles in (("baseline", []), ("speculative", [(3, 3)])):
        stats = GenerationStats(target_calls=4 - 3 * len(cycles), prefill_s=0.1, decode_s=0.3)
        for drafted, accepted in cycles:
            stats.record_step(drafted, accepted)
        stats.extra.update(target_s=0.3, draft_s=0.05, other_s=0.05)
        common = {"run_id": "r1", "resume_key": f"mt_bench/1/1/{method}/abc", "method": method,
                  "dataset": "mt_bench", "prompt_id": "1", "category": "writing", "turn": 1, "params": {},
                  "target": {"name": "t"}, "system": SYSTEM}
        record = build_ok_record(common, Generation([5, 6, 7, 2], stats, "eos"), "text")
        if cost_profile:
            record.update(predicted_target_s=0.25, predicted_draft_s=0.05, predicted_tokens_per_s=13.3,
                          unexplained_share=0.25, cost_profile={"context": 8, "target_ms": {"1": 1.0}})
        records.append(record)
    compare_with_baseline(records, greedy=True)
    return records


def test_records_of_todays_writer_are_not_called_older(tmp_path):
    records = todays_records()
    assert [r["matches_baseline"] for r in records] == [True, True] and "divergence_class" not in records[1]
    out = tmp_path / "report"
    assert main([write(tmp_path / "r.jsonl", records), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "written before" not in md and "no cost-profile prediction" not in md


def test_a_run_without_cost_profile_is_not_called_older():
    from src.results.report.plots import missing_fields_blocks

    notes = " ".join(block[1] for block in missing_fields_blocks(todays_records(cost_profile=False)))
    assert "written before" not in notes
    assert "measured no cost profile" in notes


def test_older_records_name_the_near_tie_check_only_where_it_applies():
    from src.results.report.plots import missing_fields_blocks

    def note(records):
        return " ".join(block[1] for block in missing_fields_blocks(records))

    older = rich_records()  # no time split; speculative prompt 2 is off the baseline on turn 1, unclassed
    assert "written before sp-samp recorded: time split (`target_s`), cost-profile prediction" in note(older)
    assert "near-tie check (`divergence_class`)" in note(older)
    equal = [r | {"matches_baseline": True} for r in older]
    off_by_design = [ok_record("autojudge[threshold=0.3]", "1", matches_baseline=False, first_divergence=2),
                     ok_record("speculative", "1", turn=2, matches_baseline=False, first_divergence=2)]
    for records in (equal, equal + off_by_design):  # a lossy method, or a later turn, is never classed
        assert "time split" in note(records) and "near-tie" not in note(records)


def test_x_base_is_taken_against_the_baseline_of_the_same_configuration(tmp_path):
    """Issue 27 item 4: two configurations (fp32 / bf16 target), each with its baseline, and a third without one."""
    def config(dtype: str, max_new_tokens: int = 64) -> tuple[dict, dict]:
        changes = {"target.dtype": dtype, "params.max_new_tokens": max_new_tokens}
        return (fingerprint("baseline", draft=None, files={}, **changes) | {"params": {"max_new_tokens": max_new_tokens}},
                fingerprint(**changes))

    (base32, spec32), (base16, spec16), (_, spec_long) = config("float32"), config("bfloat16"), config("float32", 128)
    def timed(method: str, prompt_id: str, fp: dict, tokens_per_s: float) -> dict:
        wall_s = 8 / tokens_per_s  # the drafter takes a quarter of it
        return fingerprinted(method, prompt_id, fp, tokens_per_s=tokens_per_s, target_s=wall_s / 2,
                             draft_s=wall_s / 4, other_s=wall_s / 4)

    records = []
    for i in ("1", "2"):
        records += [timed("baseline", i, base32, 10.0), timed("baseline", i, base16, 20.0),
                    timed("speculative", i, spec32, 30.0), timed("speculative", i, spec16, 30.0),
                    timed("speculative", i, spec_long, 50.0)]
    out = tmp_path / "report"
    assert main([write(tmp_path / "r.jsonl", records), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    ratios = {label: table_row(summary(md), label, "all")[4]
              for label in ("baseline #1", "baseline #2", "speculative #1", "speculative #2", "speculative #3")}
    assert ratios == {"baseline #1": "1.000", "baseline #2": "1.000", "speculative #1": "3.000",
                      "speculative #2": "1.500", "speculative #3": "-"}
    assert table_row(summary(md), "speculative #2", "writing")[4] == "1.500"
    assert "No baseline of the same configuration (target, prompt formatting, sampling) in the input for " \
           "`speculative #3`: their x base is `-`" in md
    times = {line.strip("|").split(" | ")[0].strip(): [c.strip() for c in line.strip("|").split(" | ")]
             for line in md.split("Where the time goes")[1].splitlines() if line.startswith("| ")}
    # x base, then x base with a free drafter: 30 tok/s without the drafter's quarter is 40, over bf16's 20
    assert times["speculative #2"][7:9] == ["1.500", "2.000"]
    assert times["speculative #3"][7:9] == ["-", "-"]


def test_prompts_of_one_name_decoded_from_different_texts_are_named_and_never_paired(tmp_path, capsys):
    """Two prompt files of the same name (or one edited between runs): records of one (dataset, prompt_id, turn)
    with different prompt_sha are pooled in one section with a warning naming them, and --compare pairs only the
    prompts whose text is the same on both sides."""
    old = [ok_record(m, p, prompt_sha=f"old{p}", tokens_per_s=10.0) for m in ("baseline", "speculative")
           for p in ("1", "2", "3")]
    new = [ok_record(m, p, run_id="r2", prompt_sha=f"old{p}" if p != "3" else "new3", tokens_per_s=20.0)
           for m in ("baseline", "speculative") for p in ("1", "2", "3")]
    a, b = write(tmp_path / "a.jsonl", old), write(tmp_path / "b.jsonl", new)
    assert main([a, b, "--out", str(tmp_path / "pooled")]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 prompts (dataset/prompt_id/turn) were decoded from different texts" in err
    assert "mt_bench/3/1" in err
    from src.results.report.compare import _by_key

    a_keys, b_keys = _by_key(old, "speculative").keys(), _by_key(new, "speculative").keys()
    assert len(a_keys & b_keys) == 2  # prompt 3 changed its text: not a pair
