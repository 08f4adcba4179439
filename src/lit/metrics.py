"""Per-method decoding metrics as torchmetrics ``Metric``s (summed states, so they reduce across processes).

One :class:`DecodingMetrics` per method key is updated with that method's ``ok`` / ``error`` records. Its states
are the summed counters of :mod:`src.results.schema` and ``compute`` is :func:`src.results.schema.aggregate`: the console table,
wandb and ``src.report`` print the same value under the same name (:mod:`src.results.summary` adds
``throughput_ratio`` and formats the console table).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from src.results.schema import MAX_POSITIONS, MAXED, SUMS, aggregate, contributions


class DecodingMetrics(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in SUMS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in MAXED:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("accepted_at", default=torch.zeros(MAX_POSITIONS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("drafted_at", default=torch.zeros(MAX_POSITIONS, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, record: dict[str, Any]) -> None:
        sums, accepted, drafted = contributions(record)
        for name in SUMS:
            setattr(self, name, getattr(self, name) + sums[name])
        for name in MAXED:
            setattr(self, name, torch.clamp(getattr(self, name), min=sums[name]))
        for i, (a, d) in enumerate(zip(accepted, drafted)):
            self.accepted_at[i] += a
            self.drafted_at[i] += d

    def compute(self) -> dict[str, Any]:
        sums = {name: float(getattr(self, name)) for name in SUMS + MAXED}
        return aggregate(sums, self.accepted_at.tolist(), self.drafted_at.tolist())
