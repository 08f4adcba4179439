"""``k: auto``, ``budget/max_depth: auto`` and ``quantization: auto`` of the draft (src.lit.auto): what the greedy
replay predicts, what a run records, and that a resume reuses the recorded choice."""

from __future__ import annotations

import json

import pytest
from conftest import write_tiny_predict_config

from src.__main__ import main
from src.decoding import SpecExec, SpeculativeSampling
from src.decoding.profile import greedy_survival
from src.decoding.specexec import AUTO_SHAPES
from src.errors import InvalidParameterError
from src.results.check import check_file


def test_greedy_replay_counts_cycles_as_a_chain_verifier_would():
    # agreement: T T F T T T F F T ; k=2 cycles start at 0 (accepts 2, emits the target's token 2), 3 (accepts 2,
    # emits 5), 6 (accepts 0, emits 6), 7 (accepts 0, emits 7), 8 (offers 1 at the end, accepts it)
    agreement = [True, True, False, True, True, True, False, False, True]
    assert greedy_survival([agreement], 2) == [3 / 5, 2 / 4]
    assert greedy_survival([[True] * 6], 1) == [1.0]
    assert greedy_survival([[False] * 4], 3) == [0.0, 0.0, 0.0]
    # sequences are replayed apart: no cycle runs from the end of one into the next
    assert greedy_survival([[True, True], [True, False]], 2) == [2 / 2, 1 / 2]


def test_auto_parameters_are_declared_and_checked_when_resolved():
    chain, tree = SpeculativeSampling(k="auto", max_k=4), SpecExec(budget="auto", max_depth="auto")
    assert chain.auto_params() == ["k"] and tree.auto_params() == ["budget", "max_depth"]
    assert chain.verify_width() == 5 and tree.verify_width() == max(b for b, _ in AUTO_SHAPES) + 1
    with pytest.raises(InvalidParameterError, match="k=0"):
        chain.resolve({"k": 0})
    with pytest.raises(InvalidParameterError, match=r"\['schedule'\] are not 'auto'"):
        chain.resolve({"schedule": 3})
    with pytest.raises(InvalidParameterError, match="a tree shape is chosen as a whole"):
        SpecExec(budget="auto", max_depth=4)
    with pytest.raises(InvalidParameterError, match="k='auto' chooses one constant chain length"):
        SpeculativeSampling(k="auto", schedule="heuristic")


def auto_config(tmp_path):
    """The tiny predict config with a self-draft of quantization auto, k: auto and a SpecExec of auto shape."""
    path = write_tiny_predict_config(tmp_path, limit=2, new_tokens=8)
    text = path.read_text()
    text = text.replace("draft: {name_or_path: " + text.split("draft: {name_or_path: ")[1].split(",")[0],
                        "draft: {name_or_path: target")
    text = text.replace("dtype: bfloat16, device: cpu}", "quantization: auto, device: cpu}")
    text = text.replace("init_args: {k: 2}", "init_args: {k: auto, max_k: 3}\n"
                        "      - class_path: src.decoding.specexec.SpecExec\n"
                        "        init_args: {budget: auto, max_depth: auto}")
    path.write_text(text)
    return path


def test_a_run_records_its_choices_and_a_resume_reuses_them(tmp_path, capfd):
    config, output = auto_config(tmp_path), tmp_path / "results.jsonl"
    assert main(["predict", "--config", str(config), "--output", str(output)]) == 0
    err = capfd.readouterr().err
    assert "auto: calibrating on 2 prompts of the run" in err and "speculative: k=" in err and "specexec: budget=" in err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    chains = [r for r in records if r["method"] == "speculative"]
    trees = [r for r in records if r["method"] == "specexec"]
    assert len(chains) == len(trees) == 2 and all(r["status"] == "ok" for r in records)
    k = chains[0]["params"]["k"]
    assert k in (1, 2, 3) and chains[0]["fingerprint"]["params"]["k"] == "auto"
    assert chains[0]["auto_choice"]["values"] == {"k": k}
    assert (trees[0]["params"]["budget"], trees[0]["params"]["max_depth"]) in AUTO_SHAPES
    draft = chains[0]["auto_choice"]["draft"]
    assert chains[0]["draft"]["quantization"] == draft["quantization"]
    assert chains[0]["draft"]["dtype"] == draft["dtype"]
    assert chains[0]["fingerprint"]["draft"]["quantization"] == "auto"
    assert all(r["matches_baseline"] for r in chains + trees)  # lossless whatever was chosen
    assert check_file(output, strict=True)[0] == []
    # a resume with one more prompt measures nothing again: the file's choices are applied
    assert main(["predict", "--config", str(config), "--output", str(output), "--resume", "true",
                 "--data.limit", "3"]) == 0
    err = capfd.readouterr().err
    assert "calibrating" not in err and "(as recorded in the results file)" in err
    resumed = [json.loads(line) for line in output.read_text().splitlines()][len(records):]
    assert resumed and all(r["params"]["k"] == k for r in resumed if r["method"] == "speculative")
    assert all(r["auto_choice"]["draft"] == draft for r in resumed if r["method"] != "baseline")
