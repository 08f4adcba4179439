"""Choices made by measurement at run start: ``k: auto`` (chains), ``budget: auto`` + ``max_depth: auto`` (trees)
and ``quantization: auto`` of the draft (which copy of the draft weights: bf16, fp32, torchao int8 / int4).

What is fast depends on the machine, not only on the model pair: a bf16 copy of SmolLM2 cost ~0.6 of an fp32
forward on an AMD EPYC and 1.06x on an Intel Xeon with AMX, so one fixed config gained on one and lost 30% on the
other. Before the first prompt, on the run's first prompt (the calibration prompt):

    Step 1  the baseline decodes it greedily (up to CALIBRATION_TOKENS): the target's own tokens, its ms per token
            and the harness ms per step (wall - T(1)); T(n) for n up to the longest chain is measured after it
    Step 2  each draft copy (DRAFT_CANDIDATES, one loaded at a time) reads prompt + those tokens in one forward:
            its greedy agreement with the target at every position, replayed as greedy chains
            (src.decoding.profile.greedy_survival: exact for greedy decoding), and its ms per proposed token
    Step 3  a chain's k: the best predicted tok/s of src.decoding.profile.chain_prediction (the tune tool's
            model); a draft copy: the one whose best chain is fastest; a tree shape: every AUTO_SHAPES shape
            decodes the calibration prompt once and the fastest measured is kept
    Step 4  every auto method decodes the calibration prompt with its chosen values: its measured speed-up is
            printed next to the predicted one, one line per method, and a warning line when it is below 1

A resume reuses the values the results file records (``auto_choice``), so one file never mixes two choices. The
figures are greedy ones: with sampling, acceptance is lower than the greedy replay says.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from src.decoding.base import model_logits, vocab_width
from src.decoding.baseline import Baseline
from src.decoding.drafters import ModelDrafter
from src.decoding.kv import new_cache
from src.decoding.profile import (
    chain_prediction,
    drafter_step_ms,
    forward_latency,
    greedy_survival,
    interpolate,
)
from src.decoding.sampling import SamplingConfig
from src.decoding.specexec import AUTO_SHAPES
from src.decoding.timing import timed_generate
from src.models.loading import load_model
from src.models.spec import ModelSpec

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 64  # target tokens the agreement is measured on (capped by max_new_tokens)
MAX_AUTO_K = 8  # the longest chain k: auto considers (and max_k, when smaller)
# (dtype, quantization) of the draft copies ``quantization: auto`` measures, per device type. bitsandbytes only
# on CUDA: its CPU kernels are slower than a plain bf16 matmul.
DRAFT_CANDIDATES: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (("bfloat16", "none"), ("float32", "none"), ("bfloat16", "torchao-int8"), ("bfloat16", "torchao-int4")),
    "cuda": (("bfloat16", "none"), ("bfloat16", "torchao-int8"), ("bfloat16", "torchao-int4"),
             ("bfloat16", "bnb-4bit")),
}


@dataclass
class Calibration:
    """What the baseline told about the calibration prompt."""

    input_ids: torch.Tensor  # (1, prompt) on the target's device
    tokens: list[int]  # the target's greedy continuation
    baseline_tok_s: float
    harness_ms: float  # per target step beyond T(1): sampling, cache, Python
    target_ms: dict[int, float] = field(default_factory=dict)  # T(n) after prompt + continuation / 2

    def T(self, n: int) -> float:
        return interpolate(self.target_ms, n)


@dataclass
class DraftFigures:
    """One draft copy: its ms per proposed token and its greedy agreement along the target's tokens."""

    dtype: str
    quantization: str
    step_ms: float
    agreement: list[bool]
    model: Any = None  # the LoadedModel, kept for the chosen copy only

    @property
    def label(self) -> str:
        return self.dtype if self.quantization == "none" else f"{self.quantization} ({self.dtype})"

    def best_chain(self, calibration: Calibration, ks: range) -> tuple[int, float]:
        """(k, predicted tok/s) of the fastest chain with this draft."""
        rates = {k: chain_prediction(greedy_survival(self.agreement, k), k, calibration.T, self.step_ms,
                                     calibration.harness_ms)[1] for k in ks}
        best = max(rates, key=rates.get)
        return best, rates[best]


def say(line: str) -> None:
    """A line of our own on stderr in quiet mode too (the choices are part of what a run reports)."""
    print(line, file=sys.stderr, flush=True)


@torch.no_grad()
def calibrate(target, input_ids: torch.Tensor, max_new_tokens: int, eos: set[int], longest: int) -> Calibration:
    """Step 1: the baseline's greedy tokens on the calibration prompt, its speed, T(1..longest + 1)."""
    budget = min(CALIBRATION_TOKENS, max_new_tokens)
    Baseline().generate(target, None, input_ids, 4, SamplingConfig(), eos, None)  # warm-up
    generation = timed_generate(Baseline(), target, None, input_ids, budget, SamplingConfig(), eos, None)
    wall = generation.stats.prefill_s + generation.stats.decode_s
    context = torch.cat([input_ids, torch.tensor([generation.tokens], device=input_ids.device)], dim=1)
    context = context[:, : input_ids.shape[1] + len(generation.tokens) // 2]
    target_ms = forward_latency(target, context, range(1, longest + 2))
    decode_ms_per_token = 1000 * generation.stats.decode_s / max(1, len(generation.tokens) - 1)
    return Calibration(input_ids, list(generation.tokens), len(generation.tokens) / wall,
                       max(0.0, decode_ms_per_token - target_ms[1]), target_ms)


@torch.no_grad()
def draft_figures(loaded, target, calibration: Calibration, dtype: str, quantization: str) -> DraftFigures:
    """Step 2: one forward of the draft (a LoadedModel) over prompt + the target's tokens, and its ms per proposed
    token."""
    draft, prompt = loaded.model, calibration.input_ids
    sequence = torch.cat([prompt, torch.tensor([calibration.tokens], device=prompt.device)], dim=1)
    logits = model_logits(draft, sequence.to(next(draft.parameters()).device), new_cache(),
                          logits_to_keep=len(calibration.tokens) + 1)
    guesses = logits[0, :-1, : vocab_width(target)].argmax(-1).tolist()  # after prompt + t target tokens
    agreement = [g == t for g, t in zip(guesses, calibration.tokens)]
    context = sequence[:, : prompt.shape[1] + len(calibration.tokens) // 2]
    step_ms = drafter_step_ms(ModelDrafter(), target, context, vocab_width(target), draft=draft)
    return DraftFigures(dtype, quantization, step_ms, agreement, loaded)


def choose_draft(spec: ModelSpec, target, calibration: Calibration, ks: range,
                 progress=say) -> tuple[DraftFigures, list[DraftFigures]]:
    """Steps 2-3 for ``quantization: auto``: every candidate copy that loads on this machine, measured one at a
    time; returns the fastest (its LoadedModel kept in ``model``) and the figures of all."""
    device_type = next(target.parameters()).device.type
    measured, best = [], None
    for dtype, quantization in DRAFT_CANDIDATES["cuda" if device_type == "cuda" else "cpu"]:
        candidate = dataclasses.replace(spec, dtype=dtype, quantization=quantization)
        started = time.perf_counter()
        try:
            loaded = load_model(candidate)
        except Exception as error:  # a copy this machine cannot build (no torchao kernel, no bitsandbytes)
            log.warning("draft candidate %s/%s skipped: %s", dtype, quantization, error)
            continue
        figures = draft_figures(loaded, target, calibration, dtype, quantization)
        k, rate = figures.best_chain(calibration, ks)
        progress(f"  draft {figures.label}: {figures.step_ms:.1f} ms/token, agreement "
                 f"{sum(figures.agreement) / max(1, len(figures.agreement)):.2f}, best k={k} predicted "
                 f"{rate / calibration.baseline_tok_s:.2f}x ({time.perf_counter() - started:.0f} s)")
        measured.append(figures)
        if best is None or rate > best.best_chain(calibration, ks)[1]:
            if best is not None:
                best.model = None
            best = figures
        else:
            figures.model = None
        del loaded
        gc.collect()
    if best is None:
        raise RuntimeError("no draft candidate loaded: set the draft's quantization explicitly")
    return best, measured


def measured_tok_s(method, target, draft, calibration: Calibration, eos: set[int]) -> float:
    """Step 4: the calibration prompt decoded by ``method`` (greedy), tok/s."""
    budget = len(calibration.tokens)
    generation = timed_generate(method, target, draft, calibration.input_ids, budget, SamplingConfig(), eos, None)
    return len(generation.tokens) / (generation.stats.prefill_s + generation.stats.decode_s)


def choose_tree(method, target, draft, calibration: Calibration, eos: set[int]) -> tuple[dict[str, int], float]:
    """Step 3 for a tree: every AUTO_SHAPES shape decodes the calibration prompt; the fastest measured."""
    rates = {}
    for budget, depth in AUTO_SHAPES:
        probe = copy.copy(method)
        probe.budget, probe.max_depth = budget, depth
        rates[budget, depth] = measured_tok_s(probe, target, draft, calibration, eos)
    budget, depth = max(rates, key=rates.get)
    return {"budget": budget, "max_depth": depth}, rates[budget, depth]


def choose_chain(method, target, draft_figures_: DraftFigures | None, calibration: Calibration, eos: set[int],
                 ks: range) -> tuple[dict[str, int], float]:
    """Step 3 for a chain: with a draft model, from its agreement; with a model-free drafter (EAGLE head, prompt
    lookup), from one decode at the longest k (greedy acceptance of position i does not depend on k)."""
    if draft_figures_ is not None and method.needs_draft:
        k, rate = draft_figures_.best_chain(calibration, ks)
        return {"k": k}, rate
    probe = copy.copy(method)
    probe.k = max(ks)
    generation = timed_generate(probe, target, None, calibration.input_ids, len(calibration.tokens),
                                SamplingConfig(), eos, None)
    stats = generation.stats
    survival = [a / d if d else 0.0 for a, d in zip(stats.accepted_per_position, stats.drafted_per_position)]
    step_ms = drafter_step_ms(method.drafter, target, calibration.input_ids, vocab_width(target))
    rates = {k: chain_prediction(survival, k, calibration.T, step_ms, calibration.harness_ms)[1] for k in ks}
    k = max(rates, key=rates.get)
    return {"k": k}, rates[k]


def reused_choices(previous_records: dict[str, dict[str, Any]], fingerprint_ids: dict[str, str]) -> dict[str, dict]:
    """``method key -> auto_choice`` of the ok records of an earlier run of this configuration (a resume)."""
    reused = {}
    for record in previous_records.values():
        key = record.get("method")
        if record.get("auto_choice") and fingerprint_ids.get(key) == record.get("fingerprint_id"):
            reused.setdefault(key, record["auto_choice"])
    return reused


def choice_line(key: str, choice: dict[str, Any]) -> str:
    """``speculative: k=2, draft torchao-int8 (bfloat16): predicted 1.08x, calibration prompt 1.05x``."""
    values = ", ".join(f"{name}={value}" for name, value in choice["values"].items())
    draft = choice.get("draft")
    parts = [values] if values else []
    if draft:
        parts.append("draft " + DraftFigures(draft["dtype"], draft["quantization"], 0.0, []).label)
    figures = f"predicted {choice['predicted_speedup']:.2f}x"
    if choice.get("calibration_speedup") is not None:
        figures += f", calibration prompt {choice['calibration_speedup']:.2f}x"
    return f"{key}: {', '.join(parts)}: {figures}"


def auto_methods(methods, keys: list[str], draft_spec: ModelSpec | None) -> tuple[dict[str, Any], bool]:
    """(method key -> method for those with an ``auto`` parameter or an auto-chosen draft copy, draft auto?)."""
    draft_auto = draft_spec is not None and draft_spec.quantization == "auto" and any(m.needs_draft for m in methods)
    return {key: m for m, key in zip(methods, keys) if m.auto_params() or (draft_auto and m.needs_draft)}, draft_auto


def resolve(methods, keys: list[str], pair, draft_spec: ModelSpec | None, input_ids: torch.Tensor,
            max_new_tokens: int, reused: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Resolve every ``auto`` of ``methods`` (and the draft copy) on this process; returns ``method key ->
    auto_choice`` for the methods that had one (and every draft method when the draft copy was chosen).
    ``reused``: choices found in the results file; they are applied as they are, nothing is measured again."""
    auto, draft_auto = auto_methods(methods, keys, draft_spec)
    if not auto:
        return {}
    if all(key in reused for key in auto):
        return apply_reused(auto, pair, draft_spec, reused, draft_auto)
    started = time.perf_counter()
    eos = pair.eos_token_ids
    limits = [m.max_k for m in auto.values() if "k" in m.auto_params()]
    ks = range(1, min([MAX_AUTO_K, *limits]) + 1)
    say(f"auto: calibrating on the first prompt ({input_ids.shape[1]} tokens) ...")
    calibration = calibrate(pair.target.model, input_ids, max_new_tokens, eos, max(ks))
    say(f"  baseline {calibration.baseline_tok_s:.1f} tok/s, T(1) {calibration.T(1):.1f} ms, "
        f"harness {calibration.harness_ms:.1f} ms/step")
    figures, draft_choice = None, None
    if draft_auto:
        figures, _ = choose_draft(draft_spec, pair.target.model, calibration, ks)
        pair.draft = figures.model
        draft_choice = {"dtype": figures.dtype, "quantization": figures.quantization}
    elif pair.draft is not None and any(m.needs_draft and "k" in m.auto_params() for m in auto.values()):
        info = pair.draft.info
        figures = draft_figures(pair.draft, pair.target.model, calibration, info["dtype"], info["quantization"])
    draft_model = pair.draft.model if pair.draft is not None else None
    choices = {}
    for key, method in auto.items():
        values, predicted = {}, None
        if "k" in method.auto_params():
            values, predicted = choose_chain(method, pair.target.model, figures, calibration, eos, ks)
        elif method.auto_params():
            values, predicted = choose_tree(method, pair.target.model, draft_model, calibration, eos)
        method.resolve(values)
        k = method.params().get("k")
        if predicted is None and figures is not None and method.needs_draft and isinstance(k, int):
            predicted = chain_prediction(greedy_survival(figures.agreement, k), k, calibration.T, figures.step_ms,
                                         calibration.harness_ms)[1]
        measured = measured_tok_s(method, pair.target.model, draft_model, calibration, eos)
        choices[key] = {
            "values": values,
            "draft": draft_choice if method.needs_draft else None,
            "predicted_speedup": (predicted or measured) / calibration.baseline_tok_s,
            "calibration_speedup": measured / calibration.baseline_tok_s,
            "calibration_tokens": len(calibration.tokens),
        }
        say(choice_line(key, choices[key]))
        if choices[key]["calibration_speedup"] < 1:
            say(f"warning: {key} is slower than the baseline on the calibration prompt here "
                f"({choices[key]['calibration_speedup']:.2f}x; baseline {calibration.baseline_tok_s:.1f} tok/s, "
                f"T(1) {calibration.T(1):.1f} ms"
                + (f", draft {figures.label} {figures.step_ms:.1f} ms/token, agreement "
                   f"{sum(figures.agreement) / max(1, len(figures.agreement)):.2f}" if figures and method.needs_draft
                   else "") + "): no configured choice is predicted to beat it")
    say(f"auto: chosen in {time.perf_counter() - started:.0f} s")
    return choices


def apply_reused(auto: dict[str, Any], pair, draft_spec: ModelSpec | None, reused: dict[str, dict],
                 draft_auto: bool, source: str = "as recorded in the results file") -> dict[str, dict[str, Any]]:
    """Choices made before (a resume: the results file's; another rank: rank 0's), applied without measuring;
    the draft copy they name is loaded. ``source``: what the printed lines say (None: print nothing)."""
    for key, method in auto.items():
        method.resolve(dict(reused[key]["values"]))
    if draft_auto:
        draft = next((c["draft"] for c in reused.values() if c.get("draft")), None)
        if draft is None:
            raise RuntimeError("the results file records no draft choice for quantization 'auto'")
        pair.draft = load_model(dataclasses.replace(draft_spec, **draft))
    for key in auto:
        if source is not None:
            say(f"{choice_line(key, reused[key])} ({source})")
    return {key: reused[key] for key in auto}
