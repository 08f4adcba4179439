"""The AutoJudge judge: a small classifier over hidden-state features that says whether a draft/target
mismatch is *important* (would change the final answer) -- Garipov et al. 2025, "AutoJudge: Judge Decoding
Without Manual Annotation".

Label convention: 1 = important (the target's token must be kept), 0 = unimportant (the draft token may stay).
The judge outputs P(important); a mismatch is let through when that probability is below ``threshold``.

Exported as two files side by side: ``<path>.safetensors`` (head weights and the feature mean / std) and
``<path>.json`` (head type, feature layout, threshold, validation figures, and the target / draft the judge was
trained for). Never pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from src.errors import IncompatibleModelsError, InvalidParameterError, MissingInputError

# The cheap per-mismatch features label mining keeps (src.data.mining) and the logistic baseline judge reads.
STATS_FEATURES = ("p_target_token", "p_draft_token", "q_draft_token", "q_target_token", "entropy_p", "entropy_q",
                  "position", "position_share")


@dataclass
class LabelSet:
    """All mined mismatches: features (n, Hd) and (n, Ht), labels (n,), the prompt of each row, and the cheap
    features (n, len(STATS_FEATURES)) (None for a store mined before they were kept)."""

    draft_hidden: torch.Tensor
    target_hidden: torch.Tensor
    labels: torch.Tensor
    prompt_ids: list[str]
    rows: list[dict[str, Any]]
    stats: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.numel()


HeadType = Literal["logistic", "mlp"]
FeatureLayout = Literal["draft+target", "target"]
PAIR_FIELDS = ("name", "dtype", "quantization")  # what identifies a model for the judge


class JudgeHead(nn.Module):
    """Standardize features with fixed (train-set) mean / std, then a linear layer or a one-hidden-layer MLP."""

    def __init__(self, in_features: int, head: HeadType = "logistic", hidden_size: int = 256, dropout: float = 0.1):
        super().__init__()
        if head not in ("logistic", "mlp"):
            raise InvalidParameterError(f"judge head {head!r} is unknown: use 'logistic' or 'mlp'")
        self.head_type = head
        self.hidden_size = hidden_size
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        if head == "logistic":
            self.net = nn.Linear(in_features, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_size, 1)
            )

    @property
    def in_features(self) -> int:
        return self.mean.numel()

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))  # a constant feature must not divide by zero

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (n, in_features) -> logits (n,) of P(important)."""
        x = (features.to(self.mean.dtype) - self.mean) / self.std
        return self.net(x).squeeze(-1)


def select_threshold(scores: torch.Tensor, labels: torch.Tensor, recall_target: float = 0.9) -> float:
    """The largest threshold t such that recall of important mismatches, P(score >= t | important), is >= target.

    With the important scores sorted ascending s_1 <= ... <= s_n, keeping m = ceil(target * n) of them flagged
    means t = s_(n - m + 1): every important score from there up is >= t. A mismatch is let through when its
    score is *below* t. No important example at all: nothing needs protecting, t = 1 (everything through
    except scores of exactly 1).
    """
    if not 0.0 < recall_target <= 1.0:
        raise InvalidParameterError(f"recall_target={recall_target} is invalid: use a value in (0, 1]")
    important = scores[labels.bool()].sort().values
    n = important.numel()
    if n == 0:
        return 1.0
    m = math.ceil(recall_target * n - 1e-9)
    return float(important[n - m])


def pair_identity(info: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if info is None else {key: info.get(key) for key in PAIR_FIELDS}


class Judge:
    """A trained head plus what is needed to use it safely: threshold, feature layout, and the model pair."""

    def __init__(
        self,
        head: JudgeHead,
        threshold: float,
        feature_layout: FeatureLayout,
        target: dict[str, Any] | None,
        draft: dict[str, Any] | None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        self.head = head.eval()
        self.threshold = threshold
        self.feature_layout = feature_layout
        self.target = pair_identity(target)
        self.draft = pair_identity(draft)
        self.metrics = metrics or {}

    def features(self, draft_hidden: torch.Tensor, target_hidden: torch.Tensor) -> torch.Tensor:
        """(n, Hd), (n, Ht) -> (n, in_features) in the layout the judge was trained on."""
        if self.feature_layout == "target":
            return target_hidden
        return torch.cat([draft_hidden.to(target_hidden.device, target_hidden.dtype), target_hidden], dim=-1)

    @torch.no_grad()
    def score(self, draft_hidden: torch.Tensor, target_hidden: torch.Tensor) -> torch.Tensor:
        """P(important) for each row: (n,)."""
        features = self.features(draft_hidden, target_hidden)
        head_param = self.head.mean
        return torch.sigmoid(self.head(features.to(head_param.device, head_param.dtype)))

    # ---- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[Path, Path]:
        from safetensors.torch import save_file

        weights, meta = judge_files(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.head.state_dict().items()}
        save_file(state, str(weights))
        meta.write_text(json.dumps({
            "format": "sp-samp-autojudge-judge/1",
            "head": self.head.head_type,
            "hidden_size": self.head.hidden_size,
            "in_features": self.head.in_features,
            "feature_layout": self.feature_layout,
            "threshold": self.threshold,
            "target": self.target,
            "draft": self.draft,
            "metrics": self.metrics,
        }, indent=2) + "\n")
        return weights, meta

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        from safetensors.torch import load_file

        weights, meta_path = judge_files(path)
        if not weights.is_file() or not meta_path.is_file():
            raise MissingInputError(
                f"no judge at {path} (expected {weights.name} and {meta_path.name}): train one with "
                "`python -m src fit --config configs/autojudge.yaml`, or set judge_path"
            )
        meta = json.loads(meta_path.read_text())
        head = JudgeHead(meta["in_features"], meta["head"], meta["hidden_size"])
        head.load_state_dict(load_file(str(weights)))
        return cls(head, meta["threshold"], meta["feature_layout"], meta["target"], meta["draft"], meta.get("metrics"))

    def check_pair(self, target: dict[str, Any] | None, draft: dict[str, Any] | None) -> None:
        """Refuse a judge trained on other models: its features would mean something else."""
        for role, trained, now in (("target", self.target, pair_identity(target)), ("draft", self.draft, pair_identity(draft))):
            if trained != now:
                raise IncompatibleModelsError(
                    f"the judge was trained for {role} {trained} but this run's {role} is {now}: "
                    "train a judge for this pair (`python -m src fit --config configs/autojudge.yaml` with the same "
                    "model settings) or point judge_path at one"
                )


def judge_files(path: str | Path) -> tuple[Path, Path]:
    """``artifacts/judge`` -> (``artifacts/judge.safetensors``, ``artifacts/judge.json``)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")
