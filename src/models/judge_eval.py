"""Does the trained judge know something? Its AUROC / AP on held-out prompts next to trivial judges', with CIs.

Every judge here is a score per mismatch where higher means "more likely important" (label 1):

- ``trained judge``: the exported head on its features (the paper's hidden states);
- ``always important``: a constant (AUROC 0.5, AP = the share of important labels): what a judge must beat;
- ``target top-1 probability``: p of the target's own token (a confident target makes swaps costly?);
- ``p-q gap of the draft token``: q(draft token) - p(draft token), how much more the draft likes its token;
- ``cheap features (logistic)``: a logistic judge on :data:`src.models.judge.STATS_FEATURES` (probabilities,
  entropies, position), trained on the same split: the cheap extra set, reported apart from the paper's.

A one-feature judge's direction (score or minus score) is chosen on the training labels, never on the test
labels. CIs are percentile intervals of a bootstrap over *prompts* (labels of one prompt are correlated, so
resampling single labels would make the intervals too narrow), paired across judges: the same resampled
prompts score every judge, so ``trained - best trivial`` has its own interval.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from src.models.judge import STATS_FEATURES, HeadType, JudgeHead, LabelSet

BOOTSTRAP_SAMPLES = 1000
CURVE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # shares of the training prompts behind each learning-curve point
TRAINED = "trained judge"


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(scores.float(), labels.long()))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.max() == 0:
        return float("nan")
    return float(binary_average_precision(scores.float(), labels.long()))


def oriented(name: str, train_scores: torch.Tensor, train_labels: torch.Tensor) -> tuple[str, float]:
    """(name, sign): a one-feature judge flipped when its training AUROC is below 0.5."""
    return (name, 1.0) if auroc(train_scores, train_labels) >= 0.5 else (f"{name} (reversed)", -1.0)


@dataclass
class JudgeFigures:
    name: str
    auroc: float
    auroc_ci: tuple[float, float]
    average_precision: float
    average_precision_ci: tuple[float, float]

    def row(self) -> dict:
        return {"judge": self.name, "auroc": round(self.auroc, 4), "auroc_ci": [round(x, 4) for x in self.auroc_ci],
                "average_precision": round(self.average_precision, 4),
                "average_precision_ci": [round(x, 4) for x in self.average_precision_ci]}


def bootstrap_figures(
    judges: dict[str, torch.Tensor], labels: torch.Tensor, prompts: Sequence[str], samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0, level: float = 0.95,
) -> tuple[list[JudgeFigures], dict[str, tuple[float, float, float]]]:
    """Figures of every judge on (labels, prompts) with prompt-bootstrap CIs, and, for each judge after the
    first, the AUROC difference first - judge as (point, low, high)."""
    by_prompt: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(row)
    groups = list(by_prompt.values())
    rng = random.Random(seed)
    draws: dict[str, list[tuple[float, float]]] = {name: [] for name in judges}
    for _ in range(samples):
        rows = torch.tensor([r for g in rng.choices(groups, k=len(groups)) for r in g])
        y = labels[rows]
        if y.min() == y.max():
            continue  # a resample with one class has no AUROC
        for name, scores in judges.items():
            draws[name].append((auroc(scores[rows], y), average_precision(scores[rows], y)))
    low, high = (1 - level) / 2, 1 - (1 - level) / 2

    def interval(values: list[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        ordered = sorted(values)
        return ordered[int(low * (len(ordered) - 1))], ordered[int(round(high * (len(ordered) - 1)))]

    figures = [JudgeFigures(name, auroc(s, labels), interval([d[0] for d in draws[name]]),
                            average_precision(s, labels), interval([d[1] for d in draws[name]]))
               for name, s in judges.items()]
    first = next(iter(judges))
    differences = {}
    for name in list(judges)[1:]:
        point = figures[0].auroc - next(f.auroc for f in figures if f.name == name)
        spread = [a[0] - b[0] for a, b in zip(draws[first], draws[name])]
        differences[name] = (point, *interval(spread))
    return figures, differences


def train_head(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, head: HeadType = "logistic",
    epochs: int = 60, learning_rate: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 64, seed: int = 0,
    class_weighting: bool = True,
) -> JudgeHead:
    """The fit recipe of :class:`src.lit.judge.AutoJudgeModule` in plain torch (standardize on train, AdamW, BCE
    with the important class weighted by #unimportant / #important, the epoch of best validation AUROC), for the
    judges trained only to be compared (cheap features, learning-curve points)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JudgeHead(train_x.shape[1], head)
    model.set_standardization(train_x.mean(0), train_x.std(0) if len(train_x) > 1 else torch.ones(train_x.shape[1]))
    share = float(train_y.mean())
    pos_weight = torch.tensor((1 - share) / share if class_weighting and 0 < share < 1 else 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    best, best_state = -1.0, copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train_x), generator=generator).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(model(train_x[batch]), train_y[batch], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            score = auroc(model(val_x), val_y)
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def format_table(figures: list[JudgeFigures], differences: dict[str, tuple[float, float, float]], labels: int,
                 important: int, prompts: int) -> str:
    lines = [f"judge evaluation on held-out prompts: {labels} labels ({important} important) from {prompts} prompts",
             f"{'judge':44s} {'AUROC [95% CI]':>22s} {'AP [95% CI]':>22s} {'trained - judge AUROC [CI]':>30s}"]
    for f in figures:
        diff = differences.get(f.name)
        shown = f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else ""
        lines.append(f"{f.name:44s} {f.auroc:8.3f} [{f.auroc_ci[0]:.3f}, {f.auroc_ci[1]:.3f}] "
                     f"{f.average_precision:8.3f} [{f.average_precision_ci[0]:.3f}, {f.average_precision_ci[1]:.3f}] "
                     f"{shown:>30s}")
    return "\n".join(lines)


def evaluate_judges(
    trained_test_scores: torch.Tensor, labels: LabelSet, features: torch.Tensor, rows: dict[str, torch.Tensor],
    recipe: dict, seed: int = 0, curve_fractions: Sequence[float] = CURVE_FRACTIONS,
) -> dict:
    """The comparison of the module docstring on the ``test`` rows, plus a learning curve: the trained judge's
    recipe refit on growing shares of the training prompts (``recipe``: :func:`train_head` keywords), each
    point's test AUROC with its CI. Returns a JSON-ready dict (``table`` holds the printed form)."""
    y = labels.labels
    train, val, test = rows["train"], rows["val"], rows["test"]
    test_prompts = [labels.prompt_ids[i] for i in test.tolist()]
    judges = {TRAINED: trained_test_scores.float(), "always important": torch.ones(len(test))}
    if labels.stats is not None:
        stats = labels.stats
        top1 = stats[:, STATS_FEATURES.index("p_target_token")]
        gap = stats[:, STATS_FEATURES.index("q_draft_token")] - stats[:, STATS_FEATURES.index("p_draft_token")]
        for name, score in (("target top-1 probability", top1), ("p-q gap of the draft token", gap)):
            shown, sign = oriented(name, score[train], y[train])
            judges[shown] = sign * score[test]
        cheap = train_head(stats[train], y[train], stats[val], y[val], **recipe, seed=seed)
        with torch.no_grad():
            judges["cheap features (logistic)"] = torch.sigmoid(cheap(stats[test]))
    figures, differences = bootstrap_figures(judges, y[test], test_prompts, seed=seed)
    curve = learning_curve(labels, features, rows, recipe, seed, curve_fractions)
    important = int(y[test].sum())
    table = format_table(figures, differences, len(test), important, len(set(test_prompts)))
    table += "\nlearning curve (same recipe on a share of the training prompts; test AUROC):\n" + "\n".join(
        f"  {c['train_labels']:6d} labels ({c['train_prompts']} prompts): {c['auroc']:.3f} "
        f"[{c['auroc_ci'][0]:.3f}, {c['auroc_ci'][1]:.3f}]" for c in curve)
    return {
        "test_labels": len(test), "test_important": important, "test_prompts": len(set(test_prompts)),
        "judges": [f.row() for f in figures],
        "trained_minus": {name: [round(v, 4) for v in d] for name, d in differences.items()},
        "learning_curve": curve, "table": table,
    }


def learning_curve(labels: LabelSet, features: torch.Tensor, rows: dict[str, torch.Tensor], recipe: dict, seed: int,
                   fractions: Sequence[float]) -> list[dict]:
    y, train, val, test = labels.labels, rows["train"], rows["val"], rows["test"]
    prompts = sorted({labels.prompt_ids[i] for i in train.tolist()})
    random.Random(seed).shuffle(prompts)
    test_prompts = [labels.prompt_ids[i] for i in test.tolist()]
    points = []
    for fraction in fractions:
        chosen = set(prompts[: max(1, round(fraction * len(prompts)))])
        subset = torch.tensor([i for i in train.tolist() if labels.prompt_ids[i] in chosen], dtype=torch.long)
        if y[subset].min() == y[subset].max():
            continue  # one class only: nothing to learn yet
        head = train_head(features[subset], y[subset], features[val], y[val], **recipe, seed=seed)
        with torch.no_grad():
            scores = torch.sigmoid(head(features[test]))
        figures, _ = bootstrap_figures({"point": scores}, y[test], test_prompts, samples=200, seed=seed)
        points.append({"train_labels": len(subset), "train_prompts": len(chosen), "auroc": round(figures[0].auroc, 4),
                       "auroc_ci": [round(x, 4) for x in figures[0].auroc_ci]})
    return points
