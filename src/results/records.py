"""The one place where a result record (one JSONL line) is built. Scripts depend on these field names.

``ok_record`` reads a ``src.decoding.stats.Generation`` by its attributes (``tokens``, ``stats``, ``stopped_by``):
the results layer imports nothing from decoding (tests/test_layers.py), so it is typed ``Any`` here.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from typing import Any


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of a run fingerprint: equal for records of the same configuration."""
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prompt_sha(user_turns: list[str]) -> str:
    """A short hash of the user text a turn answers (``user_turns``: the prompt's turns up to and including it)."""
    return hashlib.sha1(json.dumps(user_turns, ensure_ascii=False).encode()).hexdigest()[:12]


def resume_key(dataset: str, prompt_id: str, turn: int, method_key: str, fingerprint: dict[str, Any],
               text_sha: str | None = None) -> str:
    """Identifies (prompt, turn, method, configuration): a resumed run skips keys already ``ok`` in the file.

    The configuration is the whole run fingerprint (models, prompt formatting, sampling, method parameters, input
    file hashes): a run with another target dtype or system prompt never reuses the first run's records.
    ``text_sha`` (:func:`prompt_sha`) ends the key of every record written since records carry it: an edited
    prompt of the same file stem and id is then decoded again, and two files of one stem never share a key.
    The prompt text is kept out of the fingerprint, which names one configuration for a whole run.
    """
    key = f"{dataset}/{prompt_id}/{turn}/{method_key}/{fingerprint_id(fingerprint)}"
    return key if text_sha is None else f"{key}/{text_sha}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"target": {"dtype": "float32"}}`` -> ``{"target.dtype": "float32"}`` (lists and scalars are leaves)."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat or {prefix: {}}


def fingerprint_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """``field: old -> new`` for each field where two fingerprints differ (``old`` None: a record without one)."""
    if old is None:
        return ["fingerprint: none (written before sp-samp recorded run fingerprints)"]
    a, b = flatten(old), flatten(new)
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]


def ok_record(common: dict[str, Any], generation: Any, text: str) -> dict[str, Any]:
    stats = generation.stats
    wall_s = stats.prefill_s + stats.decode_s
    record = {
        **common,
        "status": "ok",
        "error": None,
        "new_tokens": generation.new_tokens,
        "stopped_by": generation.stopped_by,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "wall_s": wall_s,
        "tokens_per_s": generation.new_tokens / wall_s if wall_s > 0 else None,
        "target_calls": stats.target_calls,
        "draft_calls": stats.draft_calls,
        "tokens_per_target_call": generation.tokens_per_target_call,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "accepted_per_position": [
            a / d if d else None for a, d in zip(stats.accepted_per_position, stats.drafted_per_position)
        ],
        "accepted_counts_per_position": stats.accepted_per_position,
        "drafted_counts_per_position": stats.drafted_per_position,
        "acceptance_histogram": acceptance_histogram(stats.accepted_per_step),
        "speedup": None,
        "matches_baseline": None,
        "first_divergence": None,
        "text": text,
        "tokens": generation.tokens,
    }
    for key, value in stats.extra.items():
        record[key] = value
    return record


def acceptance_histogram(accepted_per_step: list[int]) -> list[int]:
    """``h[i]`` = verification cycles that accepted exactly ``i`` draft tokens; [] without cycles (the baseline).

    Counts instead of the per-cycle list: a record stays a few numbers long however long the output, and every
    figure made of the cycles' accepted lengths (their mean, Spec-Bench's ``accept_lengths`` mean) ignores their
    order.
    """
    histogram = [0] * (max(accepted_per_step) + 1) if accepted_per_step else []
    for accepted in accepted_per_step:
        histogram[accepted] += 1
    return histogram


def error_record(common: dict[str, Any], error: BaseException) -> dict[str, Any]:
    return {
        **common,
        "status": "error",
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(error)),
        },
    }


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# Largest top-1 / top-2 logit gap of the target still called a near tie when a lossless method's greedy output
# leaves the baseline's: a multi-token verification forward and a 1-token forward round differently (other
# kernels, other reduction orders), so at a near tie the argmax may flip without any bug. ~ a few units in the
# last place of a logit of magnitude ~20 in the target's dtype.
NEAR_TIE_TOLERANCE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}
QUANTIZED_TOLERANCE = 0.25  # 4/8-bit weights dequantized per forward: as coarse as bfloat16


def near_tie_tolerance(dtype: str | None, quantization: str | None) -> float:
    if quantization and quantization != "none":
        return QUANTIZED_TOLERANCE
    return NEAR_TIE_TOLERANCE.get(str(dtype), NEAR_TIE_TOLERANCE["bfloat16"])


def classify_divergence(record: dict[str, Any], margin: float, tolerance: float) -> None:
    """``divergence_margin`` = the target's top-1 minus top-2 logit after the baseline's tokens up to the first
    divergence; ``divergence_class`` = ``near_tie`` (margin <= tolerance) or ``mismatch`` (a real difference)."""
    record["divergence_margin"] = margin
    record["divergence_tolerance"] = tolerance
    record["divergence_class"] = "near_tie" if margin <= tolerance else "mismatch"


def compare_with_baseline(
    records: list[dict[str, Any]], greedy: bool, reference: list[dict[str, Any]] = ()
) -> None:
    """Fill ``speedup`` / ``matches_baseline`` / ``first_divergence`` from the baseline record of the same prompt
    (among ``records``, else among ``reference``: records of a resumed run)."""
    candidates = [*records, *reference]
    baseline = next((r for r in candidates if r["method"] == "baseline" and r["status"] == "ok"), None)
    if baseline is None:
        return
    for record in records:
        if record["status"] != "ok":
            continue
        if baseline["tokens_per_s"] and record["tokens_per_s"]:
            record["speedup"] = record["tokens_per_s"] / baseline["tokens_per_s"]
        if "answer" in record and "answer" in baseline:
            # lossy methods: is the final answer still the target's? (meaningful even when both are wrong)
            record["answer_matches_baseline"] = record["answer"] is not None and record["answer"] == baseline["answer"]
        if greedy:
            divergence = first_divergence(record["tokens"], baseline["tokens"])
            record["matches_baseline"] = divergence is None
            record["first_divergence"] = divergence
