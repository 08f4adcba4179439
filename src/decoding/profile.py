"""The cost model of draft-then-verify decoding: measured once per run, then used to predict every record.

A draft method's time per generation is, to first order,

    time = sum_n F_target(n) * T(n)  +  sum_n F_draft(n) * D(n)  +  S * drafter steps  +  harness overhead

where F_target(n) is how many target forwards scored n tokens at once (recorded by the time split's hooks),
T(n) the target's latency for n tokens at the run's context length, D(n) the draft model's, and S the cost of one
step of a drafter without a draft model (an EAGLE head, a lookup). :func:`measure_profile` measures T, D and S
before the first prompt (20-45 s on a 2-core CPU); :func:`predict` applies the formula to one record's counters and
returns the predicted seconds and tokens/s. What it does not predict (sampling, acceptance, cache rollback,
tree building, Python) shows as the record's ``unexplained_share``; the what-if figures drop one term at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from src.decoding.base import input_device, model_logits, model_logits_and_hidden
from src.decoding.kv import cache_length, new_cache, truncate_cache
from src.decoding.sampling import SamplingConfig
from src.decoding.timing import synchronize

REPEATS = 3  # timed forwards per size (after one warm-up); the median is kept
DRAFT_CHAIN = 8  # tokens a drafter proposes per timed step


@dataclass
class CostProfile:
    """Measured latencies. ``target_ms`` / ``draft_ms``: {tokens per forward: ms} after ``context`` cached tokens;
    ``drafter_ms``: {drafter name: ms per proposed token} for drafters without a draft model."""

    context: int
    target_ms: dict[int, float]
    draft_ms: dict[int, float] = field(default_factory=dict)
    drafter_ms: dict[str, float] = field(default_factory=dict)
    # forwards with a 4D tree mask (SpecExec's verification and growth): another, slower attention path
    target_tree_ms: dict[int, float] = field(default_factory=dict)
    draft_tree_ms: dict[int, float] = field(default_factory=dict)
    draft_step_overhead_ms: float = 0.0  # a draft model's proposal step beyond its forward (argmax, cache)
    measured_s: float = 0.0

    TABLES = ("target_ms", "draft_ms", "target_tree_ms", "draft_tree_ms")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in self.TABLES:
            data[name] = {str(n): round(ms, 4) for n, ms in data[name].items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostProfile:
        tables = {name: {int(n): float(v) for n, v in (data.get(name) or {}).items()} for name in cls.TABLES}
        return cls(context=int(data["context"]), drafter_ms=dict(data.get("drafter_ms") or {}),
                   draft_step_overhead_ms=float(data.get("draft_step_overhead_ms", 0.0)),
                   measured_s=float(data.get("measured_s", 0.0)), **tables)


def interpolate(table: Mapping[int, float], n: int) -> float:
    """ms for n tokens: exact where measured, linear between neighbours, linear extrapolation past the ends."""
    if n in table:
        return table[n]
    sizes = sorted(table)
    if len(sizes) == 1:
        return table[sizes[0]] * n / sizes[0]
    below = [s for s in sizes if s < n]
    above = [s for s in sizes if s > n]
    a, b = (below[-1], above[0]) if below and above else ((sizes[-2], sizes[-1]) if below else (sizes[0], sizes[1]))
    return max(0.0, table[a] + (table[b] - table[a]) * (n - a) / (b - a))


def profile_sizes(largest_verify: int, longest_prompt: int) -> list[int]:
    """Every n up to the largest verification (small-n latency is not smooth on CPUs: GEMM kernels change with
    n), then doublings up to the longest prompt (the prefill forward)."""
    sizes = list(range(1, max(1, largest_verify) + 1))
    n = sizes[-1]
    while n < longest_prompt:
        n = min(2 * n, longest_prompt)
        sizes.append(n)
    return sizes


def chain_as_tree_mask(cached: int, n: int, device: torch.device) -> torch.Tensor:
    """A 4D mask (1, 1, n, cached + n) of n new tokens forming one branch: what SpecExec passes for a tree (any
    tree's mask takes the same attention path)."""
    mask = torch.ones(1, 1, n, cached + n, dtype=torch.bool, device=device)
    mask[0, 0, :, cached:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask


def forward_latency(model, context: torch.Tensor, sizes: Iterable[int], repeats: int = REPEATS,
                    tree: bool = False) -> dict[int, float]:
    """Median ms of one forward of n tokens after ``context`` (1, c) is cached, for each n in ``sizes``; the cache
    is cut back to the context after each forward, as a rejected draft is. ``tree``: with a 4D tree mask and
    explicit positions, as SpecExec's forwards run."""
    device = input_device(model)
    context = context.to(device)
    cache = new_cache()
    with torch.no_grad():
        model_logits(model, context, cache, logits_to_keep=1)
        cached = cache_length(cache)
        sizes = sorted(set(sizes))
        filler = context.repeat(1, -(-max(sizes) // context.shape[1]))[:, : max(sizes)]
        latency = {}
        for size in sizes:
            seconds = []
            mask = positions = None
            if tree:
                mask = chain_as_tree_mask(cached, size, device)
                positions = torch.arange(cached, cached + size, device=device)[None]
            for attempt in range(repeats + 1):  # the first one warms up
                truncate_cache(cache, cached)
                synchronize(device)
                started = time.perf_counter()
                model_logits(model, filler[:, :size], cache, positions, mask, logits_to_keep=size)
                synchronize(device)
                if attempt:
                    seconds.append(time.perf_counter() - started)
            latency[size] = 1000 * statistics.median(seconds)
    return latency


def drafter_step_ms(drafter, target, context: torch.Tensor, vocab: int, repeats: int = REPEATS,
                    draft=None) -> float:
    """ms per proposed token of a drafter (its draft model ``draft``, if it has one): a chain of DRAFT_CHAIN after
    ``context``, the drafter rolled back between repeats (an EAGLE head first reads the target's features of the
    context; a draft model first reads the context itself, untimed)."""
    device = input_device(target)
    sequence = context[0].tolist()
    with torch.no_grad():
        drafter.begin(draft, vocab, input_device(draft) if draft is not None else device, target=target)
        if draft is not None:  # read the context once (a real cycle's draft cache already holds it)
            drafter.propose(sequence, 1, SamplingConfig(), None)
            drafter.commit(len(sequence) - 1)
        features = None
        if drafter.needs_target_features:
            _, hidden = model_logits_and_hidden(target, context.to(device), new_cache())
            features = hidden[0]
            drafter.commit(len(sequence) - 1, features[:-1])
        seconds = []
        for attempt in range(repeats + 1):
            synchronize(device)
            started = time.perf_counter()
            drafter.propose(sequence, DRAFT_CHAIN, SamplingConfig(), None)
            synchronize(device)
            if features is not None:
                drafter.commit(len(sequence) - 1, features[:0])  # back to the committed context
            else:
                drafter.commit(len(sequence) - 1)
            if attempt:
                seconds.append((time.perf_counter() - started) / DRAFT_CHAIN)
    return 1000 * statistics.median(seconds)


def measure_profile(target, draft, drafters: Iterable, context: torch.Tensor, largest_verify: int,
                    longest_prompt: int, vocab: int, trees: bool = False) -> CostProfile:
    """T(n) for the target, D(n) for the draft model (n up to the largest verification), the same with a tree
    mask when ``trees`` (a SpecExec method is configured), the draft model's step overhead and S for each
    model-free drafter; ``context`` (1, c): the cached tokens the forwards follow (the run's typical length)."""
    started = time.perf_counter()
    sizes = profile_sizes(largest_verify, longest_prompt)
    profile = CostProfile(context=int(context.shape[1]), target_ms=forward_latency(target, context, sizes))
    if trees:
        profile.target_tree_ms = forward_latency(target, context, sizes, tree=True)
    if draft is not None:
        profile.draft_ms = forward_latency(draft, context, sizes)
        if trees:
            profile.draft_tree_ms = forward_latency(draft, context, sizes, tree=True)
    for drafter in drafters:
        if drafter.needs_draft_model and draft is not None and not profile.draft_step_overhead_ms:
            step = drafter_step_ms(drafter, target, context, vocab, draft=draft)
            profile.draft_step_overhead_ms = max(0.0, step - profile.draft_ms[1])
        elif not drafter.needs_draft_model and drafter.name not in profile.drafter_ms:
            profile.drafter_ms[drafter.name] = drafter_step_ms(drafter, target, context, vocab)
    profile.measured_s = time.perf_counter() - started
    return profile


def _forwards_ms(table: Mapping[int, float], sizes: Mapping[str, int] | None) -> float | None:
    if not sizes or not table:
        return None if sizes else 0.0
    return sum(count * interpolate(table, int(n)) for n, count in sizes.items())


def predict(record: Mapping[str, Any], profile: CostProfile, drafter: str | None = None,
            tree: bool = False) -> dict[str, float | None]:
    """Predicted seconds of one ok record: target forwards (its ``target_forward_sizes``; ``tree``: priced with
    the tree-mask tables), draft-model forwards (``draft_forward_sizes``, each plus the step overhead) or drafter
    steps (``drafter``: a model-free drafter's name; its ms per proposed token
times ``draft_calls``, or ``drafted_tokens`` for a lookup, which reports no draft calls).
    Returns predicted_target_s, predicted_draft_s, predicted_tokens_per_s and unexplained_share
    (1 - predicted / observed time); None where the record lacks the counters (an older file)."""
    target_table = profile.target_tree_ms if tree and profile.target_tree_ms else profile.target_ms
    draft_table = profile.draft_tree_ms if tree and profile.draft_tree_ms else profile.draft_ms
    target_ms = _forwards_ms(target_table, record.get("target_forward_sizes"))
    if target_ms is None:
        return dict.fromkeys(("predicted_target_s", "predicted_draft_s", "predicted_tokens_per_s",
                              "unexplained_share"))
    if drafter is not None and drafter in profile.drafter_ms:  # head steps; a lookup reports none: its tokens
        steps = record.get("draft_calls") or record.get("drafted_tokens") or 0
        draft_ms = profile.drafter_ms[drafter] * steps
    else:
        sizes = record.get("draft_forward_sizes") or {}
        draft_ms = (_forwards_ms(draft_table, sizes) or 0.0) + profile.draft_step_overhead_ms * sum(sizes.values())
    seconds = (target_ms + draft_ms) / 1000
    wall = record.get("wall_s") or 0.0
    return {
        "predicted_target_s": target_ms / 1000,
        "predicted_draft_s": draft_ms / 1000,
        "predicted_tokens_per_s": record["new_tokens"] / seconds if seconds > 0 else None,
        "unexplained_share": 1 - seconds / wall if wall > 0 else None,
    }


# ---------------------------------------------------------------- choosing a chain length or a draft copy


def chain_prediction(survival: list[float], k: int, target_ms, draft_ms_per_token: float,
                     harness_ms_per_call: float) -> tuple[float, float]:
    """(tokens per call, predicted tok/s) of a k-chain: (1 + sum_{i<=k} S_i) / (T(k+1) + k d + h), with S_i =
    P(at least i drafts accepted), ``target_ms(n)`` = T(n), d the drafter's ms per proposed token and h the harness
    ms per call; positions past the measured curve continue its last ratio (a geometric tail)."""
    curve = list(survival)
    while len(curve) < k:
        ratio = curve[-1] / curve[-2] if len(curve) >= 2 and curve[-2] > 0 else 0.0
        curve.append(curve[-1] * ratio if curve else 0.0)
    per_call = 1 + sum(curve[:k])
    seconds = (target_ms(k + 1) + k * draft_ms_per_token + harness_ms_per_call) / 1000
    return per_call, per_call / seconds


def greedy_survival(sequences: list[list[bool]], k: int) -> list[float]:
    """S_1..S_k of greedy k-chains along sequences the target decoded itself: ``sequence[t]`` says whether the
    draft's argmax after the first t tokens equals the target's token t. In greedy decoding every accepted token
    is the target's, so the draft proposes from the true prefix and this replay is exact: a cycle starting at t
    accepts the run of agreements from t (at most k), emits the target's next token and the next cycle starts
    after it. S_i = cycles accepting >= i / cycles offering >= i (near its end a sequence offers fewer)."""
    at_least = [0] * k
    offered = [0] * k
    for agreement in sequences:
        t = 0
        while t < len(agreement):
            room = min(k, len(agreement) - t)
            run = 0
            while run < room and agreement[t + run]:
                run += 1
            for i in range(room):
                offered[i] += 1
                at_least[i] += i < run
            t += run + 1
    return [a / o if o else 0.0 for a, o in zip(at_least, offered)]
