"""src.tools.tune: the chain model's arithmetic, and an end-to-end tuning run on a tiny model pair."""

from __future__ import annotations

import pytest
import yaml
from conftest import write_tiny_predict_config
from test_auto import auto_config

from src.decoding.profile import chain_prediction
from src.tools.tune import main, survival_curve


def test_chain_prediction_formula_and_tail():
    flat = lambda n: 100.0  # noqa: E731 - a target whose forward costs the same for any n
    per_call, rate = chain_prediction([0.8, 0.6, 0.3], 2, flat, draft_ms_per_token=10.0, harness_ms_per_call=5.0)
    assert per_call == pytest.approx(1 + 0.8 + 0.6)
    assert rate == pytest.approx(2.4 / ((100 + 2 * 10 + 5) / 1000))
    per_call, _ = chain_prediction([0.8, 0.4], 4, flat, 0.0, 0.0)  # tail continues the last ratio 0.5
    assert per_call == pytest.approx(1 + 0.8 + 0.4 + 0.2 + 0.1)
    # a costlier draft moves the best k down
    best = {cost: max(range(1, 9), key=lambda k: chain_prediction([0.9 ** i for i in range(1, 9)], k, flat, cost,
                                                                 0.0)[1]) for cost in (1.0, 40.0)}
    assert best[40.0] < best[1.0]


def test_survival_curve_pools_records():
    records = [{"accepted_counts_per_position": [3, 1], "drafted_counts_per_position": [4, 4]},
               {"accepted_counts_per_position": [1], "drafted_counts_per_position": [2, 2, 2]}]
    assert survival_curve(records) == pytest.approx([4 / 6, 1 / 6, 0.0])


def test_tune_writes_a_config_with_the_best_k(tmp_path, capsys):
    config = write_tiny_predict_config(tmp_path, limit=4, new_tokens=8)
    out = tmp_path / "tuned.yaml"
    assert main(["--config", str(config), "--prompts", "2", "--ks", "1", "2", "4", "--out", str(out),
                 "--verify", "1"]) == 0
    printed = capsys.readouterr().out
    assert "<- best" in printed and "the pick measured" in printed
    tuned = yaml.safe_load(out.read_text())
    k = tuned["model"]["init_args"]["methods"][1]["init_args"]["k"]
    assert k in (1, 2, 4) and f"{k:>18}" in printed.split("<- best")[0].splitlines()[-1]


def test_tune_chooses_an_auto_draft_copy_as_predict_would_then_tunes_k(tmp_path, capfd):
    config = auto_config(tmp_path)  # draft `target` with quantization auto, k: auto, a SpecExec of auto shape
    out = tmp_path / "tuned.yaml"
    assert main(["--config", str(config), "--prompts", "1", "--ks", "1", "2", "--out", str(out)]) == 0
    assert "auto: calibrating" in capfd.readouterr().err
    tuned = yaml.safe_load(out.read_text())
    assert tuned["model"]["init_args"]["methods"][1]["init_args"]["k"] in (1, 2)


def test_tune_refuses_a_config_without_a_draft_method(tmp_path, capsys):
    config = write_tiny_predict_config(tmp_path, limit=2)
    text = config.read_text().replace("      - class_path: src.decoding.speculative.SpeculativeSampling\n"
                                      "        init_args: {k: 2}\n", "")
    config.write_text(text)
    assert main(["--config", str(config), "--prompts", "1"]) == 2
    assert "no speculative or specexec method to tune" in capsys.readouterr().err
