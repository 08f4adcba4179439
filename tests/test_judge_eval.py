"""The judge evaluation: AUROC / AP with prompt-bootstrap CIs, trivial judges oriented on training labels only,
the plain-torch fit recipe, and the learning curve."""

from __future__ import annotations

import pytest
import torch

from src.models.judge import STATS_FEATURES, LabelSet
from src.models.judge_eval import (
    TRAINED,
    auroc,
    bootstrap_figures,
    evaluate_judges,
    oriented,
    train_head,
)


def test_auroc_of_known_orders():
    labels = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert auroc(torch.ones(4), labels) == 0.5  # a constant judge ranks nothing
    assert auroc(torch.rand(3), torch.ones(3)) != auroc(torch.rand(3), torch.ones(3))  # NaN: one class has no AUROC


def test_bootstrap_intervals_hold_the_point_and_pair_the_judges():
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, generator=generator) < 0.6).float()
    good = labels + torch.randn(400, generator=generator)  # informative
    noise = torch.randn(400, generator=generator)
    prompts = [f"p{i // 10}" for i in range(400)]
    figures, differences = bootstrap_figures({"good": good, "noise": noise}, labels, prompts, samples=300)
    by_name = {f.name: f for f in figures}
    for f in figures:
        assert f.auroc_ci[0] <= f.auroc <= f.auroc_ci[1] and 0 <= f.auroc_ci[0] and f.auroc_ci[1] <= 1
    assert by_name["good"].auroc > 0.7 and by_name["noise"].auroc_ci[0] < 0.5 < by_name["noise"].auroc_ci[1]
    point, low, high = differences["noise"]
    assert point == pytest.approx(by_name["good"].auroc - by_name["noise"].auroc) and 0 < low <= point <= high


def test_one_feature_judges_are_oriented_on_training_labels():
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert oriented("top-1", torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == ("top-1 (reversed)", -1.0)
    assert oriented("top-1", torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == ("top-1", 1.0)


def separable_set(n_prompts: int = 40, per_prompt: int = 10, seed: int = 0) -> tuple[LabelSet, torch.Tensor]:
    """Labels a linear function of hidden feature 0; stats carry a weak signal in p_target_token."""
    generator = torch.Generator().manual_seed(seed)
    n = n_prompts * per_prompt
    hidden = torch.randn(n, 6, generator=generator)
    labels = (hidden[:, 0] + 0.3 * torch.randn(n, generator=generator) > -0.3).float()
    stats = torch.rand(n, len(STATS_FEATURES), generator=generator)
    stats[:, 0] = 0.5 * stats[:, 0] + 0.5 * labels * torch.rand(n, generator=generator)
    prompt_ids = [f"p{i // per_prompt}" for i in range(n)]
    return LabelSet(hidden[:, :3], hidden[:, 3:], labels, prompt_ids, [{}] * n, stats), hidden


def rows_by_prompt(labels: LabelSet) -> dict[str, torch.Tensor]:
    number = torch.tensor([int(p[1:]) for p in labels.prompt_ids])
    return {"train": (number < 24).nonzero().squeeze(-1), "val": ((number >= 24) & (number < 32)).nonzero().squeeze(-1),
            "test": (number >= 32).nonzero().squeeze(-1)}


RECIPE = {"head": "logistic", "epochs": 30, "learning_rate": 0.05, "weight_decay": 0.0, "batch_size": 32,
          "class_weighting": True}


def test_train_head_learns_a_separable_rule_and_is_deterministic():
    labels, hidden = separable_set()
    rows = rows_by_prompt(labels)
    heads = [train_head(hidden[rows["train"]], labels.labels[rows["train"]], hidden[rows["val"]],
                        labels.labels[rows["val"]], **RECIPE) for _ in range(2)]
    with torch.no_grad():
        scores = [h(hidden[rows["test"]]) for h in heads]
    torch.testing.assert_close(scores[0], scores[1])
    assert auroc(scores[0], labels.labels[rows["test"]]) > 0.9


def test_evaluation_puts_the_trained_judge_beside_trivial_ones():
    labels, hidden = separable_set()
    rows = rows_by_prompt(labels)
    head = train_head(hidden[rows["train"]], labels.labels[rows["train"]], hidden[rows["val"]],
                      labels.labels[rows["val"]], **RECIPE)
    with torch.no_grad():
        trained = torch.sigmoid(head(hidden[rows["test"]]))
    report = evaluate_judges(trained, labels, hidden, rows, RECIPE, curve_fractions=(0.25, 1.0))
    judges = {row["judge"]: row for row in report["judges"]}
    assert list(judges)[0] == TRAINED and judges[TRAINED]["auroc"] > 0.9
    assert judges["always important"]["auroc"] == 0.5
    assert judges["always important"]["average_precision"] == pytest.approx(float(labels.labels[rows["test"]].mean()),
                                                                         abs=1e-4)
    assert 0.5 < judges["target top-1 probability"]["auroc"] < judges[TRAINED]["auroc"]
    assert all(report["trained_minus"][name][1] > 0 for name in ("always important", "target top-1 probability"))
    assert [p["train_labels"] for p in report["learning_curve"]] == [60, 240]
    assert report["test_labels"] == 80 and report["test_prompts"] == 8
    assert "learning curve" in report["table"] and "trained judge" in report["table"]
