"""``bench_vs_hf.py``'s rows: each configuration (ours or HF's) as a runner of one prompt, built from the options.

HF's runners are ``target.generate`` (greedy), assisted by the draft with a schedule set on its generation config
(:func:`assistant_schedule`), or with HF's prompt lookup; ours call ``method.generate``. See ``bench_vs_hf.py``
for the rows and what each pairs with.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from harness import Models, Run

from src.decoding import Baseline, DecodingMethod, SamplingConfig, SpecExec, SpeculativeSampling
from src.decoding.drafters import PromptLookup
from src.decoding.eagle import EagleDrafter
from src.decoding.profile import drafter_step_ms
from src.errors import InvalidParameterError

REFERENCE = "HF generate"
ASSISTANT_SCHEDULE = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
SPECEXEC_OPTIONS = ("max_beams", "max_branch_width", "prune_threshold")


@dataclass
class Config:
    method: str
    params: str
    run: Run
    ours: bool
    drafts: bool  # proposes tokens (a draft model or a lookup): draft/call is reported, 0 for a lookup
    pair: str | None = None  # key of the HF row our tok/s is compared with
    head: torch.nn.Module | None = None  # an EAGLE row's head: its forwards count as draft forwards
    draft: Any = None  # a draft-model row's draft: its forwards count as draft forwards

    @property
    def key(self) -> str:
        return f"{self.method} {self.params}".strip()


# ------------------------------------------------------------------------------------------------ runners


def ours_runner(method: DecodingMethod, models: Models, max_new_tokens: int, eos: set[int]) -> Run:
    # A lookup method gets no draft even when other rows loaded one: its draft/call reads 0 by construction.
    draft = models.draft if method.needs_draft else None

    def run(input_ids: torch.Tensor) -> tuple[list[int], float]:
        generation = method.generate(models.target, draft, input_ids, max_new_tokens, SamplingConfig(), eos)
        return generation.tokens, generation.stats.prefill_s + generation.stats.decode_s

    return run


@contextmanager
def assistant_schedule(draft, k: int, threshold: float = 0.0, schedule: str = "constant") -> Iterator[None]:
    """k draft tokens per round (a constant schedule, or HF's heuristic reset at each call), a confidence stop at
    ``threshold`` (0: none); the draft's settings come back after."""
    config = draft.generation_config
    saved = {name: getattr(config, name, None) for name in ASSISTANT_SCHEDULE}
    config.num_assistant_tokens = k
    config.num_assistant_tokens_schedule = "heuristic_transient" if schedule == "heuristic" else "constant"
    config.assistant_confidence_threshold = threshold
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def hf_generate(models: Models, max_new_tokens: int) -> Callable[..., list[int]]:
    """Greedy ``target.generate`` returning the new tokens; assistant / lookup keywords pass through."""
    pad = models.tokenizer.pad_token_id
    if pad is None:
        pad = models.tokenizer.eos_token_id

    def generate(input_ids: torch.Tensor, **assist: Any) -> list[int]:
        output = models.target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad,
            do_sample=False, max_new_tokens=max_new_tokens, **assist,
        )
        return output[0, input_ids.shape[1]:].tolist()

    return generate


def hf_runner(
    models: Models, max_new_tokens: int, k: int | None = None, threshold: float = 0.0, schedule: str = "constant"
) -> Run:
    """HF ``generate``, greedy; with ``k``, assisted by the draft (k tokens per round, see assistant_schedule)."""
    generate = hf_generate(models, max_new_tokens)

    def run(input_ids: torch.Tensor) -> tuple[list[int], None]:
        if k is None:
            return generate(input_ids), None
        with assistant_schedule(models.draft, k, threshold, schedule):
            return generate(input_ids, assistant_model=models.draft), None

    return run


def hf_lookup_runner(models: Models, max_new_tokens: int, k: int, max_ngram: int) -> Run:
    """HF prompt lookup decoding: ``prompt_lookup_num_tokens`` alone selects its
    PromptLookupCandidateGenerator (transformers 5.x, ``_get_candidate_generator``); no assistant model is
    passed, so none can be used."""
    generate = hf_generate(models, max_new_tokens)

    def run(input_ids: torch.Tensor) -> tuple[list[int], None]:
        return generate(input_ids, prompt_lookup_num_tokens=k, max_matching_ngram_size=max_ngram), None

    return run


# ------------------------------------------------------------------------------------------------ EAGLE rows


def eagle_setting(text: str) -> tuple[str, int]:
    """``"artifacts/eagle/head:4"`` -> (head path, k 4)."""
    path, _, k = text.rpartition(":")
    if not path or not k.isdigit() or int(k) < 1:
        raise InvalidParameterError(f"--eagle {text!r} is not HEAD:K with K >= 1 (e.g. artifacts/eagle/head:4)")
    return path, int(k)


def eagle_tree_setting(text: str) -> tuple[str, int, int]:
    """``"artifacts/eagle/head:16:6"`` -> (head path, budget 16, max_depth 6)."""
    rest, _, depth = text.rpartition(":")
    path, _, budget = rest.rpartition(":")
    if not path or not budget.isdigit() or not depth.isdigit() or min(int(budget), int(depth)) < 1:
        raise InvalidParameterError(f"--eagle-tree {text!r} is not HEAD:BUDGET:DEPTH (e.g. artifacts/eagle/head:16:6)")
    return path, int(budget), int(depth)


def specexec_options(args: argparse.Namespace) -> dict[str, Any]:
    """--max-beams / --max-branch-width / --prune-threshold where given (else SpecExec's defaults)."""
    return {name: getattr(args, name) for name in SPECEXEC_OPTIONS if getattr(args, name) is not None}


def eagle_row(method: DecodingMethod, name: str, label: str, args: argparse.Namespace, models: Models,
              eos: set[int]) -> Config:
    """A row drafting with ``method.drafter`` (an EagleDrafter), its head loaded now: a missing head or one for
    another target is refused here, and the head's forwards can be hooked (they count as draft forwards)."""
    method.prepare(models.info["target"], None)
    method.drafter.load(models.target)
    runner = ours_runner(method, models, args.max_new_tokens, eos)
    return Config(name, label, runner, True, True, head=method.drafter.head)


def eagle_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    """Ours speculative sampling with an EAGLE head as the drafter (no HF counterpart)."""
    configs = []
    for text in args.eagle:
        path, k = eagle_setting(text)
        method = SpeculativeSampling(k, drafter=EagleDrafter(path))
        configs.append(eagle_row(method, "ours eagle", f"k={k} head={path}", args, models, eos))
    return configs


def eagle_tree_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    """Ours SpecExec with an EAGLE head growing the tree (EAGLE-2's dynamic tree; no HF counterpart)."""
    configs = []
    for text in args.eagle_tree:
        path, budget, depth = eagle_tree_setting(text)
        method = SpecExec(budget=budget, max_depth=depth, drafter=EagleDrafter(path), **specexec_options(args))
        label = f"budget={budget} depth={depth} head={path}"
        configs.append(eagle_row(method, "ours eagle tree", label, args, models, eos))
    return configs


def eagle_draft_cost(args: argparse.Namespace, models: Models, context: torch.Tensor) -> dict[str, float]:
    """ms per proposed token of each --eagle head (src.decoding.profile.drafter_step_ms: a chain of 8 after
    ``context``, median of 3): what a draft step costs, lm_head rows included."""
    heads = [path for path, _ in map(eagle_setting, args.eagle)]
    heads += [path for path, _, _ in map(eagle_tree_setting, args.eagle_tree)]
    costs = {}
    for text in dict.fromkeys(heads):
        drafter = EagleDrafter(text)
        drafter.prepare(models.info["target"])
        costs[text] = drafter_step_ms(drafter, models.target, context, models.target.config.vocab_size)
    return costs


# ------------------------------------------------------------------------------------------------ all rows


def lookup_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    """Ours prompt lookup (a chain) next to HF's with the same N and G, then our lookup trees (no HF twin)."""
    n, min_ngram = args.max_new_tokens, args.min_ngram
    # HF's min n-gram is 1: any other value shows in our params, and the row has no HF twin (not like-for-like).
    suffix = f" min_ngram={min_ngram}" if min_ngram != 1 else ""
    configs = []
    for k, max_ngram, row_min in args.lookup:
        row_min = min_ngram if row_min is None else row_min
        label = f"k={k} max_ngram={max_ngram}"
        hf = Config("HF prompt lookup", label, hf_lookup_runner(models, n, k, max_ngram), False, True)
        ours = SpeculativeSampling(k, drafter=PromptLookup(max_ngram=max_ngram, min_ngram=row_min))
        runner = ours_runner(ours, models, n, eos)
        if row_min == 1:
            configs += [Config("ours prompt lookup", label, runner, True, True, hf.key), hf]
        else:
            configs.append(Config("ours prompt lookup", f"{label} min_ngram={row_min}", runner, True, True))
    for budget, depth, max_ngram in args.lookup_tree:
        drafter = PromptLookup(max_ngram=max_ngram, min_ngram=min_ngram, max_branches=args.lookup_branches)
        method = SpecExec(budget=budget, max_depth=depth, drafter=drafter)
        label = f"budget={budget} depth={depth} max_ngram={max_ngram} branches={args.lookup_branches}{suffix}"
        configs.append(Config("ours lookup tree", label, ours_runner(method, models, n, eos), True, True))
    return configs


def specexec_method(shape: tuple[int, int], args: argparse.Namespace) -> tuple[SpecExec, str]:
    budget, depth = shape
    options = specexec_options(args)
    label = " ".join([f"budget={budget} depth={depth}", *(f"{n}={v}" for n, v in options.items())])
    return SpecExec(budget=budget, max_depth=depth, **options), label


def draft_configs(args: argparse.Namespace, models: Models, eos: set[int], label: str = "") -> list[Config]:
    """The rows with a draft model (``models.draft``): ours speculative next to HF assisted with the same draft
    (``--ks``, ``--assist``), ours SpecExec; ``label`` (e.g. ``draft=int8``) ends each row's params."""
    n, draft = args.max_new_tokens, models.draft

    def row(method: str, params: str, run: Run, ours: bool, pair: str | None = None) -> Config:
        return Config(method, f"{params} {label}".strip(), run, ours, True, pair, draft=draft)

    configs = []
    for k in args.ks:
        hf = row("HF assisted", f"k={k}", hf_runner(models, n, k), False)
        configs += [row("ours speculative", f"k={k}", ours_runner(SpeculativeSampling(k), models, n, eos), True,
                        hf.key), hf]
    for k, threshold, schedule in args.assist:
        params = f"k={k} threshold={threshold}" + (" heuristic" if schedule == "heuristic" else "")
        hf = row("HF assisted", params, hf_runner(models, n, k, threshold, schedule), False)
        # HF's heuristic schedule has no ceiling: ours gets one no generation can reach.
        ours = SpeculativeSampling(k, schedule=schedule, max_k=max(k, n), confidence_threshold=threshold)
        configs += [row("ours speculative", params, ours_runner(ours, models, n, eos), True, hf.key), hf]
    for shape in args.specexec:
        method, params = specexec_method(shape, args)
        configs.append(row("ours specexec", params, ours_runner(method, models, n, eos), True))
    return configs


def build_configs(args: argparse.Namespace, models: Models, eos: set[int]) -> list[Config]:
    """Every row; the draft-model rows once per loaded draft (``models.drafts``), each given its own draft (ours
    and HF assisted alike), labelled ``draft=KIND`` when there are several."""
    n = args.max_new_tokens
    configs = [
        Config("ours baseline", "", ours_runner(Baseline(), models, n, eos), True, False, pair=REFERENCE),
        Config(REFERENCE, "", hf_runner(models, n), False, False),
    ]
    several = len(models.drafts) > 1
    for kind in models.drafts:
        configs += draft_configs(args, models.with_draft(kind), eos, f"draft={kind}" if several else "")
    return unique(configs + lookup_configs(args, models, eos) + eagle_configs(args, models, eos)
                  + eagle_tree_configs(args, models, eos))


def unique(configs: list[Config]) -> list[Config]:
    """A setting given twice would share one key and mix its records: keep its first row only."""
    by_key: dict[str, Config] = {}
    for config in configs:
        by_key.setdefault(config.key, config)
    return list(by_key.values())
