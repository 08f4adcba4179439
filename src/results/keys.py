"""Method keys and recorded parameters: how a configured method is named and described in its records.

A decoding method reports plain facts: its family (``method.name``: ``speculative``), the drafter it uses
(``method.drafter_name``: ``draft_model``, ``prompt_lookup``, ``eagle``, or None) and every parameter that shapes
its output (``method.params()``, defaults included). What a record carries is decided here, once:

- the key: the family, ``+<drafter>`` unless the drafter is the draft model (``speculative``,
  ``speculative+prompt_lookup``), then ``[name=value,...]`` of the parameters that tell apart several
  configurations of one family in the same run (``autojudge[threshold=0.5]``);
- the recorded parameters: every parameter, except those that the first results files did not record and that
  still hold the value those runs used (:data:`UNRECORDED_DEFAULTS`). A configuration written before a parameter
  existed therefore keeps its method key, params and run fingerprint, and ``--resume true`` continues its file.

No torch: this module reads names and dictionaries only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DRAFT_MODEL = "draft_model"  # the drafter a method uses unless told otherwise: it adds nothing to the key

# family or drafter -> {parameter: the value the first results files implied by leaving it out}
UNRECORDED_DEFAULTS: dict[str, dict[str, Any]] = {
    "speculative": {"schedule": "constant", "confidence_threshold": 0.0, "drafter": DRAFT_MODEL},
    "specexec": {"scoring_temperature": None, "drafter": DRAFT_MODEL},
    DRAFT_MODEL: {"top_tokens": None, "token_map": None},  # a full-vocabulary draft model
    "prompt_lookup": {"max_branches": 1},
}
# parameter -> (the parameter it depends on, the value at which it does nothing and is not recorded)
IDLE_WHEN: dict[str, dict[str, tuple[str, Any]]] = {
    "speculative": {"max_k": ("schedule", "constant")},  # max_k bounds the heuristic schedule only
}


def method_name(family: str, drafter: str | None) -> str:
    """``speculative`` with the draft model, ``speculative+prompt_lookup`` with another drafter."""
    return family if drafter in (None, DRAFT_MODEL) else f"{family}+{drafter}"


def recorded_params(family: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the parameters older records left out (:data:`UNRECORDED_DEFAULTS`), order kept."""
    defaults = {**UNRECORDED_DEFAULTS.get(str(params.get("drafter", DRAFT_MODEL)), {}),
                **UNRECORDED_DEFAULTS.get(family, {})}
    idle = IDLE_WHEN.get(family, {})
    kept = {}
    for key, value in params.items():
        if key in defaults and value == defaults[key] and type(value) is type(defaults[key]):
            continue
        if key in idle and params.get(idle[key][0]) == idle[key][1]:
            continue
        kept[key] = value
    return kept


def describe(method: Any) -> tuple[str, dict[str, Any]]:
    """(name, recorded params) of a decoding method, read by its attributes (``name``, ``drafter_name``,
    ``params()``): what :func:`method_keys` takes."""
    return method_name(method.name, method.drafter_name), recorded_params(method.name, method.params())


def method_keys(methods: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The key of each (name, recorded params): the name alone when it is unique in the run, else the name and
    the parameters whose values differ between the configurations of that name (all of them if none differ)."""
    names = [name for name, _ in methods]
    keys = []
    for name, params in methods:
        if names.count(name) == 1:
            keys.append(name)
            continue
        siblings = [p for n, p in methods if n == name]
        varying = [k for k in params if len({repr(p.get(k)) for p in siblings}) > 1] or list(params)
        keys.append(name + "[" + ",".join(f"{k}={params[k]}" for k in varying) + "]")
    return keys
