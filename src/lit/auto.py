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
    Step 3  the cost model ranks: a chain's (k, draft copy) pairs by src.decoding.profile.chain_prediction (the
            tune tool's model); the TOP_MEASURED first, and for a tree every AUTO_SHAPES shape, then decode the
            calibration prompt once each (the baseline once more beside them) and the fastest measured is kept
            (the cost model alone misjudged by 40% on a loaded 2-core machine: it prices forwards, not the
            threads they share)
    Step 4  one line per method: the choice, its predicted and measured speed-up, and a warning when even the
            fastest candidate measured below the baseline

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

CALIBRATION_PROMPTS = 3  # the run's prompts (one per category first) the choices are measured on
CALIBRATION_TOKENS = 48  # target tokens per calibration prompt (capped by max_new_tokens)
MAX_AUTO_K = 8  # the longest chain k: auto considers (and max_k, when smaller)
SLOW_DRAFT = 1.5  # a draft copy whose 1-token forward costs more than this many target forwards is not measured
TOP_MEASURED = 3  # candidates the cost model ranks first that are then decoded on the calibration prompt
# (dtype, quantization) of the draft copies ``quantization: auto`` measures, per device type. bitsandbytes only
# on CUDA: its CPU kernels are slower than a plain bf16 matmul.
DRAFT_CANDIDATES: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (("bfloat16", "none"), ("float32", "none"), ("bfloat16", "torchao-int8"), ("bfloat16", "torchao-int4"),
            ("bfloat16", "torch-int8")),
    "cuda": (("bfloat16", "none"), ("bfloat16", "torchao-int8"), ("bfloat16", "torchao-int4"),
             ("bfloat16", "bnb-4bit")),
}


@dataclass
class CalibrationPrompt:
    input_ids: torch.Tensor  # (1, prompt) on the target's device
    tokens: list[int]  # the target's greedy continuation


@dataclass
class Calibration:
    """What the baseline told about the calibration prompts."""

    prompts: list[CalibrationPrompt]
    baseline_tok_s: float
    harness_ms: float  # per target step beyond T(1): sampling, cache, Python
    target_ms: dict[int, float] = field(default_factory=dict)  # T(n) after a prompt + half its continuation

    def T(self, n: int) -> float:
        return interpolate(self.target_ms, n)


@dataclass
class DraftFigures:
    """One draft copy: its ms per proposed token and its greedy agreement along the target's tokens (one list
    per calibration prompt)."""

    dtype: str
    quantization: str
    step_ms: float
    agreement: list[list[bool]]
    model: Any = None  # the LoadedModel

    @property
    def label(self) -> str:
        return copy_label(self.dtype, self.quantization)

    @property
    def agreement_rate(self) -> float:
        flat = [agrees for sequence in self.agreement for agrees in sequence]
        return sum(flat) / max(1, len(flat))

    def predicted_tok_s(self, calibration: Calibration, k: int) -> float:
        return chain_prediction(greedy_survival(self.agreement, k), k, calibration.T, self.step_ms,
                                calibration.harness_ms)[1]

    def best_chain(self, calibration: Calibration, ks: range) -> tuple[int, float]:
        """(k, predicted tok/s) of the fastest chain with this draft."""
        rates = {k: self.predicted_tok_s(calibration, k) for k in ks}
        best = max(rates, key=rates.get)
        return best, rates[best]


def copy_label(dtype: str, quantization: str) -> str:
    """``bfloat16``, ``torchao-int8 (bfloat16)``: how the lines name a draft copy."""
    return dtype if quantization == "none" else f"{quantization} ({dtype})"


def say(line: str) -> None:
    """A line of our own on stderr in quiet mode too (the choices are part of what a run reports)."""
    print(line, file=sys.stderr, flush=True)


def half_way(prompt: CalibrationPrompt) -> torch.Tensor:
    """(1, prompt + half its continuation): the mean context a decoding step of that prompt sees."""
    tokens = torch.tensor([prompt.tokens[: len(prompt.tokens) // 2]], device=prompt.input_ids.device,
                          dtype=prompt.input_ids.dtype)
    return torch.cat([prompt.input_ids, tokens], dim=1)


@torch.no_grad()
def calibrate(target, prompts: list[torch.Tensor], max_new_tokens: int, eos: set[int], longest: int) -> Calibration:
    """Step 1: the baseline's greedy tokens on the calibration prompts, its speed, T(1..longest + 1)."""
    budget = min(CALIBRATION_TOKENS, max_new_tokens)
    Baseline().generate(target, None, prompts[0], 4, SamplingConfig(), eos, None)  # warm-up
    done, tokens, wall, decode_s = [], 0, 0.0, 0.0
    for input_ids in prompts:
        generation = timed_generate(Baseline(), target, None, input_ids, budget, SamplingConfig(), eos, None)
        done.append(CalibrationPrompt(input_ids, list(generation.tokens)))
        tokens += len(generation.tokens)
        wall += generation.stats.prefill_s + generation.stats.decode_s
        decode_s += generation.stats.decode_s
    target_ms = forward_latency(target, half_way(done[0]), range(1, longest + 2))
    decode_ms_per_token = 1000 * decode_s / max(1, tokens - len(prompts))
    return Calibration(done, tokens / wall, max(0.0, decode_ms_per_token - target_ms[1]), target_ms)


@torch.no_grad()
def agreement_along(draft, target, prompt: CalibrationPrompt) -> list[bool]:
    """One teacher-forced forward of ``draft`` over prompt + the target's tokens: at each position, does its argmax
    equal the target's token?"""
    sequence = torch.cat([prompt.input_ids, torch.tensor([prompt.tokens], device=prompt.input_ids.device,
                                                         dtype=prompt.input_ids.dtype)], dim=1)
    logits = model_logits(draft, sequence.to(next(draft.parameters()).device), new_cache(),
                          logits_to_keep=len(prompt.tokens) + 1)
    guesses = logits[0, :-1, : vocab_width(target)].argmax(-1).tolist()  # after prompt + t target tokens
    return [guess == token for guess, token in zip(guesses, prompt.tokens)]


@torch.no_grad()
def draft_step_ms(draft, target, prompt: CalibrationPrompt) -> float:
    """ms per proposed token of ``draft`` as a ModelDrafter drives it, after half the prompt's continuation."""
    return drafter_step_ms(ModelDrafter(), target, half_way(prompt), vocab_width(target), draft=draft)


def draft_figures(loaded, target, calibration: Calibration, dtype: str, quantization: str) -> DraftFigures:
    """Step 2 for one draft copy (a LoadedModel): its agreement along every calibration prompt, its step cost."""
    agreement = [agreement_along(loaded.model, target, prompt) for prompt in calibration.prompts]
    step_ms = draft_step_ms(loaded.model, target, calibration.prompts[0])
    return DraftFigures(dtype, quantization, step_ms, agreement, loaded)


def draft_candidates(spec: ModelSpec, target, calibration: Calibration, ks: range,
                     progress=say) -> list[DraftFigures]:
    """Step 2 for ``quantization: auto``: every candidate copy that loads on this machine, loaded and measured one
    at a time (a copy that cannot be built here is skipped with a warning)."""
    device_type = next(target.parameters()).device.type
    measured = []
    for dtype, quantization in DRAFT_CANDIDATES["cuda" if device_type == "cuda" else "cpu"]:
        candidate = dataclasses.replace(spec, dtype=dtype, quantization=quantization)
        started = time.perf_counter()
        try:
            loaded = load_model(candidate)
        except Exception as error:  # a copy this machine cannot build (no torchao kernel, no bitsandbytes)
            log.warning("draft candidate %s/%s skipped: %s", dtype, quantization, error)
            continue
        forward_ms = forward_latency(loaded.model, half_way(calibration.prompts[0]), (1,), repeats=1)[1]
        if forward_ms > SLOW_DRAFT * calibration.T(1):  # no chain can gain; its full measurement would take long
            progress(f"  draft {copy_label(dtype, quantization)}: skipped, a 1-token forward takes {forward_ms:.0f} ms, over {SLOW_DRAFT}x "
                     f"the target's {calibration.T(1):.0f} ms")
            del loaded
            gc.collect()
            continue
        figures = draft_figures(loaded, target, calibration, dtype, quantization)
        k, rate = figures.best_chain(calibration, ks)
        progress(f"  draft {figures.label}: {figures.step_ms:.1f} ms/token, agreement "
                 f"{figures.agreement_rate:.2f}, best k={k} predicted "
                 f"{rate / calibration.baseline_tok_s:.2f}x ({time.perf_counter() - started:.0f} s)")
        measured.append(figures)
    if not measured:
        raise RuntimeError("no draft candidate loaded: set the draft's quantization explicitly")
    return measured


def measured_tok_s(method, target, draft, calibration: Calibration, eos: set[int]) -> float:
    """The calibration prompts decoded by ``method`` (greedy, as many tokens as the baseline gave each), tok/s."""
    tokens, seconds = 0, 0.0
    for prompt in calibration.prompts:
        generation = timed_generate(method, target, draft, prompt.input_ids, len(prompt.tokens), SamplingConfig(),
                                    eos, None)
        tokens += len(generation.tokens)
        seconds += generation.stats.prefill_s + generation.stats.decode_s
    return tokens / seconds


def with_values(method, values: dict[str, int]):
    """A copy of ``method`` with some of its ``auto`` parameters set (checked as ``resolve`` checks them)."""
    probe = copy.copy(method)
    probe.resolve(values)
    return probe


def fastest_measured(method, options: list[tuple[dict[str, int], Any, float | None]], target, calibration,
                     eos: set[int]) -> tuple[dict[str, int], Any, float | None, float]:
    """Step 3's measurement: ``options`` = (values, draft LoadedModel or None, predicted tok/s) each decode the
    calibration prompt once; the fastest measured wins. Returns (values, draft, predicted, measured tok/s)."""
    best = None
    for values, draft, predicted in options:
        rate = measured_tok_s(with_values(method, values), target, draft.model if draft is not None else None,
                              calibration, eos)
        if best is None or rate > best[3]:
            best = (values, draft, predicted, rate)
    return best


def chain_options(method, figures: list[DraftFigures], calibration: Calibration, ks: range,
                  top: int = TOP_MEASURED) -> list[tuple[dict[str, int], Any, float]]:
    """The ``top`` (k, draft copy) pairs of a draft-model chain by predicted tok/s (its own k when fixed)."""
    k = method.params().get("k")
    chains = [k] if isinstance(k, int) else list(ks)
    predicted = [({"k": n} if not isinstance(k, int) else {}, f, f.predicted_tok_s(calibration, n))
                 for f in figures for n in chains]
    predicted.sort(key=lambda option: -option[2])
    return [(values, f.model, rate) for values, f, rate in predicted[:top]]


def tree_options(method, drafts: list[Any]) -> list[tuple[dict[str, int], Any, None]]:
    """Every AUTO_SHAPES shape (or the method's own shape) with every draft copy in ``drafts``."""
    shapes = AUTO_SHAPES if method.auto_params() else [(None, None)]
    return [({"budget": b, "max_depth": d} if b is not None else {}, draft, None)
            for b, d in shapes for draft in drafts]


def model_free_chain(method, target, calibration: Calibration, eos: set[int], ks: range,
                     top: int = TOP_MEASURED) -> list[tuple[dict[str, int], None, float]]:
    """The ``top`` k of a chain with a model-free drafter (EAGLE head, prompt lookup) by predicted tok/s, from one
    decode at the longest k (greedy acceptance of position i does not depend on k) and the drafter's step cost."""
    accepted, drafted = [0] * max(ks), [0] * max(ks)
    for prompt in calibration.prompts:
        stats = timed_generate(with_values(method, {"k": max(ks)}), target, None, prompt.input_ids,
                               len(prompt.tokens), SamplingConfig(), eos, None).stats
        for i, (a, d) in enumerate(zip(stats.accepted_per_position, stats.drafted_per_position)):
            accepted[i] += a
            drafted[i] += d
    survival = [a / d if d else 0.0 for a, d in zip(accepted, drafted)]
    step_ms = drafter_step_ms(method.drafter, target, half_way(calibration.prompts[0]), vocab_width(target))
    rates = {k: chain_prediction(survival, k, calibration.T, step_ms, calibration.harness_ms)[1] for k in ks}
    return [({"k": k}, None, rates[k]) for k in sorted(rates, key=lambda k: -rates[k])[:top]]


def reused_choices(previous_records: dict[str, dict[str, Any]], fingerprint_ids: dict[str, str]) -> dict[str, dict]:
    """``method key -> auto_choice`` of the ok records of an earlier run of this configuration (a resume)."""
    reused = {}
    for record in previous_records.values():
        key = record.get("method")
        if record.get("auto_choice") and fingerprint_ids.get(key) == record.get("fingerprint_id"):
            reused.setdefault(key, record["auto_choice"])
    return reused


def choice_line(key: str, choice: dict[str, Any]) -> str:
    """``speculative: k=2, draft torchao-int8 (bfloat16): predicted 1.08x, measured 1.05x on the calibration
    prompt``."""
    values = ", ".join(f"{name}={value}" for name, value in choice["values"].items())
    draft = choice.get("draft")
    parts = [values] if values else []
    if draft:
        parts.append("draft " + copy_label(draft["dtype"], draft["quantization"]))
    figures = [f"predicted {choice['predicted_speedup']:.2f}x"] if choice.get("predicted_speedup") else []
    if choice.get("calibration_speedup") is not None:
        figures.append(f"measured {choice['calibration_speedup']:.2f}x on the calibration prompt")
    return f"{key}: {', '.join(parts) or 'as configured'}: {', '.join(figures)}"


def auto_methods(methods, keys: list[str], draft_spec: ModelSpec | None) -> tuple[dict[str, Any], bool]:
    """(method key -> method for those with an ``auto`` parameter or an auto-chosen draft copy, draft auto?)."""
    draft_auto = draft_spec is not None and draft_spec.quantization == "auto" and any(m.needs_draft for m in methods)
    return {key: m for m, key in zip(methods, keys) if m.auto_params() or (draft_auto and m.needs_draft)}, draft_auto


def resolve(methods, keys: list[str], pair, draft_spec: ModelSpec | None, prompts: list[torch.Tensor],
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
    eos, target = pair.eos_token_ids, pair.target.model
    limits = [m.max_k for m in auto.values() if "k" in m.auto_params()]
    ks = range(1, min([MAX_AUTO_K, *limits]) + 1)
    say(f"auto: calibrating on {len(prompts)} prompts of the run ...")
    calibration = calibrate(target, prompts, max_new_tokens, eos, max(ks))
    say(f"  baseline {calibration.baseline_tok_s:.1f} tok/s, T(1) {calibration.T(1):.1f} ms, "
        f"harness {calibration.harness_ms:.1f} ms/step")
    if draft_auto:
        figures = draft_candidates(draft_spec, target, calibration, ks)
    elif pair.draft is not None and any(m.needs_draft for m in auto.values()):
        info = pair.draft.info
        figures = [draft_figures(pair.draft, target, calibration, info["dtype"], info["quantization"])]
    else:
        figures = []
    # the baseline once more, next to the candidates' decodes: machine drift shows in both
    again = measured_tok_s(Baseline(), target, None, calibration, eos)
    calibration.baseline_tok_s = (calibration.baseline_tok_s + again) / 2
    chosen = None if draft_auto else pair.draft  # the draft copy: the first drafting method chooses it
    choices = {}
    # chains first: their greedy replay ranks the draft copies; a tree then grows with the copy they chose
    for key, method in sorted(auto.items(), key=lambda item: "k" not in item[1].params()):
        usable = [f for f in figures if chosen is None or f.model is chosen]
        if method.needs_draft and "k" in method.params():
            options = chain_options(method, usable, calibration, ks)
        elif method.needs_draft:
            ranked = sorted(usable, key=lambda f: -f.best_chain(calibration, ks)[1])[:2]
            options = tree_options(method, [f.model for f in ranked])
        elif "k" in method.auto_params():
            options = model_free_chain(method, target, calibration, eos, ks)
        else:
            options = tree_options(method, [None])
        values, draft, predicted, measured = fastest_measured(method, options, target, calibration, eos)
        if method.needs_draft and chosen is None:
            chosen = draft
        method.resolve(values)
        choices[key] = {
            "values": values,
            "draft": ({"dtype": draft.spec.dtype, "quantization": draft.spec.quantization}
                      if draft_auto and method.needs_draft else None),
            "predicted_speedup": predicted / calibration.baseline_tok_s if predicted else None,
            "calibration_speedup": measured / calibration.baseline_tok_s,
            "calibration_tokens": sum(len(prompt.tokens) for prompt in calibration.prompts),
        }
        say(choice_line(key, choices[key]))
        if choices[key]["calibration_speedup"] < 1:
            figure = next((f for f in figures if f.model is draft), None) if method.needs_draft else None
            say(f"warning: {key} measured {choices[key]['calibration_speedup']:.2f}x of the baseline on the "
                f"calibration prompt (baseline {calibration.baseline_tok_s:.1f} tok/s, T(1) {calibration.T(1):.1f} ms"
                + (f", draft {figure.label} {figure.step_ms:.1f} ms/token, agreement {figure.agreement_rate:.2f}"
                   if figure else "")
                + "): none of its candidates beat the baseline on this machine")
    if draft_auto:
        pair.draft = chosen
    for figure in figures:  # the copies not chosen
        figure.model = None
    gc.collect()
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
