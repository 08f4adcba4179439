"""Counters every method fills in, and the result type of ``method.generate``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    """What a generation cost and how speculation went.

    ``accepted_per_step`` holds, for each target verification, how many *draft* tokens were accepted;
    ``accepted_per_position[i]`` counts steps whose i-th draft token was accepted, ``drafted_per_position[i]``
    steps that offered an i-th draft token (their ratio is the per-position acceptance curve).
    """

    target_calls: int = 0
    draft_calls: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    # prefill_s: time to the first emitted token(s), decode_s: everything after it (src.decoding.timing)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def record_step(self, drafted: int, accepted: int) -> None:
        """One verification: ``drafted`` draft tokens offered along the chosen path, ``accepted`` of them kept."""
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.accepted_per_step.append(accepted)
        for counts, upto in ((self.drafted_per_position, drafted), (self.accepted_per_position, accepted)):
            while len(counts) < upto:
                counts.append(0)
            for i in range(upto):
                counts[i] += 1

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


@dataclass
class Generation:
    """Output of ``method.generate``: the new token ids (prompt excluded) and the statistics."""

    tokens: list[int]
    stats: GenerationStats
    stopped_by: str = "max_new_tokens"  # or "eos"

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_target_call(self) -> float | None:
        return self.new_tokens / self.stats.target_calls if self.stats.target_calls else None
